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
import random
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from modeling_deepseek import DeepseekConfig, DeepseekForCausalLM  # noqa: E402

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
CHARS = list("0123456789+-=*/() :<>.?\n") + list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
TEMPLATE = "User: {question} Assistant:"
EVAL_TEMPERATURE = 0.6  # DeepSeek-R1's pass@1 sampling temperature


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer and task
def build_tokenizer():
    """One token per character, plus one per R1 tag (<think>, </think>, <answer>, </answer>: shorter sequences) and
    <pad>, <bos>, <eos>; a transformers fast tokenizer that adds no special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS] + TAGS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("</?think>|</?answer>|."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   padding_side="left", model_max_length=256)


def make_problem(rng: random.Random, n_terms: int = 2) -> dict:
    digits = [rng.randint(1, 9) for _ in range(n_terms)]
    return {"question": "+".join(map(str, digits)), "answer": str(sum(digits)), "digits": digits}


def reasoning_trace(digits: list[int]) -> str:
    steps, total = [], digits[0]
    for d in digits[1:]:
        steps.append(f"{total}+{d}={total + d}")
        total += d
    return f" <think>{' '.join(steps)}</think> <answer>{total}</answer>"


def guess_trace(digits: list[int], rng: random.Random) -> str:
    return f" <think>guess</think> <answer>{rng.randint(2, 18)}</answer>"


def split_questions(n_held_out: int, seed: int) -> tuple[list[dict], list[dict]]:
    """All 81 sums of two digits, split at random: `n_held_out` for evaluation, never seen by GRPO, the rest for
    training (the cold-start data draw from all sums, as base-model knowledge would)."""
    every = [{"question": f"{a}+{b}", "answer": str(a + b), "digits": [a, b]} for a in range(1, 10)
             for b in range(1, 10)]
    random.Random(seed).shuffle(every)
    return every[:n_held_out], every[n_held_out:]


# ---------------------------------------------------------------------------------------------------------------------
# Model
def build_model(tokenizer, seed: int = 0, **overrides) -> DeepseekForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=len(tokenizer), hidden_size=96, intermediate_size=192, moe_intermediate_size=48,
        num_hidden_layers=3, num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=2, topk_group=1, first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False, mtp_loss_weight=0.3,
    )
    cfg.update(overrides)
    model = DeepseekForCausalLM(DeepseekConfig(**cfg))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def prompt_text(question: str) -> str:
    from trainers.prompts import r1_prompt

    return r1_prompt(question, system_prompt="", template=TEMPLATE)


def fact_line(rng: random.Random, n_facts: int = 8) -> str:
    """Addition facts as a base model would have read them: "7+5=12 3+8=11 ...", the sums the traces need."""
    facts = []
    for _ in range(n_facts):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        facts.append(f"{a}+{b}={a + b}")
    return " ".join(facts)


def sft(model, tokenizer, steps: int, make_row, seed: int, batch_size: int = 32, lr: float = 2e-3,
        log=print, name: str = "sft") -> list[float]:
    """A plain SFT loop with the model's own loss (next-token + MTP + balance) on the completion tokens;
    `make_row(rng)` returns (prompt ids, completion ids). Warm-up over 20 steps, then linear decay to 10%."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / steps))
    model.train()
    losses = []
    for step in range(steps):
        rows = [make_row(rng) for _ in range(batch_size)]
        T = max(len(a) + len(b) for a, b in rows)
        ids = torch.full((batch_size, T), tokenizer.pad_token_id)
        labels = torch.full((batch_size, T), -100)
        mask = torch.zeros((batch_size, T), dtype=torch.long)
        for i, (a, b) in enumerate(rows):  # right padding for training
            ids[i, : len(a) + len(b)] = torch.tensor(a + b)
            labels[i, len(a): len(a) + len(b)] = torch.tensor(b)
            mask[i, : len(a) + len(b)] = 1
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if (step + 1) % 50 == 0:
            log(f"  {name} step {step + 1}/{steps}: loss {sum(losses[-50:]) / 50:.3f}")
    return losses


