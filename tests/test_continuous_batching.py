"""Continuous batching (transformers' paged engine: generate_batch, the manager) over our paged latent cache.

Every request must get exactly the tokens greedy `generate()` gives its prompt alone (which test_generation.py checks
against a no-cache reference): prompts of different lengths, prefill split into chunks, requests arriving while
others decode, EOS and max_new_tokens per request. Decode runs absorbed over the cached latent rows (no kv_b_proj per
cached token), the cache holds kv_lora_rank + qk_rope_head_dim values per token and layer, and what the engine cannot
do raises instead of returning empty outputs. transformers' own DeepseekV3 on the same weights gives the same tokens.
With latent_cache_dtype="fp8" the rows are e4m3 with per-token scales (paged_fp8.py), and each request gets the tokens
of generate(latent_cache_dtype="fp8") with its prompt split where the engine split it.

transformers < 5.25 has no MLA layout in its paged cache: there the tests skip, and one checks the error.
"""

from __future__ import annotations

import time

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from conftest import hf_v3_model, random_ids, save_and_load_ours, set_mla_impl, tiny_model
from modeling_deepseek import continuous_batching
from modeling_deepseek.attention import DeepseekAttention
from modeling_deepseek.compat import MLA_PAGED_CACHE, PAGED_CACHE_MIN_VERSION

needs_mla_paged_cache = pytest.mark.skipif(
    not MLA_PAGED_CACHE, reason=f"continuous batching of MLA needs transformers >= {PAGED_CACHE_MIN_VERSION}")

LENGTHS = (3, 9, 17, 40, 70)
NEW = 10
MARGIN = 2e-4
# Small pages and batches: prompts span several pages, and the 70-token prompt is prefilled in chunks.
SMALL = dict(page_size=16, max_batch_tokens=32)


def greedy(**overrides) -> GenerationConfig:
    return GenerationConfig(**{**dict(do_sample=False, max_new_tokens=NEW, eos_token_id=None, pad_token_id=0),
                               **overrides})


def cb_config(**overrides) -> ContinuousBatchingConfig:
    return ContinuousBatchingConfig(**{**SMALL, **overrides})


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0).eval()


@pytest.fixture(scope="module")
def prompts():
    return [random_ids(1, n, seed=n)[0].tolist() for n in LENGTHS]


@torch.no_grad()
def alone(model, prompt: list[int], max_new_tokens: int = NEW, eos_token_id=None, **generate_kwargs) -> list[int]:
    """generate()'s greedy continuation of one prompt alone, cut after EOS; asserts no near-tie along the way."""
    config = greedy(max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)
    out = model.generate(torch.tensor([prompt], device=model.device), generation_config=config, output_scores=True,
                         return_dict_in_generate=True, **generate_kwargs)
    top2 = torch.stack(out.scores).float().topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() > MARGIN, "near-tie in the fixture: pick another seed"
    tokens = out.sequences[0, len(prompt):].tolist()
    return tokens[: tokens.index(eos_token_id) + 1] if eos_token_id in tokens else tokens


@pytest.fixture(scope="module")
def expected(model, prompts):
    return [alone(model, p) for p in prompts]


def tokens_of(results) -> list[list[int]]:
    return [out.generated_tokens for out in results.values()]


# ---------------------------------------------------------------------------------------------------------------------
# Same tokens as generate()


@needs_mla_paged_cache
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mla_impl", ["auto", "absorbed", "expanded"])
def test_generate_batch_matches_generate_alone(model, prompts, expected, attn, mla_impl):
    model.set_attn_implementation(attn)
    set_mla_impl(model, mla_impl)
    try:
        results = model.generate_batch(prompts, generation_config=greedy(), continuous_batching_config=cb_config())
    finally:
        model.set_attn_implementation("sdpa")
        set_mla_impl(model, "auto")
    assert list(results) == [f"req_{i}" for i in range(len(prompts))]
    assert [out.prompt_ids for out in results.values()] == prompts
    assert tokens_of(results) == expected


