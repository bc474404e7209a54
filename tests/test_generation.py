"""Generation against a no-cache reference, on random-weight models.

The reference is the definition of greedy decoding: at every step a full forward over the whole sequence so far
(`use_cache=False`), positions from the attention mask exactly as `generate` builds them, argmax of the last logits.
Every cached path (plain generate, left-padded batches, chunked prefill, the FP8 latent cache, MTP speculation,
`past_key_values` / `cache` round trips, static cache, torch.compile, `pipeline()`) must give the reference's tokens.

Why random weights: a first-order-Markov fixture (next token a function of the current one) gives the right answer
even when the cache is dropped, so it cannot tell a working cache from none. `test_fixture_is_not_first_order_markov`
checks that the fixtures here can: decoding each token from itself alone gives other tokens.

Why the margin checks: a cached forward differs from an uncached one by float rounding (~1e-6 here), so a greedy
comparison is only meaningful where the reference's top-2 logits are further apart than that. Every reference
trajectory asserts a margin first (`assert_well_separated`); a failure there means "pick another seed", not a bug.

Sampling and beam search have no simple reference loop: they are compared with transformers' own DeepseekV3 on the
same weights (its cache works), with the same seed. MTP speculation is compared with transformers' `MtpModel`
(`generate(use_mtp=True)` on its DeepseekV3 with our MTP weights), which reads the main model's hidden state after
the final norm, as vLLM and SGLang do.
"""

from __future__ import annotations

import copy

import warnings

import pytest
import torch
from transformers import DeepseekV3ForCausalLM, DynamicCache, StaticCache, pipeline
from transformers.generation.streamers import BaseStreamer

from conftest import hf_v3_model, max_diff, random_ids, save_and_load_ours, set_mla_impl, tiny_model
from modeling_deepseek.cache import DeepseekLatentCache, DeepseekStaticLatentCache

PROMPT, NEW = 10, 8
GREEDY = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
MARGIN = 2e-4  # top-1 minus top-2 logit along every reference trajectory; cache-vs-no-cache noise is ~1e-6


# ---------------------------------------------------------------------------------------------------------------------
# The reference


def positions_from_mask(mask_BS: torch.Tensor) -> torch.Tensor:
    """What generate() passes: cumsum of the mask minus one, 0 on padding."""
    return (mask_BS.long().cumsum(-1) - 1).masked_fill(mask_BS == 0, 0)


@torch.no_grad()
def reference_greedy(model, ids_BP, attention_mask=None, max_new_tokens=NEW, eos_token_id=None, pad_token_id=0):
    """No-cache greedy decoding. Returns (sequences [B, P + new], logits [B, new, V] of each step's last position).

    Each step runs the model over the whole sequence with use_cache=False: nothing can be carried between steps, so
    this is correct by construction. A row that has emitted `eos_token_id` continues with `pad_token_id`, as in
    generate().
    """
    seq = ids_BP
    mask = torch.ones_like(ids_BP) if attention_mask is None else attention_mask
    done = torch.zeros(ids_BP.shape[0], dtype=torch.bool)
    step_logits = []
    for _ in range(max_new_tokens):
        out = model(seq, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False)
        logits_BV = out.logits[:, -1].float()
        step_logits.append(logits_BV)
        next_B = logits_BV.argmax(-1).masked_fill(done, pad_token_id)
        if eos_token_id is not None:
            done |= next_B == eos_token_id
        seq = torch.cat([seq, next_B[:, None]], 1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        if done.all():
            break
    return seq, torch.stack(step_logits, 1)


def assert_well_separated(step_logits_BNV: torch.Tensor, margin: float = MARGIN) -> None:
    top2 = step_logits_BNV.topk(2, dim=-1).values
    gap = (top2[..., 0] - top2[..., 1]).min().item()
    assert gap > margin, f"fixture has a near-tie (top-2 gap {gap:.2e}): choose another seed"


@torch.no_grad()
def markov_greedy(model, ids_BP, max_new_tokens=NEW):
    """What generate() computed with the cache dropped: each token predicted from itself alone (at its position)."""
    seq = ids_BP
    for _ in range(max_new_tokens):
        pos = torch.full((seq.shape[0], 1), seq.shape[1] - 1)
        logits = model(seq[:, -1:], position_ids=pos, use_cache=False).logits[:, -1]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    return seq


def left_padded(batch: int = 3, length: int = PROMPT, pads=(0, 2, 5), seed: int = 3, vocab: int = 128):
    """A batch whose row r has pads[r] padding slots on the left (pad id 0, mask 0)."""
    ids = random_ids(batch, length, seed=seed, vocab=vocab)
    mask = torch.ones_like(ids)
    for r, n in enumerate(pads[:batch]):
        ids[r, :n] = 0
        mask[r, :n] = 0
    return ids, mask


class RecordingStreamer(BaseStreamer):
    """Records every put() as a flat list of ids (the first put is the prompt) and whether end() came."""

    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        assert not self.ended, "put() after end()"
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True

    def generated(self) -> list[int]:
        return [t for chunk in self.chunks[1:] for t in chunk]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0).eval()


@pytest.fixture(scope="module")
def prompt():
    return random_ids(1, PROMPT, seed=5)


@pytest.fixture(scope="module")
def reference(model, prompt):
    seq, logits = reference_greedy(model, prompt)
    assert_well_separated(logits)
    return seq


# ---------------------------------------------------------------------------------------------------------------------
# The fixtures can tell a working cache from none


def test_fixture_is_not_first_order_markov(model, prompt, reference):
    assert not torch.equal(markov_greedy(model, prompt), reference)


def test_reference_agrees_with_transformers_deepseek_v3(tmp_path):
    """The reference loop itself, on transformers' model and ours with the same weights, gives the same tokens."""
    hf = hf_v3_model()
    ours = save_and_load_ours(hf, tmp_path)
    ids, mask = left_padded(2, pads=(0, 3))
    expected, logits = reference_greedy(hf, ids, mask)
    assert_well_separated(logits)
    assert torch.equal(reference_greedy(ours, ids, mask)[0], expected)


