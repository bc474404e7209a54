"""Numerical parity with transformers' own DeepseekV3 / DeepseekV2 classes on the same (random) weights.

transformers' model is built with random weights, saved with save_pretrained, and loaded with
DeepseekForCausalLM.from_pretrained: this also exercises reading deepseek_v3 / deepseek_v2 config files and the
per-expert -> fused expert conversion on load.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import YARN, YARN_V2, hf_v2_model, hf_v3_model, max_diff, random_ids, save_and_load_ours, set_mla_impl
from modeling_deepseek import DeepseekConfig, DeepseekForCausalLM

TOL = 1e-4

V2_GREEDY = dict(topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0, n_group=1, topk_group=1)

CASES = {
    "v3-default": ("v3", {}),
    "v3-no-q-lora": ("v3", dict(q_lora_rank=None)),
    "v3-rope-not-interleaved": ("v3", dict(rope_interleave=False)),
    "v3-yarn": ("v3", dict(rope_scaling=YARN)),
    "v3-yarn-mscale-0.707": ("v3", dict(rope_scaling=YARN_V2)),
    "v3-yarn-no-q-lora-not-interleaved": ("v3", dict(rope_scaling=YARN, q_lora_rank=None, rope_interleave=False)),
    "v3-rope-theta-50000": ("v3", dict(rope_parameters={"rope_type": "default", "rope_theta": 50000.0})),
    "v3-yarn-rope-theta-50000": ("v3", dict(rope_parameters=dict(YARN, rope_theta=50000.0))),
    "v3-groups-4-keep-2": ("v3", dict(n_group=4, topk_group=2)),
    "v3-one-group": ("v3", dict(n_group=1, topk_group=1)),
    "v3-unnormalised-scale-1": ("v3", dict(norm_topk_prob=False, routed_scaling_factor=1.0)),
    "v2-greedy": ("v2", V2_GREEDY),
    "v2-greedy-no-q-lora-yarn-0.707": ("v2", dict(V2_GREEDY, q_lora_rank=None, rope_scaling=YARN_V2)),
    "v2-group-limited-greedy-scale-1": (
        "v2", dict(topk_method="group_limited_greedy", norm_topk_prob=False, routed_scaling_factor=1.0,
                   n_group=4, topk_group=2)),
    "v2-group-limited-greedy-scale-16": (
        "v2", dict(topk_method="group_limited_greedy", norm_topk_prob=False, routed_scaling_factor=16.0,
                   n_group=4, topk_group=2)),
}


def build_hf(kind: str, **overrides):
    return hf_v3_model(**overrides) if kind == "v3" else hf_v2_model(**overrides)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    kind, overrides = CASES[case]
    hf = build_hf(kind, **overrides)
    ours = save_and_load_ours(hf, tmp_path)
    assert isinstance(ours, DeepseekForCausalLM) and isinstance(ours.config, DeepseekConfig)
    assert ours.config.topk_method == hf.config.topk_method if kind == "v2" else ours.config.topk_method == "noaux_tc"
    ids = random_ids(2, 24)
    # Positions past original_max_position_embeddings (64) so that YaRN's long-range regime is exercised too.
    for position_ids in (None, torch.arange(90, 114).unsqueeze(0)):
        with torch.no_grad():
            expected = hf(ids, position_ids=position_ids).logits
            got = ours(ids, position_ids=position_ids).logits
        assert got.shape == expected.shape == (2, 24, 128)
        assert max_diff(got, expected) < TOL, case


def test_v2_config_loaded_with_softmax_greedy(tmp_path):
    hf = hf_v2_model(**V2_GREEDY)
    ours = save_and_load_ours(hf, tmp_path)
    assert ours.config.scoring_func == "softmax"
    assert ours.config.topk_method == "greedy"
    # V2 routers carry no balancing bias
    assert all(getattr(m, "e_score_correction_bias", "absent") is None for m in ours.modules() if hasattr(m, "top_k"))


def test_v2_greedy_with_transformers_default_groups_loads(tmp_path):
    hf = hf_v2_model(topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0,
                     n_group=None, topk_group=None)
    ours = save_and_load_ours(hf, tmp_path)
    ids = random_ids(1, 12)
    with torch.no_grad():
        assert max_diff(ours(ids).logits, hf(ids).logits) < TOL


def _left_padded_batch():
    ids = random_ids(2, 16, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids[0, :3] = 0
    return ids, mask


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_left_padding_matches_transformers(attn, tmp_path):
    hf = hf_v3_model()
    hf.save_pretrained(tmp_path)
    from transformers import DeepseekV3ForCausalLM

    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path, attn_implementation=attn).eval()
    ours = DeepseekForCausalLM.from_pretrained(tmp_path, attn_implementation=attn).eval()
    assert ours.config._attn_implementation == attn
    ids, mask = _left_padded_batch()
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    assert max_diff(got[0, 3:], expected[0, 3:]) < TOL
    assert max_diff(got[1], expected[1]) < TOL


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("mla_impl", ["expanded", "absorbed"])
def test_left_padding_is_invisible(attn, mla_impl, tmp_path):
    """The padded row, with positions from the mask, gives the logits of the unpadded sequence on its own."""
    hf_v3_model().save_pretrained(tmp_path)
    ours = DeepseekForCausalLM.from_pretrained(tmp_path, attn_implementation=attn).eval()
    set_mla_impl(ours, mla_impl)
    ids, mask = _left_padded_batch()
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        padded = ours(ids, attention_mask=mask, position_ids=position_ids).logits
        alone = ours(ids[:1, 3:]).logits
    assert max_diff(padded[0, 3:], alone[0]) < TOL


def test_sdpa_matches_eager(tmp_path):
    hf_v3_model().save_pretrained(tmp_path)
    eager = DeepseekForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    sdpa = DeepseekForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    for m in (eager, sdpa):
        set_mla_impl(m, "expanded")  # the path that goes through the attention interface
    ids, mask = _left_padded_batch()
    with torch.no_grad():
        assert max_diff(eager(ids).logits, sdpa(ids).logits) < 1e-5
        a = eager(ids, attention_mask=mask).logits
        b = sdpa(ids, attention_mask=mask).logits
    assert max_diff(a[0, 3:], b[0, 3:]) < 1e-5 and max_diff(a[1], b[1]) < 1e-5


def test_bf16_forward_close_to_fp32(tmp_path):
    hf_v3_model().save_pretrained(tmp_path)
    fp32 = DeepseekForCausalLM.from_pretrained(tmp_path).eval()
    bf16 = DeepseekForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    assert bf16.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    # the balancing bias is kept in fp32 on load (_keep_in_fp32_modules_strict)
    assert bf16.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    ids = random_ids(2, 16)
    with torch.no_grad():
        ref = fp32(ids).logits
        got = bf16(ids).logits
    assert got.dtype == torch.bfloat16
    assert torch.isfinite(got).all()
    err = (got.float() - ref).abs()
    assert err.mean().item() < 0.05 * ref.abs().mean().item()
    assert err.max().item() < 1.0  # a rare bf16 routing flip moves single logits; the mean bound above is tight
    # same argmax almost everywhere
    assert (got.float().argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.9


@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_generate_matches_transformers(batch, tmp_path):
    hf = hf_v3_model()
    ours = save_and_load_ours(hf, tmp_path)
    ids = random_ids(batch, 10, seed=5)
    mask = torch.ones_like(ids)
    if batch == 2:
        ids[1, :2] = 0
        mask[1, :2] = 0
    kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=8, use_cache=True, pad_token_id=0,
                  eos_token_id=None)
    with torch.no_grad():
        expected = hf.generate(ids, **kwargs)
        got = ours.generate(ids, **kwargs)
    assert expected.shape == (batch, 18)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("q_lora", [True, False])
def test_gradients_match_transformers(q_lora, tmp_path):
    overrides = {} if q_lora else dict(q_lora_rank=None)
    hf = hf_v3_model(**overrides)
    ours = save_and_load_ours(hf, tmp_path, num_nextn_predict_layers=0, seq_balance_alpha=0.0)
    assert ours.config.num_nextn_predict_layers == 0 and ours.config.seq_balance_alpha == 0.0
    hf.train()
    ours.train()
    ids = random_ids(2, 12, seed=7)
    labels = random_ids(2, 12, seed=8)
    labels[0, :4] = -100
    hf_loss = hf(ids, labels=labels).loss
    out = ours(ids, labels=labels)
    assert out.mtp_loss is None and out.balance_loss is None
    assert abs(out.loss.item() - hf_loss.item()) < 1e-5
    hf_loss.backward()
    out.loss.backward()

    q = "q_b_proj" if q_lora else "q_proj"
    names = [
        f"model.layers.0.self_attn.{q}.weight",
        f"model.layers.2.self_attn.{q}.weight",
        "model.layers.1.self_attn.kv_b_proj.weight",
        "model.layers.1.self_attn.kv_a_proj_with_mqa.weight",
        "model.layers.1.mlp.experts.gate_up_proj",
        "model.layers.2.mlp.experts.down_proj",
        "model.layers.1.mlp.gate.weight",
        "model.layers.2.mlp.gate.weight",
        "model.layers.2.mlp.shared_experts.up_proj.weight",
        "model.embed_tokens.weight",
        "lm_head.weight",
    ]
    hf_params = dict(hf.named_parameters())
    our_params = dict(ours.named_parameters())
    for name in names:
        g_hf, g_ours = hf_params[name].grad, our_params[name].grad
        assert g_hf is not None and g_ours is not None, name
        assert g_hf.abs().max() > 0, name
        assert g_ours.shape == g_hf.shape, name
        assert max_diff(g_ours, g_hf) < 1e-4, name


def test_router_gradient_nonzero_and_loss_is_plain_ce(tmp_path):
    """Guard for the gradient test: the router weight gets a gradient, and the loss compared is the plain CE."""
    ours = save_and_load_ours(hf_v3_model(), tmp_path, num_nextn_predict_layers=0, seq_balance_alpha=0.0).train()
    ids = random_ids(2, 12, seed=7)
    out = ours(ids, labels=ids)
    out.loss.backward()
    gate_grad = ours.model.layers[1].mlp.gate.weight.grad
    assert gate_grad is not None and gate_grad.abs().sum() > 0
    # CE by hand
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    assert abs(out.loss.item() - ref.item()) < 1e-5
