"""The standard transformers model API, honoured as transformers' own DeepseekV3 honours it, and the review's fixes.

Outputs (return_dict=False, attentions, hidden states, router logits) are compared with transformers' DeepseekV3 on
the same weights; the rest checks behaviour that was silently wrong before: shift_labels, meta-device start-up,
rope types, the experts interface, V2 routing and MTP defaults, padding in the expert statistics, quantized
kv_b_proj in absorbed decode, base-model checkpoints and FP8 models that cannot be saved.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import hf_v3_model, max_diff, random_ids, save_and_load_ours, set_mla_impl, tiny_config, tiny_model
from modeling_deepseek import DeepseekConfig, DeepseekForCausalLM, DeepseekModel
from modeling_deepseek.fp8 import DeepseekFP8Linear
from modeling_deepseek.routing import DeepseekTopkRouter

TOL = 1e-4


@pytest.fixture
def pair(tmp_path):
    hf = hf_v3_model()
    hf.set_attn_implementation("eager")
    ours = save_and_load_ours(hf, tmp_path)
    ours.set_attn_implementation("eager")
    return hf, ours


def test_return_dict_false_gives_a_tuple(model):
    ids = random_ids(2, 10)
    with torch.no_grad():
        as_dict = model(ids, labels=ids)
        as_tuple = model(ids, labels=ids, return_dict=False)
        base = model.model(ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and isinstance(base, tuple)
    assert torch.equal(as_tuple[0], as_dict.loss)  # loss first, then what is set, in field order
    assert any(isinstance(t, torch.Tensor) and t.shape == as_dict.logits.shape and torch.equal(t, as_dict.logits)
               for t in as_tuple)
    assert torch.equal(base[0], model.model(ids).last_hidden_state)


def test_hidden_states_attentions_and_router_logits_match_transformers(pair):
    hf, ours = pair
    ids = random_ids(2, 12)
    kwargs = dict(output_hidden_states=True, output_attentions=True, output_router_logits=True)
    with torch.no_grad():
        expected = hf(ids, **kwargs)
        got = ours(ids, **kwargs)
    n_layers = ours.config.num_hidden_layers
    assert len(got.hidden_states) == len(expected.hidden_states) == n_layers + 1
    for g, e in zip(got.hidden_states, expected.hidden_states):
        assert max_diff(g, e) < TOL
    assert len(got.attentions) == len(expected.attentions) == n_layers
    for g, e in zip(got.attentions, expected.attentions):
        assert g.shape == e.shape == (2, ours.config.num_attention_heads, 12, 12)
        assert max_diff(g, e) < TOL
    moe_layers = n_layers - ours.config.first_k_dense_replace
    assert len(got.router_logits) == len(expected.router_logits) == moe_layers
    for g, e in zip(got.router_logits, expected.router_logits):
        assert g.shape == (2 * 12, ours.config.n_routed_experts)
        assert max_diff(g, e.view_as(g)) < TOL


def test_outputs_off_by_default_and_from_config(model):
    ids = random_ids(1, 6)
    with torch.no_grad():
        out = model(ids)
        assert out.hidden_states is None and out.attentions is None and out.router_logits is None
        model.config.output_router_logits = True
        assert len(model(ids).router_logits) == 2
    model.config.output_router_logits = False


def test_router_logits_and_aux_loss_in_training():
    model = tiny_model(train=True, seq_balance_alpha=0.01)
    ids = random_ids(2, 10)
    out = model(ids, labels=ids, output_router_logits=True)
    assert out.aux_loss is not None and out.aux_loss.requires_grad
    assert torch.equal(out.aux_loss, out.balance_loss)
    assert all(r.requires_grad for r in out.router_logits)


def test_shift_labels_give_the_same_losses_as_labels(model):
    ids = random_ids(2, 12)
    labels = ids.clone()
    labels[0, :3] = -100
    shift = F.pad(labels, (0, 1), value=-100)[:, 1:]
    with torch.no_grad():
        by_labels = model(ids, labels=labels)
        by_shift = model(ids, shift_labels=shift)
        # a shifted target that differs from the unshifted labels' must change the loss (it is really read)
        other = model(ids, shift_labels=torch.roll(shift, 1, dims=1))
    for name in ("loss", "main_loss", "mtp_loss"):
        assert torch.allclose(getattr(by_labels, name), getattr(by_shift, name), atol=1e-6), name
    assert not torch.allclose(other.main_loss, by_shift.main_loss)


def test_to_empty_after_meta_init_then_init_weights():
    config = tiny_config()
    with torch.device("meta"):
        model = DeepseekForCausalLM(config)
    model.to_empty(device="cpu")
    routers = [m for m in model.modules() if isinstance(m, DeepseekTopkRouter)]
    assert routers and all(r.e_score_correction_bias.device.type == "cpu" for r in routers)
    assert all(r.e_score_correction_bias.dtype == torch.float32 for r in routers)
    model.init_weights()
    assert all(torch.equal(r.e_score_correction_bias, torch.zeros_like(r.e_score_correction_bias)) for r in routers)
    ids = random_ids(1, 8)
    assert torch.isfinite(model(ids).logits).all()
    model.to(torch.bfloat16)  # the balancing state stays fp32 through a dtype cast
    assert all(r.e_score_correction_bias.dtype == torch.float32 for r in routers)


@pytest.mark.parametrize("rope_type", ["longrope"])  # dynamic NTK is implemented (test_conventions.py)
def test_rope_types_that_would_do_nothing_raise(rope_type):
    with pytest.raises(ValueError, match="rope_scaling.*" + rope_type):
        tiny_config(rope_scaling={"rope_type": rope_type, "factor": 2.0})


def test_linear_rope_scaling_is_applied():
    ids = random_ids(1, 10)
    plain = tiny_model()
    scaled = tiny_model(rope_scaling={"rope_type": "linear", "factor": 4.0})
    with torch.no_grad():
        assert max_diff(plain(ids).logits, scaled(ids).logits) > 1e-3


def test_experts_implementation_eager_and_grouped_mm_agree():
    ids = random_ids(2, 12)
    grouped = tiny_model(experts_implementation="grouped_mm")
    eager = tiny_model(experts_implementation="eager")
    assert grouped.config._experts_implementation == "grouped_mm"
    assert eager.config._experts_implementation == "eager"
    with torch.no_grad():
        assert max_diff(grouped(ids).logits, eager(ids).logits) < 1e-5
    grouped.set_experts_implementation("eager")
    assert grouped.config._experts_implementation == "eager"


def test_v2_config_without_mtp_field_builds_no_mtp(tmp_path):
    cfg = {k: v for k, v in tiny_config().to_dict().items() if k not in ("num_nextn_predict_layers", "auto_map")}
    cfg.update(model_type="deepseek_v2", topk_method="greedy", n_group=1, topk_group=1)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    config = DeepseekConfig.from_pretrained(tmp_path)
    assert config.num_nextn_predict_layers == 0
    assert len(DeepseekForCausalLM(config).model.layers) == config.num_hidden_layers


@pytest.mark.parametrize("norm", [True, False])
def test_v2_routing_normalises_or_scales(norm):
    config = tiny_config(topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=norm,
                         routed_scaling_factor=16.0)
    router = DeepseekTopkRouter(config)
    torch.nn.init.normal_(router.weight)
    _, weights, ids, scores = router(torch.randn(5, config.hidden_size))
    chosen = scores.gather(1, ids)
    expected = chosen / chosen.sum(-1, keepdim=True) if norm else chosen * 16.0
    assert torch.allclose(weights, expected)


def test_padding_counts_nowhere_in_expert_statistics():
    model = tiny_model(train=True, seq_balance_alpha=0.01)
    ids = random_ids(2, 10)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    out = model(ids, attention_mask=mask, labels=ids)
    K = model.config.num_experts_per_tok
    real = int(mask.sum())
    main = out.expert_load[: 2]
    assert torch.equal(main.sum(-1), torch.full((2,), float(real * K)))
    # the padded row's statistics equal those of the same row without its padding
    row = model(ids[:1, 4:], labels=ids[:1, 4:])
    solo = model(ids[1:], labels=ids[1:])
    assert torch.allclose(main, row.expert_load[:2] + solo.expert_load[:2])
    # the sequence-wise loss averages per sequence: the mean of the two rows' own losses
    assert torch.allclose(out.balance_loss, (row.balance_loss + solo.balance_loss) / 2, atol=1e-7)


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


def test_base_model_checkpoint_into_causal_lm_warns_naming_the_head(tmp_path):
    torch.manual_seed(0)
    base = DeepseekModel(tiny_config())
    base.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="lm_head.weight"):
        lm = DeepseekForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(lm.model.embed_tokens.weight, base.embed_tokens.weight)


def test_causal_lm_checkpoint_missing_a_weight_still_raises(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model()
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["lm_head.weight"], weights["model.layers.0.self_attn.o_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(OSError, match="o_proj"):
        DeepseekForCausalLM.from_pretrained(tmp_path)


def test_fp8_kept_model_refuses_to_save(model, tmp_path):
    layer = model.model.layers[0].self_attn
    layer.o_proj = DeepseekFP8Linear.from_linear(layer.o_proj)
    with pytest.raises(ValueError, match="FP8.*o_proj"):
        model.save_pretrained(tmp_path)


def test_stale_balancing_bias_warns(monkeypatch):
    from modeling_deepseek import balancing, update_balancing_bias

    monkeypatch.setattr(balancing, "STALE_FORWARDS", 3)
    model = tiny_model(train=True)
    ids = random_ids(1, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            model(ids)
        update_balancing_bias(model)  # an update resets the count
        for _ in range(2):
            model(ids)
    assert not any("has not moved" in str(w.message) for w in caught)
    with pytest.warns(UserWarning, match="has not moved for 3 training forwards"):
        model(ids)