# ---------------------------------------------------------------------------------------------------------------------
# Plain greedy generate


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("mla_impl", ["auto", "expanded", "absorbed"])
def test_greedy_generate_matches_reference(model, prompt, reference, attn, mla_impl):
    m = tiny_model(seed=0).eval()
    m.set_attn_implementation(attn)
    set_mla_impl(m, mla_impl)
    assert torch.equal(m.generate(prompt, max_new_tokens=NEW, **GREEDY), reference)


def test_generate_without_cache_matches_reference(model, prompt, reference):
    assert torch.equal(model.generate(prompt, max_new_tokens=NEW, use_cache=False, **GREEDY), reference)


def test_generate_from_inputs_embeds_matches_reference(model, prompt, reference):
    """generate(inputs_embeds=...) returns only the new tokens (transformers' convention for decoder-only models)."""
    embeds = model.get_input_embeddings()(prompt).detach()
    assert torch.equal(model.generate(inputs_embeds=embeds, max_new_tokens=NEW, **GREEDY), reference[:, PROMPT:])


def test_greedy_left_padded_batch_matches_reference(model):
    ids, mask = left_padded(3, pads=(0, 2, 5))
    expected, logits = reference_greedy(model, ids, mask)
    assert_well_separated(logits[1:])  # ... and row 0
    assert_well_separated(logits[:1])
    got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, **GREEDY)
    assert torch.equal(got, expected)


def test_generate_logits_match_reference_logits(model, prompt, reference):
    """Not only the argmax: every step's logits are those of the full no-cache forward."""
    out = model.generate(prompt, max_new_tokens=NEW, output_logits=True, return_dict_in_generate=True, **GREEDY)
    _, ref_logits = reference_greedy(model, prompt)
    got = torch.stack(out.logits, 1).float()
    assert got.shape == ref_logits.shape
    assert max_diff(got, ref_logits) < 1e-4


def test_cache_grows_one_slot_per_token_and_is_returned(model, prompt, reference):
    out = model.generate(prompt, max_new_tokens=NEW, return_dict_in_generate=True, **GREEDY)
    assert torch.equal(out.sequences, reference)
    cache = out.past_key_values
    assert isinstance(cache, DeepseekLatentCache)
    # every token but the last generated one has been through a forward
    assert cache.get_seq_length() == PROMPT + NEW - 1
    assert len([layer for layer in cache.layers if layer.is_initialized]) == model.config.num_hidden_layers


def test_corrupted_cache_changes_the_continuation(model, prompt, reference):
    """The cache is read: the same continuation from a cache whose prompt latents were overwritten differs."""
    with torch.no_grad():
        out = model(prompt, use_cache=True)
    first = out.logits[:, -1].argmax(-1, keepdim=True)
    assert torch.equal(first, reference[:, PROMPT : PROMPT + 1])
    good = out.past_key_values
    bad = DeepseekLatentCache()
    with torch.no_grad():
        model(prompt, past_key_values=bad, use_cache=True)
        g = torch.Generator().manual_seed(0)
        for layer in bad.layers:
            layer.keys.copy_(torch.randn(layer.keys.shape, generator=g) * layer.keys.std())
    ids = torch.cat([prompt, first], 1)
    cont_good = model.generate(ids, cache=good, max_new_tokens=NEW - 1, **GREEDY)
    cont_bad = model.generate(ids, cache=bad, max_new_tokens=NEW - 1, **GREEDY)
    assert torch.equal(cont_good, reference)
    assert not torch.equal(cont_bad, reference)


# ---------------------------------------------------------------------------------------------------------------------
# past_key_values / cache round trips


@pytest.mark.parametrize("kwarg", ["past_key_values", "cache"])
def test_manual_decode_loop_with_returned_cache(model, prompt, reference, kwarg):
    """Prefill with model(..., use_cache=True), then feed one token at a time with the returned cache passed back."""
    seq = prompt
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        for _ in range(NEW):
            seq = torch.cat([seq, out.logits[:, -1].argmax(-1, keepdim=True)], 1)
            cache = out.past_key_values
            assert cache is not None and cache.get_seq_length() == seq.shape[1] - 1
            out = model(seq[:, -1:], use_cache=True, **{kwarg: cache})
    assert torch.equal(seq, reference)


@pytest.mark.parametrize("kwarg", ["past_key_values", "cache"])
def test_generate_continues_from_its_returned_cache(model, prompt, reference, kwarg):
    first = model.generate(prompt, max_new_tokens=3, return_dict_in_generate=True, **GREEDY)
    assert torch.equal(first.sequences, reference[:, : PROMPT + 3])
    cache = first.past_key_values
    if kwarg == "cache":
        rest = model.generate(first.sequences, max_new_tokens=NEW - 3, cache=cache, **GREEDY)
    else:
        # transformers 5.24 deprecates generate(past_key_values=...). Accepting it quietly is fine; a FutureWarning is
        # fine too if it points at the caller's line (as transformers' own models do), not at a line of ours.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rest = model.generate(first.sequences, max_new_tokens=NEW - 3, past_key_values=cache, **GREEDY)
        ours = [(w.filename, w.lineno) for w in caught
                if issubclass(w.category, (FutureWarning, DeprecationWarning)) and "modeling_deepseek" in w.filename]
        assert not ours, ours
    assert torch.equal(rest, reference)


def test_left_padded_continuation_from_cache(model):
    ids, mask = left_padded(2, pads=(4, 0))
    expected, logits = reference_greedy(model, ids, mask)
    assert_well_separated(logits)
    first = model.generate(ids, attention_mask=mask, max_new_tokens=3, return_dict_in_generate=True, **GREEDY)
    mask3 = torch.cat([mask, mask.new_ones(2, 3)], 1)
    rest = model.generate(first.sequences, attention_mask=mask3, cache=first.past_key_values,
                          max_new_tokens=NEW - 3, **GREEDY)
    assert torch.equal(rest, expected)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("op", ["reorder_cache", "batch_select_indices", "batch_repeat_interleave", "crop"])