@needs_mla_paged_cache
def test_shared_prefix_blocks_and_forked_requests(model, prompts, expected, monkeypatch):
    """Repeated prompts reuse each other's full cache pages (prefix sharing: their prefill starts after a cached
    prefix), and num_return_sequences forks a request's cache (sampling with top_k=1: greedy, which allows forks):
    every copy still gets generate()'s tokens."""
    from transformers.generation.continuous_batching import PagedAttentionCache

    matched, search = [], PagedAttentionCache.search_prefix_match
    monkeypatch.setattr(PagedAttentionCache, "search_prefix_match",
                        lambda self, *a: matched.append(search(self, *a)) or matched[-1])
    repeated = [prompts[4], prompts[3], prompts[4], prompts[4]]
    results = model.generate_batch(repeated, generation_config=greedy(), continuous_batching_config=cb_config())
    assert tokens_of(results) == [expected[4], expected[3], expected[4], expected[4]]
    assert max(matched) >= 16, f"no cached prefix was reused: {matched}"
    forked = model.generate_batch(prompts[3:], continuous_batching_config=cb_config(),
                                  generation_config=greedy(do_sample=True, top_k=1, num_return_sequences=3))
    assert len(forked) == 6 and tokens_of(forked) == [expected[3]] * 3 + [expected[4]] * 3


@needs_mla_paged_cache
def test_decode_is_absorbed_and_batched_prefill_chunks_expanded(model, prompts, expected, monkeypatch):
    """With mla_impl="auto": decode tokens of several requests go through one padded absorbed call; prefill chunks
    (queries after a cached prefix among them) through the expanded path; kv_b_proj never sees a decode step."""
    calls = {"batched_decode": [], "expanded": []}
    batched, expanded = continuous_batching._batched_decode, DeepseekAttention.expanded_attention

    def spy_batched(attn, q_nope, *args):
        calls["batched_decode"].append(len(args[-2]))
        return batched(attn, q_nope, *args)

    def spy_expanded(self, q_nope, q_rope, latent, *args, **kwargs):
        calls["expanded"].append((q_nope.shape[2], latent.shape[2]))
        return expanded(self, q_nope, q_rope, latent, *args, **kwargs)

    monkeypatch.setattr(continuous_batching, "_batched_decode", spy_batched)
    monkeypatch.setattr(DeepseekAttention, "expanded_attention", spy_expanded)
    results = model.generate_batch(prompts, generation_config=greedy(), continuous_batching_config=cb_config())
    assert tokens_of(results) == expected
    assert max(calls["batched_decode"]) > 1, "decode tokens were never batched"
    assert all(T > 1 for T, _ in calls["expanded"]), "a decode token was attended through the expanded path"
    assert any(T < S for T, S in calls["expanded"]), "no prefill chunk after a cached prefix"


@needs_mla_paged_cache
def test_decode_steps_never_run_kv_b_proj(model, prompts):
    """Rows through kv_b_proj (the per-head K/V rebuild) are the same for 1 and for 12 generated tokens: decode
    reads the latent rows as they are cached, it never re-expands them."""
    rows = []
    hooks = [m.self_attn.kv_b_proj.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[:-1].numel()))
             for m in model.model.layers[: model.config.num_hidden_layers]]
    one_step = ContinuousBatchingConfig(page_size=16, max_batch_tokens=256)  # every prompt prefilled in one step
    try:
        model.generate_batch(prompts, generation_config=greedy(max_new_tokens=1), continuous_batching_config=one_step)
        prefill_rows, rows[:] = sum(rows), []
        model.generate_batch(prompts, generation_config=greedy(max_new_tokens=12), continuous_batching_config=one_step)
    finally:
        for h in hooks:
            h.remove()
    assert prefill_rows > 0 and sum(rows) == prefill_rows


@needs_mla_paged_cache
def test_paged_cache_holds_the_latent_row_per_token(model, prompts):
    manager = model.init_continuous_batching(generation_config=greedy(), continuous_batching_config=cb_config())
    try:
        manager.warmup()  # builds the paged cache
        cache = manager.batch_processor.cache
        (allocator,) = cache.cache_allocators.values()
        c = model.config
        assert type(allocator).__name__ == "MLACacheAllocator"
        assert allocator.row_numel == c.kv_lora_rank + c.qk_rope_head_dim == c.latent_cache_dim
        assert allocator.bytes_per_page == allocator.tokens_per_page * c.latent_cache_dim * 4  # fp32, no heads
    finally:
        manager.stop(block=True)
        manager.destroy()


