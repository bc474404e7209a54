"""DeepSeek-V3.2's indexer keys in generate()'s own caches with index_cache_dtype="fp8" (modeling_deepseek/index_cache.py).

The option is a validated config field; generate() (dynamic and static caches, with the latent in the model dtype or
in e4m3) then gives the tokens, and the scores, of generate() over model-dtype caches whose cached indexer keys are
rounded through e4m3 with per-token scales (the fresh tokens' own in full precision): test_sparse_serving.py's
reference for the paged rows, which hold the same format. Bytes per token are the paged rows' figures, and the
static cache still decodes compiled (one graph).
"""

from __future__ import annotations

import pytest
import torch

from conftest import random_ids, tiny_config, tiny_model
from modeling_deepseek import DeepseekConfig
from modeling_deepseek.cache import DeepseekLatentCache, DeepseekStaticLatentCache, update_latent_cache
from modeling_deepseek.fp8_format import FP8_DTYPE
from test_sparse_serving import e4m3_cached_index_keys

DSA = dict(index_topk=6, index_n_heads=16, index_head_dim=16)


def test_config_field_is_validated_and_saved(tmp_path):
    with pytest.raises(ValueError, match="`index_cache_dtype` must be None or 'fp8', got 'int8'"):
        tiny_config(**DSA, index_cache_dtype="int8")
    with pytest.raises(ValueError, match=r"`index_cache_dtype`='fp8' needs .*lightning indexer \(`index_topk` set\)"):
        tiny_config(index_cache_dtype="fp8")
    tiny_config(**DSA, index_cache_dtype="fp8").save_pretrained(tmp_path)
    assert DeepseekConfig.from_pretrained(tmp_path).index_cache_dtype == "fp8"
    with pytest.raises(ValueError, match="`index_cache_dtype`"):  # an override is checked like the file's value
        DeepseekConfig.from_pretrained(tmp_path, index_cache_dtype="e5m2")
    # generate() checks the argument (and a generation config's) by the same rule
    v3, ids = tiny_model(seed=0).eval(), random_ids(1, 4)
    with pytest.raises(ValueError, match="`index_topk` set"):
        v3.generate(ids, max_new_tokens=1, index_cache_dtype="fp8")
    with pytest.raises(ValueError, match="got 'int8'"):
        tiny_model(seed=0, **DSA).eval().generate(ids, max_new_tokens=1, index_cache_dtype="int8")


@pytest.mark.parametrize("latent_cache_dtype", [None, "fp8"])
def test_generate_equals_generate_with_e4m3_rounded_indexer_keys(latent_cache_dtype):
    model = tiny_model(seed=0, **DSA).eval()
    ids = random_ids(2, 14, seed=5)
    kwargs = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True,
                  latent_cache_dtype=latent_cache_dtype)
    plain = model.generate(ids, **kwargs)
    with e4m3_cached_index_keys():
        expected = model.generate(ids, **kwargs)
    model.config.index_cache_dtype = "fp8"  # the config field: generate() reads it
    got = {"dynamic": model.generate(ids, **kwargs),
           "static": model.generate(ids, cache_implementation="static", **kwargs)}
    model.config.index_cache_dtype = None
    got["argument"] = model.generate(ids, index_cache_dtype="fp8", **kwargs)
    assert not torch.allclose(torch.stack(plain.scores), torch.stack(expected.scores))  # the rounding shows
    for name, out in got.items():
        assert torch.equal(out.sequences, expected.sequences), name
        assert torch.allclose(torch.stack(out.scores), torch.stack(expected.scores), atol=1e-5, rtol=0), name


@pytest.mark.parametrize("latent_fp8,index_fp8,row_bytes", [(False, False, 1408), (False, True, 1284),
                                                             (True, False, 840), (True, True, 716)])
def test_bytes_per_token_are_the_paged_rows(latent_fp8, index_fp8, row_bytes):
    """V3.2's widths (latent 512, RoPE key 64, indexer key 128) in bf16, one layer: docs/sparse_attention.md's table.
    The cache holds e4m3 + scales, and hands the indexer the written tokens exactly, the cached ones within e4m3."""
    config = tiny_config(num_hidden_layers=1, first_k_dense_replace=1, kv_lora_rank=512, qk_rope_head_dim=64,
                         index_topk=8, index_head_dim=128)
    g = torch.Generator().manual_seed(0)
    new = [torch.randn(2, *shape, generator=g).to(torch.bfloat16) for shape in ((1, 4, 512), (1, 4, 64), (4, 128))]
    for cache in (DeepseekLatentCache(config, fp8=latent_fp8, index_fp8=index_fp8),
                  DeepseekStaticLatentCache(config, max_cache_len=8, fp8=latent_fp8, index_fp8=index_fp8)):
        update_latent_cache(cache, 0, *new)
        fresh = [t[..., :1, :] + 1 for t in new[:2]] + [new[2][:, :1] + 1]
        *_, keys_BSD = update_latent_cache(cache, 0, *fresh)
        assert cache.nbytes_per_token() == row_bytes
        layer = cache.layers[0]
        assert layer.index_keys.dtype == (FP8_DTYPE if index_fp8 else torch.bfloat16)
        assert keys_BSD.dtype == torch.bfloat16 and torch.equal(keys_BSD[:, 4], fresh[2][:, 0])
        cached, want = keys_BSD[:, :4].float(), new[2].float()
        if index_fp8:  # e4m3: relative error <= 2^-4 of the token's largest value
            amax = want.abs().amax(-1, keepdim=True)
            assert (cached - want).abs().le(amax * 2**-4 + 1e-6).all() and not torch.equal(cached, want)
        else:
            assert torch.equal(cached, want)


def test_compiled_static_decode_with_e4m3_indexer_keys():
    """The e4m3 indexer-key streams keep the static cache compileable: a decode step compiles whole (fullgraph) once,
    with the eager logits."""
    from conftest import eager_and_compiled_static_decode, max_diff

    eager = tiny_model(num_hidden_layers=1, **DSA).eval()
    logits, counter, cache = eager_and_compiled_static_decode(
        eager, lambda m: DeepseekStaticLatentCache(m.config, max_cache_len=16, fp8=True, index_fp8=True),
        random_ids(2, 14), prefill=10)
    assert cache.layers[0].index_keys.dtype == FP8_DTYPE
    assert max_diff(logits["eager"], logits["compiled"]) < 1e-5
    assert counter.frame_count == 2  # the prefill and one decode graph for all four steps
