"""Smoke test of examples/pretrain.py: the whole job (corpus, tokenizer, eval, Trainer, save, reload, pipeline,
push to the Hub, mocked offline by the hub_commits fixture of conftest.py) on the tiny config for a few steps."""

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


def test_pretrain_tiny_end_to_end(tmp_path, hub_commits):
    modeling_deepseek = pytest.importorskip("modeling_deepseek")
    pretrain = _load_example()
    out = tmp_path / "run"
    metrics = pretrain.main([
        "--config", str(REPO / "hub_configs" / "tiny"), "--output", str(out),
        "--max-steps", "6", "--max-files", "20", "--block-size", "32", "--batch-size", "4",
        "--vocab-size", "400", "--logging-steps", "2", "--eval-steps", "3", "--eval-blocks", "8",
        "--max-new-tokens", "8", "--lr", "3e-3", "--push-to-hub", "some-user/some-repo",
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

    # --push-to-hub: the repo holds exactly what was saved to final/ (byte for byte), plus the model card; the
    # Trainer's pickled training_args.bin is not needed to load the model and is not pushed.
    assert hub_commits, "nothing was pushed"
    pushed = {}
    for repo_id, uploaded, kwargs in hub_commits:
        assert repo_id == "some-user/some-repo"
        assert not kwargs.get("create_pr") and kwargs.get("revision") is None  # straight to main
        for name, data in uploaded.items():
            assert "/" not in name, name
            assert pushed.setdefault(name, data) == data, f"{name} pushed twice with different contents"
    saved = {p.name: p.read_bytes() for p in final.iterdir()}
    assert set(pushed) == set(saved) - {"training_args.bin"} | {"README.md"}
    for name, data in pushed.items():
        if name != "README.md":
            assert data == saved[name], f"pushed {name} differs from the saved one"
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "configuration.py", "modeling.py"} <= set(pushed)
    auto_map = json.loads(pushed["config.json"])["auto_map"]
    assert auto_map == {"AutoConfig": "configuration.DeepseekConfig",
                        "AutoModelForCausalLM": "modeling.DeepseekForCausalLM"}
    package = Path(modeling_deepseek.__file__).resolve().parent
    for name in (n for n in pushed if n.endswith(".py")):  # the package's own code, copied for trust_remote_code
        assert pushed[name] == (package / name).read_bytes(), name
    # A user pulling the repo gets a loadable model + tokenizer that reproduce the run's greedy sample.
    from transformers import pipeline

    pulled = tmp_path / "pulled"
    pulled.mkdir()
    for name, data in pushed.items():
        (pulled / name).write_bytes(data)
    generator = pipeline("text-generation", model=str(pulled), tokenizer=str(pulled), device="cpu")
    assert type(generator.model).__name__ == "DeepseekForCausalLM" and len(generator.tokenizer) == 400
    assert generator("def fibonacci(n):")[0]["generated_text"] == metrics["generated"]


def test_pretrain_checkpoints_and_resume(tmp_path):
    pytest.importorskip("modeling_deepseek")
    pretrain = _load_example()
    out = tmp_path / "run"
    common = ["--config", str(REPO / "hub_configs" / "tiny"), "--output", str(out), "--max-files", "10",
              "--block-size", "32", "--batch-size", "2", "--vocab-size", "300", "--eval-blocks", "4",
              "--max-new-tokens", "2", "--save-steps", "2", "--save-total-limit", "2", "--logging-steps", "1"]
    first = pretrain.main(common + ["--max-steps", "4", "--resume"])  # nothing to resume yet: starts at step 0
    run_dir = out / "trainer"
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-2", "checkpoint-4"]  # no staging left over
    state4 = json.loads((run_dir / "checkpoint-4" / "trainer_state.json").read_text())
    assert state4["global_step"] == 4

    second = pretrain.main(common + ["--max-steps", "6", "--resume"])
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-4", "checkpoint-6"]  # rotation kept 2
    state6 = json.loads((run_dir / "checkpoint-6" / "trainer_state.json").read_text())
    assert state6["global_step"] == 6
    # The resumed run continued the first one's history (steps 1-4) instead of starting over.
    losses = {e["step"]: e["loss"] for e in state6["log_history"] if "loss" in e}
    first_losses = {e["step"]: e["loss"] for e in state4["log_history"] if "loss" in e}
    assert first_losses and all(losses[s] == v for s, v in first_losses.items())
    assert sorted(first_losses) == [1, 2, 3, 4] and sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert first["max_steps"] == 4 and second["max_steps"] == 6
