"""DeepSeek-V3.2 sparse attention (DSA): the lightning indexer and top-k attention over the MLA latent.

The reference is transformers' DeepseekV32ForCausalLM on the same random weights (saved by transformers, loaded by
us): our "masked" path (dense attention under the top-k mask) and our "sparse" path (each query gathers its k latent
rows) give its logits. Where k covers the context the sparse path is plain attention; elsewhere it equals the masked
path, through the caches (dynamic, static, chunked prefill), with padding, in generate() and in gradients.

The tiny indexer has 16 heads: a key whose ReLU scores are zero in every head ties at 0 with others, and top-k breaks
ties in no defined order (transformers' too); with 16 heads such keys are vanishingly rare.
"""

from __future__ import annotations

import pytest
import torch

from conftest import HF_TINY, max_diff, random_ids, randomize_, tiny_config, tiny_model
from modeling_deepseek import DeepseekConfig, DeepseekForCausalLM
from modeling_deepseek import indexer as indexer_module
from modeling_deepseek import sparse_attention
from modeling_deepseek.cache import DeepseekLatentCache, DeepseekStaticLatentCache

TOL = 1e-4
K = 6  # index_topk: below the test sequences' lengths, so that selection matters
DSA = dict(index_topk=K, index_n_heads=16, index_head_dim=16)


def set_dsa(model, impl: str):
    model.config.dsa_impl = impl
    return model


@pytest.fixture(scope="module")
def v32_pair(tmp_path_factory):
    """(transformers' DeepseekV32ForCausalLM, ours loaded from its save_pretrained folder)."""
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    torch.manual_seed(0)
    hf = randomize_(DeepseekV32ForCausalLM(DeepseekV32Config(**HF_TINY, **DSA)), 0).eval()
    path = tmp_path_factory.mktemp("v32")
    hf.save_pretrained(path)
    ours = DeepseekForCausalLM.from_pretrained(path).eval()
    return hf, ours


