"""Checkpoints: our round trip, the official per-expert key layout, interop with transformers' DeepseekV3 classes,
Auto* registration and reading transformers-saved configs (V3 and V2). Which weights may be missing: test_loading.py."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import modeling_deepseek
from conftest import hf_v3_model, max_diff, random_ids, routers, tiny_config, tiny_kwargs, tiny_model
from modeling_deepseek import DeepseekConfig, DeepseekForCausalLM, DeepseekModel


def saved_keys(path) -> set[str]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_round_trip_identical(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = DeepseekForCausalLM.from_pretrained(tmp_path).eval()
    strip = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert strip(loaded.config.to_dict()) == strip(model.config.to_dict())
    ids = random_ids(2, 12)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        out_a, out_b = loaded(ids, labels=ids), model(ids, labels=ids)  # MTP weights came back too
    assert out_a.mtp_loss.item() == out_b.mtp_loss.item()
    for a, b in zip(routers(loaded), routers(model)):
        assert a.e_score_correction_bias.dtype == torch.float32
        assert torch.equal(a.e_score_correction_bias, b.e_score_correction_bias)
    sd_a, sd_b = loaded.state_dict(), model.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_b:
        assert torch.equal(sd_a[k], sd_b[k]), k


def test_saved_keys_use_per_expert_layout(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    keys = saved_keys(tmp_path)
    for layer in (1, 2, 3):  # MoE layers and the MTP block
        for j in range(8):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{layer}.mlp.experts.{j}.{proj}.weight" in keys
        assert f"model.layers.{layer}.mlp.gate.e_score_correction_bias" in keys
        assert f"model.layers.{layer}.mlp.shared_experts.gate_proj.weight" in keys
    assert not any("gate_up_proj" in k for k in keys)
    assert not any(k.endswith("experts.down_proj") for k in keys)
    assert "model.layers.0.mlp.gate_proj.weight" in keys  # dense layer
    assert {"model.layers.3.enorm.weight", "model.layers.3.hnorm.weight", "model.layers.3.eh_proj.weight",
            "model.layers.3.shared_head.norm.weight"} <= keys
    assert not any("pending_load" in k for k in keys)
    # the per-expert tensors are the rows of the fused parameter
    model = DeepseekForCausalLM.from_pretrained(tmp_path)
    I = 32
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        fused = model.model.layers[2].mlp.experts
        assert torch.equal(f.get_tensor("model.layers.2.mlp.experts.5.gate_proj.weight"), fused.gate_up_proj[5, :I])
        assert torch.equal(f.get_tensor("model.layers.2.mlp.experts.5.up_proj.weight"), fused.gate_up_proj[5, I:])
        assert torch.equal(f.get_tensor("model.layers.2.mlp.experts.5.down_proj.weight"), fused.down_proj[5])


def test_transformers_loads_our_checkpoint(tmp_path):
    """transformers' DeepseekV3ForCausalLM reads our folder as it is (model_type "deepseek", our config fields)."""
    from transformers import DeepseekV3ForCausalLM

    model = tiny_model()
    model.save_pretrained(tmp_path)
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path, use_kernels=False).eval()
    ids = random_ids(2, 12)
    with torch.no_grad():
        assert max_diff(hf(ids).logits, model(ids).logits) < 1e-5
    assert torch.equal(hf.model.layers[1].mlp.gate.e_score_correction_bias,
                       model.model.layers[1].mlp.gate.e_score_correction_bias)


