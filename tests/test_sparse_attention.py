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

from conftest import HF_TINY, eager_and_compiled_static_decode, max_diff, random_ids, randomize_, tiny_config, tiny_model
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
    # transformers' per-layer dense / MoE list must agree with the layout ours derives from first_k_dense_replace
    assert tiny_config(mlp_layer_types=["dense", "sparse", "sparse"]).is_moe_layer(1)
    with pytest.raises(ValueError, match="mlp_layer_types"):
        tiny_config(mlp_layer_types=["dense", "dense", "sparse"])


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
def test_logits_match_transformers_v32(v32_pair, impl, monkeypatch):
    hf, ours = v32_pair
    set_dsa(ours, impl)
    gathers = []
    gathered = sparse_attention.gathered_attention
    monkeypatch.setattr(sparse_attention, "gathered_attention", lambda *a: gathers.append(1) or gathered(*a))
    ids, mask = padded_batch()
    with torch.no_grad():
        for attention_mask in (None, mask):
            expected = hf(ids, attention_mask=attention_mask).logits
            got = ours(ids, attention_mask=attention_mask).logits
            keep = slice(None) if attention_mask is None else attention_mask.bool()
            assert max_diff(got[keep], expected[keep]) < TOL, (impl, attention_mask is not None)
    assert len(gathers) == (6 if impl == "sparse" else 0)  # the sparse path gathered in each layer and call
    set_dsa(ours, "sparse")


def test_gather_or_mask_by_cost_at_v32_shapes():
    """mla_impl="auto": at V3.2's widths a prefill whose queries see few more than k keys runs masked and expanded
    (cheaper there); decode steps, later prefill chunks and long one-shot prefills gather. mla_impl decides when set."""
    from types import SimpleNamespace

    attn = SimpleNamespace(mla_impl="auto", kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128)
    k = 2048
    assert not sparse_attention.gather_is_cheaper(attn, 4096, 4096, k)  # the first 4K chunk of a prompt
    for T, S in ((1, 2049), (1, 32768), (4096, 16384), (16384, 16384)):
        assert sparse_attention.gather_is_cheaper(attn, T, S, k), (T, S)
    attn.mla_impl = "absorbed"
    assert sparse_attention.gather_is_cheaper(attn, 4096, 4096, k)
    attn.mla_impl = "expanded"
    assert not sparse_attention.gather_is_cheaper(attn, 1, 32768, k)


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
    if not static:  # per token: 3 layers x (latent 32 + rope key 8 + indexer key 16) fp32 values
        assert cache.nbytes_per_token() == 3 * (32 + 8 + 16) * 4


def test_generate_sparse_equals_masked(v32_pair):
    _, ours = v32_pair
    ids, mask = padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    masked = set_dsa(ours, "masked").generate(ids, **kwargs)
    sparse = set_dsa(ours, "sparse").generate(ids, **kwargs)
    static = ours.generate(ids, cache_implementation="static", **kwargs)
    assert torch.equal(sparse, masked) and torch.equal(static, masked)
    # the FP8 latent cache keeps the indexer keys in the model dtype beside its e4m3 latent: both paths agree on it
    fp8 = ours.generate(ids, latent_cache_dtype="fp8", **kwargs)
    assert torch.equal(set_dsa(ours, "masked").generate(ids, latent_cache_dtype="fp8", **kwargs), fp8)
    set_dsa(ours, "sparse")


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


def test_indexer_record_for_the_training_objective(monkeypatch):
    """With `indexer.record`, each layer leaves its scores (differentiable), the selection and the main attention's
    head-summed distribution (normalised over the selected keys) for the KL objectives. Scored one query per block
    (causal key ranges), the scores and their gradients are the same."""
    model = tiny_model(train=True, **DSA)
    for m in model.modules():
        if isinstance(m, indexer_module.DeepseekIndexer):
            m.record = True
    ids = random_ids(2, 16)
    indexer = model.model.layers[1].self_attn.indexer
    runs = []
    for block_bytes in (indexer_module.SCORE_BLOCK_BYTES, 1):
        monkeypatch.setattr(indexer_module, "SCORE_BLOCK_BYTES", block_bytes)
        model.zero_grad()
        model(ids)
        record = indexer.last_record
        record.scores_BTS.gather(-1, record.topk_BTK).masked_fill(~record.valid_BTK, 0).sum().backward()
        runs.append((record, indexer.wq_b.weight.grad.clone()))
    (record, grad), (blocked, blocked_grad) = runs
    assert record.scores_BTS.shape == (2, 16, 16) and record.scores_BTS.requires_grad
    assert torch.isinf(record.scores_BTS[0, 0, 1:]).all()  # causal: query 0 sees key 0 only
    assert record.topk_BTK.shape == record.valid_BTK.shape == record.attention_BTX.shape == (2, 16, K)
    assert torch.allclose(record.attention_BTX.sum(-1), torch.ones(2, 16))
    assert not record.valid_BTK[:, 2, 3:].any() and record.valid_BTK[:, -1].all()
    assert grad.abs().sum() > 0
    assert torch.equal(record.topk_BTK, blocked.topk_BTK)
    assert max_diff(record.scores_BTS.nan_to_num(0, 0, 0), blocked.scores_BTS.nan_to_num(0, 0, 0)) < 1e-5
    assert max_diff(grad, blocked_grad) < 1e-5


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
    # Kept in FP8 (the CUDA default), the indexer's projections are FP8 modules with the dequantized model's logits.
    kept = DeepseekForCausalLM.from_pretrained(fp8, fp8_keep_quantized=True).eval()
    assert type(kept.model.layers[1].self_attn.indexer.wq_b).__name__ == "DeepseekFP8Linear"
    with torch.no_grad():
        assert max_diff(kept(ids).logits, ours(ids).logits) < TOL