@needs_mla_paged_cache
def test_eos_and_max_new_tokens_per_request(model, prompts, expected):
    """EOS (a token that request 2 emits at its 4th step) ends the requests that emit it, and only them; a manager
    takes max_new_tokens per request, and requests added while others decode get their own greedy tokens."""
    eos = expected[2][3]
    with_eos = [alone(model, p, eos_token_id=eos) for p in prompts]
    assert len(with_eos[2]) == 4 and any(len(t) == NEW for t in with_eos)
    results = model.generate_batch(prompts, generation_config=greedy(eos_token_id=eos),
                                   continuous_batching_config=cb_config())
    assert tokens_of(results) == with_eos

    budgets = [12, 3, 7, 1, 5]
    manager = model.init_continuous_batching(generation_config=greedy(), continuous_batching_config=cb_config())
    manager.start()
    try:
        first = manager.add_request(prompts[4], max_new_tokens=budgets[4], streaming=True)
        while not (out := manager.get_result(request_id=first, timeout=5)).generated_tokens:
            pass  # wait until the first request is decoding
        assert not out.is_finished()
        later = [manager.add_request(p, max_new_tokens=n) for p, n in zip(prompts[:4], budgets[:4])]
        got, deadline = {}, time.monotonic() + 120
        while len(got) < 5 and time.monotonic() < deadline:
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                assert result.error is None, result.error
                got[result.request_id] = result.generated_tokens
    finally:
        manager.stop(block=True)
        manager.destroy()
    for request_id, prompt, n in zip([*later, first], prompts, budgets):
        assert got[request_id] == alone(model, prompt, max_new_tokens=n)


@needs_mla_paged_cache
def test_same_tokens_as_transformers_deepseek_v3_generate_batch(tmp_path, prompts):
    hf = hf_v3_model()
    ours = save_and_load_ours(hf, tmp_path)
    theirs = hf.generate_batch(prompts, generation_config=greedy(), continuous_batching_config=cb_config())
    assert all(out.error is None for out in theirs.values())
    assert tokens_of(ours.generate_batch(prompts, generation_config=greedy(),
                                         continuous_batching_config=cb_config())) == tokens_of(theirs)


@needs_mla_paged_cache
def test_sampling_runs_and_uses_its_settings(model, prompts):
    results = model.generate_batch(prompts, generation_config=greedy(do_sample=True, temperature=5.0, top_k=0),
                                   continuous_batching_config=cb_config(seed=3))
    assert all(len(t) == NEW for t in tokens_of(results))
    assert tokens_of(results) != [alone(model, p) for p in prompts]


# ---------------------------------------------------------------------------------------------------------------------
# The FP8 latent (paged_fp8.py): e4m3 rows with per-token scales, generate(latent_cache_dtype="fp8")'s tokens

ONE_STEP = dict(page_size=16, max_batch_tokens=256)  # every prompt of the fixture prefilled in one step


def fp8_alone(model, prompt, **kwargs) -> list[int]:
    return alone(model, prompt, latent_cache_dtype="fp8", **kwargs)


@pytest.fixture(scope="module")
def expected_fp8(model, prompts, expected):
    tokens = [fp8_alone(model, p) for p in prompts]
    assert tokens != expected, "fixture: the FP8 latent changes no token, a batch ignoring it would pass"
    return tokens