def test_cache_operations_of_generate_keep_the_cache_consistent(model, fp8, op):
    """What beam search, num_return_sequences and speculation do to the cache (public Cache methods) leaves the cache
    of the correspondingly transformed batch: the next step's logits equal those from a fresh prefill of it."""
    ids = random_ids(3, PROMPT, seed=11)
    step = random_ids(3, 1, seed=12)
    transform = {
        "reorder_cache": (lambda c: c.reorder_cache(torch.tensor([2, 0, 1])), lambda x: x[[2, 0, 1]]),
        "batch_select_indices": (lambda c: c.batch_select_indices(torch.tensor([2, 0])), lambda x: x[[2, 0]]),
        "batch_repeat_interleave": (lambda c: c.batch_repeat_interleave(2), lambda x: x.repeat_interleave(2, 0)),
        "crop": (lambda c: c.crop(-3), lambda x: x),
    }[op]
    prefix = ids[:, :-3] if op == "crop" else ids
    with torch.no_grad():
        cache = DeepseekLatentCache(fp8=fp8)
        model(ids, cache=cache, use_cache=True)
        transform[0](cache)
        nxt = transform[1](step)
        got = model(nxt, cache=cache, use_cache=True).logits
        fresh = DeepseekLatentCache(fp8=fp8)
        model(transform[1](prefix), cache=fresh, use_cache=True)
        expected = model(nxt, cache=fresh, use_cache=True).logits
    assert cache.get_seq_length() == fresh.get_seq_length() == prefix.shape[1] + 1
    assert max_diff(got, expected) < 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# Chunked prefill


@pytest.mark.parametrize("how", ["prefill_chunk_size", "config.prefill_chunk_tokens"])
@pytest.mark.parametrize("padded", [False, True])
def test_chunked_prefill_matches_reference(how, padded):
    m = tiny_model(seed=0).eval()
    ids, mask = left_padded(2, length=13, pads=(0, 3)) if padded else (random_ids(1, 13, seed=5), None)
    expected, logits = reference_greedy(m, ids, mask)
    assert_well_separated(logits)
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, **GREEDY)
    if how == "prefill_chunk_size":
        kwargs["prefill_chunk_size"] = 4
    else:
        m.config.prefill_chunk_tokens = 4
    chunk_lengths = []
    hook = m.model.register_forward_pre_hook(
        lambda mod, args, kw: chunk_lengths.append((kw.get("input_ids") if kw.get("input_ids") is not None
                                                    else kw["inputs_embeds"]).shape[1]), with_kwargs=True)
    try:
        got = m.generate(ids, **kwargs)
    finally:
        hook.remove()
    assert chunk_lengths[:4] == [4, 4, 4, 1], chunk_lengths  # the prompt really was prefilled in chunks
    assert torch.equal(got, expected)


# ---------------------------------------------------------------------------------------------------------------------
# FP8 latent cache


def first_unsafe_step(ref_logits_BNV: torch.Tensor, err_BN: torch.Tensor) -> int:
    """The first step at which an error of err (max over the vocabulary) could flip the reference's argmax."""
    top2 = ref_logits_BNV.topk(2, dim=-1).values
    unsafe = ((top2[..., 0] - top2[..., 1]) <= 2 * err_BN).any(0)
    return int(unsafe.nonzero()[0, 0]) if unsafe.any() else ref_logits_BNV.shape[1]


@pytest.mark.parametrize("how", ["generate-kwarg", "config", "generation-config"])
def test_fp8_latent_cache_logits_close_and_tokens_equal(how):
    """Each step's logits with the e4m3 latent cache are those of the exact no-cache forward over the same prefix,
    within the quantization error (a dropped or mis-scaled cache is off by whole logits), and the tokens equal the
    reference's for as long as that error cannot flip the reference's argmax."""
    m = tiny_model(seed=0).eval()
    prompt = random_ids(1, PROMPT, seed=6)
    kwargs = dict(latent_cache_dtype="fp8") if how == "generate-kwarg" else {}
    if how == "config":
        m.config.latent_cache_dtype = "fp8"
    elif how == "generation-config":
        kwargs["generation_config"] = copy.deepcopy(m.generation_config)
        kwargs["generation_config"].latent_cache_dtype = "fp8"
    out = m.generate(prompt, max_new_tokens=NEW, output_logits=True, return_dict_in_generate=True, **kwargs, **GREEDY)
    cache = out.past_key_values
    assert cache.fp8 and cache.layers[0].keys.dtype == torch.float8_e4m3fn
    assert cache.get_seq_length() == PROMPT + NEW - 1
    fp8_BNV = torch.stack(out.logits, 1).float()
    seq = out.sequences
    assert torch.equal(seq[:, PROMPT:], fp8_BNV.argmax(-1))  # greedy on what it computed
    with torch.no_grad():
        exact_BNV = m(seq, use_cache=False).logits[:, PROMPT - 1 : -1].float()
    err_BN = (fp8_BNV - exact_BNV).abs().amax(-1)
    assert 1e-3 < err_BN.max() < 0.1 * exact_BNV.abs().max()  # really quantized, and close
    assert (fp8_BNV - exact_BNV).abs().mean() < 0.05 * exact_BNV.abs().mean()
    expected, ref_BNV = reference_greedy(m, prompt)
    safe = first_unsafe_step(ref_BNV, err_BN)
    assert safe >= 2, "fixture: FP8 error exceeds the reference's top-2 gaps from the start"
    assert torch.equal(seq[:, : PROMPT + safe], expected[:, : PROMPT + safe])


def test_e4m3_dequantization_is_torchs_cast_times_the_scale():
    """The CPU fast path of fp8_format.dequantize_per_token (a table of byte pairs) gives torch's e4m3 cast bit for bit:
    every one of the 65,536 pairs, NaN codes included, and strided rows of several shapes, as e4m3 or as bytes."""
    from modeling_deepseek.fp8_format import FP8_DTYPE, dequantize_per_token, quantize_per_token

    pairs = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.uint8).view(-1, 2)
    ones = torch.ones(pairs.shape[0], 1)
    assert torch.equal(dequantize_per_token(pairs, ones, torch.float32).view(torch.int32),
                       pairs.view(FP8_DTYPE).float().view(torch.int32))
    q, scale = quantize_per_token(torch.randn(3, 1, 40, 24))
    for rows in (q, q[:, :, 5:], q[..., :10], q[..., 1:4]):  # odd widths take torch's cast
        got = dequantize_per_token(rows, scale[:, :, -rows.shape[2]:], torch.bfloat16)
        assert torch.equal(got, (rows.float() * scale[:, :, -rows.shape[2]:]).to(torch.bfloat16))


