"""torch.compile over the static latent cache: fullgraph decode, no recompiles, the same tokens as eager.

Graphs are counted with a counting backend (torch's CompileCounterWithBackend around the "eager" backend: dynamo's
tracing, guards and recompiles are all real, only the code generation is skipped, which keeps a CPU test in seconds).
`fullgraph=True` turns any graph break into an error, so every compiled generate below is also the proof that the
absorbed MLA path, the router (group-limited top-k with the bias) and the grouped experts trace without one. The
benchmark (benchmarks/decode_compile.py) runs the same steps under inductor and checks its tokens too.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import CompileConfig, DynamicCache
from transformers.generation.utils import GenerateDecoderOnlyOutput

from conftest import random_ids, tiny_model
from modeling_deepseek.cache import DeepseekStaticLatentCache
from modeling_deepseek.compat import compile_on_any_device
from test_generation import (ALL_OUTPUTS, GREEDY, assert_same_generate_outputs, assert_well_separated, left_padded,
                             reference_greedy)

NEW, CACHE_LEN = 10, 24  # max_cache_len fixed across calls: the same shapes every time


def counting_backend():
    """A backend that counts the graphs it is handed. A plain function around the counter, because
    CompileConfig.to_dict deep-copies its backend (a counter object would be copied and count elsewhere)."""
    counter = CompileCounterWithBackend("eager")

    def backend(gm, example_inputs, **kwargs):
        return counter(gm, example_inputs)

    backend.counter = counter
    return backend


@pytest.fixture(scope="module")
def model():
    """Two decoder layers (dense, MoE) and the MTP module: every kind of block, half the tracing of conftest's three."""
    m = tiny_model(seed=0, num_hidden_layers=2).eval()
    assert m.model.layers[1].moe is not None and m.config._experts_implementation == "grouped_mm"
    return m


@pytest.fixture(scope="module")
def batch():
    return left_padded(2, pads=(0, 3))


@pytest.fixture(scope="module")
def reference(model, batch):
    expected, logits = reference_greedy(model, *batch, max_new_tokens=NEW)
    assert_well_separated(logits)
    return expected


@pytest.fixture(scope="module")
def compiled(model):
    """The same weights with `forward = torch.compile(forward, fullgraph=True)`."""
    import copy

    torch._dynamo.reset()
    m = copy.deepcopy(model)
    backend = counting_backend()
    m.forward = torch.compile(m.forward, fullgraph=True, backend=backend)
    yield m, backend.counter
    torch._dynamo.reset()


def test_static_decode_takes_the_absorbed_path(model):
    attn = model.model.layers[0].self_attn
    assert attn.use_absorbed(1, CACHE_LEN) and not attn.use_absorbed(CACHE_LEN, CACHE_LEN)


def test_compiled_decode_adds_no_graph_as_max_new_tokens_grows(compiled, batch, reference):
    m, counter = compiled
    ids, mask = batch
    short = m.generate(ids, attention_mask=mask, max_new_tokens=3, cache_implementation="static",
                       max_cache_len=CACHE_LEN, **GREEDY)
    assert torch.equal(short, reference[:, : ids.shape[1] + 3])
    graphs = counter.frame_count
    assert graphs == 2, f"expected one graph for the prefill and one for every decode step, got {graphs}"
    long = m.generate(ids, attention_mask=mask, max_new_tokens=NEW, cache_implementation="static",
                      max_cache_len=CACHE_LEN, **GREEDY)
    assert torch.equal(long, reference)
    assert counter.frame_count == graphs, "decoding more tokens compiled new graphs"


