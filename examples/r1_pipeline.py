#!/usr/bin/env python
"""The DeepSeek-R1 recipe end to end on CPU, on Countdown, each stage measured on the same held-out problems.

    python examples/r1_pipeline.py --output runs/r1_pipeline          # the full run (make r1-demo)
    python examples/r1_pipeline.py --output runs/r1_smoke --smoke     # every stage on a tiny budget

The task (examples/countdown_task.py): three numbers and a target, "User: 5 7 3 to 38 Assistant:"; the answer an
expression that uses each number once, "<think>5*7=35 35+3=38</think> <answer>5*7+3</answer>". The held-out problems
(numbers as a multiset and target) are never trained on by any stage. The "base model" (the stand-in for
DeepSeek-V3-Base) is a small DeepSeek (MLA, MoE, MTP) pre-trained on computation steps ("3*4=12 12-5=7 ...") with no
problem, target or R1 format. Then R1's stages, in order:

1. cold_start_sft: trainers.DeepseekSFTTrainer on a few worked traces (one valid solution each, no search shown);
2. grpo: trainers.GRPOTrainer with trainers.rewards.countdown_reward (TinyZero's shaping: 1.0 / 0.1 / 0), DAPO's
   dynamic sampling (`--dynamic-sampling`), on training problems; rollouts at T=0.6 (R1 samples its RL rollouts at
   1.0; here 0.6 was chosen by measurement from one saved cold start: benchmarks/grpo_sweep.py, RESULTS.md);
3. rejection_sampling: trainers.rejection_sample draws N completions per training problem from the RL policy and
   keeps the correct ones, deduplicated; its held-out figures are those of the policy it sampled from;
4. sft: as in R1, the *base* model fine-tuned on the kept samples;
5. distill: a dense transformers LlamaForCausalLM (same tokenizer), pre-trained on the same steps, then trained by
   trl.SFTTrainer on the kept samples (R1 distils by SFT only); optionally `--on-policy-steps` of TRL's on-policy
   distillation from the stage-4 model.

And two controls with stage 2's budget and settings: grpo_random_reward (from the cold start, the reward's values
handed out in a random order within each batch: the same mean, no information; trainers.rewards.random_reward_control)
and r1_zero (GRPO from the base model, no cold start).

Every model: held-out pass@1 and pass@8 (the unbiased estimator over --eval-samples samples per problem at T=0.6,
R1's setting; trainers.pass_at_k), greedy accuracy, format rate and completion length, each with its standard error
over problems. A stage whose pass@1 ends far below the model it started from (or, for sft and distill, the policy
whose samples they learned) is flagged in the output and in stages.json ("warning"). Writes OUTPUT/stages.json (one
object per stage and control), OUTPUT/grpo_logs.json (TRL's per-step logs of the three GRPO runs: reward,
frac_reward_zero_std, ...), OUTPUT/rejection_sampled (datasets.save_to_disk), OUTPUT/student (plain transformers
loads it), OUTPUT/r1_stages.png and OUTPUT/run.json (command, machine, timings, arguments, the base model's figures).
Seeded throughout (data, sampling, training, evaluation): the same command on the same machine and releases gives
the same figures. `--from-cold-start DIR` takes the base and cold start saved by `python -m benchmarks.grpo_sweep
cold-start` (made with the same arguments) instead of training them again.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from examples.arithmetic_task import (  # noqa: E402
    EVAL_TEMPERATURE, build_model, build_tokenizer, grpo_setup, pretrain_facts, save_figure)
from examples.countdown_task import fact_line, prompt_text, split_problems, trace_rows  # noqa: E402

STAGES = ("cold_start_sft", "grpo", "rejection_sampling", "sft", "distill")
CONTROLS = ("grpo_random_reward", "r1_zero")
FIGURES = ("pass@1", "pass@8", "greedy_accuracy", "format_rate", "completion_tokens")
SMOKE = dict(held_out=12, facts_steps=60, cold_start_examples=32, cold_start_steps=100, grpo_steps=2,
             prompts_per_step=4, num_generations=4, rs_prompts=48, rs_samples=4, sft_steps=20,
             student_facts_steps=20, student_sft_steps=20, eval_samples=8, on_policy_steps=2)
# A stage is flagged when its pass@1 is below its reference by more than this many points and this many standard
# errors of the difference: a real drop, not the noise of a few hundred problems.
COLLAPSE_POINTS, COLLAPSE_SE = 0.05, 3.0
# An SFT stage whose training loss ends above this has not learned its data (benchmarks/RESULTS.md: on the arithmetic
# task, SFT runs that ended at 0.03-0.04 reached 90-94% held-out, those at 0.09-0.2 46-65%, and the same seeds
# trained 1000 steps instead of 400 ended at 0.001 and 98%): the likely cause named in a flagged stage's warning.
UNDERTRAINED_LOSS = 0.05


# ---------------------------------------------------------------------------------------------------------------------
# Models and data
def task_split(args) -> tuple[list[dict], list[dict]]:
    """(held-out problems, training problems) of a run: its seed, operations and numbers decide them, so every
    stage, the controls' process and benchmarks/grpo_sweep.py score and train on the same split."""
    return split_problems(args.held_out, seed=10_000 + args.seed, ops=args.ops, max_number=args.max_number)


