"""trainers/pass_at_k.py: the unbiased pass@k estimator, standard errors, and held-out figures of a real policy."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from trainers.pass_at_k import heldout_figures, mean_and_stderr, pass_at_k


def test_pass_at_k_matches_enumeration_and_binomials():
    for n, c, k in [(8, 0, 1), (8, 3, 1), (8, 3, 2), (8, 3, 8), (8, 8, 4), (10, 1, 5), (16, 5, 8)]:
        # the chance that a k-subset of the n samples contains a correct one, by enumeration
        samples = [1] * c + [0] * (n - c)
        subsets = list(itertools.combinations(range(n), k))
        by_count = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(by_count, abs=1e-12)
        expected = 1.0 if n - c < k else 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)  # pass@1 is the mean accuracy
    for bad in [(8, 9, 1), (8, 3, 0), (8, 3, 9), (8, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_mean_and_stderr():
    values = [random.Random(0).random() for _ in range(50)]
    mean, se = mean_and_stderr(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 49)
    assert mean == pytest.approx(sum(values) / 50) and se == pytest.approx(sd / math.sqrt(50))
    assert mean_and_stderr([0.3]) == (0.3, 0.0)


def test_heldout_figures_of_a_model_against_its_own_samples():
    """On a tiny model: pass@1 <= pass@8, both equal to what the unbiased estimator gives on the same seeded samples,
    greedy scored on the greedy decode, and the same figures twice (seeded)."""

    from examples.arithmetic_task import build_model, build_tokenizer
    from trainers.pass_at_k import sample_and_score

    tok = build_tokenizer()
    model = build_model(tok, seed=0, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                        num_hidden_layers=2, q_lora_rank=16, kv_lora_rank=16)
    prompts = [f"User: {i}+{j} Assistant:" for i in range(1, 6) for j in range(1, 5)]

    def has_digit(texts, owners):  # a rule that the untrained model meets sometimes
        return [any(ch in t for ch in str(owners[i] % 10)) for i, t in enumerate(texts)]

    figures = heldout_figures(model, tok, prompts, has_digit, lambda texts: ["<" in t for t in texts], n=8,
                              ks=(1, 8), max_new_tokens=6, temperature=1.0, seed=3)
    assert figures == heldout_figures(model, tok, prompts, has_digit, lambda texts: ["<" in t for t in texts], n=8,
                                      ks=(1, 8), max_new_tokens=6, temperature=1.0, seed=3)
    samples = sample_and_score(model, tok, prompts, 8, 6, 1.0, seed=3)
    counts = [sum(has_digit([t for t, _ in g], [i] * 8)) for i, g in enumerate(samples)]
    assert figures["pass@1"][0] == pytest.approx(sum(counts) / (8 * len(prompts)))
    assert figures["pass@8"][0] == pytest.approx(sum(c > 0 for c in counts) / len(prompts))
    assert 0 < figures["pass@1"][0] < figures["pass@8"][0] <= 1, figures
    assert figures["pass@1"][1] > 0 and figures["completion_tokens"][0] > 0
    greedy = sample_and_score(model, tok, prompts, 1, 6, None, seed=3)
    assert figures["greedy_accuracy"][0] == pytest.approx(
        sum(has_digit([g[0][0] for g in greedy], list(range(len(prompts))))) / len(prompts))
    with pytest.raises(ValueError, match="k <= n"):
        heldout_figures(model, tok, prompts, has_digit, lambda t: t, n=4, ks=(8,))