def test_compiled_static_sampling_and_fp8_match_eager(compiled, model, batch):
    """Sampling with a seed, and the FP8 latent cache, give under the compiled forward exactly what eager gives."""
    m, counter = compiled
    ids, mask = batch
    sampling = dict(attention_mask=mask, max_new_tokens=NEW, cache_implementation="static", max_cache_len=CACHE_LEN,
                    do_sample=True, top_k=20, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(7)
    expected = model.generate(ids, **sampling)
    torch.manual_seed(7)
    assert torch.equal(m.generate(ids, **sampling), expected)
    fp8 = dict(attention_mask=mask, max_new_tokens=NEW, cache_implementation="static", max_cache_len=CACHE_LEN,
               latent_cache_dtype="fp8", **GREEDY)
    expected = model.generate(ids, **fp8)
    assert not torch.equal(expected, model.generate(ids, **dict(fp8, latent_cache_dtype=None)))  # FP8 shows
    assert torch.equal(m.generate(ids, **fp8), expected)
    graphs = counter.frame_count
    assert torch.equal(m.generate(ids, **dict(fp8, max_new_tokens=NEW - 4)), expected[:, :-4])
    assert counter.frame_count == graphs


def test_manual_decode_loop_over_a_static_cache_compiles_once(compiled, model):
    """A hand-written loop: prefill, then one token per compiled call; one graph for all the single-token steps."""
    m, counter = compiled
    prompt = random_ids(1, 6, seed=9)
    expected, _ = reference_greedy(model, prompt, max_new_tokens=6)
    cache = DeepseekStaticLatentCache(m.config, max_cache_len=16)
    cache.early_initialization(1, torch.float32, "cpu")
    seq = prompt
    with torch.no_grad():
        out = m(prompt, cache=cache, use_cache=True)
        for step in range(6):
            seq = torch.cat([seq, out.logits[:, -1].argmax(-1, keepdim=True)], 1)
            if step == 1:
                graphs = counter.frame_count
            if step < 5:
                out = m(seq[:, -1:], cache=cache, use_cache=True)
    assert torch.equal(seq, expected)
    assert counter.frame_count == graphs
    assert int(cache.get_seq_length()) == 11


def test_generate_compile_config_compiles_the_decode_step(model, batch, reference):
    """transformers' own path: generate(cache_implementation="static", compile_config=...) compiles the decode step
    (fullgraph) itself; more tokens, no new graph."""
    backend = counting_backend()
    config = compile_on_any_device(CompileConfig(backend=backend, fullgraph=True, mode=None))
    kwargs = dict(attention_mask=batch[1], cache_implementation="static", max_cache_len=CACHE_LEN,
                  compile_config=config, **GREEDY)
    torch._dynamo.reset()
    try:
        assert torch.equal(model.generate(batch[0], max_new_tokens=3, **kwargs), reference[:, :-(NEW - 3)])
        graphs = backend.counter.frame_count
        assert graphs >= 1, "generate did not compile"
        assert torch.equal(model.generate(batch[0], max_new_tokens=NEW, **kwargs), reference)
        assert backend.counter.frame_count == graphs
    finally:
        vars(model).pop("_compiled_call", None)
        torch._dynamo.reset()


def test_generate_compile_model_forward_fullgraph(model):
    """As transformers' test_generate_compile_model_forward_fullgraph: with eager decoding the default cache is a
    DynamicCache and nothing compiles; with cache_implementation="static" and a fullgraph, static-shape compile_config
    generate() compiles its forward, the cache is compileable, two batches of the same shape compile once, and the
    outputs are eager's."""
    import copy

    m = copy.deepcopy(model)
    ids = random_ids(4, 7, seed=21)
    batches = (ids[:2], ids[2:])
    backend = counting_backend()
    config = compile_on_any_device(CompileConfig(backend=backend, fullgraph=True, dynamic=False, mode=None))
    kwargs = dict(use_cache=True, max_new_tokens=5, return_dict_in_generate=True, output_scores=True,
                  compile_config=config, **GREEDY)
    torch._dynamo.reset()
    try:
        with torch.compiler.set_stance("force_eager"):
            eager = [m.generate(x, **kwargs) for x in batches]
        for out in eager:
            assert isinstance(out.past_key_values, DynamicCache) and not out.past_key_values.is_compileable
        assert not hasattr(m, "_compiled_call"), "generate compiled over the default (dynamic) cache"
        compiled = [m.generate(batches[0], cache_implementation="static", **kwargs)]
        graphs = backend.counter.frame_count
        compiled.append(m.generate(batches[1], cache_implementation="static", **kwargs))
        assert hasattr(m, "_compiled_call") and graphs >= 1, "generate did not compile"
        assert backend.counter.frame_count == graphs, "the second batch recompiled"
        for out, reference in zip(compiled, eager, strict=True):
            assert not isinstance(out.past_key_values, DynamicCache) and out.past_key_values.is_compileable
            assert torch.equal(out.sequences, reference.sequences)
            torch.testing.assert_close(torch.stack(out.scores), torch.stack(reference.scores))
    finally:
        torch._dynamo.reset()


def test_generate_compilation_all_outputs(model):
    """As transformers' test_generate_compilation_all_outputs: a model whose generation config holds a compile_config
    and cache_implementation="static" compiles generate()'s forward, and every optional output (scores, logits,
    attentions, hidden states) comes back for every new token, equal to the default cache's eager outputs."""
    import copy

    m = copy.deepcopy(model)
    m.set_attn_implementation("eager")
    ids = random_ids(2, 7, seed=22)  # no padding: hidden states at padded positions are meaningless, and differ
    kwargs = dict(num_beams=1, max_new_tokens=NEW, min_new_tokens=NEW, use_cache=True, **ALL_OUTPUTS, **GREEDY)
    eager = m.generate(ids, **kwargs)
    backend = counting_backend()
    m.generation_config.compile_config = compile_on_any_device(CompileConfig(backend=backend, mode=None))
    m.generation_config.cache_implementation = "static"
    torch._dynamo.reset()
    try:
        out = m.generate(ids, **kwargs)
        assert hasattr(m, "_compiled_call") and backend.counter.frame_count >= 1, "generate did not compile"
    finally:
        torch._dynamo.reset()
    assert isinstance(out, GenerateDecoderOnlyOutput)
    assert out.sequences.shape[1] == ids.shape[1] + NEW
    layers = m.config.num_hidden_layers
    assert len(out.scores) == len(out.logits) == len(out.attentions) == len(out.hidden_states) == NEW
    assert all(len(step) == layers for step in out.attentions)
    assert all(len(step) == layers + 1 for step in out.hidden_states)  # the embeddings, then every layer
    assert_same_generate_outputs(out, eager)


def test_compiled_training_step_matches_eager(tmp_path):
    """Trainer(torch_compile=True) with the grouped experts: the same losses as eager, step by step."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    ids = random_ids(8, 16, seed=1).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    losses = {}
    torch._dynamo.reset()
    for compiled in (False, True):
        m = tiny_model(seed=0, train=True, num_hidden_layers=2)
        assert m.config._experts_implementation == "grouped_mm"
        args = TrainingArguments(
            output_dir=str(tmp_path / str(compiled)), per_device_train_batch_size=2, learning_rate=1e-3,
            logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0, data_seed=0,
            max_steps=3, torch_compile=compiled, torch_compile_backend="eager" if compiled else None)
        trainer = Trainer(model=m, args=args, train_dataset=data)
        trainer.train()
        losses[compiled] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        if compiled:  # accelerate wrapped the model in torch.compile's OptimizedModule
            assert getattr(trainer.model_wrapped, "_orig_mod", None) is m, "Trainer did not compile the model"
    torch._dynamo.reset()
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    assert losses[False][0] != losses[False][-1]  # the weights really moved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs (mode='reduce-overhead') need a CUDA device")
def test_reduce_overhead_cuda_graphs_decode_matches_eager(model, batch):
    """On CUDA, the decode step captured in CUDA graphs (inductor, mode="reduce-overhead") gives eager's tokens."""
    import copy

    m = copy.deepcopy(model).cuda()
    ids, mask = (t.cuda() for t in batch)
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, cache_implementation="static", max_cache_len=CACHE_LEN,
                  **GREEDY)
    expected = m.generate(ids, **kwargs)
    torch._dynamo.reset()
    try:
        config = CompileConfig(fullgraph=True, mode="reduce-overhead")
        for _ in range(2):  # warm-up / recording, then replay
            got = m.generate(ids, compile_config=config, **kwargs)
        assert torch.equal(got, expected)
    finally:
        torch._dynamo.reset()
