"""modeling_deepseek.export: the official DeepSeek-V3 checkpoint layout, read by transformers' DeepseekV3 classes.

The export is checked three ways: transformers' own DeepseekV3ForCausalLM (and V2) loads it and reproduces our
logits exactly in fp32; our loader reads it back including the MTP module; the FP8 variant holds e4m3 weights with
128x128 float32 `weight_scale_inv` blocks that read back to exactly fp8 * scale.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from modeling_deepseek.fp8_format import quantize_weight_blockwise
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import YARN, YARN_V2, max_diff, random_ids, tiny_model
from modeling_deepseek import DeepseekForCausalLM
from modeling_deepseek.export import (
    FP8_QUANTIZATION_CONFIG,
    TRAINING_ONLY_FIELDS,
    export_official,
    main,
)

REPO = Path(__file__).resolve().parents[1]
N_LAYERS, N_EXPERTS = 3, 8
MTP = N_LAYERS  # model.layers.3 is the MTP module of the tiny config
FP8_PROJECTIONS = (
    "self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj",
    "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj",
)


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for name in files:
        out.update(load_file(folder / name))
    return out


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3, rope_parameters=YARN).eval()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    return export_official(model, tmp_path_factory.mktemp("official"))


# ------------------------------------------------------------------------------------------------------------------
def test_official_config(exported, model):
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3"
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    assert cfg["num_nextn_predict_layers"] == 1
    assert cfg["rope_scaling"] == {
        "type": "yarn", "factor": 4.0, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 64,
    }
    assert cfg["rope_theta"] == 10000.0
    assert cfg["topk_method"] == "noaux_tc" and cfg["scoring_func"] == "sigmoid"
    assert cfg["torch_dtype"] == "float32"
    for field in TRAINING_ONLY_FIELDS + ("rope_parameters", "auto_map", "quantization_config", "head_dim"):
        assert field not in cfg, field
    for field in ("mtp_loss_weight", "mtp_loss_weight_late"):
        assert field not in cfg
    for field in ("hidden_size", "kv_lora_rank", "q_lora_rank", "n_routed_experts", "first_k_dense_replace"):
        assert cfg[field] == getattr(model.config, field)


def test_official_tensor_layout(exported, model):
    sd = read_all(exported)
    ours = model.state_dict()
    I = model.config.moe_intermediate_size
    assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in sd)
    for layer in (1, 2, MTP):
        fused_gu = ours[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        fused_d = ours[f"model.layers.{layer}.mlp.experts.down_proj"]
        for j in range(N_EXPERTS):
            p = f"model.layers.{layer}.mlp.experts.{j}"
            assert torch.equal(sd[f"{p}.gate_proj.weight"], fused_gu[j, :I])
            assert torch.equal(sd[f"{p}.up_proj.weight"], fused_gu[j, I:])
            assert torch.equal(sd[f"{p}.down_proj.weight"], fused_d[j])
        bias = sd[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"]
        assert bias.dtype == torch.float32
        assert torch.equal(bias, ours[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"])
    # The MTP module carries its copies of the shared embedding and head, as the official files do.
    assert torch.equal(sd[f"model.layers.{MTP}.embed_tokens.weight"], sd["model.embed_tokens.weight"])
    assert torch.equal(sd[f"model.layers.{MTP}.shared_head.head.weight"], sd["lm_head.weight"])
    for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight"):
        assert torch.equal(sd[f"model.layers.{MTP}.{name}"], ours[f"model.layers.{MTP}.{name}"])
    # Everything else is our state dict unchanged.
    split = {k for k in sd if ".mlp.experts." in k} | {
        f"model.layers.{MTP}.embed_tokens.weight", f"model.layers.{MTP}.shared_head.head.weight"
    }
    rest = {k: v for k, v in sd.items() if k not in split}
    ours_rest = {k: v for k, v in ours.items() if ".mlp.experts." not in k}
    assert rest.keys() == ours_rest.keys()
    assert all(torch.equal(rest[k], ours_rest[k]) for k in rest)
    assert not [f for f in os.listdir(exported) if f.startswith(".")], "temporary files left behind"


def test_transformers_deepseek_v3_loads_export_with_identical_logits(exported, model):
    from transformers import DeepseekV3ForCausalLM

    hf, info = DeepseekV3ForCausalLM.from_pretrained(exported, output_loading_info=True, use_kernels=False)
    hf.eval()
    assert not info["missing_keys"] and not info["mismatched_keys"]
    # transformers skips MTP only at layer 61; the tiny model's MTP keys (layer 3) are reported, nothing else.
    assert info["unexpected_keys"] and all(k.startswith(f"model.layers.{MTP}.") for k in info["unexpected_keys"])
    ids = random_ids(2, 16)
    with torch.no_grad():
        assert max_diff(hf(ids).logits, model(ids).logits) < 1e-5


def test_our_loader_reads_export_including_mtp(exported, model):
    ours = DeepseekForCausalLM.from_pretrained(exported).eval()
    ref, got = model.state_dict(), ours.state_dict()
    assert ref.keys() == got.keys()
    mtp_keys = [k for k in ref if k.startswith(f"model.layers.{MTP}.")]
    assert len(mtp_keys) > 10
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    ids = random_ids(2, 16)
    labels = ids.clone()
    with torch.no_grad():
        a, b = model(ids, labels=labels), ours(ids, labels=labels)
    assert max_diff(a.logits, b.logits) == 0
    assert max_diff(a.mtp_logits[0], b.mtp_logits[0]) == 0


def test_bf16_export_same_in_transformers_and_ours(model, tmp_path):
    from transformers import DeepseekV3ForCausalLM

    out = export_official(model, tmp_path / "bf16", dtype=torch.bfloat16)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"
    with safe_open(out / "model.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {d for k, d in dtypes.items() if not k.endswith("e_score_correction_bias")} == {"BF16"}
    assert {d for k, d in dtypes.items() if k.endswith("e_score_correction_bias")} == {"F32"}
    hf = DeepseekV3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = DeepseekForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = random_ids(2, 16)
    with torch.no_grad():
        assert max_diff(hf(ids).logits, ours(ids).logits) < 1e-5


def test_v2_shaped_model_exports_as_deepseek_v2(tmp_path):
    from transformers import DeepseekV2ForCausalLM

    model = tiny_model(
        seed=4, topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0, n_group=1, topk_group=1,
        q_lora_rank=None, num_nextn_predict_layers=0, rope_parameters=YARN_V2,
    ).eval()
    out = export_official(model, tmp_path / "v2")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v2" and cfg["architectures"] == ["DeepseekV2ForCausalLM"]
    assert cfg["rope_scaling"]["type"] == "yarn" and cfg["rope_scaling"]["mscale_all_dim"] == 0.707
    hf, info = DeepseekV2ForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    ids = random_ids(2, 16)
    with torch.no_grad():
        assert max_diff(hf.eval()(ids).logits, model(ids).logits) < 1e-5


def test_export_from_saved_folder_via_cli_matches_model_export(model, exported, tmp_path):
    """The CLI streams a (sharded) save_pretrained folder tensor by tensor; the result equals the live model's export."""
    model.save_pretrained(tmp_path / "src", max_shard_size="100KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").exists()
    main([str(tmp_path / "src"), str(tmp_path / "cli")])
    a, b = read_all(exported), read_all(tmp_path / "cli")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["model_type"] == "deepseek_v3"
    assert (tmp_path / "cli" / "generation_config.json").exists()
    assert not list((tmp_path / "cli").glob("*.py"))