def task_facts(args):
    """The base model's (and the student's) pre-training line for a run's task: rng -> text."""
    return lambda rng: fact_line(rng, ops=args.ops, max_number=args.max_number)


def build_student(tokenizer, seed: int, hidden: int = 96, layers: int = 3):
    """A dense Llama (plain transformers) of about the teacher's active size, same tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def sft_config(out_dir: Path, name: str, steps: int, lr: float, seed: int, batch_size: int = 32):
    from trl import SFTConfig

    return SFTConfig(output_dir=str(out_dir / name), max_steps=steps, per_device_train_batch_size=batch_size,
                     learning_rate=lr, lr_scheduler_type="linear", warmup_steps=min(20, steps // 5),
                     weight_decay=0.0, max_grad_norm=1.0, logging_steps=max(1, steps // 10), save_strategy="no",
                     report_to=[], use_cpu=True, bf16=False, seed=seed, data_seed=seed, dataloader_num_workers=0,
                     activation_checkpointing=False, disable_tqdm=False, max_length=128)


def train_sft(model, tokenizer, rows, out_dir: Path, name: str, steps: int, lr: float, seed: int):
    """SFT on prompt / completion rows (completion tokens only): trainers.DeepseekSFTTrainer for a DeepSeek model
    (the full loss: next-token + MTP + balance), trl.SFTTrainer for any other."""
    import datasets
    from trl import SFTTrainer

    from trainers.grpo import deepseek_lm
    from trainers.sft import DeepseekSFTTrainer

    ds = datasets.Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    trainer_cls = DeepseekSFTTrainer if deepseek_lm(model) is not None else SFTTrainer
    trainer = trainer_cls(model=model, args=sft_config(out_dir, name, steps, lr, seed), train_dataset=ds,
                          processing_class=tokenizer)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def base_and_cold_start(args, tokenizer, held_out, train_problems, out_dir: Path, log) -> dict:
    """The base model (computation steps only) and stage 1, the cold start (a few worked traces, one valid
    solution each), both measured: {"model" (the cold start), "base_state", "cold_state", "base" and
    "cold_start_sft" (held-out figures), "final_train_loss", "train_examples", "base_seconds",
    "cold_start_seconds"}. benchmarks/grpo_sweep.py saves its output to run many GRPO settings from it."""
    started = time.time()
    model = build_model(tokenizer, seed=args.seed)
    log(f"task: Countdown, 3 numbers from 1 to {args.max_number}, operations {args.ops!r}; {len(held_out)} problems "
        f"held out, {len(train_problems)} for training; base model "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {args.facts_steps} steps of computation "
        f"steps")
    pretrain_facts(model, tokenizer, args.facts_steps, seed=args.seed + 2, log=log, line=task_facts(args))
    base_state = copy.deepcopy(model.state_dict())
    base = measure(model, tokenizer, held_out, args)
    base_seconds = round(time.time() - started, 1)
    log(f"base model: held-out pass@1 {base['heldout_pass@1']:.1%}, format {base['heldout_format_rate']:.1%}")
    started = time.time()
    cold_set = train_problems[: args.cold_start_examples]
    losses = train_sft(model, tokenizer, trace_rows(cold_set, seed=args.seed + 3), out_dir / "trainer",
                       "cold_start_sft", args.cold_start_steps, args.cold_start_lr, args.seed)
    cold = measure(model, tokenizer, held_out, args)
    return {"model": model, "base_state": base_state, "cold_state": copy.deepcopy(model.state_dict()),
            "base": base, "cold_start_sft": cold, "final_train_loss": losses[-1], "train_examples": len(cold_set),
            "base_seconds": base_seconds, "cold_start_seconds": round(time.time() - started, 1)}


# the arguments that decide the base and the cold start: a saved cold start is used only where they match
COLD_START_ARGS = ("seed", "ops", "max_number", "held_out", "facts_steps", "cold_start_examples",
                   "cold_start_steps", "cold_start_lr", "eval_samples", "max_completion_length")


def load_cold_start(args, tokenizer, path: Path, log) -> dict:
    """base_and_cold_start's result from a directory written by `python -m benchmarks.grpo_sweep cold-start` (the
    weights and figures it measured), refused unless it was made with this run's arguments."""
    info = json.loads((path / "cold_start.json").read_text())
    differ = {k: (info["args"][k], getattr(args, k)) for k in COLD_START_ARGS if info["args"][k] != getattr(args, k)}
    if differ:
        raise SystemExit(f"--from-cold-start {path} was made with other arguments (saved, this run): {differ}")
    model = build_model(tokenizer, seed=args.seed)
    base_state = torch.load(path / "base.pt")
    cold_state = torch.load(path / "cold_start.pt")
    model.load_state_dict(cold_state)
    log(f"base model and cold start loaded from {path} (made in {info['seconds']:.0f}s)")
    return {"model": model, "base_state": base_state, "cold_state": cold_state, "base": info["base"],
            "cold_start_sft": info["cold_start_sft"], "final_train_loss": info["final_train_loss"],
            "train_examples": info["train_examples"], "base_seconds": info["base_seconds"],
            "cold_start_seconds": info["cold_start_seconds"]}