def padded_batch():
    ids = random_ids(2, 20, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding, as generate pads
    return ids, mask


# ---------------------------------------------------------------------------------------------------------------------
# Config


def test_config_fields_and_errors():
    config = tiny_config(**DSA)
    assert config.uses_sparse_attention and config.dsa_impl == "sparse"
    assert not tiny_config().uses_sparse_attention
    for bad, field in ((dict(index_topk=0), "index_topk"), (dict(index_topk=2.5), "index_topk"),
                       (dict(dsa_impl="flash"), "dsa_impl"), (dict(index_head_dim=4), "index_head_dim"),
                       (dict(index_n_heads=0), "index_n_heads"), (dict(q_lora_rank=None), "q_lora_rank")):
        with pytest.raises(ValueError, match=field):
            tiny_config(**{**DSA, **bad})
    big = tiny_config(**dict(DSA, index_topk=10_000))  # k beyond any context is fine: every key is kept
    assert big.index_topk == 10_000


def test_transformers_v32_config_loads_as_ours(v32_pair):
    hf, ours = v32_pair
    assert isinstance(ours.config, DeepseekConfig) and ours.config.model_type == "deepseek"
    assert (ours.config.index_topk, ours.config.index_n_heads, ours.config.index_head_dim) == (K, 16, 16)
    assert not hasattr(ours.config, "layer_types")  # transformers' "indexed_attention" layer kinds are not ours
    indexer = ours.model.layers[0].self_attn.indexer
    assert indexer.weights_proj.weight.dtype == torch.float32
    assert max_diff(indexer.wq_b.weight, hf.model.layers[0].self_attn.indexer.wq_b.weight) == 0


# ---------------------------------------------------------------------------------------------------------------------
# Parity with transformers' DeepseekV32


@pytest.mark.parametrize("impl", ["masked", "sparse"])
def test_logits_match_transformers_v32(v32_pair, impl):
    hf, ours = v32_pair
    set_dsa(ours, impl)
    ids, mask = padded_batch()
    with torch.no_grad():
        for attention_mask in (None, mask):
            expected = hf(ids, attention_mask=attention_mask).logits
            got = ours(ids, attention_mask=attention_mask).logits
            keep = slice(None) if attention_mask is None else attention_mask.bool()
            assert max_diff(got[keep], expected[keep]) < TOL, (impl, attention_mask is not None)
    set_dsa(ours, "sparse")


def test_dense_impl_ignores_the_indexer(v32_pair):
    """"dense" is V3 attention: the same logits as the V3.2 model with k covering the context."""
    _, ours = v32_pair
    ids = random_ids(2, 20)
    with torch.no_grad():
        dense = set_dsa(ours, "dense")(ids).logits
        sparse = set_dsa(ours, "sparse")(ids).logits
        indexers = [m for m in ours.modules() if isinstance(m, indexer_module.DeepseekIndexer)]
        for m in indexers:
            m.topk = 20
        covered = ours(ids).logits
        for m in indexers:
            m.topk = K
    assert max_diff(dense, covered) < TOL
    assert max_diff(dense, sparse) > 1e-2  # with k = 6 < 20 the selection changes the logits


# ---------------------------------------------------------------------------------------------------------------------
# The sparse path == the masked path: caches, chunked prefill, padding, generate


def _cached_logits(model, ids, mask, cache, split: int, chunk: int):
    """Prefill `split` tokens in chunks of `chunk`, then decode one token at a time; all logits concatenated."""
    out = []
    for t0 in list(range(0, split, chunk)) + list(range(split, ids.shape[1])):
        t1 = min(split, t0 + chunk) if t0 < split else t0 + 1
        out.append(model(ids[:, t0:t1], attention_mask=mask[:, :t1], cache=cache, use_cache=True).logits)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("static", [False, True])
def test_cached_sparse_decode_matches_masked_full_forward(v32_pair, static):
    _, ours = v32_pair
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = set_dsa(ours, "masked")(ids, attention_mask=mask).logits
        set_dsa(ours, "sparse")
        cache = (DeepseekStaticLatentCache(ours.config, max_cache_len=32) if static
                 else DeepseekLatentCache(config=ours.config))
        got = _cached_logits(ours, ids, mask, cache, split=12, chunk=5)
    keep = mask.bool()
    assert max_diff(got[keep], expected[keep]) < TOL
    layer = cache.layers[0]
    assert layer.index_keys.shape[-1] == 16 and layer.index_keys.shape[-2] == (32 if static else 20)


def test_generate_sparse_equals_masked(v32_pair):
    _, ours = v32_pair
    ids, mask = padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    masked = set_dsa(ours, "masked").generate(ids, **kwargs)
    sparse = set_dsa(ours, "sparse").generate(ids, **kwargs)
    static = ours.generate(ids, cache_implementation="static", **kwargs)
    assert torch.equal(sparse, masked) and torch.equal(static, masked)


def test_query_and_gather_blocks_do_not_change_results(v32_pair, monkeypatch):
    """The indexer scores and the gather run in query blocks bounded in bytes: one query per block gives the same."""
    _, ours = v32_pair
    ids = random_ids(2, 20)
    with torch.no_grad():
        whole = set_dsa(ours, "sparse")(ids).logits
        monkeypatch.setattr(indexer_module, "SCORE_BLOCK_BYTES", 1)
        monkeypatch.setattr(sparse_attention, "GATHER_BLOCK_BYTES", 1)
        blocked = ours(ids).logits
    assert max_diff(whole, blocked) < 1e-5


def test_sparse_gradients_match_masked():
    """Training through the gather (the sparse stage trains the main model under sparse attention): the loss and every
    gradient equal the masked path's; the indexer, used only for selection, gets none from the LM loss."""
    ids = random_ids(2, 16)
    grads = {}
    for impl in ("masked", "sparse"):
        model = tiny_model(train=True, mla_impl="absorbed", **DSA, dsa_impl=impl)
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads[impl] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    (loss_m, g_m), (loss_s, g_s) = grads["masked"], grads["sparse"]
    assert abs(loss_m - loss_s) < 1e-5 and set(g_m) == set(g_s)
    assert not any(".indexer." in n for n in g_s)
    assert max(max_diff(g_m[n], g_s[n]) for n in g_m) < 1e-5


def test_indexer_record_for_the_training_objective():
    """With `indexer.record`, each layer leaves its scores (differentiable), the selection and the main attention's
    head-summed distribution (normalised over the selected keys) for the KL objectives."""
    model = tiny_model(train=True, **DSA)
    for m in model.modules():
        if isinstance(m, indexer_module.DeepseekIndexer):
            m.record = True
    ids = random_ids(2, 16)
    model(ids)
    record = model.model.layers[1].self_attn.indexer.last_record
    assert record.scores_BTS.shape == (2, 16, 16) and record.scores_BTS.requires_grad
    assert torch.isinf(record.scores_BTS[0, 0, 1:]).all()  # causal: query 0 sees key 0 only
    assert record.topk_BTK.shape == record.valid_BTK.shape == record.attention_BTX.shape == (2, 16, K)
    assert torch.allclose(record.attention_BTX.sum(-1), torch.ones(2, 16))
    assert not record.valid_BTK[:, 2, 3:].any() and record.valid_BTK[:, -1].all()
    record.scores_BTS.gather(-1, record.topk_BTK).masked_fill(~record.valid_BTK, 0).sum().backward()
    assert model.model.layers[1].self_attn.indexer.wq_b.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------------
# DeepSeek's official V3.2 layout (export.py): config, FP8 indexer projections, MTP


def test_official_v32_layout_round_trips_with_fp8_indexer(tmp_path):
    """export_official writes a V3.2 model as DeepSeek's release lays it out (model_type deepseek_v32, the indexer's
    wq_b / wk in e4m3 with 128 x 128 block scales, MTP included); transformers' DeepseekV32 reads the bf16/fp32
    export with our logits, and our loader dequantizes the FP8 export to exactly fp8 x scale."""
    from safetensors.torch import load_file
    from transformers import DeepseekV32ForCausalLM

    from modeling_deepseek.export import export_official
    from modeling_deepseek.fp8_format import dequantize_weight_blockwise

    model = tiny_model(seed=3, **DSA).eval()
    ids = random_ids(2, 20)
    plain = export_official(model, tmp_path / "plain")
    hf = DeepseekV32ForCausalLM.from_pretrained(plain, use_kernels=False).eval()
    fp8 = export_official(model, tmp_path / "fp8", fp8=True)
    saved = load_file(fp8 / "model.safetensors")
    ours = DeepseekForCausalLM.from_pretrained(fp8).eval()
    with torch.no_grad():
        assert max_diff(hf(ids).logits, model(ids).logits) < TOL
    for layer in (0, 3):  # a main layer and the MTP block
        prefix = f"model.layers.{layer}.self_attn.indexer"
        for name in ("wq_b", "wk"):
            w, scale = saved[f"{prefix}.{name}.weight"], saved[f"{prefix}.{name}.weight_scale_inv"]
            assert w.dtype == torch.float8_e4m3fn
            loaded = ours.get_parameter(f"{prefix}.{name}.weight")
            assert torch.equal(loaded, dequantize_weight_blockwise(w, scale, 128, loaded.dtype))
        assert saved[f"{prefix}.weights_proj.weight"].dtype == torch.float32
        assert torch.equal(ours.get_parameter(f"{prefix}.k_norm.bias"), model.get_parameter(f"{prefix}.k_norm.bias"))