@needs_mla_paged_cache
@pytest.mark.parametrize("how", ["kwarg", "generation_config", "model_config"])
def test_fp8_latent_gives_generate_fp8_tokens(model, prompts, expected_fp8, how):
    """Prompts prefilled in one step each (arriving together, and while others decode) get exactly the tokens of
    generate(latent_cache_dtype="fp8") alone; forked copies those of the same prompt split before its last token."""
    gc, kwargs = greedy(), {}
    if how == "kwarg":
        kwargs["latent_cache_dtype"] = "fp8"
    elif how == "generation_config":
        gc.latent_cache_dtype = "fp8"
    else:
        model.config.latent_cache_dtype = "fp8"
    try:
        results = model.generate_batch(prompts, generation_config=gc, continuous_batching_config=cb_config(**ONE_STEP),
                                       **kwargs)
        assert tokens_of(results) == expected_fp8
        if how != "model_config":
            return
        # A request to fork is prefilled up to its last prompt token, which each copy then runs on its own.
        forked = model.generate_batch(prompts[3:], continuous_batching_config=cb_config(**ONE_STEP),
                                      generation_config=greedy(do_sample=True, top_k=1, num_return_sequences=3))
        assert tokens_of(forked) == [fp8_alone(model, p, prefill_chunk_size=len(p) - 1) for p in prompts[3:]
                                     for _ in range(3)]
        manager = model.init_continuous_batching(generation_config=greedy(),
                                                 continuous_batching_config=cb_config(**ONE_STEP))
        manager.start()
        try:
            first = manager.add_request(prompts[4], max_new_tokens=NEW, streaming=True)
            while not manager.get_result(request_id=first, timeout=5).generated_tokens:
                pass  # the first request is decoding
            later = manager.add_requests(prompts[:4], max_new_tokens=NEW)
            got = {}
            while len(got) < 5:
                result = manager.get_result(timeout=30)
                assert result is not None, "no result within 30 s"
                if result.is_finished():
                    assert result.error is None, result.error
                    got[result.request_id] = result.generated_tokens
        finally:
            manager.stop(block=True)
            manager.destroy()
        assert [got[r] for r in [*later, first]] == expected_fp8
    finally:
        model.config.latent_cache_dtype = None


@needs_mla_paged_cache
def test_fp8_latent_chunked_prefill_and_shared_prefix_read_the_e4m3_copy(model, prompts, expected_fp8, monkeypatch):
    """A prompt prefilled in chunks, or after a prefix cached by an earlier request, attends to that part in e4m3:
    its tokens are generate(latent_cache_dtype="fp8", prefill_chunk_size=...)'s, split at the same places."""
    from transformers.generation.continuous_batching import PagedAttentionCache

    long_prompt = prompts[4]  # 70 tokens
    chunked = fp8_alone(model, long_prompt, prefill_chunk_size=32)
    assert chunked != expected_fp8[4], "fixture: chunking changes no token"
    results = model.generate_batch([long_prompt], generation_config=greedy(latent_cache_dtype="fp8"),
                                   continuous_batching_config=cb_config(page_size=16, max_batch_tokens=32))
    assert tokens_of(results) == [chunked]

    matched, search = [], PagedAttentionCache.search_prefix_match
    monkeypatch.setattr(PagedAttentionCache, "search_prefix_match",
                        lambda self, *a: matched.append(search(self, *a)) or matched[-1])
    manager = model.init_continuous_batching(generation_config=greedy(latent_cache_dtype="fp8"),
                                             continuous_batching_config=cb_config(**ONE_STEP))
    manager.start()
    try:
        got = []
        for _ in range(2):  # the second request starts after the first one's cached pages
            request_id = manager.add_request(long_prompt, max_new_tokens=NEW)
            while not (result := manager.get_result(request_id=request_id, timeout=30)).is_finished():
                pass
            assert result.error is None, result.error
            got.append(result.generated_tokens)
    finally:
        manager.stop(block=True)
        manager.destroy()
    assert matched[0] == 0 and matched[1] == 64, matched
    assert got == [expected_fp8[4], fp8_alone(model, long_prompt, prefill_chunk_size=64)]


@needs_mla_paged_cache
@pytest.mark.parametrize("latent_cache_dtype", [None, "fp8"])
def test_requests_offloaded_under_memory_pressure_keep_their_tokens(model, prompts, expected, expected_fp8,
                                                                   latent_cache_dtype, monkeypatch):
    """A cache of 6 pages of 16 tokens cannot hold the 5 requests at once: the engine moves some to CPU memory and
    back (their rows copied as bytes, e4m3 and scales alike), and every request still gets generate()'s tokens."""
    from transformers.generation.continuous_batching.offloading_manager import OffloadingManager

    offloads, offload = [], OffloadingManager._offload_to_cpu
    monkeypatch.setattr(OffloadingManager, "_offload_to_cpu", lambda self, *a: offloads.append(1) or offload(self, *a))
    results = model.generate_batch(prompts, generation_config=greedy(), latent_cache_dtype=latent_cache_dtype,
                                   continuous_batching_config=cb_config(**{**ONE_STEP, "num_blocks": 6}))
    assert offloads, "no request was offloaded: the cache was not under pressure"
    assert tokens_of(results) == (expected_fp8 if latent_cache_dtype == "fp8" else expected)


