"""The R1 recipe (examples/r1_pipeline.py) over several seeds: each stage's held-out figures as mean and spread.

    python -m benchmarks.r1_seeds --seeds 0 1 2 --output runs/r1_seeds        # run the pipeline per seed, then sum up
    python -m benchmarks.r1_seeds --runs runs/a runs/b runs/c                 # sum up runs already made

A seed changes everything a run draws: the held-out split, the cold-start traces, initialisations, data order,
rollouts and evaluation samples. Per stage and figure: the mean over seeds, the smallest and largest value, and the
mean of the runs' own standard errors (the noise of one run's 300 x 8 samples, next to the spread between runs).
Also per seed: GRPO's pass@1 gain over its cold start, the random-reward control's, R1-Zero's against GRPO, and the
student's share of its teacher's pass@1. Writes OUTPUT/r1_seeds.json (or benchmarks/results/r1_seeds.json for
--runs) and prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.harness import REPO_ROOT, RESULTS_DIR, markdown_table, write_json

FIGURES = ("pass@1", "pass@8", "greedy_accuracy", "format_rate", "completion_tokens")


def summarise(runs: list[dict]) -> dict:
    """runs: one {"seed", "stages"} per run -> per stage and figure {mean, min, max, mean_se}, and per-seed gains."""
    names = [s["stage"] for s in runs[0]["stages"]]
    table = {}
    for name in names:
        entries = [next(s for s in r["stages"] if s["stage"] == name) for r in runs]
        table[name] = {}
        for f in FIGURES:
            values = [e[f"heldout_{f}"] for e in entries if f"heldout_{f}" in e]
            if values:
                table[name][f] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values),
                                  "mean_se": sum(e[f"heldout_{f}_se"] for e in entries) / len(entries),
                                  "values": values}
        table[name]["warnings"] = [e.get("warning") for e in entries if e.get("warning")]
    gains = []
    for r in runs:
        by = {s["stage"]: s for s in r["stages"]}
        p1 = {k: v["heldout_pass@1"] for k, v in by.items()}
        gains.append({
            "seed": r["seed"],
            "grpo_gain_pass@1": p1["grpo"] - p1["cold_start_sft"],
            "grpo_change_pass@8": by["grpo"]["heldout_pass@8"] - by["cold_start_sft"]["heldout_pass@8"],
            "random_reward_gain_pass@1": (p1["grpo_random_reward"] - p1["cold_start_sft"]
                                          if "grpo_random_reward" in p1 else None),
            "r1_zero_minus_grpo_pass@1": p1["r1_zero"] - p1["grpo"] if "r1_zero" in p1 else None,
            "student_share_of_teacher_pass@1": by["distill"].get("kept_share_of_teacher_pass@1"),
        })
    return {"stages": table, "per_seed": gains}


def markdown(summary: dict) -> str:
    def cell(d, pct=True):
        if d is None:
            return "-"
        f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.1f}")
        return f"{f(d['mean'])} ({f(d['min'])}-{f(d['max'])}; se {f(d['mean_se'])})"

    rows = [[name, *(cell(figs.get(f), f != "completion_tokens") for f in FIGURES)]
            for name, figs in summary["stages"].items()]
    out = markdown_table(["stage", "pass@1 %", "pass@8 %", "greedy %", "format %", "tokens"], rows)
    seed_rows = [[g["seed"], *(f"{100 * g[k]:+.1f}" if g[k] is not None else "-" for k in (
        "grpo_gain_pass@1", "grpo_change_pass@8", "random_reward_gain_pass@1", "r1_zero_minus_grpo_pass@1")),
        f"{100 * g['student_share_of_teacher_pass@1']:.0f}%" if g["student_share_of_teacher_pass@1"] else "-"]
        for g in summary["per_seed"]]
    out += "\n\n" + markdown_table(["seed", "GRPO pass@1 gain (points)", "GRPO pass@8 change", "random-reward gain",
                                    "R1-Zero minus GRPO", "student / teacher pass@1"], seed_rows)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--output", help="folder for the runs (one per seed) and r1_seeds.json")
    p.add_argument("--runs", nargs="*", help="sum up these run folders instead of running")
    p.add_argument("pipeline_args", nargs=argparse.REMAINDER, help="after --: arguments for r1_pipeline.py")
    args = p.parse_args(argv)
    extra = [a for a in args.pipeline_args if a != "--"]
    if args.runs:
        folders = [Path(r) for r in args.runs]
        out = RESULTS_DIR / "r1_seeds.json"
    else:
        if not args.output:
            raise SystemExit("--output is needed to run the pipeline (or give --runs)")
        folders = [Path(args.output) / f"seed{s}" for s in args.seeds]
        for seed, folder in zip(args.seeds, folders):
            subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "r1_pipeline.py"), "--output", str(folder),
                            "--seed", str(seed), *extra], check=True)
        out = Path(args.output) / "r1_seeds.json"
    runs = [{"seed": json.loads((f / "run.json").read_text())["args"]["seed"], "folder": str(f),
             "stages": json.loads((f / "stages.json").read_text())} for f in folders]
    summary = summarise(runs)
    summary["runs"] = [{"seed": r["seed"], "folder": r["folder"],
                        **{k: json.loads((Path(r["folder"]) / "run.json").read_text())[k]
                           for k in ("command", "machine_line", "seconds")}} for r in runs]
    write_json(out, summary)
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
