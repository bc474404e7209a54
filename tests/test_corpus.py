"""Tests for trainers.corpus: stdlib corpus, byte-level BPE tokenizer, block packing."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from trainers.corpus import pack_dataset, pack_texts, stdlib_source_files, train_tokenizer

SNIPPET = (
    "def fibonacci(n: int) -> int:\n"
    '    """Return the n-th Fibonacci number."""\n'
    "    if n < 2:\n"
    "        return n\n"
    "\treturn fibonacci(n - 1) + fibonacci(n - 2)  # tab, unicode: é → ∑\n"
)


@pytest.fixture(scope="module")
def files():
    return stdlib_source_files(limit=30, seed=0)


@pytest.fixture(scope="module")
def tokenizer(files):
    return train_tokenizer(files, vocab_size=512)


def test_stdlib_source_files_nonempty_sorted_no_tests():
    all_files = stdlib_source_files()
    assert len(all_files) > 100
    assert all_files == sorted(all_files)
    root = Path(sysconfig.get_paths()["stdlib"])
    for f in all_files:
        assert f.suffix == ".py" and f.is_file()
        dirs = f.relative_to(root).parts[:-1]
        assert not {"test", "tests", "idle_test", "site-packages"} & set(dirs), f
    names = {f.relative_to(root).as_posix() for f in all_files}
    assert "os.py" in names and "json/__init__.py" in names
    assert not any(n.startswith(("idlelib/idle_test/", "lib2to3/tests/", "test/")) for n in names)


def test_stdlib_source_files_limit_deterministic(files):
    again = stdlib_source_files(limit=30, seed=0)
    assert again == files and len(files) == 30 and files == sorted(files)
    assert set(files) <= set(stdlib_source_files())
    assert stdlib_source_files(limit=30, seed=1) != files


def test_tokenizer_special_ids_and_roundtrip(tokenizer):
    from transformers import PreTrainedTokenizerFast

    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<|bos|>", "<|eos|>", "<|pad|>"]
    assert len(tokenizer) == 512
    ids = tokenizer(SNIPPET)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert max(ids) < len(tokenizer)
    assert len(ids) < len(SNIPPET.encode()), "BPE should compress below one token per byte"
    assert tokenizer.decode(ids, skip_special_tokens=True) == SNIPPET
    assert tokenizer.decode(tokenizer(SNIPPET, add_special_tokens=False)["input_ids"]) == SNIPPET


def test_tokenizer_save_and_reload(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert (reloaded.bos_token_id, reloaded.eos_token_id, reloaded.pad_token_id) == (0, 1, 2)
    assert len(reloaded) == len(tokenizer)
    assert reloaded(SNIPPET)["input_ids"] == tokenizer(SNIPPET)["input_ids"]
    assert reloaded.decode(reloaded(SNIPPET)["input_ids"], skip_special_tokens=True) == SNIPPET
    # left padding with the pad id, as pipeline("text-generation") expects
    batch = reloaded(["x = 1", "def f(a, b):\n    return a + b"], padding=True)
    assert reloaded.padding_side == "left"
    assert batch["input_ids"][0][0] == reloaded.pad_token_id and batch["attention_mask"][0][0] == 0


def test_train_tokenizer_save_dir(files, tmp_path):
    tok = train_tokenizer(files[:5], vocab_size=300, save_dir=tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    assert (tmp_path / "tok" / "tokenizer_config.json").is_file()
    assert tok.model_max_length == 2048


def test_pack_dataset_blocks(tokenizer, files):
    block = 64
    train, evald = pack_dataset(tokenizer, files, block, eval_fraction=0.1)
    assert set(train.column_names) == {"input_ids", "labels"} == set(evald.column_names)
    assert len(train) > 10 and len(evald) >= 1
    assert abs(len(evald) / (len(train) + len(evald)) - 0.1) < 0.02
    for ds in (train, evald):
        for row in ds.select(range(min(20, len(ds)))):
            assert len(row["input_ids"]) == block
            assert row["labels"] == row["input_ids"]
    ids = [i for row in train["input_ids"] for i in row]
    assert max(ids) < len(tokenizer) and min(ids) >= 0
    # every file is wrapped as [bos] ... [eos]; only the dropped tail (< one block) can lose a few of them
    all_ids = ids + [i for row in evald["input_ids"] for i in row]
    for special in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        assert len(files) - 5 <= all_ids.count(special) <= len(files)
    # deterministic
    train2, _ = pack_dataset(tokenizer, files, block, eval_fraction=0.1)
    assert train2["input_ids"] == train["input_ids"]


def test_pack_dataset_max_tokens_and_roundtrip(tokenizer):
    texts = [SNIPPET] * 10
    train, evald = pack_texts(tokenizer, texts, 16, eval_fraction=0.0, max_tokens=100)
    assert len(train) == 100 // 16 and len(evald) == 0
    train, evald = pack_texts(tokenizer, texts, 16, eval_fraction=0.0)
    stream = [i for row in train["input_ids"] for i in row]
    doc = tokenizer(SNIPPET)["input_ids"] + [tokenizer.eos_token_id]
    assert stream[: len(doc)] == doc
    with pytest.raises(ValueError):
        pack_texts(tokenizer, ["x"], 1024)
