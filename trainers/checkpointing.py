"""Trainer checkpoints that survive a crash and resume exactly.

transformers 5.23's Trainer writes checkpoints in place (this works for TRL's trainers too):

1. Checkpoints are not atomic. `Trainer._save_checkpoint` creates `<output_dir>/checkpoint-N`, then fills it step by
   step (weights, optimizer and scheduler, scaler, RNG state, trainer_state.json). A process killed in between
   (preemption, OOM killer, a full disk) leaves a `checkpoint-N` that `get_last_checkpoint` and
   `resume_from_checkpoint=True` take for the newest one; resuming from it fails or silently mixes states.

   Here the checkpoint is written under a staging directory and renamed into place once every file is on disk:

       <output_dir>/.checkpoint-N.tmp/checkpoint-N      written by transformers' own _save_checkpoint
       fsync every file and directory, then  rename(.checkpoint-N.tmp/checkpoint-N -> checkpoint-N)

   A rename within one file system is atomic, so readers (a resuming job, `get_last_checkpoint`, checkpoint
   rotation) see the old set of checkpoints or the new one, never a half-written directory. The staging directory
   starts with a dot on purpose: `trainer_utils.sort_checkpoints` (checkpoint rotation) globs `checkpoint-*` and
   reads the step with an unanchored regex, so a `checkpoint-N.tmp` would be counted, kept or deleted as a real
   checkpoint. A staging directory left by a crash is never read, and is removed when training starts again.
   With several processes, every rank writes into the same staging directory (FSDP / DeepSpeed shards) and the main
   process publishes it after a barrier. Checkpoint uploads with `push_to_hub` would read the staging path, which
   disappears after the rename: with push_to_hub the default integration writes in place, and make_checkpoints_atomic
   warns.

Resuming exactly needs nothing more: the balancing state is the fp32 `e_score_correction_bias`, saved with the
weights, and the token counts are zero at every optimizer-step boundary, where checkpoints are taken. (The fused
experts read the per-expert keys that save_pretrained writes even through Trainer's bare load_state_dict.)

Use: nothing. `import modeling_deepseek` installs this for every Trainer (TRL's included) whose model is a DeepSeek
model (`install_default_atomic_checkpoints`); other models' checkpoints are left to transformers. For any model:

    trainer = make_checkpoints_atomic(SFTTrainer(...))      # patches this instance
    class MyTrainer(AtomicCheckpointMixin, Trainer): ...    # or as a mixin
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

STAGING_PREFIX = "."
STAGING_SUFFIX = ".tmp"


def staging_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of `step` is written before it is published: <run_dir>/.checkpoint-<step>.tmp"""
    return Path(run_dir) / f"{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-{step}{STAGING_SUFFIX}"


def stale_staging_dirs(run_dir: str | os.PathLike) -> list[Path]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.glob(f"{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-*{STAGING_SUFFIX}") if p.is_dir())