def test_fp8_latent_cache_is_read(model, prompt, reference):
    """Teacher-forced along the reference, the FP8 cache gives logits within its quantization error of the no-cache
    ones; the same decode without a cache (each token alone) is off by far more."""
    _, ref_BNV = reference_greedy(model, prompt)
    cache = DeepseekLatentCache(fp8=True)
    with torch.no_grad():
        steps = [model(prompt, cache=cache, use_cache=True).logits[:, -1]]
        for k in range(NEW - 1):
            steps.append(model(reference[:, PROMPT + k : PROMPT + k + 1], cache=cache, use_cache=True).logits[:, -1])
            assert cache.get_seq_length() == PROMPT + k + 1
        alone = [model(reference[:, PROMPT + k : PROMPT + k + 1], position_ids=torch.tensor([[PROMPT + k]]),
                       use_cache=False).logits[:, -1] for k in range(NEW - 1)]
    fp8_err = max_diff(torch.stack(steps, 1), ref_BNV)
    no_cache_err = max_diff(torch.stack(alone, 1), ref_BNV[:, 1:])
    assert fp8_err < 0.1 * ref_BNV.abs().max()
    assert no_cache_err > 5 * fp8_err


# ---------------------------------------------------------------------------------------------------------------------
# MTP speculation against the reference


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("draft_tokens", [1, 2])
def test_mtp_greedy_matches_reference(model, batch, draft_tokens):
    ids, mask = (random_ids(1, PROMPT, seed=5), None) if batch == 1 else left_padded(2, pads=(3, 0))
    expected, logits = reference_greedy(model, ids, mask, max_new_tokens=12)
    assert_well_separated(logits)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, use_mtp=True, mtp_draft_tokens=draft_tokens,
                         return_dict_in_generate=True, **GREEDY)
    assert torch.equal(out.sequences, expected)
    assert out.mtp_drafted > 0 and 0 <= out.mtp_accepted <= out.mtp_drafted
    assert out.mtp_acceptance_rate == pytest.approx(out.mtp_accepted / out.mtp_drafted)
    stats = model.last_mtp_stats
    assert (stats.drafted, stats.accepted) == (out.mtp_drafted, out.mtp_accepted)


def test_mtp_chunked_prefill_matches_reference(model):
    ids, mask = left_padded(2, length=13, pads=(0, 3))
    expected, logits = reference_greedy(model, ids, mask)
    assert_well_separated(logits)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, use_mtp=True, prefill_chunk_size=4, **GREEDY)
    assert torch.equal(got, expected)


def test_mtp_with_fp8_cache_matches_plain_fp8_generate(model):
    """Speculation verifies with the same per-token-quantized cache as plain decoding: greedy tokens are the same
    (on a batch where FP8 changes the tokens, so a speculation that ignored latent_cache_dtype would show)."""
    ids, mask = left_padded(2, pads=(3, 0), seed=7)
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, latent_cache_dtype="fp8", **GREEDY)
    plain = model.generate(ids, output_logits=True, return_dict_in_generate=True, **kwargs)
    assert plain.past_key_values.fp8
    assert_well_separated(torch.stack(plain.logits, 1).float())
    assert not torch.equal(plain.sequences, reference_greedy(model, ids, mask)[0]), "fixture: FP8 changes nothing"
    assert torch.equal(model.generate(ids, use_mtp=True, **kwargs), plain.sequences)


# ---------------------------------------------------------------------------------------------------------------------
# Beam search and sampling: transformers' own DeepseekV3 on the same weights


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    hf = hf_v3_model()
    ours = save_and_load_ours(hf, tmp_path_factory.mktemp("v3"))
    return hf, ours


@pytest.mark.parametrize("padded", [False, True])
def test_beam_search_matches_transformers(hf_and_ours, padded):
    hf, ours = hf_and_ours
    ids, mask = left_padded(2, pads=(0, 3)) if padded else (random_ids(1, PROMPT, seed=5), None)
    kwargs = dict(attention_mask=mask, num_beams=3, num_return_sequences=2, max_new_tokens=6,
                  return_dict_in_generate=True, output_scores=True, **GREEDY)
    with torch.no_grad():
        expected = hf.generate(ids, **kwargs)
        got = ours.generate(ids, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(got.sequences_scores, expected.sequences_scores, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("padded", [False, True])
def test_sampling_with_seed_matches_transformers(hf_and_ours, padded):
    hf, ours = hf_and_ours
    ids, mask = left_padded(2, pads=(0, 3)) if padded else (random_ids(1, PROMPT, seed=5), None)
    kwargs = dict(attention_mask=mask, do_sample=True, top_k=20, temperature=0.7, max_new_tokens=10,
                  eos_token_id=None, pad_token_id=0)
    torch.manual_seed(1234)
    expected = hf.generate(ids, **kwargs)
    torch.manual_seed(1234)
    got = ours.generate(ids, **kwargs)
    torch.manual_seed(4321)
    other = ours.generate(ids, **kwargs)
    assert not torch.equal(other, got)  # the seed matters: this is really sampling
    assert torch.equal(got, expected)


def test_greedy_matches_transformers_generate(hf_and_ours):
    hf, ours = hf_and_ours
    ids, mask = left_padded(3, pads=(0, 2, 5))
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, **GREEDY)
    assert torch.equal(reference_greedy(hf, ids, mask)[0], expected)  # transformers' cache works
    assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=NEW, **GREEDY), expected)


# ---------------------------------------------------------------------------------------------------------------------
# pipeline()


@pytest.fixture(scope="module")
def tokenizer():
    from trainers.corpus import stdlib_source_files, train_tokenizer

    return train_tokenizer(stdlib_source_files(limit=8), vocab_size=300)


