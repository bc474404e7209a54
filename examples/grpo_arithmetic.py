#!/usr/bin/env python
"""A small DeepSeek model (MLA, MoE, MTP) learns to reason on CPU: cold-start SFT, then GRPO with rule-based rewards.

    python examples/grpo_arithmetic.py --output runs/grpo_arithmetic

The task, generated in code: add two digits ("User: 7+5 Assistant:"). The cold-start data are written
in the R1 format, <think>...</think> <answer>...</answer>, and are deliberately imperfect, as cold-start data are:
most traces skip the work and guess ("<think>guess</think> <answer>17</answer>"), a minority add the digits one at a
time ("<think>7+5=12</think> <answer>12</answer>"). After the short SFT the model writes the format
and can do the sums, but mostly guesses: held-out accuracy is low. GRPO with accuracy + format rewards only (no
critic, no reward model, no hint about which trace is better) then has to discover that working the sum out pays,
the small-scale analogue of R1-Zero learning to reason before it answers (measured in benchmarks/RESULTS.md, GRPO
section: held-out pass@1 21% -> 97% in about 6 minutes on 2 CPU cores).

Steps: character-level tokenizer built in code; a DeepseekForCausalLM (MLA, 8 routed experts top-2 + 1 shared, one
MTP module); SFT with the model's own loss (next-token + MTP + balance), completion tokens only; held-out accuracy
(pass@1 sampled at temperature 0.6, several samples per problem, and greedy); trainers.GRPOTrainer with
accuracy_reward + format_reward, the held-out accuracy re-measured every --eval-every steps. Writes OUTPUT/metrics.json
and OUTPUT/grpo_curves.png (reward, held-out accuracy, completion length, MaxVio). Fixed seeds; one command.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from examples.arithmetic_task import (  # noqa: E402,F401  (the task and model, shared with r1_pipeline.py)
    EVAL_TEMPERATURE, TEMPLATE, build_model, build_tokenizer, evaluate, fact_line, guess_trace, make_problem,
    grpo_setup, pretrain_facts, prompt_text, reasoning_trace, save_figure, sft, split_questions)


def cold_start(model, tokenizer, steps: int, reason_fraction: float, seed: int, facts_fraction: float = 0.3,
               log=print) -> list[float]:
    """SFT on R1-format traces (completion tokens only), a `reason_fraction` of them worked out, the rest guessed;
    a `facts_fraction` of the rows stay plain addition facts, so that the arithmetic is not forgotten."""
    eos = [tokenizer.eos_token_id]

    def row(rng):
        if rng.random() < facts_fraction:
            return [], tokenizer(fact_line(rng))["input_ids"] + eos
        p = make_problem(rng)
        trace = reasoning_trace(p["digits"]) if rng.random() < reason_fraction else guess_trace(p["digits"], rng)
        return (tokenizer(prompt_text(p["question"]))["input_ids"],
                tokenizer(trace)["input_ids"] + [tokenizer.eos_token_id])

    return sft(model, tokenizer, steps, row, seed, lr=3e-3, log=log, name="cold start")


class HeldOutEval(TrainerCallback):
    def __init__(self, model, tokenizer, held_out, every: int, samples: int, log=print):
        self.model, self.tokenizer, self.held_out, self.every, self.samples, self.log = (
            model, tokenizer, held_out, every, samples, log)
        self.history = []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            m = evaluate(self.model, self.tokenizer, self.held_out, self.samples)
            self.history.append({"step": state.global_step, **m})
            self.log(f"  GRPO step {state.global_step}: held-out sampled acc {m['sampled_accuracy']:.1%}, greedy "
                     f"{m['greedy_accuracy']:.1%}, length {m['sampled_length']:.1f}, worked out "
                     f"{m['sampled_worked_share']:.0%} (right {m['sampled_worked_accuracy']:.0%})")


def plot(log_history, evals, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [h for h in log_history if "reward" in h]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    panels = [
        (axes[0, 0], "reward (accuracy + format)", [("reward", "mean reward")]),
        (axes[1, 0], "completion length (tokens)", [("completions/mean_length", "mean length")]),
        (axes[1, 1], "MaxVio (loss forwards, mean over MoE layers)", [("moe/maxvio", "MaxVio")]),
    ]
    for ax, title, series in panels:
        for key, label in series:
            pts = [(h["step"], h[key]) for h in train if key in h]
            if pts:
                ax.plot(*zip(*pts), label=label)
        ax.set_title(title)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    ax = axes[0, 1]
    ax.plot([e["step"] for e in evals], [e["sampled_accuracy"] for e in evals], "o-",
            label=f"pass@1 (T={EVAL_TEMPERATURE})")
    ax.plot([e["step"] for e in evals], [e["greedy_accuracy"] for e in evals], "s--", label="greedy")
    ax.axhline(0.3, color="grey", lw=0.8, ls=":")
    ax.axhline(0.6, color="grey", lw=0.8, ls=":")
    ax.set_ylim(0, 1)
    ax.set_title("held-out accuracy")
    ax.set_xlabel("GRPO step (0 = after cold start)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.suptitle("GRPO on CPU: DeepSeek MLA + MoE + MTP, sums of two digits, accuracy + format rewards")
    save_figure(fig, path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--facts-steps", type=int, default=300, help="steps on plain addition facts (the base model)")
    p.add_argument("--sft-steps", type=int, default=1000, help="cold-start SFT steps on R1-format traces")
    p.add_argument("--reason-fraction", type=float, default=0.35, help="share of worked-out cold-start traces")
    p.add_argument("--grpo-steps", type=int, default=150)
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4, help="GRPO learning rate")
    p.add_argument("--max-completion-length", type=int, default=40)
    p.add_argument("--held-out", type=int, default=30, help="held-out sums (of the 81), never trained on by GRPO")
    p.add_argument("--eval-samples", type=int, default=8, help="samples per held-out problem")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--use-mtp", action="store_true", help="MTP self-speculative rollouts")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: tiny matmuls run fastest single-threaded, and immune to OpenMP spin contention)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    from transformers import set_seed

    from trainers.grpo import GRPOTrainer
    from trainers.rewards import accuracy_reward, format_reward

    set_seed(args.seed)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=args.seed)
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; {args.facts_steps} steps of "
        f"addition facts, then cold start {args.sft_steps} steps ({args.reason_fraction:.0%} worked-out traces)")
    pretrain_facts(model, tokenizer, args.facts_steps, seed=args.seed + 2, log=log)
    sft_losses = cold_start(model, tokenizer, args.sft_steps, args.reason_fraction, seed=args.seed + 1, log=log)
    held_out, train_questions = split_questions(args.held_out, seed=10_000 + args.seed)
    before = evaluate(model, tokenizer, held_out, args.eval_samples)
    log(f"after cold start: held-out sampled acc {before['sampled_accuracy']:.1%}, greedy "
        f"{before['greedy_accuracy']:.1%}, format {before['sampled_format']:.1%}, worked out "
        f"{before['sampled_worked_share']:.0%} (right {before['sampled_worked_accuracy']:.0%})")

    train, config = grpo_setup(train_questions, 40, args.seed, str(out_dir / "trainer"), args.grpo_steps, args.lr,
                               args.prompts_per_step, args.num_generations, args.max_completion_length,
                               temperature=1.0, logging_steps=1, use_mtp=args.use_mtp)
    evals = HeldOutEval(model, tokenizer, held_out, args.eval_every, args.eval_samples, log=log)
    trainer = GRPOTrainer(model, reward_funcs=[accuracy_reward, format_reward], args=config, train_dataset=train,
                          processing_class=tokenizer, callbacks=[evals])
    evals.history.append({"step": 0, **before})
    log(f"GRPO: {args.grpo_steps} steps of {args.prompts_per_step} prompts x {args.num_generations} completions")
    trainer.train()
    after = evals.history[-1]
    log(f"after GRPO: held-out sampled acc {after['sampled_accuracy']:.1%}, greedy {after['greedy_accuracy']:.1%}")

    plot(trainer.state.log_history, evals.history, out_dir / "grpo_curves.png")
    import datetime
    import os
    import platform

    metrics = {
        "machine_line": (f"{len(os.sched_getaffinity(0))} CPU cores ({platform.processor() or platform.machine()}), "
                         f"torch {torch.__version__}, load avg at end {[round(x, 1) for x in os.getloadavg()]}; "
                         f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"),
        "command": " ".join(["python", "examples/grpo_arithmetic.py", *(argv if argv is not None else sys.argv[1:])]),
        "seconds": round(time.time() - t0, 1), "threads": args.threads, "args": vars(args),
        "sft_final_loss": sum(sft_losses[-20:]) / 20,
        "before": before, "after": after, "held_out_curve": evals.history,
        "train_log": [{k: v for k, v in h.items() if isinstance(v, (int, float))} for h in trainer.state.log_history],
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    log(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'grpo_curves.png'}")
    return metrics


if __name__ == "__main__":
    main()