def run_grpo(model, tokenizer, train_problems, args, out_dir: Path, name: str, reward) -> list[dict]:
    """GRPO with `reward` on the training problems (rows carry `numbers` and `target` for the reward); TRL's logs
    at every step (reward, frac_reward_zero_std, dynamic_sampling/kept_groups, completion length, ...)."""
    from trainers.grpo import GRPOTrainer

    epochs = max(1, -(-args.grpo_steps * args.prompts_per_step // len(train_problems)))  # enough for the steps
    options = dict(loss_type=args.loss_type, scale_rewards=args.scale_rewards, beta=args.kl_beta,
                   epsilon_high=args.epsilon_high, dynamic_sampling=args.dynamic_sampling)
    train, config = grpo_setup(train_problems, epochs, args.seed, str(out_dir / name), args.grpo_steps,
                               args.grpo_lr, args.prompts_per_step, args.num_generations,
                               args.max_completion_length, temperature=args.grpo_temperature, logging_steps=1,
                               columns=("numbers", "target"), **options)
    trainer = GRPOTrainer(model, reward_funcs=[reward], args=config, train_dataset=train, processing_class=tokenizer)
    trainer.train()
    return [{k: v for k, v in h.items() if isinstance(v, (int, float))} for h in trainer.state.log_history
            if "reward" in h]


def run_controls(args, tokenizer, held_out, train_problems, base_state, cold_state, out_dir: Path) -> dict:
    """The two controls with stage 2's budget and settings: GRPO from the cold start with the reward's values shuffled
    within each batch (grpo_random_reward), and GRPO from the base model (r1_zero). {name: {"figures" (held-out),
    "logs" (TRL's per-step logs), "seconds"}}."""
    from trainers.rewards import make_countdown_reward, random_reward_control

    reward = make_countdown_reward(well_formed=args.well_formed)
    results = {}
    for name, start, control_reward in (("grpo_random_reward", cold_state, random_reward_control(reward, args.seed)),
                                        ("r1_zero", base_state, reward)):
        started = time.time()
        model = build_model(tokenizer, seed=args.seed)
        model.load_state_dict(start)
        logs = run_grpo(model, tokenizer, train_problems, args, out_dir / "trainer", name, control_reward)
        results[name] = {"figures": measure(model, tokenizer, held_out, args), "logs": logs,
                         "seconds": round(time.time() - started, 1)}
    return results


class Controls:
    """The controls of a run, started when the base and the cold start exist and read when stages 2-5 are done.

    With `--controls-process` (the default) they run in a second process (this script with `--controls-from DIR`,
    DIR holding the two starting states; its output in DIR/controls.log), on the machine's second core while this
    process runs stages 2-5: the recipe's wall time is that of its longer branch. Without it they run here, after
    stage 5. Seeded the same way in both cases, so the figures are the same (tests/test_r1_pipeline.py). A context
    manager: leaving it stops the second process if it is still running (a failed stage stops the run).
    """

    def __init__(self, args, argv, tokenizer, held_out, train_problems, base_state, cold_state, out_dir: Path, log):
        self.run_here = lambda: run_controls(args, tokenizer, held_out, train_problems, base_state, cold_state,
                                             out_dir)
        self.process = None
        if args.controls_process:
            import subprocess

            self.dir = out_dir / "controls"
            self.dir.mkdir(parents=True, exist_ok=True)
            torch.save(base_state, self.dir / "base.pt")
            torch.save(cold_state, self.dir / "cold_start.pt")
            argv = list(sys.argv[1:] if argv is None else argv)
            with open(self.dir / "controls.log", "w") as out:
                self.process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv,
                                                 "--controls-from", str(self.dir)], stdout=out,
                                                stderr=subprocess.STDOUT)
            log(f"controls (grpo_random_reward, r1_zero) started in a second process, pid {self.process.pid}; "
                f"log: {self.dir / 'controls.log'}")

    def results(self) -> dict:
        if self.process is None:
            return self.run_here()
        if self.process.wait() != 0:
            raise SystemExit(f"the controls' process failed (exit status {self.process.returncode}); its output: "
                             f"{self.dir / 'controls.log'}")
        return json.loads((self.dir / "controls.json").read_text())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def controls_only(args) -> None:
    """`--controls-from DIR`: the controls from DIR's base.pt and cold_start.pt, written to DIR/controls.json."""
    from transformers import set_seed

    set_seed(args.seed)
    src = Path(args.controls_from)
    tokenizer = build_tokenizer()
    held_out, train_problems = task_split(args)
    results = run_controls(args, tokenizer, held_out, train_problems, torch.load(src / "base.pt"),
                           torch.load(src / "cold_start.pt"), Path(args.output))
    (src / "controls.json.tmp").write_text(json.dumps(results))
    os.replace(src / "controls.json.tmp", src / "controls.json")


