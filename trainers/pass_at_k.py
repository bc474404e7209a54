"""pass@k and the held-out figures of a policy: n samples per problem, scored by a rule, with standard errors.

pass@k is the chance that at least one of k samples solves a problem. Drawing exactly k samples per problem gives a
noisy estimate; drawing n >= k and counting the c correct ones gives the unbiased estimator of Chen et al. (2021,
the Codex paper), the chance that k of the n drawn without replacement include a correct one:

    pass@k = 1 - C(n - c, k) / C(n, k)          (1 when n - c < k)

averaged over problems. pass@1 is then the mean accuracy c / n. RL with a verifiable reward tends to move pass@1
towards pass@k and pass@k itself little (Yue et al. 2025), so the pair says whether a stage added anything a few
more samples would not have found.

`sample_and_score` draws the samples in large left-padded batches (one `generate` per batch of rows, in eval mode:
for a DeepSeek model, absorbed MLA and routing that counts no loads), seeded, so that the same model gives the same
figures; `heldout_figures` adds greedy accuracy, the format rate and the completion length. Every figure carries its
standard error over problems (the samples of one problem are correlated; problems are the independent units).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .grpo import cut_at_eos, eval_routing, left_pad

__all__ = ["pass_at_k", "mean_and_stderr", "sample_and_score", "heldout_figures"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one problem from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError(f"pass_at_k takes integers, got n={n!r}, c={c!r}, k={k!r}")
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # the product form: no huge binomials, exact enough for any n a run draws
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean: sample standard deviation / sqrt(count)); stderr 0 for one value."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_and_stderr of no values")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


@torch.no_grad()
def sample_and_score(model, tokenizer, prompts: Sequence[str], n: int, max_new_tokens: int,
                     temperature: float | None, seed: int, rows_per_batch: int = 1024) -> list[list[tuple[str, int]]]:
    """`n` completions per prompt as (text, token count), one list per prompt; `temperature` None: greedy. Seeded
    (torch's generator) so that the same model and arguments give the same samples."""
    eos = tokenizer.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    expanded = [r for r in ids for _ in range(n)]
    gen = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_ids or None)
    gen.update(dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature else
               dict(do_sample=False))
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    out: list[tuple[str, int]] = []
    with eval_routing(model):
        for start in range(0, len(expanded), rows_per_batch):
            ids_BP, mask_BP = left_pad(expanded[start:start + rows_per_batch], tokenizer.pad_token_id)
            seq = model.generate(input_ids=ids_BP.to(device), attention_mask=mask_BP.to(device), **gen)
            completion_ids, _ = cut_at_eos(seq[:, ids_BP.shape[1]:].cpu(), eos_ids or [-1])
            texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
            out += [(t, sum(1 for i in c if i not in eos_ids)) for t, c in zip(texts, completion_ids)]
    return [out[i * n:(i + 1) * n] for i in range(len(prompts))]


def heldout_figures(model, tokenizer, prompts: Sequence[str], is_correct: Callable[[list[str], list[int]], list[bool]],
                    is_formatted: Callable[[list[str]], list[bool]], n: int = 8, ks: Sequence[int] = (1, 8),
                    max_new_tokens: int = 40, temperature: float = 0.6, seed: int = 1234) -> dict:
    """The held-out figures of a policy, each a (mean, stderr) over problems: pass@k for every k in `ks` from `n`
    samples at `temperature` (the unbiased estimator), greedy accuracy, the format rate and the completion length
    (tokens, EOS excluded) of the samples; plus one sampled completion as an example. `is_correct(texts,
    problem_indices)` judges completions of the given problems, `is_formatted(texts)` their format."""
    if any(k > n for k in ks):
        raise ValueError(f"pass@k needs k <= n samples per problem: ks={list(ks)}, n={n}")
    sampled = sample_and_score(model, tokenizer, prompts, n, max_new_tokens, temperature, seed)
    greedy = sample_and_score(model, tokenizer, prompts, 1, max_new_tokens, None, seed)
    texts = [t for group in sampled for t, _ in group]
    owners = [i for i, group in enumerate(sampled) for _ in group]
    correct = is_correct(texts, owners)
    formatted = is_formatted(texts)
    figures = {}
    counts = [sum(correct[i * n:(i + 1) * n]) for i in range(len(prompts))]
    for k in ks:
        figures[f"pass@{k}"] = mean_and_stderr([pass_at_k(n, int(c), k) for c in counts])
    greedy_correct = is_correct([g[0][0] for g in greedy], list(range(len(prompts))))
    figures["greedy_accuracy"] = mean_and_stderr([float(x) for x in greedy_correct])
    figures["format_rate"] = mean_and_stderr([sum(formatted[i * n:(i + 1) * n]) / n for i in range(len(prompts))])
    figures["completion_tokens"] = mean_and_stderr([sum(c for _, c in g) / n for g in sampled])
    figures["example"] = texts[0]
    figures["samples_per_problem"], figures["problems"], figures["temperature"] = n, len(prompts), temperature
    return figures
