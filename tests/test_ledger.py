"""The cost ledger (modeling_deepseek.ledger): DeepSeek-V3's published numbers, computed on the meta device."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from modeling_deepseek import DeepseekConfig, DeepseekForCausalLM
from modeling_deepseek.ledger import ledger, load_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def v3():
    return ledger(load_config(REPO / "hub_configs" / "deepseek-v3"))


def test_deepseek_v3_numbers(v3):
    assert v3["total_params"] == pytest.approx(671e9, rel=0.005)  # the paper: 671B total
    assert v3["active_params"] == pytest.approx(37e9, rel=0.03)  # 37B activated per token
    assert v3["kv_cache_bytes_per_token"] == 576 * 61 * 2 == 70_272
    assert v3["mha_kv_cache_bytes_per_token"] == 128 * (192 + 128) * 61 * 2
    # One MTP module next to 61 layers: a few percent of a training step.
    assert 0.01 < v3["mtp_train_overhead"] < 0.06
    assert v3["train_flops_per_token"] == 3 * v3["flops_per_token"]


def test_counts_match_a_real_model():
    config = DeepseekConfig.from_pretrained(str(REPO / "hub_configs" / "tiny"))
    row = ledger(config, context=64)
    model = DeepseekForCausalLM(config)
    N = config.num_hidden_layers
    mtp = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.layers.")
              and int(n.split(".")[2]) >= N)
    assert row["total_params"] + row["mtp_params"] == sum(p.numel() for p in model.parameters())
    assert row["mtp_params"] == mtp > 0
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n and
                  int(n.split(".")[2]) < N)
    inactive = experts * (1 - config.num_experts_per_tok / config.n_routed_experts)
    assert row["active_params"] == row["total_params"] - round(inactive)
    assert row["kv_cache_bytes_per_token"] == (config.kv_lora_rank + config.qk_rope_head_dim) * N * 2
    no_mtp = ledger(DeepseekConfig.from_pretrained(str(REPO / "hub_configs" / "tiny"), num_nextn_predict_layers=0))
    assert no_mtp["mtp_params"] == 0 and no_mtp["mtp_flops_per_token"] == 0


def test_cli_json():
    out = subprocess.run([sys.executable, "-m", "modeling_deepseek.ledger", str(REPO / "hub_configs" / "deepseek-v3"),
                          "--json"], capture_output=True, text=True, check=True, cwd=REPO, timeout=300)
    row = json.loads(out.stdout)
    for key in ("total_params", "active_params", "mtp_params", "kv_cache_bytes_per_token",
                "mha_kv_cache_bytes_per_token"):
        assert key in row, key
    assert row["kv_cache_bytes_per_token"] == 70_272


def test_v3_bytes_per_rank_from_the_parallel_plans():
    """DeepSeek-V3 (MTP included) under transformers' engine: tp splits heads, MLPs, embedding and head but leaves
    the routed experts whole; ep splits those; the latent cache stays whole on every tensor-parallel rank."""
    from modeling_deepseek.ledger import parallel_bytes

    config = load_config(REPO / "hub_configs" / "deepseek-v3")
    one = parallel_bytes(config)
    tp8, tp8_ep8 = parallel_bytes(config, tp_size=8), parallel_bytes(config, tp_size=8, ep_size=8)
    ep8 = parallel_bytes(config, tp_size=8, ep_size=8, split_heads=False)
    ep64 = parallel_bytes(config, fsdp_size=64, ep_size=64)
    assert one["weight_bytes_per_rank"] == one["weight_bytes_total"] == pytest.approx(2 * 682.6e9, rel=0.002)
    experts = one["weight_bytes_by_kind"]["routed_experts"]
    assert tp8["weight_bytes_by_kind"]["routed_experts"] == experts  # tp alone: every rank holds every expert
    assert tp8_ep8["weight_bytes_by_kind"]["routed_experts"] == ep8["weight_bytes_by_kind"]["routed_experts"] \
        == experts / 8
    assert ep64["weight_bytes_by_kind"]["routed_experts"] == experts / 64
    assert tp8_ep8["weight_bytes_per_rank"] < ep8["weight_bytes_per_rank"] < tp8["weight_bytes_per_rank"]
    assert ep64["weight_bytes_per_rank"] == pytest.approx(one["weight_bytes_total"] / 64, rel=1e-6)
    for row in (tp8, tp8_ep8, ep8, ep64):
        assert row["latent_cache_bytes_per_token_per_rank"] == 70_272
    assert tp8["mha_cache_bytes_per_token_per_rank"] == 4_997_120 // 8
    with pytest.raises(ValueError, match="ep_size=8 must be a multiple of tp_size=3"):
        parallel_bytes(config, tp_size=3, ep_size=8)