def run_on_policy_distillation(student, teacher, tokenizer, train_problems, args, out_dir: Path):
    """TRL's on-policy distillation: the student samples, the teacher scores the same tokens (same tokenizer)."""
    import datasets
    from trl import DistillationConfig, DistillationTrainer

    prompts = datasets.Dataset.from_list([{"prompt": prompt_text(p["numbers"], p["target"])} for p in train_problems])
    config = DistillationConfig(
        output_dir=str(out_dir / "on_policy"), max_steps=args.on_policy_steps, learning_rate=args.on_policy_lr,
        per_device_train_batch_size=16, max_completion_length=args.max_completion_length, temperature=1.0,
        beta=1.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
        activation_checkpointing=False, seed=args.seed, dataloader_num_workers=0, disable_tqdm=False)
    teacher.eval()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=prompts,
                                  processing_class=tokenizer)
    trainer.train()
    return [{k: v for k, v in h.items() if isinstance(v, (int, float))} for h in trainer.state.log_history]


# ---------------------------------------------------------------------------------------------------------------------
# Measurement and output
def measure(model, tokenizer, held_out: list[dict], args) -> dict:
    """Held-out figures (trainers.pass_at_k): heldout_<figure> and heldout_<figure>_se for pass@1, pass@8, greedy
    accuracy, format rate and completion tokens, and one sampled completion."""
    from trainers.pass_at_k import heldout_figures
    from trainers.rewards import countdown_reward, format_reward

    def correct(texts, owners):
        return [r == countdown_reward.correct for r in countdown_reward(
            texts, [held_out[i]["numbers"] for i in owners], [held_out[i]["target"] for i in owners])]

    figures = heldout_figures(model, tokenizer, [prompt_text(p["numbers"], p["target"]) for p in held_out], correct,
                              lambda texts: [f == 1.0 for f in format_reward(texts)], n=args.eval_samples,
                              ks=sorted({1, min(8, args.eval_samples)}), max_new_tokens=args.max_completion_length,
                              temperature=EVAL_TEMPERATURE, seed=args.seed + 1234)
    out = {}
    for name in FIGURES:
        if name in figures:
            out[f"heldout_{name}"], out[f"heldout_{name}_se"] = figures[name]
    out["heldout_example"] = figures["example"]
    return out