@pytest.fixture(scope="module")
def text_model(tokenizer):
    m = tiny_model(seed=2, vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1, pad_token_id=2).eval()
    m.generation_config.update(do_sample=False, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return m


def test_pipeline_matches_reference(text_model, tokenizer):
    prompts = ["def add(a, b):", "import os\nclass Thing(object):\n    "]
    pipe = pipeline("text-generation", model=text_model, tokenizer=tokenizer, device="cpu")
    got = pipe(prompts, max_new_tokens=NEW, do_sample=False, return_full_text=False, batch_size=2)
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    assert (enc.attention_mask == 0).any()  # really a left-padded batch
    expected, logits = reference_greedy(text_model, enc.input_ids, enc.attention_mask, eos_token_id=1, pad_token_id=2)
    assert_well_separated(logits)
    for r, text in enumerate(got):
        new = expected[r, enc.input_ids.shape[1] :]
        new = new[: (new == 1).nonzero()[0, 0] + 1] if (new == 1).any() else new
        assert text[0]["generated_text"] == tokenizer.decode(new, skip_special_tokens=True)
    direct = text_model.generate(**enc, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(direct, expected[:, : direct.shape[1]])


# ---------------------------------------------------------------------------------------------------------------------
# Static cache and torch.compile: the reference output, or a clear error (compiled decoding: test_compile.py)


@pytest.mark.parametrize("implementation", ["offloaded_static", "offloaded", "quantized"])
def test_per_head_cache_implementations_raise_naming_them(model, prompt, implementation):
    """transformers' offloaded / quantized caches store per-head keys and values; MLA caches one latent per token."""
    with pytest.raises(ValueError, match=rf"cache_implementation='{implementation}'\) is not supported"):
        model.generate(prompt, max_new_tokens=NEW, cache_implementation=implementation, **GREEDY)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("mla_impl", ["absorbed", "expanded"])
def test_static_cache_matches_reference(model, prompt, reference, padded, mla_impl):
    """generate(cache_implementation="static"): a DeepseekStaticLatentCache sized for the call, the reference tokens."""
    m = tiny_model(seed=0).eval()
    set_mla_impl(m, mla_impl)
    ids, mask = left_padded(3, pads=(0, 2, 5)) if padded else (prompt, None)
    expected = reference_greedy(m, ids, mask)[0] if padded else reference
    out = m.generate(ids, attention_mask=mask, max_new_tokens=NEW, cache_implementation="static",
                     return_dict_in_generate=True, **GREEDY)
    assert torch.equal(out.sequences, expected)
    cache = out.past_key_values
    assert isinstance(cache, DeepseekStaticLatentCache) and cache.is_compileable
    assert cache.max_cache_len >= ids.shape[1] + NEW - 1 and int(cache.get_seq_length()) == ids.shape[1] + NEW - 1
    assert cache.layers[0].keys.shape == (ids.shape[0], 1, cache.max_cache_len, m.config.kv_lora_rank)
    assert cache.layers[0].values.shape == (ids.shape[0], 1, cache.max_cache_len, m.config.qk_rope_head_dim)


def test_static_cache_through_the_generation_config(model, prompt, reference):
    """cache_implementation / max_cache_len set on a GenerationConfig work like the keyword arguments."""
    from transformers import GenerationConfig

    gc = GenerationConfig(max_new_tokens=NEW, cache_implementation="static", max_cache_len=32, **GREEDY)
    out = model.generate(prompt, generation_config=gc, return_dict_in_generate=True)
    assert torch.equal(out.sequences, reference)
    assert out.past_key_values.max_cache_len == 32
    assert gc.cache_implementation == "static"  # the caller's config is left as it was


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generate_with_static_cache(dtype):
    """As transformers' GenerationTesterMixin.test_generate_with_static_cache: generate(cache_implementation="static")
    leaves a StaticCache with one layer per decoder layer, each holding the prompt and every new token but the last
    (MLA's pair, [B, 1, slots, C] latents and [B, 1, slots, R] rope keys, in place of per-head keys and values), and
    gives the default cache's tokens and scores."""
    m = tiny_model(seed=0).to(dtype).eval()  # a fresh model: no earlier call's cache length to reuse
    ids, mask = left_padded(2, pads=(0, 3))
    new = 20
    kwargs = dict(attention_mask=mask, max_new_tokens=new, return_dict_in_generate=True, output_scores=True,
                  use_cache=True, **GREEDY)
    static = m.generate(ids, cache_implementation="static", **kwargs)
    cache = static.past_key_values
    assert isinstance(cache, StaticCache) and isinstance(cache, DeepseekStaticLatentCache)
    assert len(cache) == m.config.num_hidden_layers
    slots = ids.shape[1] + new - 1
    assert cache.layers[0].keys.shape == (2, 1, slots, m.config.kv_lora_rank)
    assert cache.layers[0].values.shape == (2, 1, slots, m.config.qk_rope_head_dim)
    dynamic = m.generate(ids, **kwargs)
    assert torch.equal(static.sequences, dynamic.sequences)
    # The static cache attends over its masked slots too, which changes the rounding (scores here are of order 1).
    atol = {torch.float32: 1e-5, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(torch.stack(static.scores), torch.stack(dynamic.scores), atol=atol, rtol=0)


def test_generate_from_inputs_embeds_with_static_cache(prompt, reference):
    """As transformers' test_generate_from_inputs_embeds_with_static_cache: from inputs_embeds, the static cache is a
    StaticCache sized for the embedded prompt plus the new tokens but the last (not max_length minus the prompt)."""
    m = tiny_model(seed=0).eval()
    embeds = m.get_input_embeddings()(prompt).detach()
    out = m.generate(inputs_embeds=embeds, max_new_tokens=NEW, cache_implementation="static",
                     return_dict_in_generate=True, **GREEDY)
    assert torch.equal(out.sequences, reference[:, PROMPT:])
    cache = out.past_key_values
    assert isinstance(cache, StaticCache)
    assert len(cache) == m.config.num_hidden_layers
    assert cache.layers[0].keys.shape == (1, 1, PROMPT + NEW - 1, m.config.kv_lora_rank)


ALL_OUTPUTS = dict(output_scores=True, output_logits=True, output_attentions=True, output_hidden_states=True,
                   return_dict_in_generate=True)


def assert_same_generate_outputs(static, dynamic) -> None:
    """Two generate() results with ALL_OUTPUTS agree: tokens, scores, logits, hidden states, and the attention
    probabilities over the keys both have (a static cache's extra slots are masked, so they get none)."""
    assert torch.equal(static.sequences, dynamic.sequences)
    for name in ("scores", "logits"):
        torch.testing.assert_close(torch.stack(getattr(static, name)), torch.stack(getattr(dynamic, name)))
    for step_static, step_dynamic in zip(static.hidden_states, dynamic.hidden_states, strict=True):
        torch.testing.assert_close(torch.stack(step_static), torch.stack(step_dynamic))
    for step_static, step_dynamic in zip(static.attentions, dynamic.attentions, strict=True):
        for a_static, a_dynamic in zip(step_static, step_dynamic, strict=True):
            keys = a_dynamic.shape[-1]
            torch.testing.assert_close(a_static[..., :keys], a_dynamic)
            assert not a_static[..., keys:].any()


@pytest.mark.parametrize("outputs", [{}, ALL_OUTPUTS], ids=["tokens", "all_outputs"])
def test_static_cache_implementation_of_the_model_generation_config(prompt, reference, outputs):
    """model.generation_config.cache_implementation = "static" (the usual way to make compiled decoding the default)
    makes every generate() decode over the static latent cache, with the default cache's tokens and outputs."""
    m = tiny_model(seed=0).eval()
    kwargs = dict(max_new_tokens=NEW, **GREEDY, **outputs)
    dynamic = m.generate(prompt, **kwargs)
    m.generation_config.cache_implementation = "static"
    static = m.generate(prompt, **kwargs)
    if not outputs:
        assert torch.equal(static, reference) and torch.equal(dynamic, reference)
        return
    assert isinstance(static.past_key_values, DeepseekStaticLatentCache)
    assert isinstance(dynamic.past_key_values, DeepseekLatentCache)
    assert torch.equal(static.sequences, reference)
    assert_same_generate_outputs(static, dynamic)


def test_static_cache_implementation_of_generation_config_json(tmp_path, prompt, reference):
    """A checkpoint whose generation_config.json says cache_implementation "static" generates over the static latent
    cache once loaded, its tokens the reference's."""
    m = tiny_model(seed=0).eval()
    m.generation_config.cache_implementation = "static"
    m.save_pretrained(tmp_path)
    assert '"cache_implementation": "static"' in (tmp_path / "generation_config.json").read_text()
    loaded = type(m).from_pretrained(tmp_path).eval()
    out = loaded.generate(prompt, max_new_tokens=NEW, return_dict_in_generate=True, **GREEDY)
    assert torch.equal(out.sequences, reference)
    assert isinstance(out.past_key_values, DeepseekStaticLatentCache)


def test_default_cache_is_a_dynamic_cache(model, prompt):
    """The cache generate() and a forward with use_cache=True start from is transformers' DynamicCache (latent layers
    inside), not compileable: generate() does not compile over it."""
    out = model.generate(prompt, max_new_tokens=2, return_dict_in_generate=True, **GREEDY)
    with torch.no_grad():
        forward_cache = model(prompt, use_cache=True).past_key_values
    for cache in (out.past_key_values, forward_cache):
        assert isinstance(cache, DynamicCache) and isinstance(cache, DeepseekLatentCache)
        assert not cache.is_compileable


def test_static_cache_sampling_beams_and_fp8_match_the_dynamic_cache(model):
    ids, mask = left_padded(2, pads=(0, 3))
    common = dict(attention_mask=mask, max_new_tokens=NEW)
    for options in (dict(do_sample=True, top_k=20, temperature=0.7, eos_token_id=None, pad_token_id=0),
                    dict(num_beams=3, num_return_sequences=2, **GREEDY),
                    dict(latent_cache_dtype="fp8", **GREEDY)):
        torch.manual_seed(1234)
        dynamic = model.generate(ids, **common, **options)
        torch.manual_seed(1234)
        static = model.generate(ids, cache_implementation="static", **common, **options)
        assert torch.equal(static, dynamic), options


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("draft_tokens", [1, 2])
def test_mtp_speculation_over_static_caches_matches_dynamic(model, fp8, draft_tokens):
    """MTP speculation with static caches (rejected drafts stay as holes, masked): the tokens of the dynamic caches,
    which are the reference's in full precision."""
    ids, mask = left_padded(2, pads=(3, 0), seed=7)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, use_mtp=True, mtp_draft_tokens=draft_tokens,
                  latent_cache_dtype="fp8" if fp8 else None, **GREEDY)
    dynamic = model.generate(ids, **kwargs)
    if not fp8:
        assert torch.equal(dynamic, reference_greedy(model, ids, mask, max_new_tokens=12)[0])
    assert torch.equal(model.generate(ids, cache_implementation="static", **kwargs), dynamic)


def test_static_cache_too_small_raises_naming_max_cache_len(model, prompt):
    for max_cache_len, names in ((PROMPT - 1, ("prompt", "longer")), (PROMPT + NEW - 2, ("max_new_tokens",))):
        for use_mtp in (False, True):
            with pytest.raises(ValueError, match="max_cache_len") as err:
                model.generate(prompt, max_new_tokens=NEW, cache_implementation="static", max_cache_len=max_cache_len,
                               use_mtp=use_mtp, **GREEDY)
            assert all(n in str(err.value) for n in names), err.value
    cache = DeepseekStaticLatentCache(model.config, max_cache_len=PROMPT + 2)
    with torch.no_grad():
        model(prompt, cache=cache, use_cache=True)
        model(prompt[:, :2], cache=cache, use_cache=True)
        with pytest.raises(ValueError, match="max_cache_len"):
            model(prompt[:, :1], cache=cache, use_cache=True)


def test_transformers_static_cache_object_raises_naming_it(model, prompt):
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=PROMPT + NEW)
    with pytest.raises(ValueError, match="StaticCache is not supported"):
        model.generate(prompt, max_new_tokens=NEW, cache=cache, **GREEDY)


def test_static_cache_matches_transformers_static_cache(hf_and_ours):
    """Ours and transformers' DeepseekV3, both on their static caches, same weights: the same greedy tokens."""
    hf, ours = hf_and_ours
    ids, mask = left_padded(2, pads=(0, 3))
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, cache_implementation="static", **GREEDY)
    with torch.no_grad():
        expected = hf.generate(ids, **kwargs)
    assert torch.equal(expected, reference_greedy(hf, ids, mask)[0])
    assert torch.equal(ours.generate(ids, **kwargs), expected)


