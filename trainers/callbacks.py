"""Trainer integration in one callback: `Trainer(..., callbacks=[DeepseekTrainerCallback()])`.

Works with transformers' Trainer and TRL's trainers (trainers.DeepseekTrainer / DeepseekSFTTrainer add it
themselves). It does nothing for models without a DeepSeek causal LM inside, so it is safe in any trainer. It

- adds the parts of the training signal to the train logs: `lm_loss` (the main next-token CE, comparable with any
  other causal LM), `mtp_loss`, `balance_loss` (the sequence-wise term) and `maxvio` (MaxVio over the MoE layers),
  averaged over the forwards since the previous log, next to `loss` (the total objective that is trained);
- adds `eval_lm_loss`, `eval_mtp_loss` and `eval_perplexity` = exp(eval_lm_loss) to every evaluation's metrics
  (`eval_loss` is the total objective, CE + mtp_loss_weight * MTP, not comparable across models), so they land in
  the dict `trainer.evaluate()` returns, in `state.log_history` and in every reporting integration;
- applies the MTP loss-weight schedule of DeepSeek-V3 (config.mtp_loss_weight until mtp_late_fraction of max_steps,
  then config.mtp_loss_weight_late) at the start of every optimizer step;
- warns when trl's SFTTrainer replaced the model's forward (its fused LM head trains the main CE only).

With several processes (DDP / FSDP), each rank averages over its own forwards and the callback then averages over the
ranks (an all-reduce in on_log, which Trainer calls on every process at the same points), like Trainer's own loss.

How the eval numbers get in: Trainer.evaluate() runs the evaluation loop, then `self.log(metrics)`, which appends a
copy of `metrics` to state.log_history and calls on_log with the `metrics` dict itself; on_evaluate comes after.
on_log therefore updates the dict in place (what evaluate() returns and best-model selection read) and the history
entry just appended.

The aux-loss-free bias update needs no callback: it hangs on the optimizer step itself (modeling_deepseek.balancing).
"""

from __future__ import annotations

import math
import warnings

import torch
from transformers import TrainerCallback

from .compat import forward_replaced_by_trl


def deepseek_modules(model):
    """The Deepseek causal LMs inside `model` (which may be wrapped by PEFT, DDP or FSDP)."""
    if model is None:
        return []
    return [m for m in model.modules() if hasattr(m, "pop_train_metrics") and hasattr(m, "config")]


def _eval_prefix(logs: dict) -> str | None:
    """The metric prefix of an evaluation's logs ("eval", or "eval_<name>" for a dict of eval sets), from the speed
    metric Trainer.evaluate always adds (`<prefix>_runtime`); None for train logs (the end of training logs
    `train_runtime` and `train_loss`)."""
    for key in logs:
        prefix = key.removesuffix("_runtime")
        if prefix != key and prefix != "train" and f"{prefix}_loss" in logs:
            return prefix
    return None


def _mean_over_processes(metrics: dict, args) -> dict:
    """The mean of each metric over the data-parallel processes (every process computes the same keys)."""
    if not metrics or args.world_size <= 1 or not (torch.distributed.is_available()
                                                     and torch.distributed.is_initialized()):
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=args.device)
    torch.distributed.all_reduce(values)
    return dict(zip(keys, (values / args.world_size).tolist()))


def _add_to_log(state, logs: dict, metrics: dict) -> None:
    logs.update(metrics)
    # Trainer.log appended a copy of `logs` to log_history before calling on_log: keep the history complete too.
    if state.log_history and state.log_history[-1].get("step") == state.global_step:
        state.log_history[-1].update(metrics)


class DeepseekTrainerCallback(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for lm in deepseek_modules(model):
            lm.pop_eval_metrics()  # eval-mode forwards outside the Trainer (a manual eval) are not this run's
            cfg = lm.config
            if forward_replaced_by_trl(lm) and (cfg.num_nextn_predict_layers > 0 or cfg.seq_balance_alpha > 0):
                warnings.warn(
                    "the model's forward was replaced (trl's SFTTrainer scores the main next-token loss with its own "
                    "fused LM head), so only that loss trains: the MTP loss (num_nextn_predict_layers="
                    f"{cfg.num_nextn_predict_layers}) and the sequence-balance loss (seq_balance_alpha="
                    f"{cfg.seq_balance_alpha}) are skipped. Use trainers.DeepseekSFTTrainer for the full objective.",
                    stacklevel=2,
                )

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        for lm in deepseek_modules(model):
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
        lms = deepseek_modules(model)
        if logs is None or not lms:  # (the same on every process, as the all-reduce below requires)
            return
        prefix = _eval_prefix(logs)
        metrics = {}
        if prefix is not None:
            for lm in lms:
                metrics.update({f"{prefix}_{k}": v for k, v in lm.pop_eval_metrics().items()})
            metrics = _mean_over_processes(metrics, args)
            if f"{prefix}_lm_loss" in metrics:
                lm_loss = metrics[f"{prefix}_lm_loss"]
                metrics[f"{prefix}_perplexity"] = math.exp(lm_loss) if lm_loss < 700 else math.inf
        elif "loss" in logs:
            for lm in lms:
                metrics.update(lm.pop_train_metrics())
                if getattr(lm.config, "mtp_loss_weight_late", None) is not None:
                    metrics["mtp_loss_weight"] = lm.config.mtp_loss_weight
            metrics = _mean_over_processes(metrics, args)
        if metrics:
            _add_to_log(state, logs, metrics)
