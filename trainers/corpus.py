"""A small code corpus for pretraining demos: Python standard-library sources, a byte-level BPE tokenizer
trained on them, and fixed-length packed blocks for causal language modelling.

Everything here runs offline: the corpus is read from the local Python installation and the tokenizer is
trained from scratch with the `tokenizers` library.
"""

from __future__ import annotations

import math
import os
import random
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
# Order matters: the trainer assigns ids in this order, so bos=0, eos=1, pad=2 (matching hub_configs).
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)

# Directory names (any path component below the stdlib root) whose files are left out of the corpus.
# "test"/"tests"/"idle_test" cover test, unittest/test, ctypes/test, idlelib/idle_test, lib2to3/tests, ...
# pydoc_data holds one huge string of prose documentation, not code.
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "pydoc_data"})


def stdlib_source_files(limit: int | None = None, seed: int = 0) -> list[Path]:
    """Return the ``.py`` files of the running interpreter's standard library, sorted.

    Test directories, ``site-packages`` and ``pydoc_data`` are excluded. With ``limit``, a subset of ``limit``
    files is drawn with ``random.Random(seed)`` (deterministic for a given seed and stdlib) and returned sorted.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        rel_dirs = path.relative_to(root).parts[:-1]
        if EXCLUDED_DIRS.intersection(rel_dirs):
            continue
        if path.is_file():
            files.append(path)
    files.sort()
    if limit is not None and limit < len(files):
        files = sorted(random.Random(seed).sample(files, limit))
    return files


def read_text(path: str | os.PathLike) -> str:
    """Read a source file as UTF-8 (undecodable bytes are replaced)."""
    return Path(path).read_text(encoding="utf-8", errors="replace")


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def train_tokenizer_from_texts(
    texts: Iterable[str],
    vocab_size: int,
    save_dir: str | os.PathLike | None = None,
    *,
    model_max_length: int = 2048,
    min_frequency: int = 2,
    length: int | None = None,
):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a transformers fast tokenizer.

    Special tokens ``<|bos|>``, ``<|eos|>``, ``<|pad|>`` get ids 0, 1, 2. The tokenizer prepends ``<|bos|>`` when
    ``add_special_tokens`` is true (the transformers default, also in ``pipeline("text-generation")``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size <= len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must exceed {len(SPECIAL_TOKENS) + 256} (specials + byte alphabet)")

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_batched(texts, 64), trainer=trainer, length=length)
    for i, tok in enumerate(SPECIAL_TOKENS):
        assert backend.token_to_id(tok) == i, f"special token {tok} got id {backend.token_to_id(tok)}"

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        add_bos_token=True, add_eos_token=False, model_max_length=model_max_length,
        clean_up_tokenization_spaces=False, padding_side="left",  # left: generation appends on the right
    )
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def train_tokenizer(
    files: Sequence[str | os.PathLike],
    vocab_size: int,
    save_dir: str | os.PathLike | None = None,
    *,
    model_max_length: int = 2048,
    min_frequency: int = 2,
):
    """Train a byte-level BPE tokenizer on the contents of ``files``; see :func:`train_tokenizer_from_texts`."""
    return train_tokenizer_from_texts(
        (read_text(f) for f in files),
        vocab_size,
        save_dir,
        model_max_length=model_max_length,
        min_frequency=min_frequency,
        length=len(files),
    )


def _backend(tokenizer):
    """The `tokenizers.Tokenizer` doing the work: `tokenizer` itself, or a fast tokenizer's `backend_tokenizer`."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise TypeError(f"pack_texts needs a fast tokenizer (with a backend_tokenizer) or a tokenizers.Tokenizer; got "
                        f"{type(tokenizer).__name__}")
    return backend


def pack_texts(
    tokenizer,
    texts: Iterable[str],
    block_size: int,
    eval_fraction: float = 0.05,
    max_tokens: int | None = None,
    seed: int = 0,
):
    """Tokenize ``texts`` (each as ``[bos] text [eos]``), shuffle the documents with ``seed``, concatenate them,
    and cut the stream into ``block_size`` blocks (the remainder is dropped).

    The last ``ceil(n_blocks * eval_fraction)`` blocks form the eval set (at least one when ``eval_fraction > 0``
    and there are two or more blocks), the rest the train set. Both are ``datasets.Dataset`` objects with
    ``input_ids`` and ``labels`` (a copy of ``input_ids``; the model shifts labels itself).
    ``max_tokens`` caps the total number of tokens used.
    """
    from datasets import Dataset

    texts = [t for t in texts if t]
    backend = _backend(tokenizer)
    eos_id = tokenizer.eos_token_id
    docs = []
    for batch in _batched(texts, 256):
        # The backend encodes batches in parallel and does not warn about documents longer than model_max_length.
        for enc in backend.encode_batch(batch, add_special_tokens=True):
            ids = enc.ids
            if not ids or ids[-1] != eos_id:
                ids = ids + [eos_id]
            docs.append(np.asarray(ids, dtype=np.int64))
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    stream = np.concatenate([docs[i] for i in order]) if docs else np.zeros(0, dtype=np.int64)
    if max_tokens is not None:
        stream = stream[:max_tokens]
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise ValueError(f"corpus has {len(stream)} tokens, fewer than one block of {block_size}")
    blocks = stream[: n_blocks * block_size].reshape(n_blocks, block_size)

    n_eval = 0
    if eval_fraction > 0 and n_blocks >= 2:
        n_eval = min(n_blocks - 1, max(1, math.ceil(n_blocks * eval_fraction)))
    train_blocks, eval_blocks = blocks[: n_blocks - n_eval], blocks[n_blocks - n_eval :]

    def to_dataset(arr: np.ndarray) -> Dataset:
        rows = arr.tolist()
        return Dataset.from_dict({"input_ids": rows, "labels": [list(r) for r in rows]})

    return to_dataset(train_blocks), to_dataset(eval_blocks)


def pack_dataset(
    tokenizer,
    files: Sequence[str | os.PathLike],
    block_size: int,
    eval_fraction: float = 0.05,
    max_tokens: int | None = None,
    seed: int = 0,
):
    """Read ``files`` and pack them into (train, eval) datasets of ``block_size`` blocks; see :func:`pack_texts`."""
    return pack_texts(
        tokenizer,
        (read_text(f) for f in files),
        block_size,
        eval_fraction=eval_fraction,
        max_tokens=max_tokens,
        seed=seed,
    )