def test_compiled_forward_matches_reference():
    """A torch.compile'd forward inside generate over the default (growing) cache. One (MoE) decoder layer and four
    tokens: tracing is the cost here."""
    import torch._dynamo

    m = tiny_model(seed=0, num_hidden_layers=1, first_k_dense_replace=0).eval()
    assert m.model.layers[0].moe is not None
    prompt = random_ids(1, PROMPT, seed=5)
    expected, logits = reference_greedy(m, prompt, max_new_tokens=4)
    assert_well_separated(logits)
    assert not torch.equal(markov_greedy(m, prompt, 4), expected)
    torch._dynamo.reset()
    m.forward = torch.compile(m.forward, backend="eager")
    try:
        assert torch.equal(m.generate(prompt, max_new_tokens=4, **GREEDY), expected)
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------------------------
# MTP against transformers' MtpModel on the same weights

MTP_VOCAB = 16  # small, so that drafts are accepted now and then (multi-token chunks in the stream)


@pytest.fixture(scope="module")
def mtp_pair(tmp_path_factory):
    """Ours with an MTP module, saved in the official layout (MTP at model.layers.N) and loaded into transformers'
    DeepseekV3ForCausalLM. transformers finds MTP weights through the class's _keys_to_ignore_on_load_unexpected
    pattern, hard-coded to V3's layer 61: the instance attribute points it at layer N of this tiny model.

    The final norm's weight is drawn from N(0, 1), signs included, so that the main model's hidden state before and
    after model.norm lead the MTP module to different drafts (with norm weights near 1 they rarely differ)."""
    folder = tmp_path_factory.mktemp("mtp")
    ours = tiny_model(seed=0, vocab_size=MTP_VOCAB).eval()
    with torch.no_grad():
        ours.model.norm.weight.copy_(torch.randn(ours.config.hidden_size, generator=torch.Generator().manual_seed(0)))
    ours.save_pretrained(folder)
    hf = DeepseekV3ForCausalLM.from_pretrained(folder).eval()
    hf._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{ours.config.num_hidden_layers}\..*"]
    assert hf.config.num_mtp_layers == 1
    return ours, hf