def test_sharded_export_with_index_and_stale_shards_removed(model, exported, tmp_path):
    from transformers import DeepseekV3ForCausalLM

    out = export_official(model, tmp_path / "sharded", max_shard_size="200KB")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert all(s.name.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    assert all(s.stat().st_size <= 200_000 + 20_000 for s in shards)  # + header
    ref = read_all(exported)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ref.values())
    got = read_all(out)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    hf = DeepseekV3ForCausalLM.from_pretrained(out).eval()
    ids = random_ids(1, 12)
    with torch.no_grad():
        assert max_diff(hf(ids).logits, model(ids).logits) < 1e-5
    # Re-exporting unsharded into the same folder leaves one file and no stale shards or index.
    export_official(model, out)
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    assert not [f for f in os.listdir(out) if f.startswith(".")]


def _dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: int = 128) -> torch.Tensor:
    full = scale_inv.repeat_interleave(block, 0).repeat_interleave(block, 1)[: q.shape[0], : q.shape[1]]
    return q.float() * full


def test_blockwise_quantizer_ragged_blocks():
    w = torch.randn(300, 200) * torch.logspace(-3, 1, 300)[:, None]  # rows of very different magnitude
    q, s = quantize_weight_blockwise(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (3, 2)
    # Each block's amax maps onto the e4m3 maximum; e4m3 keeps 3 mantissa bits: |error| <= |w| / 16 (+ subnormals).
    deq = _dequantize(q, s)
    bound = w.abs() / 16 + s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :200] / 1024 + 1e-12
    assert ((deq - w).abs() <= bound).all()
    assert torch.equal(s[2, 1], w[256:, 128:].abs().amax() / 448)


