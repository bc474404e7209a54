"""One test per internal in modeling_deepseek/compat.py: each checks that the installed library still has the private
name or version-dependent behaviour the package relies on, and fails with a message that names it."""

from __future__ import annotations

import inspect

import pytest
import torch

from modeling_deepseek import compat

from conftest import random_ids, tiny_model


# ---------------------------------------------------------------------------------------------------------------------
# Model side


# ---------------------------------------------------------------------------------------------------------------------
# Training side


def test_trainer_save_checkpoint_and_get_output_dir(tmp_path):
    """compat.CheckpointSaveHook, checkpoint_run_dir, redirect_checkpoint_run_dir: the training loop saves through the
    private Trainer._save_checkpoint(model, trial), which writes <Trainer._get_output_dir(trial)>/checkpoint-N."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    for name, params in (("_save_checkpoint", ["self", "model", "trial"]), ("_get_output_dir", ["self", "trial"])):
        fn = getattr(Trainer, name, None)
        assert fn is not None, f"transformers' Trainer.{name} is gone (compat.py, atomic checkpoints)"
        assert list(inspect.signature(fn).parameters) == params, (
            f"Trainer.{name} now takes {list(inspect.signature(fn).parameters)} (compat.py expects {params})")

    seen = []

    class Hooked(compat.CheckpointSaveHook, Trainer):
        def around_checkpoint_save(self, save, trial):
            seen.append(compat.checkpoint_run_dir(self, trial))
            with compat.redirect_checkpoint_run_dir(self, tmp_path / "elsewhere"):
                save()

    ids = random_ids(2, 8).tolist()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2,
                             save_strategy="steps", save_steps=1, save_only_model=True, report_to=[], use_cpu=True,
                             disable_tqdm=True, logging_strategy="no")
    trainer = Hooked(model=tiny_model(train=True), args=args,
                     train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}))
    trainer.train()
    assert seen == [str(tmp_path / "out")], (
        f"Trainer._save_checkpoint was called {len(seen)} times by the training loop, run dir {seen} "
        "(compat.CheckpointSaveHook overrides it; compat.checkpoint_run_dir reads Trainer._get_output_dir)")
    assert (tmp_path / "elsewhere" / "checkpoint-1" / "model.safetensors").is_file(), (
        "Trainer._save_checkpoint no longer writes under Trainer._get_output_dir() (compat.redirect_checkpoint_run_dir)")
    assert not (tmp_path / "out" / "checkpoint-1").exists()
    assert "_get_output_dir" not in vars(trainer)  # the redirect is undone


def test_trl_fused_lm_head_replaces_instance_forward():
    """compat.forward_replaced_by_trl / restore_class_forward: trl's SFTTrainer calls
    trl.trainer.utils.add_fused_lm_head(model), which sets an instance attribute `forward` defined in trl; accelerate's
    mixed-precision wrapper keeps the forward it wraps in `model._original_forward`."""
    from accelerate import Accelerator
    from trl import SFTTrainer
    from trl.trainer import utils as trl_utils

    add_fused_lm_head = getattr(trl_utils, "add_fused_lm_head", None)
    assert add_fused_lm_head is not None, "trl.trainer.utils.add_fused_lm_head is gone (compat.forward_replaced_by_trl)"
    assert "add_fused_lm_head(" in inspect.getsource(SFTTrainer.__init__), (
        "trl's SFTTrainer.__init__ no longer calls add_fused_lm_head (compat.forward_replaced_by_trl)")
    assert "model._original_forward = model.forward" in inspect.getsource(Accelerator.prepare_model), (
        "accelerate's Accelerator.prepare_model no longer keeps model._original_forward (compat.forward_replaced_by_trl)")

    model = tiny_model()
    ids = random_ids(1, 8)
    with torch.no_grad():
        reference = model(ids, labels=ids).loss
    assert not compat.forward_replaced_by_trl(model)
    add_fused_lm_head(model)
    assert "forward" in vars(model) and compat.forward_replaced_by_trl(model), (
        "add_fused_lm_head no longer sets the instance's forward to a function of trl (compat.forward_replaced_by_trl)")
    model._original_forward, model.forward = model.forward, lambda *a, **k: None  # what accelerate's wrapper does
    assert compat.forward_replaced_by_trl(model)
    del model._original_forward
    compat.restore_class_forward(model)
    assert not compat.forward_replaced_by_trl(model)
    with torch.no_grad():
        assert torch.equal(model(ids, labels=ids).loss, reference)
