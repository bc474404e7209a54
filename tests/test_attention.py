"""MLA: the absorbed and expanded paths agree (prefill, decode, multi-token chunks, padding); the cache holds only
the latent and the shared RoPE key."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import max_diff, random_ids, set_mla_impl, tiny_model
from modeling_deepseek.attention import DeepseekAttention
from modeling_deepseek.fp8 import DeepseekFP8Linear
from modeling_deepseek.rope import apply_rope

TOL = 1e-4


def make_cache(kind, model):
    if kind == "dynamic":
        return DynamicCache(config=model.config)
    from modeling_deepseek.cache import DeepseekLatentCache

    return DeepseekLatentCache()


def cached_run(model, ids, chunks, attention_mask=None, cache_kind="dynamic"):
    """Prefill ids[:, :chunks[0]], then feed the rest in pieces of the given sizes; returns concatenated logits."""
    cache = make_cache(cache_kind, model)
    logits, start = [], 0
    with torch.no_grad():
        for size in chunks:
            end = start + size
            kwargs = {}
            if attention_mask is not None:
                kwargs["attention_mask"] = attention_mask[:, :end]
                kwargs["position_ids"] = (attention_mask[:, :end].cumsum(-1) - 1).clamp_min(0)[:, start:end]
            out = model(ids[:, start:end], past_key_values=cache, use_cache=True, **kwargs)
            assert out.past_key_values is cache
            logits.append(out.logits)
            start = end
    assert cache.get_seq_length() == ids.shape[1]
    return torch.cat(logits, dim=1), cache


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("chunks", [[8, 1, 1, 1, 1], [8, 3, 3, 1], [5, 2, 1, 4]], ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("cache_kind", ["dynamic", "latent"])
def test_absorbed_matches_expanded_with_cache(attn, chunks, cache_kind):
    model = tiny_model(q_lora_rank=None if attn == "eager" else 32)
    model.config._attn_implementation = attn
    ids = random_ids(2, sum(chunks))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits  # no cache at all: the ground truth
    results = {}
    for impl in ("expanded", "absorbed"):
        set_mla_impl(model, impl)
        results[impl], _ = cached_run(model, ids, chunks, cache_kind=cache_kind)
    assert max_diff(results["absorbed"], results["expanded"]) < TOL
    assert max_diff(results["expanded"], full) < TOL
    assert max_diff(results["absorbed"], full) < TOL


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("chunks", [[9, 1, 1, 1], [9, 3, 1]], ids=lambda c: "-".join(map(str, c)))
def test_absorbed_matches_expanded_with_left_padding(attn, chunks):
    model = tiny_model()
    model.config._attn_implementation = attn
    T = sum(chunks)
    ids = random_ids(2, T, seed=4)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids[0, :3] = 0
    results = {}
    for impl in ("expanded", "absorbed"):
        set_mla_impl(model, impl)
        results[impl], _ = cached_run(model, ids, chunks, attention_mask=mask)
    assert max_diff(results["absorbed"][0, 3:], results["expanded"][0, 3:]) < TOL
    assert max_diff(results["absorbed"][1], results["expanded"][1]) < TOL
    # the padded row equals its unpadded sequence run alone
    set_mla_impl(model, "auto")
    with torch.no_grad():
        alone = model(ids[:1, 3:], use_cache=False).logits
    assert max_diff(results["absorbed"][0, 3:], alone[0]) < TOL


def test_absorbed_prefill_without_cache_matches_expanded():
    model = tiny_model()
    ids = random_ids(2, 14)
    out = {}
    for impl in ("expanded", "absorbed"):
        set_mla_impl(model, impl)
        with torch.no_grad():
            out[impl] = model(ids, use_cache=False).logits
    assert max_diff(out["absorbed"], out["expanded"]) < TOL


def test_absorbed_path_gradients_match_expanded():
    ids = random_ids(2, 10)
    grads = {}
    for impl in ("expanded", "absorbed"):
        model = tiny_model(train=True, num_nextn_predict_layers=0, seq_balance_alpha=0.0)
        set_mla_impl(model, impl)
        model(ids, labels=ids, use_cache=False).loss.backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters() if "self_attn" in n}
    for name in grads["expanded"]:
        assert max_diff(grads["absorbed"][name], grads["expanded"][name]) < 1e-4, name


@pytest.mark.parametrize("cache_kind", ["dynamic", "latent", "default"])
def test_cache_holds_only_the_latent(cache_kind):
    model = tiny_model()
    ids = random_ids(2, 7)
    with torch.no_grad():
        if cache_kind == "default":
            cache = model(ids, use_cache=True).past_key_values
        else:
            cache = make_cache(cache_kind, model)
            model(ids, past_key_values=cache, use_cache=True)
        model(ids[:, :1], past_key_values=cache, use_cache=True)  # one decode step
    layers = [layer for layer in cache.layers if getattr(layer, "keys", None) is not None and layer.keys.numel()]
    assert len(layers) == 3  # the 3 main layers (MTP does not cache)
    for layer in layers:
        assert layer.keys.shape == (2, 1, 8, 32)  # [B, 1, S, kv_lora_rank]
        assert layer.values.shape == (2, 1, 8, 8)  # [B, 1, S, qk_rope_head_dim]
    assert cache.get_seq_length() == 8


def test_cache_latent_is_normalised_latent_and_rotated_rope_key():
    """keys = kv_a_layernorm(latent), values = RoPE'd shared key: the same pair the attention computes."""
    model = tiny_model()
    ids = random_ids(1, 5)
    cache = DynamicCache(config=model.config)
    captured = {}
    attn0 = model.model.layers[0].self_attn
    handle = model.model.layers[0].input_layernorm.register_forward_hook(
        lambda m, i, o: captured.setdefault("x", o.detach()))
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    handle.remove()
    latent, k_rope = attn0.compress_kv(captured["x"])
    assert max_diff(cache.layers[0].keys, latent) < 1e-6
    cos, sin = model.model.rotary_emb(captured["x"], torch.arange(5)[None])
    rotated = apply_rope(k_rope, cos, sin, model.config.rope_interleave)
    assert max_diff(cache.layers[0].values, rotated) < 1e-6
    assert max_diff(rotated, k_rope) > 1e-3  # positions 1..4 really rotate


