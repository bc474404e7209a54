"""The arithmetic task shared by the examples (grpo_arithmetic.py, r1_pipeline.py): a character-level tokenizer built
in code, sums of digits in the R1 format, the small DeepSeek model, a plain SFT loop, the "base model" pre-training on
addition facts, and the held-out evaluation (pass@1, greedy, format rate, completion length).

Sums of `n_terms` digits ("7+5+3"); a worked-out trace adds one digit at a time ("<think>7+5=12 12+3=15</think>
<answer>15</answer>"), so a sum of three digits is a two-step problem whose steps need facts "s+d" with s up to 18.
"""

from __future__ import annotations

import itertools
import random

import torch

from modeling_deepseek import DeepseekConfig, DeepseekForCausalLM

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
    return f" <think>guess</think> <answer>{rng.randint(len(digits), 9 * len(digits))}</answer>"


def split_questions(n_held_out: int, seed: int, n_terms: int = 2) -> tuple[list[dict], list[dict]]:
    """All 9**n_terms sums of `n_terms` digits (81 for two), split at random: `n_held_out` for evaluation, the rest
    for training."""
    every = [{"question": "+".join(map(str, d)), "answer": str(sum(d)), "digits": list(d)}
             for d in itertools.product(range(1, 10), repeat=n_terms)]
    if not 0 < n_held_out < len(every):
        raise ValueError(f"n_held_out must be between 1 and {len(every) - 1} (there are {len(every)} sums of "
                         f"{n_terms} digits), got {n_held_out}")
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


def fact_line(rng: random.Random, n_facts: int = 8, max_first: int = 9) -> str:
    """Addition facts as a base model would have read them: "7+5=12 3+8=11 ...", the sums the traces need: a first
    operand up to `max_first` (9 for sums of two digits, 18 for three, whose second step adds to a running sum)."""
    facts = []
    for _ in range(n_facts):
        a, b = rng.randint(1, max_first), rng.randint(1, 9)
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


def pretrain_facts(model, tokenizer, steps: int, seed: int, cycle: int = 100, log=print,
                   max_first: int = 9, line=None) -> list[float]:
    """The "base model": addition facts, no R1 format, in warm-restart cycles of `cycle` steps (each warms up to
    6e-3 and decays; one long schedule at this size learns the table more slowly). `line(rng)` -> text replaces
    the addition facts (another task's)."""
    eos = [tokenizer.eos_token_id]
    line = line or (lambda rng: fact_line(rng, max_first=max_first))
    losses = []
    for c in range(-(-steps // cycle)):
        n = min(cycle, steps - c * cycle)
        row = lambda rng: ([], tokenizer(line(rng))["input_ids"] + eos)  # noqa: E731
        losses += sft(model, tokenizer, n, row, seed + c, lr=6e-3, log=log, name=f"facts cycle {c + 1}")
    return losses


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


def save_figure(fig, path) -> None:
    """Lay out, write (PNG, 110 dpi) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def grpo_setup(problems: list[dict], epochs: int, seed: int, output_dir: str, steps: int, lr: float,
               prompts_per_step: int, num_generations: int, max_completion_length: int, temperature: float,
               logging_steps: int, columns: tuple = (), **options):
    """GRPO's training prompts (`epochs` shuffled copies of the problems, R1 prompts with a `solution` column, and
    the problems' `columns` for the rewards) and
    its config for this task on CPU: constant learning rate, no KL term (beta 0, as DAPO / Dr. GRPO), no top-k/top-p
    truncation of the rollouts, no checkpoints; `options` go to the config as they are (e.g. use_mtp)."""
    import datasets

    from trainers.grpo import GRPOConfig
    from trainers.prompts import make_r1_prompts

    rows = [{k: p[k] for k in ("question", "answer", *columns)} for p in problems] * epochs
    random.Random(seed).shuffle(rows)
    train = make_r1_prompts(datasets.Dataset.from_list(rows), system_prompt="", template=TEMPLATE)
    config = GRPOConfig(
        output_dir=output_dir, max_steps=steps, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, per_device_train_batch_size=prompts_per_step * num_generations,
        num_generations=num_generations, max_completion_length=max_completion_length, temperature=temperature,
        top_k=0, top_p=1.0, beta=options.pop("beta", 0.0), logging_steps=logging_steps, save_strategy="no", report_to=[], bf16=False,
        activation_checkpointing=False, seed=seed, data_seed=seed, use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=False, **options)
    return train, config
