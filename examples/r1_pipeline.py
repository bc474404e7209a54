#!/usr/bin/env python
"""The DeepSeek-R1 recipe end to end on CPU, each stage measured on the same held-out problems.

    python examples/r1_pipeline.py --output runs/r1_pipeline          # the full run (make r1-demo)
    python examples/r1_pipeline.py --output runs/r1_smoke --smoke     # every stage on a tiny budget

The task (examples/arithmetic_task.py): sums of three digits, "User: 7+5+3 Assistant:", a two-step problem whose
worked-out trace is "<think>7+5=12 12+3=15</think> <answer>15</answer>". All 729 sums, split once: the held-out ones
are never trained on by any stage. The "base model" (the stand-in for DeepSeek-V3-Base) is a small DeepSeek (MLA, MoE,
MTP) pre-trained on addition facts ("12+3=15 7+5=12 ...") with no R1 format. Then R1's stages, in order:

1. cold_start_sft: trainers.DeepseekSFTTrainer (TRL's SFTTrainer with the model's full loss) on a small set of worked,
   well-formatted traces of training problems;
2. grpo: trainers.GRPOTrainer with the rule-based accuracy + format rewards (trainers.rewards), on training problems;
3. rejection_sampling: trainers.rejection_sample draws N completions per training problem from the RL policy
   (batched generate, absorbed MLA), keeps those that both rewards pass, deduplicated; the held-out figures of this
   stage are those of the policy it sampled from (the stage makes data, not a model);
4. sft: as in R1, the *base* model fine-tuned on the kept samples (DeepseekSFTTrainer);
5. distill: a dense transformers LlamaForCausalLM built in code (same tokenizer), pre-trained on the same facts,
   then trained by trl.SFTTrainer on the kept samples (R1 distils into Qwen / Llama by SFT only); optionally followed
   by `--on-policy-steps` of TRL's on-policy distillation (trl.DistillationTrainer) from the stage-4 model.

Each stage: held-out pass@1 (mean accuracy over --eval-samples samples per problem at temperature 0.6, R1's setting),
greedy accuracy, format rate and mean completion length. Writes OUTPUT/stages.json (one object per stage),
OUTPUT/rejection_sampled (datasets.save_to_disk: prompt, completion, solution, ...; every row correct),
OUTPUT/student (the dense model and tokenizer: plain transformers loads them), OUTPUT/r1_stages.png and
OUTPUT/run.json (command, machine, timings, arguments, the base model's figures). Fixed seeds; one command.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from examples.arithmetic_task import (  # noqa: E402
    EVAL_TEMPERATURE, build_model, build_tokenizer, evaluate, grpo_setup, pretrain_facts, prompt_text,
    reasoning_trace, save_figure, split_questions)

STAGES = ("cold_start_sft", "grpo", "rejection_sampling", "sft", "distill")
SMOKE = dict(n_terms=2, held_out=8, facts_steps=80, cold_start_examples=48, cold_start_steps=80, grpo_steps=2,
             prompts_per_step=4, num_generations=4, rs_prompts=0, rs_samples=4, sft_steps=20, student_facts_steps=30,
             student_sft_steps=20, eval_samples=2, on_policy_steps=2)


# ---------------------------------------------------------------------------------------------------------------------
# Models and data
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


def trace_rows(problems: list[dict]) -> list[dict]:
    """Prompt / completion / solution rows of worked, well-formatted traces (TRL's prompt-completion format)."""
    return [{"prompt": prompt_text(p["question"]), "completion": reasoning_trace(p["digits"]),
             "solution": p["answer"]} for p in problems]


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


def run_grpo(model, tokenizer, train_problems, args, out_dir: Path):
    from trainers.grpo import GRPOTrainer
    from trainers.rewards import accuracy_reward, format_reward

    epochs = max(1, -(-args.grpo_steps * args.prompts_per_step // len(train_problems)))  # enough for the steps
    train, config = grpo_setup(train_problems, epochs, args.seed, str(out_dir / "grpo"), args.grpo_steps,
                               args.grpo_lr, args.prompts_per_step, args.num_generations,
                               args.max_completion_length, temperature=args.grpo_temperature,
                               logging_steps=max(1, args.grpo_steps // 15))
    trainer = GRPOTrainer(model, reward_funcs=[accuracy_reward, format_reward], args=config, train_dataset=train,
                          processing_class=tokenizer)
    trainer.train()
    return [{k: v for k, v in h.items() if isinstance(v, (int, float))} for h in trainer.state.log_history]


def run_on_policy_distillation(student, teacher, tokenizer, train_problems, args, out_dir: Path):
    """TRL's on-policy distillation: the student samples, the teacher scores the same tokens (same tokenizer)."""
    import datasets
    from trl import DistillationConfig, DistillationTrainer

    prompts = datasets.Dataset.from_list([{"prompt": prompt_text(p["question"])} for p in train_problems])
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
def heldout_figures(model, tokenizer, held_out, samples: int, max_new_tokens: int) -> dict:
    m = evaluate(model, tokenizer, held_out, samples, max_new_tokens=max_new_tokens)
    return {"heldout_pass@1": m["sampled_accuracy"], "heldout_greedy_accuracy": m["greedy_accuracy"],
            "heldout_format_rate": m["sampled_format"], "heldout_mean_completion_tokens": m["sampled_length"],
            "heldout_worked_out_share": m["sampled_worked_share"], "heldout_example": m["sampled_example"]}


def plot(stages: list[dict], base: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["stage"] for s in stages]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    x = range(len(stages))
    bars = ax.bar([i - 0.2 for i in x], [s["heldout_pass@1"] for s in stages], width=0.4,
                  label=f"pass@1 (T={EVAL_TEMPERATURE})", color="tab:blue")
    ax.bar([i + 0.2 for i in x], [s["heldout_format_rate"] for s in stages], width=0.4, label="format rate",
           color="tab:orange", alpha=0.6)
    for b, s in zip(bars, stages):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 0.01, f"{s['heldout_pass@1']:.0%}", ha="center",
                fontsize=9)
    ax.axhline(base["heldout_pass@1"], color="grey", ls=":", lw=1, label="base model pass@1")
    ax.set_xticks(list(x), [n.replace("_", "\n") for n in names])
    ax.set_ylim(0, 1.22)
    ax.set_ylabel("held-out")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8, ncol=3)
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True)
    p.add_argument("--smoke", action="store_true", help="every stage on a tiny budget (sums of two digits)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-terms", type=int, default=3, help="digits per sum (3: two-step problems)")
    p.add_argument("--held-out", type=int, default=60, help="held-out sums, never trained on by any stage")
    p.add_argument("--facts-steps", type=int, default=600, help="base model: steps on plain addition facts")
    p.add_argument("--cold-start-examples", type=int, default=512, help="worked traces in the cold-start set")
    p.add_argument("--cold-start-steps", type=int, default=400)
    p.add_argument("--cold-start-lr", type=float, default=3e-3)
    p.add_argument("--grpo-steps", type=int, default=200)
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--grpo-lr", type=float, default=2e-4)
    p.add_argument("--grpo-temperature", type=float, default=0.7,
                   help="rollout temperature (R1: 1.0; this small model's samples at 1.0 are mostly noise)")
    p.add_argument("--max-completion-length", type=int, default=40)
    p.add_argument("--rs-prompts", type=int, default=0, help="training problems to sample from (0: all)")
    p.add_argument("--rs-samples", type=int, default=8, help="completions per problem")
    p.add_argument("--rs-temperature", type=float, default=EVAL_TEMPERATURE)
    p.add_argument("--sft-steps", type=int, default=400, help="stage 4: base model SFT on the kept samples")
    p.add_argument("--sft-lr", type=float, default=3e-3)
    p.add_argument("--student-facts-steps", type=int, default=400, help="the dense student's own facts pre-training")
    p.add_argument("--student-sft-steps", type=int, default=400)
    p.add_argument("--on-policy-steps", type=int, default=0,
                   help="steps of TRL's on-policy distillation after the student's SFT (0: SFT only, as R1)")
    p.add_argument("--on-policy-lr", type=float, default=1e-4)
    p.add_argument("--eval-samples", type=int, default=4, help="samples per held-out problem for pass@1")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny matmuls run fastest)")
    args = p.parse_args(argv)
    if args.smoke:
        explicit = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv or sys.argv[1:]) if a.startswith("--")}
        for k, v in SMOKE.items():
            if k not in explicit:
                setattr(args, k, v)
    for name in ("facts_steps", "cold_start_steps", "grpo_steps", "sft_steps", "student_facts_steps",
                 "student_sft_steps", "rs_samples", "eval_samples", "cold_start_examples", "n_terms"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    load_at_start = [round(x, 2) for x in os.getloadavg()]

    def log(msg):
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    from transformers import set_seed

    from trainers.rejection_sampling import rejection_sample
    from trainers.rewards import accuracy_reward, format_reward

    set_seed(args.seed)
    tokenizer = build_tokenizer()
    held_out, train_problems = split_questions(args.held_out, seed=10_000 + args.seed, n_terms=args.n_terms)
    max_first = 9 * (args.n_terms - 1)  # the running sum before the last step
    measure = lambda model: heldout_figures(model, tokenizer, held_out, args.eval_samples,  # noqa: E731
                                            args.max_completion_length)
    stages, timings = [], {}

    def finish(stage: str, model, started: float, **extra) -> dict:
        figures = extra.pop("figures", None) or measure(model)
        timings[stage] = round(time.time() - started, 1)
        entry = {"stage": stage, **figures, "seconds": timings[stage], **extra}
        stages.append(entry)
        log(f"{stage}: held-out pass@1 {entry['heldout_pass@1']:.1%}, greedy {entry['heldout_greedy_accuracy']:.1%}, "
            f"format {entry['heldout_format_rate']:.1%}, {entry['heldout_mean_completion_tokens']:.1f} tokens "
            f"({timings[stage]:.0f}s); e.g. {entry['heldout_example']!r}")
        return entry

    # The base model: addition facts only.
    started = time.time()
    model = build_model(tokenizer, seed=args.seed)
    log(f"task: sums of {args.n_terms} digits, {len(held_out)} held out, {len(train_problems)} for training; base "
        f"model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {args.facts_steps} steps of facts")
    pretrain_facts(model, tokenizer, args.facts_steps, seed=args.seed + 2, log=log, max_first=max_first)
    base_state = copy.deepcopy(model.state_dict())
    base = measure(model)
    timings["base"] = round(time.time() - started, 1)
    log(f"base model: held-out pass@1 {base['heldout_pass@1']:.1%}, format {base['heldout_format_rate']:.1%}")

    # 1. Cold start: a small set of worked, well-formatted traces.
    started = time.time()
    cold_set = random.Random(args.seed + 3).sample(train_problems, min(args.cold_start_examples, len(train_problems)))
    train_sft(model, tokenizer, trace_rows(cold_set), out_dir / "trainer", "cold_start_sft", args.cold_start_steps,
              args.cold_start_lr, args.seed)
    finish("cold_start_sft", model, started, train_examples=len(cold_set))

    # 2. Reasoning RL: GRPO with accuracy + format rewards.
    started = time.time()
    grpo_log = run_grpo(model, tokenizer, train_problems, args, out_dir / "trainer")
    rewards = [h["reward"] for h in grpo_log if "reward" in h]
    finish("grpo", model, started, first_reward=rewards[0] if rewards else None,
           last_reward=rewards[-1] if rewards else None)

    # 3. Rejection sampling from the RL policy on the training problems.
    started = time.time()
    import datasets

    pool = train_problems[: args.rs_prompts] if args.rs_prompts else train_problems
    prompts = datasets.Dataset.from_list([{"prompt": prompt_text(p["question"]), "solution": p["answer"]}
                                          for p in pool])
    result = rejection_sample(model, tokenizer, prompts, [accuracy_reward, format_reward],
                              num_samples=args.rs_samples, prompts_per_batch=64,
                              max_new_tokens=args.max_completion_length, temperature=args.rs_temperature,
                              top_p=0.95, seed=args.seed)
    kept = result.dataset
    kept.save_to_disk(str(out_dir / "rejection_sampled"))
    s = result.stats
    log(f"rejection sampling: {s['samples']} samples of {s['prompts']} problems, pass rate {s['pass_rate']:.1%}, "
        f"kept {s['kept']} ({s['duplicates_dropped']} duplicates dropped), problems with a kept sample "
        f"{s['prompts_with_a_kept_sample']:.1%}")
    if len(kept) == 0:
        raise SystemExit("rejection sampling kept no sample: the policy solves none of the training problems; raise "
                         "the cold-start / GRPO budget")
    finish("rejection_sampling", model, started,
           figures={k: v for k, v in stages[-1].items() if k.startswith("heldout_")},
        note="held-out figures: the GRPO policy it sampled from (this stage makes data, not a model)",
        rejection_sampling=s)
    rows = kept.to_list()

    # 4. SFT of the base model on the kept samples (R1's third stage starts again from DeepSeek-V3-Base).
    started = time.time()
    model = build_model(tokenizer, seed=args.seed)
    model.load_state_dict(base_state)
    train_sft(model, tokenizer, rows, out_dir / "trainer", "sft", args.sft_steps, args.sft_lr, args.seed)
    finish("sft", model, started, train_examples=len(rows), initialised_from="base model")

    # 5. Distillation into a dense transformers model (SFT on the kept samples; optionally on-policy after).
    started = time.time()
    student = build_student(tokenizer, seed=args.seed)
    log(f"student: LlamaForCausalLM, {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M parameters, "
        f"{args.student_facts_steps} steps of facts, then {args.student_sft_steps} SFT steps on the kept samples")
    pretrain_facts(student, tokenizer, args.student_facts_steps, seed=args.seed + 2, log=log, max_first=max_first)
    student_base = measure(student)
    train_sft(student, tokenizer, rows, out_dir / "trainer", "distill", args.student_sft_steps, args.sft_lr,
              args.seed)
    extra = {"student": "LlamaForCausalLM", "student_base_heldout_pass@1": student_base["heldout_pass@1"],
             "train_examples": len(rows)}
    if args.on_policy_steps:
        extra["after_sft_only"] = {k: v for k, v in measure(student).items() if k != "heldout_example"}
        history = run_on_policy_distillation(student, model, tokenizer, train_problems, args, out_dir / "trainer")
        extra["on_policy_steps"] = args.on_policy_steps
        extra["on_policy_losses"] = [h["loss"] for h in history if "loss" in h]
    finish("distill", student, started, **extra)
    student.save_pretrained(out_dir / "student")
    tokenizer.save_pretrained(out_dir / "student")

    (out_dir / "stages.json").write_text(json.dumps(stages, indent=1))
    title = (f"R1 recipe on CPU: sums of {args.n_terms} digits, held-out pass@1 by stage"
             + (" (smoke budget)" if args.smoke else ""))
    plot(stages, base, out_dir / "r1_stages.png", title)
    run = {
        "command": " ".join(["python", "examples/r1_pipeline.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine_line": (f"{len(os.sched_getaffinity(0))} CPU cores ({platform.processor() or platform.machine()}), "
                         f"torch {torch.__version__}, torch threads {args.threads}, load avg at start "
                         f"{load_at_start}, at end {[round(x, 2) for x in os.getloadavg()]}; "
                         f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"),
        "seconds": round(time.time() - t0, 1), "stage_seconds": timings, "args": vars(args), "base": base,
        "held_out": [p["question"] for p in held_out],
    }
    (out_dir / "run.json").write_text(json.dumps(run, indent=1))
    log(f"wrote {out_dir}/stages.json, rejection_sampled/, student/, r1_stages.png, run.json "
        f"({run['seconds']:.0f}s in all)")
    return stages


if __name__ == "__main__":
    main()