# ---------------------------------------------------------------------------------------------------------------------
# The rest of the model's machinery over the sparse path


def test_output_attentions_show_the_selection(v32_pair):
    """output_attentions on the sparse path: the gathered probabilities scattered over all keys, equal to the masked
    path's (eager) probabilities, zero outside each query's top-k."""
    _, ours = v32_pair
    ids = random_ids(2, 20)
    with torch.no_grad():
        masked = set_dsa(ours, "masked")(ids, output_attentions=True).attentions
        sparse = set_dsa(ours, "sparse")(ids, output_attentions=True).attentions
    for a, b in zip(masked, sparse):
        assert a.shape == b.shape == (2, 4, 20, 20) and max_diff(a, b) < 1e-5
        assert ((b > 0).sum(-1) <= K).all()


def test_mtp_speculation_and_compiled_static_decode(v32_pair):
    """MTP speculative decoding keeps the greedy tokens (its caches carry the indexer keys of the MTP block too), and
    a static-cache decode step compiles whole (fullgraph) once, with the eager logits."""
    _, ours = v32_pair
    ids = random_ids(1, 12)
    greedy = ours.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours.generate(ids, max_new_tokens=6, do_sample=False, use_mtp=True), greedy)

    ours = tiny_model(num_hidden_layers=1, **DSA).eval()  # one layer: a third of the tracing
    logits, counter, _ = eager_and_compiled_static_decode(
        ours, lambda m: DeepseekStaticLatentCache(m.config, max_cache_len=16), random_ids(2, 14), prefill=10)
    assert max_diff(logits["eager"], logits["compiled"]) < 1e-5
    assert counter.frame_count == 2  # the prefill and one decode graph for all four steps


def test_recompute_mla_up_proj_keeps_loss_and_gradients():
    """The memory option recompute_mla_up_proj reruns the attention core (the gather included) in backward: the LM
    loss plus a KL-like term on the indexer record give the same gradients as without it."""
    ids = random_ids(2, 16)
    runs = []
    for recompute in (False, True):
        model = tiny_model(train=True, mla_impl="absorbed", recompute_mla_up_proj=recompute, **DSA)
        indexers = [layer.self_attn.indexer for layer in model.model.layers[:3]]
        for indexer in indexers:
            indexer.record = True
        out = model(ids, labels=ids)
        records = [indexer.last_record for indexer in indexers]
        selected = sum((r.scores_BTS.gather(-1, r.topk_BTK).masked_fill(~r.valid_BTK, 0) * r.attention_BTX).sum()
                       for r in records)
        (out.loss + selected).backward()
        runs.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), (loss_r, grads_r) = runs
    assert torch.equal(loss, loss_r) and grads.keys() == grads_r.keys()
    assert any(".indexer." in n for n in grads)
    assert max(max_diff(grads[n], grads_r[n]) for n in grads) < 1e-6


def test_lora_on_kv_b_proj_falls_back_to_the_masked_form(monkeypatch):
    """A LoRA adapter on kv_b_proj cannot be absorbed into one matrix: the sparse path applies the same selection as a
    mask (no gather), and gives the masked path's logits."""
    from peft import LoraConfig, get_peft_model

    model = tiny_model(**DSA)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["kv_b_proj"], init_lora_weights=False))
    lora.eval()
    gathers = []
    gathered = sparse_attention.gathered_attention
    monkeypatch.setattr(sparse_attention, "gathered_attention", lambda *a: gathers.append(1) or gathered(*a))
    ids = random_ids(2, 20)
    with torch.no_grad():
        sparse = lora(ids).logits
        masked = set_dsa(model, "masked")(ids).logits
    assert not gathers and max_diff(sparse, masked) < TOL


def test_hub_config_v32_builds_the_indexer_of_every_layer():
    """hub_configs/deepseek-v3.2 (V3's config plus the index fields) builds, on the meta device, one indexer per
    decoder layer and MTP block, with V3.2's shapes."""
    from pathlib import Path

    config = DeepseekConfig.from_pretrained(str(Path(__file__).resolve().parent.parent / "hub_configs" / "deepseek-v3.2"))
    assert (config.index_topk, config.index_n_heads, config.index_head_dim) == (2048, 64, 128)
    with torch.device("meta"):
        model = DeepseekForCausalLM(config)
    indexers = [m for m in model.modules() if isinstance(m, indexer_module.DeepseekIndexer)]
    assert len(indexers) == config.num_hidden_layers + config.num_nextn_predict_layers == 62
    per_layer = 1536 * 64 * 128 + 7168 * 128 + 2 * 128 + 7168 * 64  # wq_b, wk, k_norm (weight, bias), weights_proj
    assert all(sum(p.numel() for p in m.parameters()) == per_layer for m in indexers)
