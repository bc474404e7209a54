"""Rejection sampling: N completions per prompt from a policy, kept only where every reward passes.

DeepSeek-R1's third stage (section 2.3.3 of the paper) samples many responses per prompt from the RL checkpoint and
keeps the correct, well-formed ones (about 600k reasoning samples), deduplicated, as SFT data for the next model. Here:

    result = rejection_sample(model, tokenizer, dataset, [accuracy_reward, format_reward], num_samples=8)
    result.dataset      # datasets.Dataset: prompt, completion, the dataset's other columns (solution, ...), and
                        # completion_tokens, sample_index, prompt_pass_rate, one column per reward
    result.stats        # overall figures: samples, passed, kept, duplicates, pass rates (per sample, per reward,
                        # per prompt, share of prompts with at least one kept completion)
    result.per_prompt   # one dict per dataset row: samples, passed, kept, pass_rate

- Any `datasets.Dataset` (or list of dicts) with a `prompt` column: plain text, or a list of messages for a model with
  a chat template (the completion is then `[{"role": "assistant", "content": ...}]`, as TRL writes it).
- Any reward functions with TRL's signature, `f(prompts, completions, completion_ids, **columns) -> list[float|None]`;
  the dataset's other columns are passed by name, one value per completion. A sample is kept when every reward is
  >= its threshold; None (a reward with no opinion, e.g. an unparsable gold answer) does not pass, since the kept
  rows are meant to be verified.
- Generation: the prompts of a batch left-padded into one `model.generate` call, each repeated N times, with the
  model in eval mode (for a DeepSeek model: absorbed MLA over the latent cache, routing that counts no loads);
  completions cut after the first EOS.
- Duplicates (the same completion text for the same prompt text, also across repeated rows) are kept once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .grpo import cut_at_eos, eval_routing, left_pad

__all__ = ["RejectionSamplingResult", "rejection_sample"]


@dataclass
class RejectionSamplingResult:
    dataset: object  # datasets.Dataset of the kept samples
    stats: dict
    per_prompt: list[dict] = field(default_factory=list)


def _reward_name(fn) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def _thresholds(threshold, n_rewards: int) -> list[float]:
    if isinstance(threshold, (int, float)):
        return [float(threshold)] * n_rewards
    threshold = [float(t) for t in threshold]
    if len(threshold) != n_rewards:
        raise ValueError(f"rejection_sample: {len(threshold)} thresholds for {n_rewards} reward functions")
    return threshold


def _prompt_ids(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("rejection_sample: the prompts are conversational (lists of messages) but the tokenizer "
                             "has no chat template")
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    raise TypeError(f"rejection_sample: a prompt must be a string or a list of messages, got {type(prompt).__name__}")


def rejection_sample(model, tokenizer, dataset, reward_funcs: Sequence[Callable], *, num_samples: int = 8,
                     threshold: float | Sequence[float] = 1.0, prompts_per_batch: int = 16, max_new_tokens: int = 256,
                     temperature: float = 0.6, top_p: float = 0.95, top_k: int = 0, do_sample: bool = True,
                     max_kept_per_prompt: int | None = None, deduplicate: bool = True, seed: int | None = None,
                     prompt_column: str = "prompt", progress: bool = True,
                     generation_kwargs: dict | None = None) -> RejectionSamplingResult:
    """Sample `num_samples` completions per row of `dataset` and keep those that pass every reward (see the module
    docstring). R1 samples its rejection data at temperature 0.6, top-p 0.95 (the defaults). `seed` seeds torch's
    generator before sampling; `max_kept_per_prompt` caps the kept completions of one prompt (None: no cap)."""
    import datasets
    from tqdm.auto import tqdm

    rows = dataset.to_list() if isinstance(dataset, datasets.Dataset) else list(dataset)
    if not rows:
        raise ValueError("rejection_sample: the dataset is empty")
    if prompt_column not in rows[0]:
        raise KeyError(f"rejection_sample: the dataset has no {prompt_column!r} column; it has {sorted(rows[0])}")
    if num_samples < 1 or prompts_per_batch < 1 or max_new_tokens < 1:
        raise ValueError(f"rejection_sample: num_samples ({num_samples}), prompts_per_batch ({prompts_per_batch}) "
                         f"and max_new_tokens ({max_new_tokens}) must be positive integers")
    if max_kept_per_prompt is not None and max_kept_per_prompt < 1:
        raise ValueError(f"rejection_sample: max_kept_per_prompt must be a positive integer, got "
                         f"{max_kept_per_prompt}")
    if not reward_funcs:
        raise ValueError("rejection_sample: give at least one reward function")
    if "completion" in rows[0]:
        raise ValueError("rejection_sample: the dataset already has a 'completion' column (it is the output's); "
                         "remove or rename it")
    thresholds = _thresholds(threshold, len(reward_funcs))
    names = [_reward_name(f) for f in reward_funcs]
    if len(set(names)) != len(names):
        raise ValueError(f"rejection_sample: reward functions need distinct names (their score columns), got {names}")
    clashes = set(names) & (set(rows[0]) | {"completion", "completion_tokens", "sample_index", "prompt_pass_rate"})
    if clashes:
        raise ValueError(f"rejection_sample: reward names {sorted(clashes)} clash with the dataset's columns")
    if tokenizer.pad_token_id is None:
        raise ValueError("rejection_sample: the tokenizer has no pad token (set tokenizer.pad_token)")
    eos = model.generation_config.eos_token_id if tokenizer.eos_token_id is None else tokenizer.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    conversational = isinstance(rows[0][prompt_column], list)

    gen = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
               eos_token_id=eos_ids or None)
    if do_sample:
        gen.update(temperature=temperature, top_p=top_p, top_k=top_k)
    gen.update(generation_kwargs or {})
    if seed is not None:
        torch.manual_seed(seed)

    kept, per_prompt, seen = [], [], set()
    passed_by_reward = [0] * len(reward_funcs)
    total_samples = total_passed = duplicates = capped = 0
    device = next(model.parameters()).device
    bar = tqdm(total=len(rows), desc="rejection sampling", unit="prompt", disable=not progress)
    with eval_routing(model), torch.no_grad():
        for start in range(0, len(rows), prompts_per_batch):
            batch = rows[start:start + prompts_per_batch]
            prompt_ids = [_prompt_ids(tokenizer, r[prompt_column]) for r in batch]
            ids_BP, mask_BP = left_pad([p for p in prompt_ids for _ in range(num_samples)], tokenizer.pad_token_id)
            out = model.generate(input_ids=ids_BP.to(device), attention_mask=mask_BP.to(device), **gen)
            completion_ids, _ = cut_at_eos(out[:, ids_BP.shape[1]:].cpu(), eos_ids or [-1])
            texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
            completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
            expanded = [r for r in batch for _ in range(num_samples)]
            columns = {k: [r[k] for r in expanded] for k in rows[0] if k != prompt_column}
            scores = []
            for fn, name in zip(reward_funcs, names):
                s = fn(prompts=[r[prompt_column] for r in expanded], completions=completions,
                       completion_ids=completion_ids, **columns)
                if len(s) != len(texts):
                    raise ValueError(f"rejection_sample: reward function {name!r} returned {len(s)} scores for "
                                     f"{len(texts)} completions")
                scores.append([None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
                               for v in s])
            for i, row in enumerate(batch):
                n_pass = n_kept = 0
                key_prompt = json.dumps(row[prompt_column], sort_keys=True)
                for j in range(i * num_samples, (i + 1) * num_samples):
                    oks = [s[j] is not None and s[j] >= t for s, t in zip(scores, thresholds)]
                    for r, ok in enumerate(oks):
                        passed_by_reward[r] += ok
                    if not all(oks):
                        continue
                    n_pass += 1
                    key = (key_prompt, texts[j])
                    if deduplicate and key in seen:
                        duplicates += 1
                        continue
                    if max_kept_per_prompt is not None and n_kept >= max_kept_per_prompt:
                        capped += 1
                        continue
                    seen.add(key)
                    n_kept += 1
                    kept.append({**row, "completion": completions[j], "completion_tokens": len(completion_ids[j]),
                                 "sample_index": j - i * num_samples, "prompt_index": start + i,
                                 **{name: s[j] for name, s in zip(names, scores)}})
                per_prompt.append({"prompt_index": start + i, "samples": num_samples, "passed": n_pass,
                                   "kept": n_kept, "pass_rate": n_pass / num_samples})
                total_samples += num_samples
                total_passed += n_pass
            bar.update(len(batch))
            bar.set_postfix(pass_rate=f"{total_passed / total_samples:.1%}", kept=len(kept))
    bar.close()

    pass_rate_of = {p["prompt_index"]: p["pass_rate"] for p in per_prompt}
    for row in kept:
        row["prompt_pass_rate"] = pass_rate_of[row.pop("prompt_index")]
    stats = {
        "prompts": len(rows), "samples": total_samples, "passed": total_passed, "kept": len(kept),
        "duplicates_dropped": duplicates, "over_cap_dropped": capped,
        "pass_rate": total_passed / total_samples,
        "pass_rate_by_reward": {n: c / total_samples for n, c in zip(names, passed_by_reward)},
        "mean_prompt_pass_rate": sum(p["pass_rate"] for p in per_prompt) / len(per_prompt),
        "prompts_with_a_kept_sample": sum(p["kept"] > 0 for p in per_prompt) / len(per_prompt),
        "mean_kept_completion_tokens": (sum(r["completion_tokens"] for r in kept) / len(kept)) if kept else 0.0,
        "num_samples": num_samples, "thresholds": dict(zip(names, thresholds)),
    }
    if kept:
        out_ds = datasets.Dataset.from_list(kept)
    else:  # an empty dataset with the columns a kept row would have had
        cols = [*rows[0], "completion", "completion_tokens", "sample_index", *names, "prompt_pass_rate"]
        out_ds = datasets.Dataset.from_dict({c: [] for c in cols})
    return RejectionSamplingResult(out_ds, stats, per_prompt)
