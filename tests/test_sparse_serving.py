"""DeepSeek-V3.2 sparse attention served: continuous batching over paged rows holding the indexer key.

The paged rows (paged_fp8.LatentRowAllocator) hold latent, RoPE key and indexer key, each in the model dtype or e4m3
+ a per-token scale: their byte layout for V3.2's widths, and what a read hands back (stored values exactly, e4m3 ones
within the format's rounding, this step's rows in full precision). Through the engine (generate_batch), every request
gets the tokens greedy generate() gives its prompt alone (test_sparse_attention.py ties generate to transformers'
DeepseekV32), with prompts longer than k, prefill split into chunks, decode tokens of several requests batched; a
decode step reads every indexer key but only the k selected latent rows; index_cache_dtype="fp8" gives the tokens of
generate() whose cached indexer keys went through e4m3.
"""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig

from conftest import random_ids, tiny_model
from modeling_deepseek.compat import MLA_PAGED_CACHE, PAGED_CACHE_MIN_VERSION

needs_mla_paged_cache = pytest.mark.skipif(
    not MLA_PAGED_CACHE, reason=f"continuous batching of MLA needs transformers >= {PAGED_CACHE_MIN_VERSION}")

K = 6  # index_topk, below the prompts' lengths: selection matters from the first decode step
DSA = dict(index_topk=K, index_n_heads=16, index_head_dim=16)
LENGTHS = (4, 9, 17, 30)
NEW = 8
MARGIN = 2e-4


def greedy(**overrides) -> GenerationConfig:
    return GenerationConfig(**{**dict(do_sample=False, max_new_tokens=NEW, eos_token_id=None, pad_token_id=0),
                               **overrides})


def cb_config(**overrides):
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    # Small pages and batches: prompts span several pages, the 30-token prompt is prefilled in chunks.
    return ContinuousBatchingConfig(**{**dict(page_size=8, max_batch_tokens=16), **overrides})


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0, **DSA).eval()


@pytest.fixture(scope="module")
def prompts():
    return [random_ids(1, n, seed=n)[0].tolist() for n in LENGTHS]


@torch.no_grad()
def alone(model, prompt: list[int], **kwargs) -> list[int]:
    """generate()'s greedy continuation of one prompt alone; asserts no near-tie along the way."""
    out = model.generate(torch.tensor([prompt]), generation_config=greedy(), output_scores=True,
                         return_dict_in_generate=True, **kwargs)
    top2 = torch.stack(out.scores).float().topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() > MARGIN, "near-tie in the fixture: pick another seed"
    return out.sequences[0, len(prompt):].tolist()


def tokens_of(results) -> list[list[int]]:
    return [out.generated_tokens for out in results.values()]


# ---------------------------------------------------------------------------------------------------------------------
# The rows


