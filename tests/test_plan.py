"""The compute planner (python -m trainers.plan): DeepSeek LLM's scaling laws, and a config's training cost from the
cost ledger (DeepSeek-V3's reported GPU-hours imply a plausible MFU)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from modeling_deepseek.ledger import ledger, load_config
from trainers.plan import main, model_flops_per_token, plan_compute, plan_config

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("compute", [1e17, 3e20, 4.3e24])
def test_laws_at_several_budgets(compute):
    row = plan_compute(compute, seq_len=4096)
    # DeepSeek LLM (2024), eqs. 1 and 4, evaluated here through logarithms
    lc = math.log(compute)
    assert row["batch_tokens"] == pytest.approx(math.exp(math.log(0.2920) + 0.3271 * lc), rel=1e-9)
    assert row["learning_rate"] == pytest.approx(math.exp(math.log(0.3118) - 0.1250 * lc), rel=1e-9)
    assert row["model_flops_per_token"] == pytest.approx(math.exp(math.log(0.1715) + 0.5243 * lc), rel=1e-9)
    assert row["train_tokens"] == pytest.approx(math.exp(math.log(5.8316) + 0.4757 * lc), rel=1e-9)
    # the allocation spends the budget: C = M D
    assert row["model_flops_per_token"] * row["train_tokens"] == pytest.approx(compute, rel=1e-3)
    # the suggested shape's M = 72 n d^2 + 12 n d l_seq lands near M_opt at a sensible aspect ratio
    n, d = row["n_layer"], row["d_model"]
    assert row["shape_flops_per_token"] == 72 * n * d * d + 12 * n * d * 4096 == model_flops_per_token(n, d, 4096)
    assert row["shape_flops_per_token"] == pytest.approx(row["model_flops_per_token"], rel=0.15)
    assert 32 <= d / n <= 512
    assert row["batch_sequences"] == round(row["batch_tokens"] / 4096)
    assert row["in_fitted_range"] == (1e17 <= compute <= 3e20)


def test_cli_json_keys():
    out = subprocess.run([sys.executable, "-m", "trainers.plan", "--compute", "1e20", "--json"], cwd=REPO,
                         capture_output=True, text=True, check=True, timeout=120)
    row = json.loads(out.stdout)
    for key in ("batch_tokens", "learning_rate", "model_flops_per_token", "train_tokens", "n_layer", "d_model",
                "batch_sequences", "seq_len"):
        assert key in row, key
    assert row["train_tokens"] == pytest.approx(5.8316 * 1e20**0.4757)


def test_deepseek_v3_mfu_from_the_ledger():
    config = load_config(REPO / "hub_configs" / "deepseek-v3")
    row = plan_config(config, tokens=14.8e12, seq_len=4096, gpu="H800", precision="bf16", gpu_hours=2.788e6)
    # the training FLOPs come from the ledger: 3 x (forward without the embedding lookup + the MTP module)
    led = ledger(config, context=4096)
    embed = config.vocab_size * config.hidden_size
    per_token = 3 * (led["flops_per_token"] - 2 * embed + led["mtp_flops_per_token"])
    assert row["train_flops_per_token"] == per_token
    # close to 6 x 37B active parameters plus attention and MTP, far from 6 x 671B
    assert 6 * 37e9 < per_token < 1.5 * 6 * 37e9
    assert row["model_flops_per_token"] < per_token
    implied = per_token * 14.8e12 / (2.788e6 * 3600 * 989.4e12)
    assert row["implied_mfu"] == pytest.approx(implied)
    assert 0.3 < row["implied_mfu"] < 0.6  # of the H800's dense bf16 peak
    fp8 = plan_config(config, tokens=14.8e12, gpu="H800", precision="fp8", gpu_hours=2.788e6)
    assert fp8["implied_mfu"] == pytest.approx(row["implied_mfu"] / 2, rel=1e-3)
    # GPU-hours at an assumed MFU invert the same arithmetic
    assert row["gpu_hours"] == pytest.approx(per_token * 14.8e12 / (989.4e12 * 0.4) / 3600)


@pytest.mark.parametrize("argv, names", [
    (["--compute", "-1e20"], "--compute must be a positive number"),
    (["--compute", "0"], "--compute"),
    (["--compute", "-5"], "must be a positive number"),
    (["--compute", "lots"], "--compute"),
    (["--compute", "nan"], "--compute"),
    (["--config", "hub_configs/tiny", "--tokens", "-5"], "--tokens must be a positive number"),
    (["--config", "hub_configs/tiny", "--tokens", "inf"], "--tokens"),
    (["--config", "hub_configs/tiny"], "--tokens"),
    (["--config", "hub_configs/tiny", "--tokens", "1e9", "--gpu", "V100"], "V100"),
    (["--config", "hub_configs/tiny", "--tokens", "1e9", "--gpu", "A100", "--precision", "fp8"], "fp8"),
    (["--config", "hub_configs/tiny", "--tokens", "1e9", "--mfu", "1.5"], "--mfu"),
    (["--compute", "1e20", "--seq-len", "0"], "--seq-len"),
])
def test_bad_inputs_are_named(argv, names, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert names in capsys.readouterr().err