def test_fp8_export_layout_and_read_back(model, tmp_path):
    out = tmp_path / "fp8"
    proc = subprocess.run(
        [sys.executable, "-m", "modeling_deepseek.export", str(_saved(model, tmp_path)), str(out), "--fp8"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == FP8_QUANTIZATION_CONFIG
    sd = read_all(out)
    fp8_keys = {k for k, v in sd.items() if v.dtype == torch.float8_e4m3fn}
    expected = {
        k for k in sd
        if k.endswith(".weight") and (any(f".{p}.weight" in k for p in FP8_PROJECTIONS) or ".mlp.experts." in k)
        and k.startswith("model.layers.")
    }
    assert fp8_keys == expected
    assert any(k.startswith(f"model.layers.{MTP}.self_attn.") for k in fp8_keys)
    for k in fp8_keys:
        scale = sd[k.removesuffix("weight") + "weight_scale_inv"]
        assert scale.dtype == torch.float32
        assert tuple(scale.shape) == tuple(-(-n // 128) for n in sd[k].shape)
    # Embeddings, head, norms, routers, the MTP input projection stay in full precision; the bias in fp32.
    for k in ("model.embed_tokens.weight", "lm_head.weight", f"model.layers.{MTP}.eh_proj.weight",
              "model.layers.1.mlp.gate.weight", f"model.layers.{MTP}.shared_head.head.weight"):
        assert sd[k].dtype == torch.float32, k
    assert sd["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32

    # Our loader reads it back (transformers' fine-grained FP8 quantizer dequantizes on a CPU-only machine).
    ours = DeepseekForCausalLM.from_pretrained(out).eval()
    got = ours.state_dict()
    reference = copy.deepcopy(model)  # given the dequantized weights below
    ref_sd = reference.state_dict()
    with torch.no_grad():
        for k, v in got.items():
            if k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj"):
                prefix = k.rsplit(".", 1)[0]
                names = ("gate_proj", "up_proj") if k.endswith("gate_up_proj") else ("down_proj",)
                parts = [
                    torch.cat([_dequantize(sd[f"{prefix}.{j}.{n}.weight"], sd[f"{prefix}.{j}.{n}.weight_scale_inv"])
                               for n in names])
                    for j in range(N_EXPERTS)
                ]
                deq = torch.stack(parts)
                assert deq.shape == v.shape, k
            elif k in fp8_keys:
                deq = _dequantize(sd[k], sd[k.removesuffix("weight") + "weight_scale_inv"])
            else:
                assert torch.equal(v, ref_sd[k]), k
                continue
            assert max_diff(v, deq) < 1e-7, k
            # within FP8 error of the original weight
            orig = ref_sd[k]
            assert ((v - orig).abs() <= orig.abs() / 16 + orig.abs().max() / 448 / 1024 * 2 + 1e-7).all(), k
            ref_sd[k].copy_(deq)
    ids = random_ids(2, 16)
    with torch.no_grad():
        assert max_diff(ours(ids).logits, reference(ids).logits) < 1e-4


def _saved(model, tmp_path: Path) -> Path:
    src = tmp_path / "src"
    model.save_pretrained(src)
    return src


def test_export_refuses_peft_model(model, tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["o_proj"], lora_dropout=0.0))
    with pytest.raises(TypeError, match="merge_and_unload"):
        export_official(peft_model, tmp_path / "peft")
