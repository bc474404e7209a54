"""trainers.rejection_sample: N completions per prompt, kept where every reward passes, deduplicated, with statistics.

A tiny DeepSeek model and the examples' character tokenizer; the rewards are written here so that what must be kept,
dropped and counted is known exactly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from conftest import TINY, routers

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from examples.arithmetic_task import TEMPLATE, build_model, build_tokenizer  # noqa: E402
from trainers.rejection_sampling import rejection_sample  # noqa: E402

TOK = build_tokenizer()
SIZES = {k: v for k, v in TINY.items() if k != "vocab_size"}


@pytest.fixture(scope="module")
def model():
    return build_model(TOK, seed=0, **SIZES)


def dataset(n: int = 5, **extra) -> Dataset:
    rows = [{"prompt": TEMPLATE.format(question=f"{i}+{i + 1}"), "solution": str(2 * i + 1), "ok": i % 2 == 0,
             "score": 0.25 * i, **{k: v[i] for k, v in extra.items()}} for i in range(n)]
    return Dataset.from_list(rows)


class Recorder:
    """A reward that records what it was given and scores with `score(completion, row_kwargs)`."""

    def __init__(self, name, score):
        self.__name__, self.score, self.calls = name, score, []

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        self.calls.append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs))
        return [self.score(c, {k: v[i] for k, v in kwargs.items()}) for i, c in enumerate(completions)]


def seen(recorder):
    """(prompt, completion, completion ids) of every sample the recorder scored, in order."""
    return [x for call in recorder.calls for x in zip(call["prompts"], call["completions"], call["completion_ids"])]


def test_batched_greedy_matches_one_prompt_at_a_time_and_duplicates_are_kept_once(model):
    ds = dataset(5)
    always = Recorder("always", lambda c, row: 1.0)
    result = rejection_sample(model, TOK, ds, [always], num_samples=3, do_sample=False, prompts_per_batch=2,
                              max_new_tokens=8, progress=False)
    # rewards get every column, one value per completion, and TRL's prompts / completion_ids
    assert [c["solution"] for c in always.calls] == [[s for s in ds["solution"][a:b] for _ in range(3)]
                                                   for a, b in ((0, 2), (2, 4), (4, 5))]
    # greedy: the three samples of a prompt agree; each equals the prompt decoded alone (left padding is invisible)
    samples = seen(always)
    assert len(samples) == 15
    for i, prompt in enumerate(ds["prompt"]):
        ids = torch.tensor([TOK(prompt)["input_ids"]])
        model.eval()
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                             pad_token_id=TOK.pad_token_id, eos_token_id=TOK.eos_token_id)[0, ids.shape[1]:].tolist()
        if TOK.eos_token_id in ref:
            ref = ref[: ref.index(TOK.eos_token_id) + 1]
        for p, text, cids in samples[3 * i: 3 * i + 3]:
            assert p == prompt and cids == ref and text == TOK.decode(ref, skip_special_tokens=True)
    # every sample passed, two of each prompt's three were duplicates
    assert len(result.dataset) == 5 and result.dataset["prompt"] == ds["prompt"]
    assert result.dataset["solution"] == ds["solution"] and result.dataset["sample_index"] == [0] * 5
    assert result.dataset["completion"] == [samples[3 * i][1] for i in range(5)]
    assert result.dataset["completion_tokens"] == [len(samples[3 * i][2]) for i in range(5)]
    s = result.stats
    assert (s["prompts"], s["samples"], s["passed"], s["kept"], s["duplicates_dropped"]) == (5, 15, 15, 5, 10)
    assert s["pass_rate"] == 1.0 and s["prompts_with_a_kept_sample"] == 1.0
    assert [p["kept"] for p in result.per_prompt] == [1] * 5
    # without deduplication all fifteen stay
    assert len(rejection_sample(model, TOK, ds, [always], num_samples=3, do_sample=False, max_new_tokens=8,
                                deduplicate=False, progress=False).dataset) == 15


def test_keep_drop_thresholds_and_statistics_exactly(model):
    ds = dataset(6)
    # reward 1: 1.0 for the rows whose `ok` column is True (prompts 0, 2, 4), 0.0 else
    by_row = Recorder("by_row", lambda c, row: 1.0 if row["ok"] else 0.0)
    # reward 2: a score per completion that depends on its text (even / odd length), None for prompt 4's
    by_text = Recorder("by_text", lambda c, row: None if row["solution"] == "9" else float(len(c) % 2))
    # reward 3: the `score` column (0, .25, .5, ...) against a threshold of 0.5: drops prompts 0 and 1
    by_score = Recorder("by_score", lambda c, row: row["score"])
    result = rejection_sample(model, TOK, ds, [by_row, by_text, by_score], num_samples=4, threshold=[1.0, 1.0, 0.5],
                              max_new_tokens=10, temperature=1.0, top_p=1.0, seed=0, progress=False)
    samples = seen(by_row)
    assert len(samples) == 24
    expect_kept, expect_pass, pass_by = [], [0] * 6, [0, 0, 0]
    for j, (prompt, text, cids) in enumerate(samples):
        i = j // 4
        oks = [i % 2 == 0, i != 4 and len(text) % 2 == 1, 0.25 * i >= 0.5]
        pass_by = [a + b for a, b in zip(pass_by, oks)]
        if all(oks):
            expect_pass[i] += 1
            if (prompt, text) not in [(p, t) for p, t, _ in expect_kept]:
                expect_kept.append((prompt, text, j % 4))
    assert [p["passed"] for p in result.per_prompt] == expect_pass
    assert list(zip(result.dataset["prompt"], result.dataset["completion"], result.dataset["sample_index"])) == \
        expect_kept
    assert set(result.dataset["prompt"]) <= {ds["prompt"][2]}  # the only prompt that can pass all three
    s = result.stats
    assert 0 < s["passed"] < 24, "the seeded draw must both keep and drop (else this test checks little)"
    assert s["passed"] == sum(expect_pass) and s["kept"] == len(expect_kept)
    assert s["duplicates_dropped"] == sum(expect_pass) - len(expect_kept)
    assert s["pass_rate"] == sum(expect_pass) / 24
    assert s["pass_rate_by_reward"] == {"by_row": pass_by[0] / 24, "by_text": pass_by[1] / 24,
                                        "by_score": pass_by[2] / 24}
    assert s["mean_prompt_pass_rate"] == pytest.approx(sum(p / 4 for p in expect_pass) / 6)
    assert result.dataset.column_names == ["prompt", "solution", "ok", "score", "completion", "completion_tokens",
                                           "sample_index", "by_row", "by_text", "by_score", "prompt_pass_rate"]
    assert all(r == expect_pass[2] / 4 for r in result.dataset["prompt_pass_rate"])


def test_repeated_rows_deduplicate_across_rows_and_the_cap(model):
    ds = Dataset.from_list([{"prompt": TEMPLATE.format(question="3+4"), "solution": "7"}] * 3)
    always = Recorder("always", lambda c, row: 1.0)
    result = rejection_sample(model, TOK, ds, [always], num_samples=2, do_sample=False, max_new_tokens=6,
                              progress=False)
    assert len(result.dataset) == 1 and result.stats["duplicates_dropped"] == 5
    sampled = rejection_sample(model, TOK, ds.select([0]), [always], num_samples=6, max_new_tokens=6,
                               temperature=1.0, top_p=1.0, seed=1, max_kept_per_prompt=2, progress=False)
    distinct = len({t for _, t, _ in seen(always)[6:]})
    assert len(sampled.dataset) == min(2, distinct)
    assert sampled.stats["over_cap_dropped"] == distinct - len(sampled.dataset)


def test_nothing_passes_gives_an_empty_dataset_with_the_columns(model):
    never = Recorder("never", lambda c, row: 0.0)
    result = rejection_sample(model, TOK, dataset(2), [never], num_samples=2, max_new_tokens=4, progress=False)
    assert len(result.dataset) == 0 and "completion" in result.dataset.column_names
    assert result.stats["pass_rate"] == 0.0 and result.stats["prompts_with_a_kept_sample"] == 0.0


def test_generation_counts_no_loads_and_restores_training_mode(model):
    model.train()
    before = [r.pending_load.clone() for r in routers(model)]
    rejection_sample(model, TOK, dataset(2), [Recorder("a", lambda c, row: 1.0)], num_samples=2, max_new_tokens=4,
                     progress=False)
    assert model.training
    assert all(torch.equal(b, r.pending_load) for b, r in zip(before, routers(model)))


def test_conversational_prompts(model):
    tok = build_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": "1+2"}], "solution": "3"}])
    rec = Recorder("a", lambda c, row: 1.0)
    result = rejection_sample(model, tok, ds, [rec], num_samples=2, do_sample=False, max_new_tokens=4,
                              progress=False)
    completion = result.dataset["completion"][0]
    assert isinstance(completion, list) and completion[0]["role"] == "assistant"
    assert rec.calls[0]["completions"][0] == completion
    with pytest.raises(ValueError, match="no chat template"):
        rejection_sample(model, TOK, ds, [rec], num_samples=1, max_new_tokens=2, progress=False)


def test_bad_input_is_named(model):
    ok = Recorder("ok", lambda c, row: 1.0)
    with pytest.raises(KeyError, match="no 'prompt' column"):
        rejection_sample(model, TOK, Dataset.from_list([{"question": "1+1"}]), [ok], progress=False)
    with pytest.raises(ValueError, match="num_samples"):
        rejection_sample(model, TOK, dataset(1), [ok], num_samples=0, progress=False)
    with pytest.raises(ValueError, match="2 thresholds for 1 reward"):
        rejection_sample(model, TOK, dataset(1), [ok], threshold=[1.0, 1.0], progress=False)
    with pytest.raises(ValueError, match="empty"):
        rejection_sample(model, TOK, [], [ok], progress=False)

    def short(completions, **kwargs):
        return [1.0]

    with pytest.raises(ValueError, match="'short' returned 1 scores for 2 completions"):
        rejection_sample(model, TOK, dataset(1), [short], num_samples=2, max_new_tokens=2, progress=False)