def remove_stale_staging_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the staging directories an interrupted save left behind; returns what was removed."""
    removed = stale_staging_dirs(run_dir)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root` to disk, so that the rename publishes durable data."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(staged: Path, final: Path, fsync: bool = True) -> None:
    """Move the finished checkpoint `staged` to `final` with a rename (replacing an older `final`, if any)."""
    if fsync:
        _fsync_tree(staged)
    if final.exists():  # the same step saved twice (e.g. a JIT checkpoint): swap, never expose a partial directory
        old = final.parent / f"{STAGING_PREFIX}{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staged, final)
    if fsync:
        _fsync_dir(final.parent)


class AtomicCheckpointMixin:
    """Put before a Trainer class: `class MyTrainer(AtomicCheckpointMixin, Trainer)`. See the module docstring."""

    atomic_checkpoint_fsync: bool = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not any(isinstance(cb, AtomicCheckpointCallback) for cb in self.callback_handler.callbacks):
            self.add_callback(AtomicCheckpointCallback())

    def _save_checkpoint(self, model, trial):
        def save():
            super(AtomicCheckpointMixin, self)._save_checkpoint(model, trial)

        save_checkpoint_atomically(self, save, trial)


def save_checkpoint_atomically(trainer, save, trial) -> None:
    """Run `save()` (a Trainer's own _save_checkpoint) into the staging directory, then publish it by a rename."""
    run_dir = Path(trainer._get_output_dir(trial=trial))
    name = f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
    final = run_dir / name
    staging = staging_dir(run_dir, trainer.state.global_step)
    args = trainer.args
    distributed = args.world_size > 1

    if args.should_save:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    if distributed:
        trainer.accelerator.wait_for_everyone()

    # transformers builds the checkpoint path as os.path.join(self._get_output_dir(trial), "checkpoint-N"):
    # point that run directory at the staging area for the duration of the call.
    trainer._get_output_dir = lambda trial=None: str(staging)
    try:
        save()
    except BaseException:
        if args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        del trainer._get_output_dir

    if distributed:
        trainer.accelerator.wait_for_everyone()
    if args.should_save:
        staged = staging / name
        if not staged.is_dir():
            raise RuntimeError(
                f"atomic checkpoints: transformers did not write the checkpoint to {staged}; its "
                "_save_checkpoint no longer derives the path from _get_output_dir"
            )
        publish(staged, final, fsync=getattr(trainer, "atomic_checkpoint_fsync", True))
        shutil.rmtree(staging, ignore_errors=True)
        best = trainer.state.best_model_checkpoint
        if best is not None and Path(best).parent == staging:
            trainer.state.best_model_checkpoint = str(run_dir / Path(best).name)
        # transformers rotated inside the staging area (a no-op); rotate among the published checkpoints.
        rotate_checkpoints(
            output_dir=str(run_dir),
            save_total_limit=args.save_total_limit,
            best_model_checkpoint=trainer.state.best_model_checkpoint,
            use_mtime=True,
        )
    if distributed:
        trainer.accelerator.wait_for_everyone()


class AtomicCheckpointCallback(TrainerCallback):
    """Removes the staging directories a crashed save left in output_dir when training starts (main process)."""

    def on_train_begin(self, args, state, control, **kwargs):
        if args.should_save and args.output_dir:
            remove_stale_staging_dirs(args.output_dir)


def install_default_atomic_checkpoints() -> None:
    """Make every Trainer (TRL's too) that trains a DeepSeek model write atomic checkpoints (idempotent).

    Called by `import modeling_deepseek`. transformers' Trainer._save_checkpoint is wrapped once; the wrapper stages
    and publishes the checkpoint when the trainer's model is a DeepSeek model (also under PEFT, or loaded as remote
    code) and otherwise calls transformers' code unchanged. `trainer.atomic_checkpoints = False` opts a trainer out;
    with `push_to_hub` the checkpoint is written in place (uploads read it after the save returns).
    """
    from transformers import Trainer

    original = Trainer._save_checkpoint
    if getattr(original, "_deepseek_atomic_default", False):
        return

    @functools.wraps(original)
    def _save_checkpoint(self, model, trial):
        if (isinstance(self, AtomicCheckpointMixin) or not getattr(self, "atomic_checkpoints", True)
                or getattr(self.args, "push_to_hub", False) or not trains_deepseek(self.model)):
            return original(self, model, trial)
        save_checkpoint_atomically(self, lambda: original(self, model, trial), trial)

    _save_checkpoint._deepseek_atomic_default = True
    Trainer._save_checkpoint = _save_checkpoint


def trains_deepseek(model) -> bool:
    """Whether `model` (maybe wrapped by PEFT) is a DeepSeek model of this package: config.model_type "deepseek"."""
    return getattr(getattr(model, "config", None), "model_type", None) == "deepseek"


def make_checkpoints_atomic(trainer, fsync: bool = True):
    """Make `trainer` (any transformers / TRL Trainer instance) write its checkpoints atomically; returns it."""
    return _patch(trainer, AtomicCheckpointMixin, fsync)


def _patch(trainer, mixin, fsync: bool):
    cls = type(trainer)
    if not isinstance(trainer, mixin):
        trainer.__class__ = type(f"{mixin.__name__.removesuffix('Mixin')}{cls.__name__}", (mixin, cls),
                                 {"__module__": cls.__module__})
    trainer.atomic_checkpoint_fsync = fsync
    if not any(isinstance(cb, AtomicCheckpointCallback) for cb in trainer.callback_handler.callbacks):
        trainer.add_callback(AtomicCheckpointCallback())
    if getattr(trainer.args, "push_to_hub", False):
        warnings.warn("atomic checkpoints: checkpoint uploads with push_to_hub read the staging directory, which "
                      "is renamed away after the save; push the final model instead", stacklevel=3)
    return trainer


__all__ = [
    "AtomicCheckpointMixin",
    "AtomicCheckpointCallback",
    "install_default_atomic_checkpoints",
    "make_checkpoints_atomic",
    "publish",
    "remove_stale_staging_dirs",
    "save_checkpoint_atomically",
    "stale_staging_dirs",
    "staging_dir",
    "trains_deepseek",
]
