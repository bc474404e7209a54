"""examples/r1_pipeline.py --smoke: every stage of the R1 recipe on Countdown runs, in order, and writes what it
promises, and the same command twice gives the same figures.

The run itself is the smoke budget (a few steps per stage); the assertions are on its outputs: stages.json (every
stage and control with its figures and standard errors), the GRPO logs (frac_reward_zero_std per step), the
rejection-sampled dataset (every row correct, no duplicate, no held-out problem), the plot, and the dense student,
loaded by plain transformers in a process that never imports this package."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("r1_pipeline", REPO / "examples" / "r1_pipeline.py")
pipeline = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pipeline)

LOAD_STUDENT = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, questions = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path).eval()
completions = []
for q in questions:
    ids = torch.tensor([tok(f"User: {q} Assistant:")["input_ids"]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=40,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    completions.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
ours = sorted(m for m in sys.modules if m.split(".")[0] in ("modeling_deepseek", "trainers", "examples"))
print(json.dumps({"class": type(model).__name__, "completions": completions, "our_modules": ours,
                  "prompt_ids": tok("User: 1 2 3 to 6 Assistant:")["input_ids"]}))
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("r1_smoke")
    stages = pipeline.main(["--smoke", "--output", str(out)])
    return out, stages


FIGURES = [f"heldout_{f}" for f in ("pass@1", "pass@8", "greedy_accuracy", "format_rate", "completion_tokens")]


def test_every_stage_in_order_with_its_figures(run):
    out, stages = run
    written = json.loads((out / "stages.json").read_text())
    assert written == json.loads(json.dumps(stages))
    assert [s["stage"] for s in written] == [*pipeline.STAGES, *pipeline.CONTROLS]
    for s in written:
        for key in FIGURES:
            assert s[f"{key}_se"] >= 0, (s["stage"], key)
            if key != "heldout_completion_tokens":
                assert 0.0 <= s[key] <= 1.0, (s["stage"], key)
        assert s["heldout_pass@1"] <= s["heldout_pass@8"] + 1e-12
        assert s["heldout_completion_tokens"] > 0
    by = {s["stage"]: s for s in written}
    assert {by[s]["compared_with"] for s in ("sft", "distill")} == {"grpo"}
    assert by["grpo"]["compared_with"] == by["grpo_random_reward"]["compared_with"] == "cold_start_sft"
    assert by["r1_zero"]["compared_with"] == "base"
    for s in written:  # the flag follows the rule, wherever it is set
        if "compared_with" in s:
            drop = -s["pass@1_change"]
            assert ("warning" in s) == (drop > pipeline.COLLAPSE_POINTS and drop > pipeline.COLLAPSE_SE *
                                        s["pass@1_change_se"]), s["stage"]
    rs = by["rejection_sampling"]["rejection_sampling"]
    assert rs["kept"] > 0 and rs["samples"] == rs["prompts"] * rs["num_samples"]
    assert rs["kept"] + rs["duplicates_dropped"] == rs["passed"]
    # the rejection-sampling stage reports the policy it sampled from
    assert {k: v for k, v in by["rejection_sampling"].items() if k.startswith("heldout_")} == \
        {k: v for k, v in by["grpo"].items() if k.startswith("heldout_")}
    # the student: SFT on the kept samples, then TRL's on-policy distillation from the stage-4 model
    assert by["distill"]["student"] == "LlamaForCausalLM" and by["distill"]["on_policy_steps"] == 2
    assert len(by["distill"]["on_policy_losses"]) == 2 and all(0 < x < 1e3 for x in by["distill"]["on_policy_losses"])
    assert 0.0 <= by["distill"]["after_sft_only"]["heldout_pass@1"] <= 1.0
    # TRL's per-step logs of the three GRPO runs, frac_reward_zero_std and the kept share of dynamic sampling
    logs = json.loads((out / "grpo_logs.json").read_text())
    assert set(logs) == {"grpo", "grpo_random_reward", "r1_zero"}
    for name, steps in logs.items():
        assert [h["step"] for h in steps] == [1, 2], name
        for h in steps:
            assert 0 <= h["frac_reward_zero_std"] <= 1
            assert h["dynamic_sampling/kept_groups"] == pytest.approx(1 - h["frac_reward_zero_std"])
    png = (out / "r1_stages.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    meta = json.loads((out / "run.json").read_text())
    assert meta["args"]["smoke"] and set(meta["stage_seconds"]) == {"base", *pipeline.STAGES, *pipeline.CONTROLS}


def test_the_same_command_gives_the_same_figures(run, tmp_path):
    """Seeded data, sampling, training and evaluation: a second run of the command, figure for figure; the controls
    run in this process after stage 5 this time, and give the figures the second process gave."""
    out, stages = run
    assert (out / "controls" / "controls.json").exists()  # the first run's controls ran in a second process
    again = pipeline.main(["--smoke", "--output", str(tmp_path), "--no-controls-process"])
    assert not (tmp_path / "controls").exists()
    strip = lambda s: {k: v for k, v in s.items() if k != "seconds"}  # noqa: E731
    assert [strip(s) for s in again] == [strip(s) for s in stages]


def test_rejection_sampled_rows_are_correct_well_formed_and_distinct(run):
    import datasets

    from trainers.rewards import countdown_reward, format_reward

    out, stages = run
    kept = datasets.load_from_disk(str(out / "rejection_sampled"))
    assert {"prompt", "completion", "numbers", "target"} <= set(kept.column_names)
    assert len(kept) == stages[2]["rejection_sampling"]["kept"]
    assert countdown_reward(kept["completion"], kept["numbers"], kept["target"]) == [1.0] * len(kept)
    assert format_reward(kept["completion"]) == [1.0] * len(kept)
    pairs = list(zip(kept["prompt"], kept["completion"]))
    assert len(set(pairs)) == len(pairs)
    held_out = {f"User: {q} Assistant:" for q in json.loads((out / "run.json").read_text())["held_out"]}
    assert not held_out & set(kept["prompt"]), "a held-out problem leaked into the training data"


def test_student_loads_with_plain_transformers(run):
    out, stages = run
    questions = json.loads((out / "run.json").read_text())["held_out"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", LOAD_STUDENT, str(out / "student"), json.dumps(questions)],
                          cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["class"] == "LlamaForCausalLM" and got["our_modules"] == []
    tok = pipeline.build_tokenizer()
    assert got["prompt_ids"] == tok("User: 1 2 3 to 6 Assistant:")["input_ids"]
    # the reloaded student decodes as the stage measured it (greedy; one problem of slack for batched padding)
    from trainers.rewards import countdown_reward

    numbers = [[int(n) for n in q.split(" to ")[0].split()] for q in questions]
    targets = [int(q.split(" to ")[1]) for q in questions]
    accuracy = sum(r == 1.0 for r in countdown_reward(got["completions"], numbers, targets)) / len(questions)
    distill = next(s for s in stages if s["stage"] == "distill")
    assert abs(accuracy - distill["heldout_greedy_accuracy"]) <= 1 / len(questions) + 1e-9


def test_a_collapsed_stage_is_flagged_with_its_likely_cause():
    """The rule of the warning: more than COLLAPSE_POINTS and COLLAPSE_SE standard errors below the reference; an SFT
    stage whose training loss ended high is named as under-trained (the arithmetic task's SFT collapse)."""
    ref = {"heldout_pass@1": 0.912, "heldout_pass@1_se": 0.02}
    collapsed = {"heldout_pass@1": 0.138, "heldout_pass@1_se": 0.02, "final_train_loss": 0.09}
    pipeline.compare(collapsed, ref, "grpo")
    assert "far below grpo" in collapsed["warning"] and "under-trained" in collapsed["warning"]
    assert collapsed["pass@1_change"] == pytest.approx(0.138 - 0.912)
    converged = {"heldout_pass@1": 0.138, "heldout_pass@1_se": 0.02, "final_train_loss": 0.01}
    pipeline.compare(converged, ref, "grpo")
    assert "far below" in converged["warning"] and "under-trained" not in converged["warning"]
    for noise in ({"heldout_pass@1": 0.87, "heldout_pass@1_se": 0.02},   # 4 points: within the noise
                  {"heldout_pass@1": 0.80, "heldout_pass@1_se": 0.1}):   # 11 points, about one standard error
        pipeline.compare(noise, ref, "grpo")
        assert "warning" not in noise
