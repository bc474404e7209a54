"""Trainer integration without glue: one callback that every transformers / TRL Trainer picks up.

`import modeling_deepseek` appends `DeepseekTrainerCallback` to transformers' default Trainer callbacks (once; it
does nothing for other models). It

- adds the parts of the training signal to the logs: `mtp_loss`, `balance_loss` (the sequence-wise term) and
  `maxvio` (MaxVio over the MoE layers), averaged over the forwards since the previous log, next to `loss`;
- applies the MTP loss-weight schedule of DeepSeek-V3 (config.mtp_loss_weight until mtp_late_fraction of max_steps,
  then config.mtp_loss_weight_late) at the start of every optimizer step;
- removes the staging directories that a crashed atomic checkpoint save left behind (trainers/checkpointing.py).

The aux-loss-free bias update needs no callback: it hangs on the optimizer step itself (modeling_deepseek.balancing).
"""

from __future__ import annotations

import os
import sys
import warnings

from transformers import TrainerCallback


def _deepseek_modules(model):
    """The Deepseek causal LMs inside `model` (which may be wrapped by PEFT, DDP or FSDP)."""
    if model is None:
        return []
    return [m for m in model.modules() if hasattr(m, "pop_train_metrics") and hasattr(m, "config")]


def _forward_replaced_by_trl(lm) -> bool:
    """Whether trl's SFTTrainer (`add_fused_lm_head`) replaced this instance's forward, so that
    DeepseekForCausalLM.forward, which adds the MTP and sequence-balance losses, no longer computes the loss.
    Wrappers such as accelerate's mixed-precision forward keep the replaced one in `__wrapped__` / `_original_forward`."""
    trl = sys.modules.get("trl")
    if trl is None:
        return False
    trl_dir = os.path.dirname(trl.__file__) + os.sep
    for fn in (vars(lm).get("forward"), vars(lm).get("_original_forward")):
        for _ in range(8):  # follow the wrapper chain
            fn = getattr(fn, "__func__", fn)
            if fn is None:
                break
            code = getattr(fn, "__code__", None)
            if code is not None and code.co_filename.startswith(trl_dir):
                return True
            fn = getattr(fn, "__wrapped__", None)
    return False


class DeepseekTrainerCallback(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        lms = _deepseek_modules(model)
        # Staging directories of a save that crashed (atomic checkpoints, trainers/checkpointing.py) are never read.
        if lms and args.should_save and args.output_dir:
            from .checkpointing import remove_stale_staging_dirs

            remove_stale_staging_dirs(args.output_dir)
        for lm in lms:
            cfg = lm.config
            if _forward_replaced_by_trl(lm) and (cfg.num_nextn_predict_layers > 0 or cfg.seq_balance_alpha > 0):
                warnings.warn(
                    "the model's forward was replaced (trl's SFTTrainer scores the main next-token loss with its own "
                    "fused LM head), so only that loss trains: the MTP loss (num_nextn_predict_layers="
                    f"{cfg.num_nextn_predict_layers}) and the sequence-balance loss (seq_balance_alpha="
                    f"{cfg.seq_balance_alpha}) are skipped. Use trainers.DeepseekSFTTrainer for the full objective.",
                    stacklevel=2,
                )

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        for lm in _deepseek_modules(model):
            cfg = lm.config
            if getattr(cfg, "mtp_loss_weight_late", None) is None or not state.max_steps:
                continue
            late = state.global_step >= cfg.mtp_late_fraction * state.max_steps
            if late and not getattr(lm, "_mtp_weight_early", None):
                lm._mtp_weight_early = cfg.mtp_loss_weight
                cfg.mtp_loss_weight = cfg.mtp_loss_weight_late
            elif not late and getattr(lm, "_mtp_weight_early", None) is not None:
                cfg.mtp_loss_weight = lm._mtp_weight_early
                lm._mtp_weight_early = None

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        metrics = {}
        for lm in _deepseek_modules(model):
            metrics.update(lm.pop_train_metrics())
            if getattr(lm.config, "mtp_loss_weight_late", None) is not None:
                metrics["mtp_loss_weight"] = lm.config.mtp_loss_weight
        if not metrics:
            return
        logs.update(metrics)
        # Trainer.log appended a copy of `logs` to log_history before calling us: keep the history complete too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)


def register_default_callback() -> None:
    """Make every Trainer created from now on carry DeepseekTrainerCallback (idempotent)."""
    from transformers import trainer

    if not any(cb is DeepseekTrainerCallback or getattr(cb, "__name__", "") == "DeepseekTrainerCallback"
               for cb in trainer.DEFAULT_CALLBACKS):
        trainer.DEFAULT_CALLBACKS.append(DeepseekTrainerCallback)