@pytest.fixture(scope="module")
def mtp_prompt():
    return random_ids(1, PROMPT, seed=8, vocab=MTP_VOCAB)


def hf_mtp_model(hf):
    from transformers.modeling_layers import MtpModel

    return MtpModel.from_pretrained(hf).eval()


def test_mtp_weights_reach_transformers_mtp_model(mtp_pair):
    ours, hf = mtp_pair
    mtp = hf_mtp_model(hf).layers[0]
    mine = ours.model.mtp_layers[0]
    for name in ("enorm", "hnorm", "eh_proj"):
        assert torch.equal(getattr(mtp, name).weight, getattr(mine, name).weight), name
    assert torch.equal(mtp.post_norm.weight, mine.shared_head.norm.weight)
    assert torch.equal(mtp.mtp_block.self_attn.kv_b_proj.weight, mine.self_attn.kv_b_proj.weight)


@torch.no_grad()
def transformers_mtp_logits(hf, ids_BT, pre_norm: bool = False):
    """transformers' MTP, teacher-forced: position i drafts t_{i+2} from the main model's hidden state at i and the
    embedding of t_{i+1}, at t_{i+1}'s position, as MTPCandidateGenerator feeds it. That hidden state is the final
    (normed) one, hidden_states[-1]; pre_norm=True feeds model.norm's input instead, for the fixture check."""
    mtp = hf_mtp_model(hf)
    T = ids_BT.shape[1]
    seen = []
    hook = hf.model.norm.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        h_BTD = hf(ids_BT, output_hidden_states=True).hidden_states[-1]
    finally:
        hook.remove()
    if pre_norm:
        h_BTD = seen[-1]
    position_ids = torch.arange(1, T).unsqueeze(0)
    h = mtp.forward_layer(0, h_BTD[:, :-1], position_ids, None, input_ids=ids_BT[:, 1:])
    return mtp.shared_head(h)


def test_mtp_logits_match_transformers_mtp_model(mtp_pair):
    """Our MTP module's logits (the training forward's mtp_logits) equal transformers' MtpModel's on the same
    weights: both read the main model's hidden state after the final norm (what the module drafts from at serving
    time is what it is trained on)."""
    ours, hf = mtp_pair
    ids = random_ids(1, 12, seed=7, vocab=MTP_VOCAB)
    expected = transformers_mtp_logits(hf, ids)
    assert max_diff(transformers_mtp_logits(hf, ids, pre_norm=True), expected) > 0.1  # the fixture can tell
    with torch.no_grad():
        got = ours(ids, labels=ids).mtp_logits[0][:, :-1]
    assert got.shape == expected.shape
    assert max_diff(got, expected) < 1e-4


def record_decoder_inputs(decoder) -> tuple[list, object]:
    """Token ids of every forward of the main decoder: the prompt, then each verification [bonus, drafts...]."""
    seen = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        assert ids is not None, "the speculative loop called the decoder without input_ids"
        seen.append(ids.tolist())

    return seen, decoder.register_forward_pre_hook(hook, with_kwargs=True)


def test_mtp_drafts_match_transformers_generate_use_mtp(mtp_pair, mtp_prompt):
    """Same weights, greedy, batch 1: our generate(use_mtp=True) and transformers' verify the same drafts at every
    step (each verification forward gets [last token, draft]) and stream the same per-step chunks (accepted drafts
    plus the bonus token)."""
    ours, hf = mtp_pair
    expected, logits = reference_greedy(ours, mtp_prompt, max_new_tokens=20)
    assert_well_separated(logits)
    post = transformers_mtp_logits(hf, expected).argmax(-1)
    pre = transformers_mtp_logits(hf, expected, pre_norm=True).argmax(-1)
    assert (post != pre).float().mean() > 0.5, "fixture: pre- and post-norm drafts mostly agree"
    theirs_in, h1 = record_decoder_inputs(hf.model)
    mine_in, h2 = record_decoder_inputs(ours.model)
    theirs, mine = RecordingStreamer(), RecordingStreamer()
    try:
        with torch.no_grad():
            hf_out = hf.generate(mtp_prompt, max_new_tokens=20, use_mtp=True, streamer=theirs, **GREEDY)
            out = ours.generate(mtp_prompt, max_new_tokens=20, use_mtp=True, streamer=mine,
                                return_dict_in_generate=True, **GREEDY)
    finally:
        h1.remove()
        h2.remove()
    assert torch.equal(hf_out, expected)
    assert torch.equal(out.sequences, expected)
    assert len(theirs_in) > 5 and mine_in == theirs_in
    assert mine.chunks == theirs.chunks
    accepted_by_transformers = sum(len(c) - 1 for c in theirs.chunks[2:])
    assert accepted_by_transformers > 0, "fixture: no draft accepted"
    assert out.mtp_accepted == accepted_by_transformers