def write_official_checkpoint(model, path, extra_config=None):
    """Our weights in the official layout: per-expert keys plus the MTP block's copies of embedding and head."""
    model.save_pretrained(path)
    sd = load_file(str(path / "model.safetensors"))
    N = model.config.num_hidden_layers
    for k in range(model.config.num_nextn_predict_layers):
        sd[f"model.layers.{N + k}.embed_tokens.weight"] = model.model.embed_tokens.weight.detach().clone()
        sd[f"model.layers.{N + k}.shared_head.head.weight"] = model.lm_head.weight.detach().clone()
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    for ours_only in ("use_bias_update", "bias_update_speed", "seq_balance_alpha", "mtp_loss_weight", "mla_impl",
                      "latent_cache_dtype", "qk_head_dim", "head_dim", "dtype"):
        cfg.pop(ours_only, None)
    cfg.update(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], aux_loss_alpha=0.001,
               seq_aux=True, ep_size=1, scoring_func="sigmoid", topk_method="noaux_tc", torch_dtype="float32",
               **(extra_config or {}))
    (path / "config.json").write_text(json.dumps(cfg))
    return sd


def test_official_checkpoint_with_mtp_copies_loads(tmp_path):
    model = tiny_model(seed=3)
    sd = write_official_checkpoint(model, tmp_path)
    assert "model.layers.3.embed_tokens.weight" in sd and "model.layers.3.shared_head.head.weight" in sd
    loaded = DeepseekForCausalLM.from_pretrained(tmp_path).eval()  # strict loader: raises on anything missing
    assert loaded.config.model_type == "deepseek"
    assert loaded.config.num_nextn_predict_layers == 1
    sd_loaded, sd_ref = loaded.state_dict(), model.state_dict()
    mtp_keys = [k for k in sd_ref if k.startswith("model.layers.3.")]
    for name in ("eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight",
                 "self_attn.kv_b_proj.weight", "mlp.experts.gate_up_proj", "mlp.gate.e_score_correction_bias"):
        assert "model.layers.3." + name in mtp_keys
    for k in mtp_keys:
        assert torch.equal(sd_loaded[k], sd_ref[k]), k
    ids = random_ids(2, 12)
    with torch.no_grad():
        a, b = loaded(ids, labels=ids), model(ids, labels=ids)
    assert torch.equal(a.logits, b.logits)
    assert abs(a.mtp_loss.item() - b.mtp_loss.item()) < 1e-6
    assert not any("embed_tokens" in k and "layers" in k for k in loaded.state_dict())


def test_auto_classes():
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    cfg = AutoConfig.for_model("deepseek", **tiny_kwargs())
    assert type(cfg) is DeepseekConfig
    assert cfg.hidden_size == 64 and cfg.n_routed_experts == 8
    assert type(AutoModelForCausalLM.from_config(cfg)) is DeepseekForCausalLM
    assert type(AutoModel.from_config(cfg)) is DeepseekModel


def test_auto_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is DeepseekForCausalLM
    ids = random_ids(1, 8)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, model(ids).logits)


def test_reload_twice_does_not_raise():
    from transformers import AutoConfig, AutoModelForCausalLM

    importlib.reload(modeling_deepseek)
    importlib.reload(modeling_deepseek)
    cfg = AutoConfig.for_model("deepseek", **tiny_kwargs())
    assert type(AutoModelForCausalLM.from_config(cfg)).__name__ == "DeepseekForCausalLM"


def test_config_from_transformers_saved_v3_config(tmp_path):
    from conftest import HF_TINY, YARN
    from transformers import DeepseekV3Config

    hf_cfg = DeepseekV3Config(**dict(HF_TINY, rope_scaling=YARN, rope_interleave=False, routed_scaling_factor=1.5))
    hf_cfg.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "deepseek_v3"
    cfg = DeepseekConfig.from_pretrained(tmp_path)
    assert cfg.model_type == "deepseek"
    for field in list(HF_TINY) + ["rope_interleave", "routed_scaling_factor", "norm_topk_prob", "rms_norm_eps",
                                  "tie_word_embeddings", "bos_token_id", "eos_token_id", "hidden_act",
                                  "attention_bias"]:
        assert getattr(cfg, field) == getattr(hf_cfg, field), field
    assert cfg.num_nextn_predict_layers == hf_cfg.num_mtp_layers
    for key in ("rope_type", "factor", "mscale", "mscale_all_dim", "original_max_position_embeddings", "beta_fast",
                "beta_slow", "rope_theta"):
        assert cfg.rope_parameters[key] == hf_cfg.rope_parameters[key], key
    assert cfg.topk_method == "noaux_tc" and cfg.scoring_func == "sigmoid"