def _allocator(index_head_dim, latent_fp8, index_fp8, dtype=torch.bfloat16, tokens=64):
    """A LatentRowAllocator for one layer at V3.2's widths over a cache tensor of `tokens` rows (+ trash)."""
    from transformers.generation.continuous_batching.cache_allocators import CachePool, MLACacheAllocator

    from modeling_deepseek.paged_fp8 import LatentRowAllocator

    config = SimpleNamespace(kv_lora_rank=512, qk_rope_head_dim=64)
    mla = MLACacheAllocator(0, config, 1, dtype, page_size=16, layer_indices=[0], allow_block_sharing=False)
    allocator = LatentRowAllocator(mla, index_head_dim, latent_fp8, index_fp8)
    sector = allocator.bytes_per_block
    cache = torch.zeros(sector * (tokens // 16 + 2), dtype=torch.uint8)
    allocator.register_cache_tensor(sector, sector * tokens // 16, cache, CachePool(tokens // 16, 1))
    return allocator


@needs_mla_paged_cache
@pytest.mark.parametrize("latent_fp8,index_fp8,row_bytes", [(False, False, 1408), (False, True, 1284),
                                                             (True, False, 840), (True, True, 716)])
def test_rows_hold_the_indexer_key_in_its_dtype(latent_fp8, index_fp8, row_bytes):
    """V3.2 (C 512, R 64, I 128) in bf16: the bytes per token and layer the docstring states. A read hands back the
    stored values (exactly for bf16 streams, within e4m3's rounding for e4m3 ones), this step's rows as written."""
    from modeling_deepseek.paged_fp8 import PagedRows

    allocator = _allocator(128, latent_fp8, index_fp8)
    assert allocator.row_bytes == row_bytes and allocator.bytes_per_page == 16 * row_bytes
    g = torch.Generator().manual_seed(0)
    new = {name: torch.randn(10, w, generator=g).to(torch.bfloat16) for name, w in (("latent", 512), ("rope", 64),
                                                                                     ("index", 128))}
    slots = torch.arange(30, 40)
    PagedRows(allocator, 0, new, torch.empty(0, dtype=torch.long), slots)  # written, nobody reads: a first prefill
    fresh = {name: t[:2] + 1 for name, t in new.items()}
    rows = PagedRows(allocator, 0, fresh, torch.cat([slots, torch.tensor([50, 51])]), torch.tensor([50, 51]))
    picks = torch.tensor([11, 3, 0, 10])  # a fresh row, cached rows, the other fresh row
    for name, fp8 in (("latent", latent_fp8), ("rope", latent_fp8), ("index", index_fp8)):
        (got,) = rows.read((name,), picks)
        assert got.dtype == torch.bfloat16 and torch.equal(got[[0, 3]], fresh[name][[1, 0]])
        cached, want = got[1:3].float(), new[name][[3, 0]].float()
        if fp8:  # e4m3: 3 mantissa bits, relative error <= 2^-4 of the token's largest value
            amax = want.abs().amax(-1, keepdim=True)
            assert (cached - want).abs().le(amax * 2**-4 + 1e-6).all() and not torch.equal(cached, want)
        else:
            assert torch.equal(cached, want)
    # The engine's own update reads every row: latent, and [rope | index] side by side.
    latent, value = allocator.update(fresh["latent"][:, None], torch.cat([fresh["rope"], fresh["index"]], -1)[:, None],
                                     0, torch.cat([slots, torch.tensor([50, 51])]), torch.tensor([50, 51]))
    assert latent.shape == (12, 1, 512) and value.shape == (12, 1, 192)
    assert torch.equal(latent[:, 0], rows.read(("latent",))[0])
    assert torch.equal(value[:, 0], torch.cat(rows.read(("rope", "index")), dim=-1))


@needs_mla_paged_cache
def test_index_fp8_without_an_indexer_raises():
    with pytest.raises(ValueError, match="index_head_dim"):
        _allocator(0, False, True)


# ---------------------------------------------------------------------------------------------------------------------
# Through the engine


@needs_mla_paged_cache
def test_generate_batch_matches_generate_and_decode_reads_only_the_top_k_rows(model, prompts, monkeypatch):
    """Every request gets generate()'s tokens (prompts of 4 to 30 tokens with k = 6, chunked prefill, decode tokens
    batched). A decode step of D requests reads D x min(k, S) latent rows (S: the longest context among them), and
    all D x S indexer keys only where k does not cover S (there every key is attended: no indexer run)."""
    from modeling_deepseek import paged_sparse

    expected = [alone(model, p) for p in prompts]
    steps, decode = [], paged_sparse._sparse_decode

    def counting_decode(attn, x, q_low, q_nope, q_rope, cos, sin, rows, requests, out):
        counts, read = {}, rows.read

        def counting_read(names, positions=None):
            counts[tuple(names)] = positions.numel()
            return read(names, positions)

        rows.read = counting_read
        decode(attn, x, q_low, q_nope, q_rope, cos, sin, rows, requests, out)
        steps.append((len(requests), max(k1 - k0 for _, k0, k1 in requests), counts))

    monkeypatch.setattr(paged_sparse, "_sparse_decode", counting_decode)
    results = model.generate_batch(prompts, generation_config=greedy(), continuous_batching_config=cb_config())
    assert tokens_of(results) == expected
    for D, S, counts in steps:
        assert counts[("latent", "rope")] == D * min(K, S)
        assert counts.get(("index",)) == (D * S if S > K else None)
    assert any(D > 1 and S > K for D, S, _ in steps), "no batched decode step beyond k"


@needs_mla_paged_cache
def test_masked_path_through_the_engine_gives_the_same_tokens(prompts):
    """dsa_impl="masked" (dense attention under the top-k mask) runs decode tokens through whole rows: the tokens of
    generate() on the sparse path (test_sparse_attention.py ties the two)."""
    model = tiny_model(seed=0, **DSA).eval()
    expected = [alone(model, p) for p in prompts]
    model.config.dsa_impl = "masked"
    results = model.generate_batch(prompts, generation_config=greedy(), continuous_batching_config=cb_config())
    assert tokens_of(results) == expected


@contextmanager
def e4m3_cached_index_keys():
    """generate()'s caches hand the indexer its cached keys (all but this forward's own) rounded through e4m3 with
    per-token scales: what the paged rows with index_cache_dtype="fp8" hand it."""
    from modeling_deepseek import attention
    from modeling_deepseek.fp8_format import dequantize_per_token, quantize_per_token

    update = attention.update_latent_cache

    def rounded(cache, layer_idx, latent, k_rope, index_keys_BTD):
        latent, k_rope, keys_BSD = update(cache, layer_idx, latent, k_rope, index_keys_BTD)
        T = index_keys_BTD.shape[1]
        cached = dequantize_per_token(*quantize_per_token(keys_BSD[:, :-T]), keys_BSD.dtype)
        return latent, k_rope, torch.cat([cached, keys_BSD[:, -T:]], dim=1)

    attention.update_latent_cache = rounded
    try:
        yield
    finally:
        attention.update_latent_cache = update


@needs_mla_paged_cache
def test_fp8_indexer_keys_give_generate_tokens_with_e4m3_cached_keys(model, prompts):
    """index_cache_dtype="fp8": the indexer scores cached keys read back from e4m3 (this step's own in full
    precision): the tokens of generate() whose cached indexer keys are rounded the same way, and those of
    generate(index_cache_dtype="fp8"), whose caches store them so. One-step prefills, so that generate's prompt forward
    and the engine's see the same fresh rows."""
    results = model.generate_batch(prompts, generation_config=greedy(),
                                   continuous_batching_config=cb_config(max_batch_tokens=64), index_cache_dtype="fp8")
    with e4m3_cached_index_keys():
        assert tokens_of(results) == [alone(model, p) for p in prompts]
    assert tokens_of(results) == [alone(model, p, index_cache_dtype="fp8") for p in prompts]


@needs_mla_paged_cache
def test_index_cache_dtype_is_checked_before_the_loop(prompts):
    v3 = tiny_model(seed=0).eval()
    with pytest.raises(ValueError, match="lightning"):
        v3.generate_batch(prompts[:1], generation_config=greedy(), index_cache_dtype="fp8")
    with pytest.raises(ValueError, match="`index_cache_dtype` must be None or 'fp8'"):
        tiny_model(seed=0, **DSA).eval().generate_batch(prompts[:1], generation_config=greedy(),
                                                        index_cache_dtype="int8")


@needs_mla_paged_cache
def test_the_server_serves_a_v32_model_sparsely(tmp_path):
    """`python -m modeling_deepseek.serve --continuous-batching` over a saved V3.2 folder (FP8 indexer keys from its
    config.json): concurrent completions through the openai client equal generate() with the same e4m3 indexer keys
    (as test_fp8_indexer_keys_... builds them), prompts longer than k."""
    import os
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    from benchmarks.harness import free_port, serving
    from test_openai_server import REPO, VOCAB, word_tokenizer

    model = tiny_model(seed=0, bos_token_id=0, eos_token_id=1, pad_token_id=2, vocab_size=VOCAB, **DSA).eval()
    model.config.index_cache_dtype = "fp8"
    model.generation_config.update(do_sample=False, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model.save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    prompts = [random_ids(1, n, seed=n, vocab=VOCAB)[0].tolist() for n in (5, 13, 26)]
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("DEEPSEEK_API_KEY", None)
    cmd = [sys.executable, "-m", "modeling_deepseek.serve", str(tmp_path), "--continuous-batching", "--host",
           "127.0.0.1", "--port", str(port), "--device", "cpu", "--cb-num-blocks", "16", "--cb-block-size", "16"]
    with serving(cmd, port, tmp_path / "server.log", env, timeout=240):
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)

        def complete(ids):
            text = " ".join(f"w{i}" for i in ids)
            return client.completions.create(model=str(tmp_path), prompt=text, max_tokens=6, temperature=0)

        with ThreadPoolExecutor(len(prompts)) as pool:
            answers = [r.choices[0].text for r in pool.map(complete, prompts)]
    for ids, text in zip(prompts, answers):
        with torch.no_grad(), e4m3_cached_index_keys():
            expected = model.generate(torch.tensor([ids]), max_new_tokens=6)[0, len(ids):].tolist()
        if 1 in expected:  # EOS: generation stops there, the server does not print it
            expected = expected[: expected.index(1)]
        assert [int(word[1:]) for word in text.split()] == expected