# ---------------------------------------------------------------------------------------------------------------------
# MTP: streamer, EOS, max_new_tokens and the options it does not implement


def chunk_ends(chunks: list[list[int]]) -> list[int]:
    ends, n = [], 0
    for c in chunks:
        n += len(c)
        ends.append(n)
    return ends


def streamed(model, prompt, **kwargs) -> tuple[torch.Tensor, RecordingStreamer]:
    streamer = RecordingStreamer()
    with torch.no_grad():
        out = model.generate(prompt, use_mtp=True, streamer=streamer, **{**GREEDY, **kwargs})
    return out, streamer


@pytest.mark.parametrize("max_new_tokens", [2, 4, 20])
def test_mtp_streamer_gets_exactly_the_generated_tokens(mtp_pair, mtp_prompt, max_new_tokens):
    """The stream holds exactly the returned tokens, also when max_new_tokens cuts a step's accepted drafts short,
    in the chunks transformers' MTP streams on the same weights."""
    ours, hf = mtp_pair
    if max_new_tokens < 20:  # the fixture: in an unlimited run, the limit falls inside a multi-token chunk
        _, free = streamed(hf, mtp_prompt, max_new_tokens=30)
        assert max_new_tokens not in chunk_ends(free.chunks[1:]), "fixture: limit on a chunk boundary"
    expected, theirs = streamed(hf, mtp_prompt, max_new_tokens=max_new_tokens)
    out, mine = streamed(ours, mtp_prompt, max_new_tokens=max_new_tokens)
    assert torch.equal(out, expected) and out.shape[1] == PROMPT + max_new_tokens
    assert mine.ended
    assert mine.chunks[0] == mtp_prompt[0].tolist()
    assert mine.generated() == out[0, PROMPT:].tolist()
    assert mine.chunks == theirs.chunks


def test_mtp_stops_at_eos_and_streams_nothing_after_it(mtp_pair, mtp_prompt):
    ours, hf = mtp_pair
    full, logits = reference_greedy(ours, mtp_prompt, max_new_tokens=20)
    assert_well_separated(logits)
    new = full[0, PROMPT:].tolist()
    _, free = streamed(hf, mtp_prompt, max_new_tokens=20)
    ends = chunk_ends(free.chunks[1:])
    # Every token that first appears at position i is tried as EOS; at least one of them is an accepted draft
    # followed by more tokens of its chunk (what a streamer must not receive).
    firsts = [i for i in range(len(new)) if new[i] not in new[:i]]
    assert any(i + 1 not in ends for i in firsts), "fixture: no first occurrence inside a chunk"
    for i in firsts:
        eos = dict(eos_token_id=new[i], max_new_tokens=20)
        expected, _ = reference_greedy(ours, mtp_prompt, **eos)
        _, theirs = streamed(hf, mtp_prompt, **eos)
        out, mine = streamed(ours, mtp_prompt, **eos)
        assert out[0, PROMPT:].tolist() == new[: i + 1], f"eos={new[i]}"
        assert torch.equal(out, expected)
        assert mine.generated() == new[: i + 1], f"eos={new[i]}"
        assert mine.chunks == theirs.chunks, f"eos={new[i]}"
        assert mine.ended


@pytest.mark.parametrize("option", ["output_scores", "output_logits", "output_hidden_states", "output_attentions"])
def test_mtp_refuses_output_options(model, prompt, option):
    """The speculative loop scores drafts in blocks: it has no per-step scores, logits or per-step outputs to return."""
    with pytest.raises(ValueError, match=rf"use_mtp=True\) does not support `{option}=True`"):
        model.generate(prompt, max_new_tokens=NEW, use_mtp=True, return_dict_in_generate=True, **{option: True},
                       **GREEDY)


def test_mtp_refuses_inputs_embeds(model, prompt):
    embeds = model.get_input_embeddings()(prompt).detach()
    with pytest.raises(ValueError, match="needs input_ids .* inputs_embeds alone is not supported"):
        model.generate(inputs_embeds=embeds, max_new_tokens=NEW, use_mtp=True, **GREEDY)


# Plain generate's beam search, logits processors and stopping criteria: the speculative loop implements none of them.
MTP_REFUSED_OPTIONS = {
    "num_beams": dict(num_beams=2),
    "num_beams+num_return_sequences": dict(num_beams=2, num_return_sequences=2),
    "repetition_penalty": dict(repetition_penalty=1.5),
    "no_repeat_ngram_size": dict(no_repeat_ngram_size=1),
    "min_new_tokens": dict(min_new_tokens=5, eos_token_id=3),
    "bad_words_ids": dict(bad_words_ids=[[3]]),
    "suppress_tokens": dict(suppress_tokens=[3]),
    "sequence_bias": dict(sequence_bias={(3,): -100.0}),
    "forced_eos_token_id": dict(forced_eos_token_id=3, eos_token_id=3),
    "exponential_decay_length_penalty": dict(exponential_decay_length_penalty=(2, 3.0), eos_token_id=3),
}


@pytest.mark.parametrize("option", list(MTP_REFUSED_OPTIONS))
def test_mtp_refuses_generation_options_it_does_not_implement(model, prompt, option):
    name = option.split("+")[0]
    with pytest.raises(ValueError, match=rf"use_mtp=True\) does not support `{name}="):
        model.generate(prompt, max_new_tokens=NEW, use_mtp=True, **{**GREEDY, **MTP_REFUSED_OPTIONS[option]})


def test_mtp_refuses_stop_strings(text_model, tokenizer):
    enc = tokenizer(["def add(a, b):"], return_tensors="pt")
    with pytest.raises(ValueError, match=r"use_mtp=True\) does not support `stop_strings="):
        text_model.generate(**enc, max_new_tokens=12, do_sample=False, stop_strings=["ab"], tokenizer=tokenizer,
                            use_mtp=True)
