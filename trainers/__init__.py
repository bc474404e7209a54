"""Training utilities for the DeepSeek models: corpus building, tokenizer training, sequence packing, and the
Trainer integration: DeepseekTrainer / DeepseekSFTTrainer, or DeepseekTrainerCallback and make_checkpoints_atomic
for any other Trainer (nothing is installed by ``import modeling_deepseek``).

Names are imported lazily so that ``import trainers`` stays cheap (no tokenizers/datasets import until used).
"""

from __future__ import annotations

import importlib

_LAZY = {
    "stdlib_source_files": "trainers.corpus",
    "read_text": "trainers.corpus",
    "train_tokenizer": "trainers.corpus",
    "train_tokenizer_from_texts": "trainers.corpus",
    "pack_dataset": "trainers.corpus",
    "pack_texts": "trainers.corpus",
    "SPECIAL_TOKENS": "trainers.corpus",
    "DeepseekTrainerCallback": "trainers.callbacks",
    "DeepseekSFTTrainer": "trainers.sft",
    "DeepseekTrainer": "trainers.trainer",
    "DeepseekTrainerMixin": "trainers.trainer",
    "DeepseekIndexerTrainer": "trainers.indexer_training",
    "prepare_indexer_stage": "trainers.indexer_training",
    "make_checkpoints_atomic": "trainers.checkpointing",
    "AtomicCheckpointMixin": "trainers.checkpointing",
    "GRPOTrainer": "trainers.grpo",
    "GRPOConfig": "trainers.grpo",
    "make_r1_prompts": "trainers.prompts",
    "r1_prompt": "trainers.prompts",
    "rejection_sample": "trainers.rejection_sampling",
    "RejectionSamplingResult": "trainers.rejection_sampling",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
