"""benchmarks/grpo_sweep.py: a saved cold start reloads as the model the pipeline measured, every GRPO run from it
is scored against it on the same problems and samples, and each run adds one row with its settings to the table."""

from __future__ import annotations

import json

import pytest

from benchmarks import grpo_sweep

TINY = ["--facts-steps", "4", "--cold-start-steps", "4", "--cold-start-examples", "16", "--held-out", "8",
        "--eval-samples", "8"]
GRPO = ["--grpo-steps", "2", "--prompts-per-step", "2", "--num-generations", "2"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("cold_start")
    grpo_sweep.main(["cold-start", "--output", str(out / "cs"), *TINY])
    return out


def test_rows_start_from_the_saved_cold_start_and_record_their_settings(saved):
    cs, table = saved / "cs", saved / "sweep.jsonl"
    info = json.loads((cs / "cold_start.json").read_text())
    assert info["args"]["cold_start_steps"] == 4 and info["args"]["held_out"] == 8
    row = grpo_sweep.grpo(["--cold-start", str(cs), "--table", str(table), "--grpo-lr", "3e-4",
                           "--grpo-temperature", "0.8", "--well-formed", "0.3", *GRPO])
    # the reloaded weights give the very figures the cold-start stage measured (same problems, same samples)
    measured = {k: v for k, v in info["cold_start_sft"].items() if k != "heldout_example"}
    assert row["before"] == measured and row["held_out_scored"] == 8
    assert row["settings"]["grpo_lr"] == 3e-4 and row["settings"]["grpo_temperature"] == 0.8
    assert row["settings"]["well_formed"] == 0.3 and not row["settings"]["random_reward"]
    assert row["pass@1_change"] == pytest.approx(row["after"]["heldout_pass@1"] - row["before"]["heldout_pass@1"])
    assert len(row["logs"]["reward"]) == 3 and all(0 <= v <= 1 for v in row["logs"]["frac_reward_zero_std"])
    # a cheaper sweep scores the first N held-out problems, before and after alike; the control is marked
    control = grpo_sweep.grpo(["--cold-start", str(cs), "--table", str(table), "--eval-held-out", "4",
                               "--random-reward", *GRPO])
    assert control["held_out_scored"] == 4 and control["settings"]["random_reward"]
    assert control["before"] != row["before"]
    lines = table.read_text().splitlines()
    assert [json.loads(line)["settings"]["random_reward"] for line in lines] == [False, True]
    text = grpo_sweep.table(["--table", str(table)])
    assert text.count("\n") == 3 and "random" in text.splitlines()[-1] and "0.0003" in text


def test_unknown_command_is_refused():
    with pytest.raises(SystemExit, match="cold-start"):
        grpo_sweep.main(["sweep"])


def test_the_pipeline_starts_from_a_saved_cold_start_made_with_its_arguments(saved):
    import torch

    pipeline = grpo_sweep.pipeline
    cs = saved / "cs"
    info = json.loads((cs / "cold_start.json").read_text())
    args = pipeline.parse_args(["--output", str(saved / "run"), "--from-cold-start", str(cs), *TINY])
    tokenizer = pipeline.build_tokenizer()
    made = pipeline.load_cold_start(args, tokenizer, cs, log=lambda m: None)
    assert made["cold_start_sft"] == info["cold_start_sft"] and made["base"] == info["base"]
    saved_state = torch.load(cs / "cold_start.pt")
    assert all(torch.equal(v, saved_state[k]) for k, v in made["model"].state_dict().items())
    assert not all(torch.equal(made["base_state"][k], saved_state[k]) for k in saved_state)
    other = pipeline.parse_args(["--output", str(saved / "run"), *TINY, "--cold-start-steps", "5"])
    with pytest.raises(SystemExit, match="cold_start_steps"):
        pipeline.load_cold_start(other, tokenizer, cs, log=lambda m: None)


def test_sft_stage_alone_from_the_saved_base_and_a_saved_dataset(saved):
    import datasets

    from examples.countdown_task import split_problems, trace_rows

    _, train = split_problems(8, seed=10_002, ops="+-")
    data = saved / "kept"
    datasets.Dataset.from_list(trace_rows(train[:16], seed=0)).save_to_disk(str(data))
    table = saved / "sft.jsonl"
    common = ["--cold-start", str(saved / "cs"), "--data", str(data), "--table", str(table)]
    row = grpo_sweep.sft([*common, "--sft-steps", "3", "--sft-lr", "2e-3"])
    assert row["stage"] == "sft" and row["sft_steps"] == 3 and row["sft_lr"] == 2e-3 and row["train_examples"] == 16
    student = grpo_sweep.sft([*common, "--student", "--student-facts-steps", "2", "--student-sft-steps", "2"])
    assert student["stage"] == "distill" and student["sft_steps"] == 2
    for r in (row, student):
        assert 0 <= r["after"]["heldout_pass@1"] <= r["after"]["heldout_pass@8"] <= 1 and r["final_train_loss"] > 0
    assert [json.loads(line)["stage"] for line in table.read_text().splitlines()] == ["sft", "distill"]