def pretrain_facts(model, tokenizer, steps: int, seed: int, cycle: int = 100, log=print) -> list[float]:
    """The "base model": addition facts, no R1 format, in warm-restart cycles of `cycle` steps (each warms up to
    6e-3 and decays; one long schedule at this size learns the table more slowly)."""
    eos = [tokenizer.eos_token_id]
    losses = []
    for c in range(-(-steps // cycle)):
        n = min(cycle, steps - c * cycle)
        losses += sft(model, tokenizer, n, lambda rng: ([], tokenizer(fact_line(rng))["input_ids"] + eos),
                      seed + c, lr=6e-3, log=log, name=f"facts cycle {c + 1}")
    return losses


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


@torch.no_grad()
def evaluate(model, tokenizer, held_out: list[dict], samples: int = 4, max_new_tokens: int = 40,
             seed: int = 1234, temperature: float = EVAL_TEMPERATURE) -> dict:
    """Held-out accuracy: pass@1 sampled at `temperature` (mean over `samples` per problem; R1 reports pass@1 at
    0.6) and greedy; the share of completions in the R1 format, of worked-out ones, and the mean length."""
    from trainers.rewards import accuracy_reward, format_reward

    was_training = model.training
    model.eval()
    prompts = [tokenizer(prompt_text(p["question"]))["input_ids"] for p in held_out]
    P = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_token_id] * (P - len(r)) + r for r in prompts])
    mask = (torch.arange(P)[None] >= torch.tensor([P - len(r) for r in prompts])[:, None]).long()
    gold = [p["answer"] for p in held_out]
    results = {}
    torch.manual_seed(seed)
    for name, kwargs, reps in (("sampled", dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0), samples),
                               ("greedy", dict(do_sample=False), 1)):
        out = model.generate(ids.repeat(reps, 1), attention_mask=mask.repeat(reps, 1), max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **kwargs)
        texts = tokenizer.batch_decode(out[:, P:], skip_special_tokens=True)
        acc = accuracy_reward(texts, gold * reps)
        fmt = format_reward(texts)
        lengths = [int(((row != tokenizer.pad_token_id).sum())) for row in out[:, P:]]
        results[f"{name}_accuracy"] = sum(a or 0.0 for a in acc) / len(acc)
        results[f"{name}_format"] = sum(fmt) / len(fmt)
        results[f"{name}_length"] = sum(lengths) / len(lengths)
        worked = ["=" in t.split("</think>")[0] for t in texts]
        results[f"{name}_worked_share"] = sum(worked) / len(worked)
        results[f"{name}_worked_accuracy"] = (sum(a or 0.0 for a, w in zip(acc, worked) if w) / sum(worked)
                                              if any(worked) else 0.0)
        results[f"{name}_example"] = texts[0]
    model.train(was_training)
    return results


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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

    import datasets
    from transformers import set_seed

    from trainers.grpo import GRPOConfig, GRPOTrainer
    from trainers.prompts import make_r1_prompts
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

    rows = [{"question": p["question"], "answer": p["answer"]} for p in train_questions] * 40  # epochs of the pairs
    random.Random(args.seed).shuffle(rows)
    train = make_r1_prompts(datasets.Dataset.from_list(rows), system_prompt="", template=TEMPLATE)
    config = GRPOConfig(
        output_dir=str(out_dir / "trainer"), max_steps=args.grpo_steps, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        per_device_train_batch_size=args.prompts_per_step * args.num_generations,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length,
        temperature=1.0, top_k=0, top_p=1.0, beta=0.0, logging_steps=1, save_strategy="no", report_to=[],
        bf16=False, gradient_checkpointing=False, seed=args.seed, data_seed=args.seed, use_cpu=True,
        dataloader_num_workers=0, use_mtp=args.use_mtp, disable_tqdm=False,
    )
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
