"""Trainer checkpoints that survive a crash and resume exactly.

transformers' Trainer writes checkpoints in place (this works for TRL's trainers too):

1. Checkpoints are not atomic. The Trainer's checkpoint save creates `<output_dir>/checkpoint-N`, then fills it step
   by step (weights, optimizer and scheduler, scaler, RNG state, trainer_state.json). A process killed in between
   (preemption, OOM killer, a full disk) leaves a `checkpoint-N` that `get_last_checkpoint` and
   `resume_from_checkpoint=True` take for the newest one; resuming from it fails or silently mixes states.

   Here the checkpoint is written under a staging directory and renamed into place once every file is on disk:

       <output_dir>/.checkpoint-N.tmp/checkpoint-N      written by transformers' own checkpoint save
       fsync every file and directory, then  rename(.checkpoint-N.tmp/checkpoint-N -> checkpoint-N)

   A rename within one file system is atomic, so readers (a resuming job, `get_last_checkpoint`, checkpoint
   rotation) see the old set of checkpoints or the new one, never a half-written directory. The staging directory
   starts with a dot on purpose: `trainer_utils.sort_checkpoints` (checkpoint rotation) globs `checkpoint-*` and
   reads the step with an unanchored regex, so a `checkpoint-N.tmp` would be counted, kept or deleted as a real
   checkpoint. A staging directory left by a crash is never read, and is removed when training starts again.
   With several processes, every rank writes into the same staging directory (FSDP / DeepSpeed shards) and the main
   process publishes it after a barrier. Checkpoint uploads with `push_to_hub` would read the staging path, which
   disappears after the rename: with push_to_hub, checkpoints are written in place (not atomic), with a warning.

Resuming exactly needs nothing more: the balancing state is the fp32 `e_score_correction_bias`, saved with the
weights, and the token counts are zero at every optimizer-step boundary, where checkpoints are taken. (The fused
experts read the per-expert keys that save_pretrained writes even through Trainer's bare load_state_dict.)

Use: `trainers.DeepseekTrainer` / `DeepseekSFTTrainer` write atomic checkpoints. For any other Trainer (any model):

    trainer = make_checkpoints_atomic(SFTTrainer(...))      # this instance
    class MyTrainer(AtomicCheckpointMixin, Trainer): ...    # or as a mixin

Trainer has no public hook around a checkpoint save; the two private touches this needs (overriding
Trainer._save_checkpoint, redirecting Trainer._get_output_dir) live in trainers/compat.py, tested by
tests/test_compat.py.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .compat import CheckpointSaveHook, checkpoint_run_dir, redirect_checkpoint_run_dir

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


class AtomicCheckpointMixin(CheckpointSaveHook):
    """Put before a Trainer class: `class MyTrainer(AtomicCheckpointMixin, Trainer)`. See the module docstring."""

    atomic_checkpoint_fsync: bool = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _setup_atomic(self)

    def around_checkpoint_save(self, save, trial) -> None:
        if getattr(self.args, "push_to_hub", False):  # uploads read the checkpoint after the save returns
            save()
        else:
            save_checkpoint_atomically(self, save, trial)


def save_checkpoint_atomically(trainer, save, trial) -> None:
    """Run `save()` (a Trainer's own checkpoint save) into the staging directory, then publish it by a rename."""
    run_dir = Path(checkpoint_run_dir(trainer, trial))
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

    try:
        with redirect_checkpoint_run_dir(trainer, staging):
            save()
    except BaseException:
        if args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        raise

    if distributed:
        trainer.accelerator.wait_for_everyone()
    if args.should_save:
        staged = staging / name
        if not staged.is_dir():
            raise RuntimeError(
                f"atomic checkpoints: transformers did not write the checkpoint to {staged}; its checkpoint save no "
                "longer derives the path from Trainer._get_output_dir (see trainers/compat.py)"
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


def make_checkpoints_atomic(trainer, fsync: bool = True):
    """Make `trainer` (any transformers / TRL Trainer instance) write its checkpoints atomically; returns it."""
    cls = type(trainer)
    if not isinstance(trainer, AtomicCheckpointMixin):
        trainer.__class__ = type(f"Atomic{cls.__name__}", (AtomicCheckpointMixin, cls), {"__module__": cls.__module__})
        _setup_atomic(trainer)
    trainer.atomic_checkpoint_fsync = fsync
    return trainer


def _setup_atomic(trainer) -> None:
    if not any(isinstance(cb, AtomicCheckpointCallback) for cb in trainer.callback_handler.callbacks):
        trainer.add_callback(AtomicCheckpointCallback())
    if getattr(trainer.args, "push_to_hub", False):
        warnings.warn("atomic checkpoints: with push_to_hub, checkpoints are written in place (not atomically), since "
                      "the uploads read them after the save returns", stacklevel=3)


__all__ = [
    "AtomicCheckpointMixin",
    "AtomicCheckpointCallback",
    "make_checkpoints_atomic",
    "publish",
    "remove_stale_staging_dirs",
    "save_checkpoint_atomically",
    "stale_staging_dirs",
    "staging_dir",
]