def compare(entry: dict, reference: dict, reference_name: str) -> None:
    """Adds the change of pass@1 from `reference` (with the standard error of the difference) and, when it is a
    drop of more than COLLAPSE_POINTS and COLLAPSE_SE standard errors, a warning."""
    delta = entry["heldout_pass@1"] - reference["heldout_pass@1"]
    se = math.hypot(entry["heldout_pass@1_se"], reference["heldout_pass@1_se"])
    entry["compared_with"] = reference_name
    entry["pass@1_change"], entry["pass@1_change_se"] = delta, se
    if delta < -COLLAPSE_POINTS and delta < -COLLAPSE_SE * se:
        entry["warning"] = (f"held-out pass@1 {entry['heldout_pass@1']:.1%} is far below {reference_name}'s "
                            f"{reference['heldout_pass@1']:.1%} ({delta:+.1%}, {abs(delta) / max(se, 1e-12):.1f} "
                            f"standard errors)")
        loss = entry.get("final_train_loss")
        if loss is not None and loss > UNDERTRAINED_LOSS:
            entry["warning"] += (f"; its training loss ended at {loss:.3f}: under-trained, not converged (more "
                                 f"steps; on the arithmetic task this was the cause of the SFT collapse)")


def plot(stages: list[dict], base: dict, grpo_logs: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    entries = [{"stage": "base", **base}] + stages
    x = range(len(entries))
    for offset, key, label, color in ((-0.27, "pass@1", f"pass@1 (T={EVAL_TEMPERATURE})", "tab:blue"),
                                      (0.0, "pass@8", "pass@8", "tab:green"),
                                      (0.27, "format_rate", "format rate", "tab:orange")):
        if f"heldout_{key}" not in entries[0]:
            continue
        values = [e[f"heldout_{key}"] for e in entries]
        bars = ax.bar([i + offset for i in x], values, width=0.27, yerr=[e[f"heldout_{key}_se"] for e in entries],
                      label=label, color=color, alpha=0.85 if key != "format_rate" else 0.45, capsize=2)
        if key == "pass@1":
            for b, v in zip(bars, values):
                ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 0.03, f"{v:.0%}", ha="center", fontsize=8)
    ax.set_xticks(list(x), [e["stage"].replace("_", "\n") for e in entries], fontsize=8)
    ax.set_ylim(0, 1.25)
    ax.set_ylabel("held-out (error bars: 1 standard error)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8, ncol=3)
    ax.grid(axis="y", alpha=0.3)
    window = max(1, max((len(logs) for logs in grpo_logs.values()), default=0) // 40)

    def smooth(values):  # the mean of the last `window` steps: one batch of 16 prompts is a noisy estimate
        return [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
                for i in range(len(values))]

    for name, logs in grpo_logs.items():
        steps = [h["step"] for h in logs]
        line, = ax2.plot(steps, smooth([h["reward"] for h in logs]), label=f"{name}: reward", lw=1)
        ax2.plot(steps, smooth([h["frac_reward_zero_std"] for h in logs]), ls=":", color=line.get_color(),
                 label=f"{name}: frac_reward_zero_std", lw=1)
    ax2.set_xlabel("GRPO step" + (f" (mean of the last {window} steps)" if window > 1 else ""))
    ax2.set_ylim(0, 1.05)
    ax2.set_title("GRPO: mean reward and share of groups with one reward", fontsize=10)
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    save_figure(fig, path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True)
    p.add_argument("--smoke", action="store_true", help="every stage on a tiny budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ops", default="+-", help="operations of the problems ('+-*' adds products, '+-*/' exact "
                   "division; at this model size '+-*' leaves the cold start near 0%%: benchmarks/RESULTS.md)")
    p.add_argument("--max-number", type=int, default=12,
                   help="the problems' numbers are 1..N (12: 1,264 problems, 964 of them for training; 9: 550, too "
                   "few for RL to learn more than the cold start's keys: benchmarks/RESULTS.md)")
    p.add_argument("--held-out", type=int, default=300, help="held-out problems, never trained on by any stage")
    p.add_argument("--facts-steps", type=int, default=1200, help="base model: steps on computation steps")
    p.add_argument("--cold-start-examples", type=int, default=1024, help="worked traces in the cold-start set")
    p.add_argument("--cold-start-steps", type=int, default=800)
    p.add_argument("--cold-start-lr", type=float, default=3e-3)
    p.add_argument("--grpo-steps", type=int, default=600,
                   help="held-out pass@1 gain from one cold start: +5.4 at 60 steps, +13.5 at 300, +17.2 at 500")
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--grpo-lr", type=float, default=1e-4)
    p.add_argument("--grpo-temperature", type=float, default=0.6,
                   help="rollout temperature (R1: 1.0; 0.6, the evaluation temperature, chosen by measurement: "
                   "benchmarks/RESULTS.md)")
    p.add_argument("--well-formed", type=float, default=0.1,
                   help="GRPO reward of a well-formed wrong answer (TinyZero: 0.1; correct answers get 1.0)")
    p.add_argument("--loss-type", default="dapo", help="TRL's GRPO loss type")
    p.add_argument("--scale-rewards", default="group", choices=("group", "batch", "none"))
    p.add_argument("--kl-beta", type=float, default=0.0, help="KL coefficient (TRL's beta)")
    p.add_argument("--epsilon-high", type=float, default=0.28, help="clip-higher (DAPO); None-like: --epsilon-high 0.2")
    p.add_argument("--dynamic-sampling", action=argparse.BooleanOptionalAction, default=True,
                   help="DAPO's dynamic sampling: only groups with a reward spread reach the loss")
    p.add_argument("--max-completion-length", type=int, default=36)
    p.add_argument("--rs-prompts", type=int, default=2000, help="training problems to sample from (0: all)")
    p.add_argument("--rs-samples", type=int, default=8, help="completions per problem")
    p.add_argument("--rs-temperature", type=float, default=EVAL_TEMPERATURE)
    p.add_argument("--sft-steps", type=int, default=1500, help="stage 4: base model SFT on the kept samples (300 "
                   "steps at 1e-3 left it at 1%%, 800 at 3e-3 at 20%%, 1500 at 3e-3 at 46%%: benchmarks/RESULTS.md)")
    p.add_argument("--sft-lr", type=float, default=3e-3, help="stages 4 and 5")
    p.add_argument("--student-facts-steps", type=int, default=400, help="the dense student's own pre-training")
    p.add_argument("--student-sft-steps", type=int, default=1500,
                   help="numbers to 9: 300 at lr 3e-3 gave 88%% of the teacher's pass@1, 800 gave 137%%; numbers to "
                   "12: 800 ended at loss 0.12 and 59%% on seed 1: benchmarks/RESULTS.md")
    p.add_argument("--on-policy-steps", type=int, default=0,
                   help="steps of TRL's on-policy distillation after the student's SFT (0: SFT only, as R1)")
    p.add_argument("--on-policy-lr", type=float, default=1e-4)
    p.add_argument("--eval-samples", type=int, default=8, help="samples per held-out problem (pass@1, pass@8)")
    p.add_argument("--from-cold-start", default=None, help="load the base and cold start saved by `python -m "
                   "benchmarks.grpo_sweep cold-start` (same arguments) instead of training them")
    p.add_argument("--no-controls", action="store_true", help="skip the random-reward and R1-Zero runs")
    p.add_argument("--controls-process", action=argparse.BooleanOptionalAction, default=True,
                   help="run the controls in a second process beside stages 2-5 (the second CPU core); "
                   "--no-controls-process runs them after stage 5 in this one")
    p.add_argument("--controls-from", default=None, metavar="DIR",
                   help="run only the controls, from DIR/base.pt and DIR/cold_start.pt, and write DIR/controls.json "
                   "(what the second process of --controls-process runs)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny matmuls run fastest)")
    args = p.parse_args(argv)
    if args.smoke:
        explicit = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv or sys.argv[1:]) if a.startswith("--")}
        for k, v in SMOKE.items():
            if k not in explicit:
                setattr(args, k, v)
    for name in ("facts_steps", "cold_start_steps", "grpo_steps", "sft_steps", "student_facts_steps",
                 "student_sft_steps", "rs_samples", "eval_samples", "cold_start_examples", "held_out"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.controls_from:
        return controls_only(args)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    load_at_start = [round(x, 2) for x in os.getloadavg()]

    def log(msg):
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    import datasets
    from transformers import set_seed

    from trainers.rejection_sampling import rejection_sample
    from trainers.rewards import countdown_reward, make_countdown_reward

    set_seed(args.seed)
    tokenizer = build_tokenizer()
    held_out, train_problems = task_split(args)
    stages, timings, grpo_logs = [], {}, {}
    by_name = {}

    def finish(stage: str, model, started: float, reference: str | None = None, **extra) -> dict:
        figures = extra.pop("figures", None) or measure(model, tokenizer, held_out, args)
        timings[stage] = round(time.time() - started, 1)
        entry = {"stage": stage, **figures, "seconds": timings[stage], **extra}
        if reference is not None:
            compare(entry, by_name[reference], reference)
        stages.append(entry)
        by_name[stage] = entry
        p8 = f", pass@8 {entry['heldout_pass@8']:.1%}" if "heldout_pass@8" in entry else ""
        log(f"{stage}: held-out pass@1 {entry['heldout_pass@1']:.1%} +- {entry['heldout_pass@1_se']:.1%}{p8}, "
            f"greedy {entry['heldout_greedy_accuracy']:.1%}, format {entry['heldout_format_rate']:.1%}, "
            f"{entry['heldout_completion_tokens']:.1f} tokens ({timings[stage]:.0f}s); "
            f"e.g. {entry['heldout_example']!r}")
        if "warning" in entry:
            log(f"WARNING {stage}: {entry['warning']}")
        return entry

    if args.from_cold_start:
        made = load_cold_start(args, tokenizer, Path(args.from_cold_start), log)
    else:
        made = base_and_cold_start(args, tokenizer, held_out, train_problems, out_dir, log)
    base, base_state, cold_state, model = made["base"], made["base_state"], made["cold_state"], made["model"]
    by_name["base"] = base
    timings["base"] = made["base_seconds"]

    def from_base():
        m = build_model(tokenizer, seed=args.seed)
        m.load_state_dict(base_state)
        return m

    finish("cold_start_sft", model, time.time() - made["cold_start_seconds"], reference="base",
           figures=made["cold_start_sft"], train_examples=made["train_examples"],
           final_train_loss=made["final_train_loss"])

    # The controls (same GRPO budget and settings: a reward of the same mean and no information, and R1-Zero) start
    # from the base and the cold start: by default in a second process, on the second core, beside stages 2-5.
    controls = None if args.no_controls else Controls(args, argv, tokenizer, held_out, train_problems, base_state,
                                                      cold_state, out_dir, log)
    with controls or contextlib.nullcontext():
        # 2. Reasoning RL: GRPO with the Countdown reward.
        started = time.time()
        reward = make_countdown_reward(well_formed=args.well_formed)
        grpo_logs["grpo"] = run_grpo(model, tokenizer, train_problems, args, out_dir / "trainer", "grpo", reward)
        finish("grpo", model, started, reference="cold_start_sft", **grpo_summary(grpo_logs["grpo"]))

        # 3. Rejection sampling from the RL policy on training problems.
        started = time.time()
        pool = train_problems[: args.rs_prompts] if args.rs_prompts else train_problems
        prompts = datasets.Dataset.from_list([{"prompt": prompt_text(p["numbers"], p["target"]),
                                               "numbers": p["numbers"], "target": p["target"]} for p in pool])
        result = rejection_sample(model, tokenizer, prompts, [countdown_reward], num_samples=args.rs_samples,
                                  prompts_per_batch=256, max_new_tokens=args.max_completion_length,
                                  temperature=args.rs_temperature, top_p=0.95, seed=args.seed, progress=False)
        kept = result.dataset
        kept.save_to_disk(str(out_dir / "rejection_sampled"))
        s = result.stats
        log(f"rejection sampling: {s['samples']} samples of {s['prompts']} problems, pass rate "
            f"{s['pass_rate']:.1%}, kept {s['kept']} ({s['duplicates_dropped']} duplicates dropped), problems with a "
            f"kept sample {s['prompts_with_a_kept_sample']:.1%}")
        if len(kept) == 0:
            raise SystemExit("rejection sampling kept no sample: the policy solves none of the training problems; "
                             "raise the cold-start / GRPO budget")
        finish("rejection_sampling", model, started,
               figures={k: v for k, v in by_name["grpo"].items() if k.startswith("heldout_")},
               note="held-out figures: the GRPO policy it sampled from (this stage makes data, not a model)",
               rejection_sampling=s)
        rows = kept.to_list()
        grpo_model = model

        # 4. SFT of the base model on the kept samples (R1's third stage starts again from DeepSeek-V3-Base).
        started = time.time()
        model = from_base()
        losses = train_sft(model, tokenizer, rows, out_dir / "trainer", "sft", args.sft_steps, args.sft_lr,
                           args.seed)
        finish("sft", model, started, reference="grpo", train_examples=len(rows), initialised_from="base model",
               final_train_loss=losses[-1])

        # 5. Distillation into a dense transformers model (SFT on the kept samples; optionally on-policy after).
        started = time.time()
        student = build_student(tokenizer, seed=args.seed)
        log(f"student: LlamaForCausalLM, {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M parameters, "
            f"{args.student_facts_steps} steps of computation steps, then {args.student_sft_steps} SFT steps on the "
            f"kept samples")
        pretrain_facts(student, tokenizer, args.student_facts_steps, seed=args.seed + 2, log=log, line=task_facts(args))
        losses = train_sft(student, tokenizer, rows, out_dir / "trainer", "distill", args.student_sft_steps,
                           args.sft_lr, args.seed)
        extra = {"student": "LlamaForCausalLM", "train_examples": len(rows), "teacher": "grpo",
                 "final_train_loss": losses[-1]}
        if args.on_policy_steps:
            extra["after_sft_only"] = {k: v for k, v in measure(student, tokenizer, held_out, args).items()
                                       if k != "heldout_example"}
            history = run_on_policy_distillation(student, model, tokenizer, train_problems, args,
                                                 out_dir / "trainer")
            extra["on_policy_steps"] = args.on_policy_steps
            extra["on_policy_losses"] = [h["loss"] for h in history if "loss" in h]
        entry = finish("distill", student, started, reference="grpo", **extra)
        entry["kept_share_of_teacher_pass@1"] = (entry["heldout_pass@1"] / by_name["grpo"]["heldout_pass@1"]
                                                 if by_name["grpo"]["heldout_pass@1"] else None)
        student.save_pretrained(out_dir / "student")
        tokenizer.save_pretrained(out_dir / "student")
        del grpo_model

        if controls is not None:  # waits for the second process where there is one
            results = controls.results()
            for name, reference in (("grpo_random_reward", "cold_start_sft"), ("r1_zero", "base")):
                grpo_logs[name] = results[name]["logs"]
                finish(name, None, time.time() - results[name]["seconds"], reference=reference,
                       figures=results[name]["figures"], **grpo_summary(results[name]["logs"]))

    (out_dir / "stages.json").write_text(json.dumps(stages, indent=1))
    (out_dir / "grpo_logs.json").write_text(json.dumps(grpo_logs, indent=1))
    title = "R1 recipe on CPU: Countdown, held-out figures by stage" + (" (smoke budget)" if args.smoke else "")
    plot(stages, base, grpo_logs, out_dir / "r1_stages.png", title)
    run = {
        "command": " ".join(["python", "examples/r1_pipeline.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine_line": (f"{len(os.sched_getaffinity(0))} CPU cores ({platform.processor() or platform.machine()}), "
                         f"torch {torch.__version__}, torch threads {args.threads}, load avg at start "
                         f"{load_at_start}, at end {[round(x, 2) for x in os.getloadavg()]}; "
                         f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"),
        "seconds": round(time.time() - t0, 1), "stage_seconds": timings, "args": vars(args), "base": base,
        "held_out": [p["question"] for p in held_out],
        "warnings": {e["stage"]: e["warning"] for e in stages if "warning" in e},
    }
    (out_dir / "run.json").write_text(json.dumps(run, indent=1))
    log(f"wrote {out_dir}/stages.json, grpo_logs.json, rejection_sampled/, student/, r1_stages.png, run.json "
        f"({run['seconds']:.0f}s in all)")
    return stages


def grpo_summary(logs: list[dict]) -> dict:
    """Training reward and frac_reward_zero_std: first step, last step, mean of the last tenth."""
    if not logs:
        return {}
    tail = logs[-max(1, len(logs) // 10):]
    out = {}
    for key in ("reward", "frac_reward_zero_std", "dynamic_sampling/kept_groups"):
        if key in logs[0]:
            out[f"train_{key}_first"] = logs[0][key]
            out[f"train_{key}_last_tenth"] = sum(h.get(key, 0.0) for h in tail) / len(tail)
    return out


if __name__ == "__main__":
    main()