@needs_mla_paged_cache
def test_fp8_paged_cache_rows_hold_e4m3_and_two_scales(model, prompts):
    """C + R e4m3 bytes and two fp32 scales per token and layer (584 bytes for V3's 512 + 64, against 2,304 in fp32):
    the cache of the same num_blocks takes that share of the memory."""
    from modeling_deepseek.paged_fp8 import FP8LatentAllocator

    c, caches = model.config, {}
    for dtype in ("fp8", None):
        manager = model.init_continuous_batching(generation_config=greedy(latent_cache_dtype=dtype),
                                                 continuous_batching_config=cb_config(num_blocks=8))
        try:
            manager.warmup()
            caches[dtype] = manager.batch_processor.cache
        finally:
            manager.destroy()
    (allocator,) = caches["fp8"].cache_allocators.values()
    row_bytes = -(-c.latent_cache_dim // 4) * 4 + 8
    assert type(allocator) is FP8LatentAllocator and allocator.row_bytes == row_bytes
    assert allocator.bytes_per_page == allocator.tokens_per_page * row_bytes
    (plain,) = caches[None].cache_allocators.values()
    assert plain.bytes_per_page == plain.tokens_per_page * c.latent_cache_dim * 4
    assert caches["fp8"].num_blocks >= 8 and caches[None].num_blocks >= 8
    fp8_bytes, plain_bytes = (caches[d].cache_tensor.numel() / caches[d].num_blocks for d in ("fp8", None))
    assert fp8_bytes / plain_bytes == pytest.approx(row_bytes / (4 * c.latent_cache_dim), rel=0.2)


@needs_mla_paged_cache
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp8_latent_on_cuda_gives_generate_fp8_tokens(prompts):
    """The same rows on a GPU (torch's e4m3 cast there, byte copies into the paged cache on the device)."""
    model = tiny_model(seed=0).eval().to("cuda")
    expected = [fp8_alone(model, p) for p in prompts]
    results = model.generate_batch(prompts, generation_config=greedy(), latent_cache_dtype="fp8",
                                   continuous_batching_config=cb_config(**ONE_STEP))
    assert tokens_of(results) == expected


@needs_mla_paged_cache
def test_a_kept_manager_refuses_another_latent_dtype(model, prompts, expected_fp8):
    model.generate_batch(prompts[:1], generation_config=greedy(), continuous_batching_config=cb_config(**ONE_STEP),
                         persistent_manager=True)
    try:
        with pytest.raises(ValueError, match="stores the latent as the model dtype.*asks for fp8.*destroy_cached"):
            model.generate_batch(prompts[:1], generation_config=greedy(), latent_cache_dtype="fp8",
                                 continuous_batching_config=cb_config(**ONE_STEP))
    finally:
        model.destroy_cached_continuous_batching_manager()
    results = model.generate_batch(prompts[:1], generation_config=greedy(), latent_cache_dtype="fp8",
                                   continuous_batching_config=cb_config(**ONE_STEP))
    assert tokens_of(results) == expected_fp8[:1]


# ---------------------------------------------------------------------------------------------------------------------
# Nothing comes back empty


@needs_mla_paged_cache
def test_a_failure_inside_the_loop_raises(model, prompts, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kaput in attention")

    monkeypatch.setattr(continuous_batching, "paged_attention", broken)
    monkeypatch.setattr("modeling_deepseek.attention.paged_attention", broken)
    with pytest.raises(RuntimeError, match="request.*failed.*kaput in attention"):
        model.generate_batch(prompts, generation_config=greedy(), continuous_batching_config=cb_config())


@needs_mla_paged_cache
def test_a_running_manager_refuses_an_empty_prompt_and_survives_a_failed_step(model, prompts, expected, monkeypatch):
    """The server's manager runs for good: a prompt of no tokens is refused as it is added (before, it reached
    attention with zero rows, and the loop died: every later request was dropped), and a step that fails fails the
    requests it held, with the cause, while the next request gets generate()'s tokens."""
    from modeling_deepseek import attention

    manager = model.init_continuous_batching(generation_config=greedy(), continuous_batching_config=cb_config())
    manager.start()
    try:
        with pytest.raises(ValueError, match="at least one prompt token"):
            manager.add_request([], max_new_tokens=NEW)
        real = attention.paged_attention

        def fails_once(*args, **kwargs):
            monkeypatch.setattr(attention, "paged_attention", real)
            raise RuntimeError("kaput in attention")

        monkeypatch.setattr(attention, "paged_attention", fails_once)
        failed = manager.get_result(request_id=manager.add_request(prompts[0], max_new_tokens=NEW), timeout=60)
        assert "kaput in attention" in failed.error
        served = manager.get_result(request_id=manager.add_request(prompts[1], max_new_tokens=NEW), timeout=60)
        assert served.error is None and served.generated_tokens == expected[1]
        assert manager.background_thread_status.fatal_error is None
    finally:
        manager.stop(block=True)


POISON = 5  # a forward whose input ids hold this token twice in a row fails (the fault injected below)


def fail_on_poison(model, monkeypatch, fails_when=None, after_steps=None) -> list[list[int]]:
    """Make the model's forward raise when `fails_when(input_ids, requests in the step)` (by default: the poisoned
    pair is among the step's tokens, wherever the engine packed it), as a bug inside the batching loop would; after
    the `after_steps[0]`-th successful forward, call `after_steps[1]()`. Returns the list the query lengths of each
    failed step's requests are appended to (1: a decoding request)."""
    forward, failed, done = model.forward, [], []
    fails_when = fails_when or (lambda ids, n: bool(((ids[0, :-1] == POISON) & (ids[0, 1:] == POISON)).any()))

    def faulty_forward(*args, **kwargs):
        query_lengths = kwargs["cu_seq_lens_q"].diff().tolist()
        if fails_when(kwargs["input_ids"], len(query_lengths)):
            failed.append(query_lengths)
            raise RuntimeError("poisoned step")
        out = forward(*args, **kwargs)
        done.append(1)
        if after_steps is not None and len(done) == after_steps[0]:
            after_steps[1]()
        return out

    monkeypatch.setattr(model, "forward", faulty_forward)
    return failed


def finished_results(manager, count: int) -> dict:
    """The next `count` finished outputs of a running manager, by request id."""
    results = {}
    while len(results) < count:
        out = manager.get_result(timeout=60)
        assert out is not None, f"only {sorted(results)} came back"
        if out.is_finished():
            results[out.request_id] = out
    return results


@needs_mla_paged_cache
def test_a_failed_step_fails_only_the_request_at_fault(model, prompts, expected, monkeypatch):
    """A request whose prompt makes the forward fail joins a step where others decode and prefill: the step fails, its
    requests are put back (restarted from prompt + generated tokens) and retried alone; the culprit alone gets the
    error, every other request gets generate()'s greedy tokens, and the next request is served."""
    culprit = [7, POISON, POISON, 11]
    bad = []  # the culprit is added by the loop itself after its 2nd step, when the first requests decode
    failed = fail_on_poison(model, monkeypatch, after_steps=(2, lambda: bad.append(
        manager.add_request(culprit, max_new_tokens=NEW))))
    manager = model.init_continuous_batching(generation_config=greedy(), continuous_batching_config=cb_config())
    manager.start()
    try:
        good = manager.add_requests(prompts, max_new_tokens=NEW)
        results = finished_results(manager, len(prompts) + 1)
        assert "poisoned step" in results[bad[0]].error and "alone" in results[bad[0]].error
        assert [results[rid].error for rid in good] == [None] * len(prompts)
        assert [results[rid].generated_tokens for rid in good] == expected
        assert [results[rid].prompt_ids for rid in good] == prompts
        # failed with others, some of them decoding (restarted from prompt + generated tokens), then alone
        assert len(failed[0]) > 1 and 1 in failed[0] and len(failed[-1]) == 1, failed
        served = manager.get_result(request_id=manager.add_request(prompts[2], max_new_tokens=NEW), timeout=60)
        assert served.error is None and served.generated_tokens == expected[2]
        assert manager.background_thread_status.fatal_error is None
    finally:
        manager.stop(block=True)
    # generate_batch: the culprit alone failed, and it raises naming it
    with pytest.raises(RuntimeError, match=r"1 of 6 request\(s\) failed; req_5: RuntimeError: poisoned step"):
        model.generate_batch(prompts + [culprit], generation_config=greedy(), continuous_batching_config=cb_config())


@needs_mla_paged_cache
def test_a_fault_of_the_batch_not_of_a_request_is_retried_a_bounded_number_of_times(model, prompts, expected,
                                                                                    monkeypatch):
    """A step fails whenever it holds more than one request (as running out of memory would): each request passes
    alone, fails again with the others, and fails for good with the cause at its STEP_FAILURE_LIMIT-th failed step;
    then a request alone is served."""
    failed = fail_on_poison(model, monkeypatch, fails_when=lambda ids, n: n > 1)
    manager = model.init_continuous_batching(generation_config=greedy(), continuous_batching_config=cb_config())
    manager.start()
    try:
        ids = manager.add_requests(prompts[:3], max_new_tokens=NEW)
        finished = finished_results(manager, len(ids))
        results = [finished[rid] for rid in ids]
        limit = continuous_batching.STEP_FAILURE_LIMIT
        for out, tokens in zip(results, expected):
            assert "poisoned step" in out.error and f"in {limit} failed" in out.error
            assert out.generated_tokens == tokens[:len(out.generated_tokens)]  # what it had was right
        assert len(failed) == limit and min(map(len, failed)) > 1, failed
        served = manager.get_result(request_id=manager.add_request(prompts[3], max_new_tokens=NEW), timeout=60)
        assert served.error is None and served.generated_tokens == expected[3]
    finally:
        manager.stop(block=True)


@needs_mla_paged_cache
@pytest.mark.parametrize("how, match", [
    ("latent_cache_dtype", "`latent_cache_dtype` must be None or 'fp8', got 'int4'"),
    ("use_mtp_kwarg", "use_mtp=True is not supported.*speculative"),
    ("use_mtp_config", "use_mtp=True is not supported.*speculative"),
    ("beams", "beam search"),
    ("unknown_kwarg", "unsupported arguments.*'top_q'"),
    ("min_new_tokens", "cannot apply min_new_tokens=4"),
    ("repetition_penalty", "cannot apply repetition_penalty=1.3"),
])
def test_what_the_engine_cannot_do_raises_before_it_starts(how, match, prompts):
    model = tiny_model(seed=0).eval()
    gc, kwargs = greedy(), {}
    if how == "latent_cache_dtype":
        kwargs["latent_cache_dtype"] = "int4"
    elif how == "use_mtp_kwarg":
        kwargs["use_mtp"] = True
    elif how == "use_mtp_config":
        gc.use_mtp = True
    elif how == "beams":
        gc.num_beams = 2
    elif how == "unknown_kwarg":
        kwargs["top_q"] = 0.5
    elif how == "min_new_tokens":
        gc.min_new_tokens = 4
    elif how == "repetition_penalty":
        gc.repetition_penalty = 1.3
    with pytest.raises(ValueError, match=match):
        model.generate_batch(prompts, generation_config=gc, continuous_batching_config=cb_config(), **kwargs)


@needs_mla_paged_cache
def test_cpu_defaults_size_the_cache_for_the_workload_and_copy_the_generation_config(model):
    from transformers.generation.continuous_batching.utils import WorkloadHints

    sized = continuous_batching.cpu_batching_defaults(None, WorkloadHints(max_prompt_length=100, max_generated_length=28,
                                                            num_requests=4), page_size=64)
    assert (sized.num_blocks, sized.max_batch_tokens) == (4 * 3, continuous_batching.CPU_MAX_BATCH_TOKENS)
    mine = ContinuousBatchingConfig(num_blocks=7, max_batch_tokens=64)
    assert continuous_batching.cpu_batching_defaults(mine, None, 16).num_blocks == 7 and mine.max_batch_tokens == 64
    gc = greedy()
    model.generate_batch([[5, 6, 7]], generation_config=gc, continuous_batching_config=cb_config())
    assert gc.eos_token_id is None  # transformers writes -1 into the config it is given


@pytest.mark.skipif(MLA_PAGED_CACHE, reason="checks the error of a transformers without the MLA paged cache")
def test_old_transformers_raises_naming_the_version(model, prompts):
    with pytest.raises(RuntimeError, match=f"needs transformers >= {PAGED_CACHE_MIN_VERSION}"):
        model.generate_batch(prompts, generation_config=greedy())
    with pytest.raises(RuntimeError, match=f"needs transformers >= {PAGED_CACHE_MIN_VERSION}"):
        model.init_continuous_batching(generation_config=greedy())
