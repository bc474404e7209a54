"""Smoke test of examples/pretrain.py: the whole job (corpus, tokenizer, eval, Trainer, save, reload, pipeline)
on the tiny config for a few steps."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load_example():
    spec = importlib.util.spec_from_file_location("pretrain_example", REPO / "examples" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pretrain_tiny_end_to_end(tmp_path):
    pytest.importorskip("modeling_deepseek")
    pretrain = _load_example()
    out = tmp_path / "run"
    metrics = pretrain.main([
        "--config", str(REPO / "hub_configs" / "tiny"), "--output", str(out),
        "--max-steps", "6", "--max-files", "20", "--block-size", "32", "--batch-size", "4",
        "--vocab-size", "400", "--logging-steps", "2", "--eval-steps", "3", "--eval-blocks", "8",
        "--max-new-tokens", "8", "--lr", "3e-3",
    ])
    final = out / "final"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (final / name).is_file(), name
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert (out / "loss.png").stat().st_size > 0
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["max_steps"] == 6
    config = json.loads((final / "config.json").read_text())
    assert config["model_type"] == "deepseek" and config["vocab_size"] == 400
    gen = json.loads((final / "generation_config.json").read_text())
    assert gen["do_sample"] is False and gen["max_new_tokens"] == 8
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (0, 1, 2)
    for phase in ("before", "after"):
        for key in ("loss", "lm_loss", "mtp_loss", "max_violation"):
            assert metrics[phase][key] is not None and metrics[phase][key] == metrics[phase][key], (phase, key)
    assert metrics["after"]["loss"] < metrics["before"]["loss"]
    assert metrics["generated"].startswith("def fibonacci(n):")
