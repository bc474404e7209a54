"""GRPO settings for the R1 recipe chosen by measurement: many GRPO runs from ONE saved cold start, one table.

    python -m benchmarks.grpo_sweep cold-start --output runs/cs2 --seed 2            # base + cold start, saved once
    python -m benchmarks.grpo_sweep grpo --cold-start runs/cs2 --table runs/sweep.jsonl --grpo-lr 1e-3 --grpo-steps 100
    python -m benchmarks.grpo_sweep table --table runs/sweep.jsonl                   # the markdown table
    python -m benchmarks.grpo_sweep sft --cold-start runs/cs2 --data RUN/rejection_sampled --table T --sft-steps 800

Why a saved cold start: GRPO's gain is measured against the model it starts from, and the cold start differs from
seed to seed (benchmarks/RESULTS.md: pass@1 1.7-11.0%), so settings compared across seeds compare cold starts. Here
every GRPO run starts from the same weights and is scored on the same held-out problems with the same evaluation
samples as its starting point, so the difference between two rows is the setting's.

`cold-start` runs examples/r1_pipeline.py's base and cold-start stages (its functions, its options) and saves the
weights, the arguments and the held-out figures. `grpo` loads them and runs the pipeline's GRPO stage with any of
its GRPO options (learning rate, steps, temperature, loss, scale_rewards, `--well-formed`: the reward of a
well-formed wrong answer, i.e. the format share of the reward, ...) plus `--random-reward` (the control) or
`--from-base` (R1-Zero), then appends one row
to the table: the settings, held-out pass@1 / pass@8 / format before and after, the change with its standard error,
a summary of the per-step logs and the seconds. `--eval-held-out N` scores the first N of the held-out problems (a
cheaper sweep; the cold start is re-scored on the same N so that a row compares like with like).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness import REPO_ROOT, markdown_table

_spec = importlib.util.spec_from_file_location("r1_pipeline", REPO_ROOT / "examples" / "r1_pipeline.py")
pipeline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pipeline)

# the pipeline options a GRPO run may change (everything else comes from the saved cold start's arguments)
GRPO_OPTIONS = ("grpo_steps", "prompts_per_step", "num_generations", "grpo_lr", "grpo_temperature", "loss_type",
                "scale_rewards", "kl_beta", "epsilon_high", "dynamic_sampling", "max_completion_length", "well_formed")


def cold_start(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="grpo_sweep cold-start")
    p.add_argument("--output", required=True)
    known, rest = p.parse_known_args(argv)
    args = pipeline.parse_args(["--output", known.output, *rest])
    torch.set_num_threads(args.threads)
    out = Path(known.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tokenizer = pipeline.build_tokenizer()
    held_out, train_problems = pipeline.task_split(args)
    models = pipeline.base_and_cold_start(args, tokenizer, held_out, train_problems, out,
                                          lambda m: print(f"[{time.time() - t0:6.1f}s] {m}", flush=True))
    torch.save(models["cold_state"], out / "cold_start.pt")
    torch.save(models["base_state"], out / "base.pt")
    info = {"args": vars(args), "seconds": round(time.time() - t0, 1),
            **{k: models[k] for k in ("base", "cold_start_sft", "final_train_loss", "train_examples", "base_seconds",
                                      "cold_start_seconds")}}
    (out / "cold_start.json").write_text(json.dumps(info, indent=1))
    print(f"saved {out}/cold_start.pt ({info['seconds']:.0f}s)")


def saved_arguments(src: Path, rest: list[str]):
    """The pipeline's arguments for a run from the cold start saved in `src`: its seed, task, held-out set and
    evaluation as saved, then `rest` (the settings under test)."""
    saved = json.loads((src / "cold_start.json").read_text())["args"]
    return pipeline.parse_args(["--output", str(src / "sweep"), "--seed", str(saved["seed"]), "--ops", saved["ops"],
                                "--max-number", str(saved.get("max_number", 9)),
                                "--held-out", str(saved["held_out"]), "--eval-samples", str(saved["eval_samples"]),
                                "--threads", str(saved["threads"]), *rest])


def grpo(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="grpo_sweep grpo")
    p.add_argument("--cold-start", required=True, help="a directory written by `cold-start`")
    p.add_argument("--table", required=True, help="JSON-lines file the row is appended to")
    p.add_argument("--eval-held-out", type=int, default=0, help="score the first N held-out problems (0: all)")
    p.add_argument("--random-reward", action="store_true", help="the random-reward control of these settings")
    p.add_argument("--from-base", action="store_true", help="R1-Zero: GRPO from the base model")
    p.add_argument("--eval-train", type=int, default=0,
                   help="also score the first N training problems before and after (memorisation vs transfer)")
    p.add_argument("--bias-update-speed", type=float, default=None,
                   help="the MoE routers' bias update speed during GRPO (default: the model's own, 0.001)")
    p.add_argument("--note", default="")
    known, rest = p.parse_known_args(argv)
    src = Path(known.cold_start)
    args = saved_arguments(src, rest)
    torch.set_num_threads(args.threads)
    from trainers.rewards import make_countdown_reward, random_reward_control

    tokenizer = pipeline.build_tokenizer()
    held_out, train_problems = pipeline.task_split(args)
    scored = held_out[: known.eval_held_out] if known.eval_held_out else held_out
    model = pipeline.build_model(tokenizer, seed=args.seed)
    model.load_state_dict(torch.load(src / ("base.pt" if known.from_base else "cold_start.pt")))
    before = pipeline.measure(model, tokenizer, scored, args)
    train_scored = train_problems[: known.eval_train]
    train_before = pipeline.measure(model, tokenizer, train_scored, args) if train_scored else None
    if known.bias_update_speed is not None:
        model.config.bias_update_speed = known.bias_update_speed
    reward = make_countdown_reward(well_formed=args.well_formed)
    if known.random_reward:
        reward = random_reward_control(reward, seed=args.seed)
    t0 = time.time()
    logs = pipeline.run_grpo(model, tokenizer, train_problems, args, src / "sweep", "grpo", reward)
    seconds = time.time() - t0
    after = pipeline.measure(model, tokenizer, scored, args)
    train_after = pipeline.measure(model, tokenizer, train_scored, args) if train_scored else None
    row = {"settings": {k: getattr(args, k) for k in GRPO_OPTIONS} | {"random_reward": known.random_reward,
                                                                       "from_base": known.from_base,
                                                                       "bias_update_speed":
                                                                           model.config.bias_update_speed},
           "cold_start": str(src), "held_out_scored": len(scored), "eval_samples": args.eval_samples,
           "before": {k: v for k, v in before.items() if k != "heldout_example"},
           "after": {k: v for k, v in after.items() if k != "heldout_example"},
           "example_after": after["heldout_example"],
           "pass@1_change": after["heldout_pass@1"] - before["heldout_pass@1"],
           "pass@1_change_se": math.hypot(after["heldout_pass@1_se"], before["heldout_pass@1_se"]),
           "train_pass@1": [train_before["heldout_pass@1"], train_after["heldout_pass@1"]] if train_scored else None,
           "train_pass@8": [train_before["heldout_pass@8"], train_after["heldout_pass@8"]] if train_scored else None,
           "logs": log_summary(logs), "grpo_seconds": round(seconds, 1), "note": known.note,
           "load_avg": [round(x, 2) for x in os.getloadavg()]}
    with open(known.table, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: row[k] for k in ("settings", "pass@1_change", "pass@1_change_se", "logs")}, indent=1))
    print(f"pass@1 {before['heldout_pass@1']:.1%} -> {after['heldout_pass@1']:.1%}, pass@8 "
          f"{before['heldout_pass@8']:.1%} -> {after['heldout_pass@8']:.1%}, format {after['heldout_format_rate']:.1%}"
          f" ({seconds:.0f}s of GRPO)")
    return row


def sft(argv: list[str]) -> dict:
    """Stage 4 alone: the saved base fine-tuned on a saved rejection-sampled set (OUTPUT/rejection_sampled of a
    pipeline run) with the given --sft-steps / --sft-lr, scored on the held-out problems: how many steps the stage
    needs, without re-running the stages before it."""
    p = argparse.ArgumentParser(prog="grpo_sweep sft")
    p.add_argument("--cold-start", required=True, help="a directory written by `cold-start` (its base is used)")
    p.add_argument("--data", required=True, help="a rejection-sampled dataset (datasets.save_to_disk)")
    p.add_argument("--table", required=True)
    p.add_argument("--student", action="store_true", help="stage 5 instead: the dense student, pre-trained on the "
                   "computation steps (--student-facts-steps), then --student-sft-steps at --sft-lr")
    known, rest = p.parse_known_args(argv)
    import datasets

    src = Path(known.cold_start)
    args = saved_arguments(src, rest)
    torch.set_num_threads(args.threads)
    tokenizer = pipeline.build_tokenizer()
    held_out, _ = pipeline.task_split(args)
    rows = datasets.load_from_disk(known.data).to_list()
    t0 = time.time()
    if known.student:
        model, steps = pipeline.build_student(tokenizer, seed=args.seed), args.student_sft_steps
        pipeline.pretrain_facts(model, tokenizer, args.student_facts_steps, seed=args.seed + 2, log=print,
                                line=pipeline.task_facts(args))
    else:
        model, steps = pipeline.build_model(tokenizer, seed=args.seed), args.sft_steps
        model.load_state_dict(torch.load(src / "base.pt"))
    losses = pipeline.train_sft(model, tokenizer, rows, src / "sweep", "sft", steps, args.sft_lr, args.seed)
    after = pipeline.measure(model, tokenizer, held_out, args)
    row = {"stage": "distill" if known.student else "sft", "data": known.data, "train_examples": len(rows),
           "sft_steps": steps,
           "sft_lr": args.sft_lr, "final_train_loss": losses[-1], "seconds": round(time.time() - t0, 1),
           "after": {k: v for k, v in after.items() if k != "heldout_example"},
           "load_avg": [round(x, 2) for x in os.getloadavg()]}
    with open(known.table, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{row['stage']} {steps} steps at lr {args.sft_lr:g} on {len(rows)} samples: loss {losses[-1]:.3f}, held-out "
          f"pass@1 {after['heldout_pass@1']:.1%}, pass@8 {after['heldout_pass@8']:.1%}")
    return row


def log_summary(logs: list[dict]) -> dict:
    """Per-step logs in thirds (first, middle, last): the figures that say whether and why the policy moved."""
    keys = ("reward", "frac_reward_zero_std", "dynamic_sampling/kept_groups", "entropy", "grad_norm",
            "clip_ratio/region_mean", "completions/clipped_ratio", "completions/mean_length")
    n = len(logs)
    parts = [logs[: max(1, n // 3)], logs[n // 3: max(n // 3 + 1, 2 * n // 3)], logs[2 * n // 3:] or logs[-1:]]
    return {k: [round(sum(h.get(k, 0.0) for h in part) / len(part), 4) for part in parts]
            for k in keys if logs and k in logs[0]}


def table(argv: list[str]) -> str:
    p = argparse.ArgumentParser(prog="grpo_sweep table")
    p.add_argument("--table", required=True)
    known = p.parse_args(argv)
    rows = [json.loads(line) for line in Path(known.table).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "settings" in r]  # GRPO rows (`sft` rows are read from the file)
    headers = ["cold start", "lr", "steps", "T", "scale", "loss", "well-formed", "control", "pass@1 before -> after",
               "change (se)", "pass@8 before -> after", "greedy before -> after", "format after",
               "training-set pass@1", "reward (thirds)", "zero-std (thirds)",
               "entropy (thirds)", "s"]
    out = []
    for r in rows:
        s, b, a = r["settings"], r["before"], r["after"]
        out.append([Path(r["cold_start"]).name, f"{s['grpo_lr']:g}", s["grpo_steps"], s["grpo_temperature"],
                    s["scale_rewards"], s["loss_type"], s["well_formed"],
                    "random" if s["random_reward"] else ("R1-Zero" if s.get("from_base") else ""),
                    f"{b['heldout_pass@1']:.1%} -> {a['heldout_pass@1']:.1%}",
                    f"{r['pass@1_change'] * 100:+.1f} ({r['pass@1_change_se'] * 100:.1f})",
                    f"{b['heldout_pass@8']:.1%} -> {a['heldout_pass@8']:.1%}",
                    f"{b['heldout_greedy_accuracy']:.1%} -> {a['heldout_greedy_accuracy']:.1%}",
                    f"{a['heldout_format_rate']:.1%}",
                    " -> ".join(f"{v:.1%}" for v in r["train_pass@1"]) if r.get("train_pass@1") else "",
                    " / ".join(f"{v:.2f}" for v in r["logs"].get("reward", [])),
                    " / ".join(f"{v:.2f}" for v in r["logs"].get("frac_reward_zero_std", [])),
                    " / ".join(f"{v:.2f}" for v in r["logs"].get("entropy", [])), f"{r['grpo_seconds']:.0f}"])
    text = markdown_table(headers, out)
    print(text)
    return text


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"cold-start": cold_start, "grpo": grpo, "sft": sft, "table": table}
    if not argv or argv[0] not in commands:
        raise SystemExit(f"usage: python -m benchmarks.grpo_sweep {{{'|'.join(commands)}}} ... (see the docstring)")
    commands[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