def test_official_style_config_json(tmp_path):
    """A hand-written official config.json (legacy rope_scaling with "type", fields we do not model)."""
    from transformers import DeepseekV3Config
    from modeling_deepseek.rope import DeepseekRotaryEmbedding

    official = dict(tiny_config().to_dict(), model_type="deepseek_v3", rope_theta=50000.0,
                    rope_scaling={"type": "yarn", "factor": 4.0, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                                  "mscale_all_dim": 1.0, "original_max_position_embeddings": 64},
                    aux_loss_alpha=0.001, seq_aux=True, ep_size=1, pretraining_tp=1)
    for k in ("rope_parameters", "bias_update_speed", "seq_balance_alpha", "mtp_loss_weight", "use_bias_update"):
        official.pop(k, None)
    (tmp_path / "config.json").write_text(json.dumps(official))
    cfg = DeepseekConfig.from_pretrained(tmp_path)
    assert cfg.model_type == "deepseek"
    assert cfg.rope_parameters["rope_type"] == "yarn" and cfg.rope_parameters["factor"] == 4.0
    assert not hasattr(cfg, "aux_loss_alpha") and not hasattr(cfg, "ep_size")
    # same rotary frequencies and softmax scale as transformers' reading of the same file
    hf_cfg = DeepseekV3Config.from_pretrained(tmp_path)
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding
    from modeling_deepseek.rope import softmax_scale

    ours, theirs = DeepseekRotaryEmbedding(cfg), DeepseekV3RotaryEmbedding(hf_cfg)
    assert torch.allclose(ours.inv_freq, theirs.inv_freq)
    assert ours.attention_scaling == pytest.approx(theirs.attention_scaling)
    # the softmax scale its attention computes (wherever its YaRN helpers live in the installed release)
    assert softmax_scale(cfg) == pytest.approx(DeepseekV3Attention(hf_cfg, layer_idx=0).scaling)


def test_hub_kernels_are_off_at_load_unless_asked_for(tmp_path):
    """transformers 5.25 kernelizes every from_pretrained by default (hub kernels for its activations and norms,
    downloaded on CUDA). Ours loads without them, so loading stays offline and runs the tested code; use_kernels=True
    still reaches transformers. Where the release kernelizes by default, its own DeepseekV3 shows the contrast."""
    import transformers
    from packaging.version import Version
    from transformers import DeepseekV3ForCausalLM
    from transformers.utils import is_kernels_available

    tiny_model().save_pretrained(tmp_path / "ours")
    hf_v3_model().save_pretrained(tmp_path / "peer")
    assert DeepseekForCausalLM.from_pretrained(tmp_path / "ours").use_kernels is False
    if Version(transformers.__version__) >= Version("5.25") and is_kernels_available():
        assert DeepseekV3ForCausalLM.from_pretrained(tmp_path / "peer").use_kernels is True  # the default we turn off
        assert DeepseekForCausalLM.from_pretrained(tmp_path / "ours", use_kernels=True).use_kernels is True


def test_v2_config_without_mtp_field_builds_no_mtp(tmp_path):
    cfg = {k: v for k, v in tiny_config().to_dict().items() if k not in ("num_nextn_predict_layers", "auto_map")}
    cfg.update(model_type="deepseek_v2", topk_method="greedy", n_group=1, topk_group=1)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    config = DeepseekConfig.from_pretrained(tmp_path)
    assert config.num_nextn_predict_layers == 0
    assert len(DeepseekForCausalLM(config).model.layers) == config.num_hidden_layers