def test_auto_picks_absorbed_for_decode_and_expanded_for_prefill():
    model = tiny_model()
    attn = model.model.layers[0].self_attn
    assert isinstance(attn, DeepseekAttention) and attn.mla_impl == "auto"
    assert attn.use_absorbed(1, 100)
    assert not attn.use_absorbed(100, 100)
    attn.train()
    assert not attn.use_absorbed(1, 100)  # training always expands
    attn.mla_impl = "absorbed"
    assert attn.use_absorbed(100, 100)
    attn.mla_impl = "expanded"
    attn.eval()
    assert not attn.use_absorbed(1, 100)


def test_mla_impl_config_field():
    model = tiny_model(mla_impl="absorbed")
    assert all(m.mla_impl == "absorbed" for m in model.modules() if isinstance(m, DeepseekAttention))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_prefix_causal_sdpa_matches_masked_sdpa(dtype, tol):
    """A chunk of T queries after S - T cached keys: the two-call prefix + causal split equals SDPA with the mask."""
    from modeling_deepseek.attention import prefix_causal_sdpa

    torch.manual_seed(0)
    B, H, T, S, D = 2, 3, 5, 12, 16
    q, k, v = (torch.randn(B, H, n, D, dtype=dtype) for n in (T, S, S))
    allowed = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.3).transpose(1, 2)
    with torch.no_grad():
        out = prefix_causal_sdpa(q, k, v, 0.3)
    assert out.shape == (B, T, H, D) and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_unpadded_chunks_take_the_prefix_causal_path(monkeypatch):
    """Cached multi-token chunks without padding run prefix_causal_sdpa (no [T, S] mask) and give the uncached
    logits; with padding the mask path is kept."""
    from modeling_deepseek import attention

    calls = []
    real = attention.prefix_causal_sdpa
    monkeypatch.setattr(attention, "prefix_causal_sdpa", lambda *a: calls.append(a[0].shape[2]) or real(*a))
    model = tiny_model()
    set_mla_impl(model, "expanded")
    ids = random_ids(2, 20)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    chunked, _ = cached_run(model, ids, [8, 7, 5], cache_kind="latent")
    assert max_diff(chunked, full) < TOL
    assert calls == [7] * model.config.num_hidden_layers + [5] * model.config.num_hidden_layers
    calls.clear()
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    cached_run(model, ids, [8, 7, 5], attention_mask=mask, cache_kind="latent")
    assert calls == []


def test_no_mask_means_causal_for_every_implementation():
    """attention_mask=None is causal whatever the implementation (eager reads no is_causal flag): the MTP module's
    prefill passes no mask for unpadded prompts."""
    model = tiny_model()
    set_mla_impl(model, "expanded")
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 9, model.config.hidden_size)
    pos = torch.arange(9)[None].expand(2, -1)
    rope = model.model.rotary_emb(x, pos)
    outs = {}
    with torch.no_grad():
        for impl in ("eager", "sdpa"):
            model.config._attn_implementation = impl
            outs[impl], _ = attn(x, position_embeddings=rope, attention_mask=None)
            # causal: the first 4 positions do not depend on what comes after them
            x2 = x.clone()
            x2[:, 4:] += 1.0
            changed, _ = attn(x2, position_embeddings=rope, attention_mask=None)
            assert max_diff(changed[:, :4], outs[impl][:, :4]) < TOL
    assert max_diff(outs["eager"], outs["sdpa"]) < TOL


def expanded_and_absorbed_logits(model, ids):
    with torch.no_grad():
        set_mla_impl(model, "expanded")
        expanded = model(ids).logits
        set_mla_impl(model, "absorbed")
        return expanded, model(ids).logits


def test_absorbed_decode_with_fp8_kv_b_proj_matches_expanded(model):
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.kv_b_proj = DeepseekFP8Linear.from_linear(attn.kv_b_proj)
        assert attn.absorbable()
    ids = random_ids(2, 16)
    expanded, absorbed = expanded_and_absorbed_logits(model, ids)
    with torch.no_grad():
        set_mla_impl(model, "auto")
        out = model(ids[:, :15], use_cache=True)
        step = model(ids[:, 15:], cache=out.cache if hasattr(out, "cache") else out.past_key_values).logits
    assert max_diff(expanded, absorbed) < 1e-4
    assert model.model.layers[0].self_attn.use_absorbed(1, 16)
    assert max_diff(step[:, -1], expanded[:, -1]) < 1e-4


def test_absorbed_decode_with_bnb_kv_b_proj_matches_expanded(model):
    bnb = pytest.importorskip("bitsandbytes")
    attn = model.model.layers[0].self_attn
    q = bnb.nn.Linear8bitLt(attn.kv_b_proj.in_features, attn.kv_b_proj.out_features, bias=False,
                            has_fp16_weights=False)
    q.weight = bnb.nn.Int8Params(attn.kv_b_proj.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    q = q.to("cpu")
    attn.kv_b_proj = q
    assert attn.absorbable()
    expanded, absorbed = expanded_and_absorbed_logits(model, random_ids(1, 12))
    assert max_diff(expanded, absorbed) < 1e-3
