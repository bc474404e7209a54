"""Trainer integration in one callback: `Trainer(..., callbacks=[DeepseekTrainerCallback()])`.

Works with transformers' Trainer and TRL's trainers (trainers.DeepseekTrainer / DeepseekSFTTrainer add it
themselves). It does nothing for models without a DeepSeek causal LM inside, so it is safe in any trainer. It

- adds the parts of the training signal to the train logs: `lm_loss` (the main next-token CE, comparable with any
  other causal LM), `mtp_loss`, `balance_loss` (the sequence-wise term), `maxvio` (MaxVio over the MoE layers) and,
  while a DeepSeek-V3.2 indexer trains (trainers/indexer_training.py), `indexer_loss`, averaged over the forwards
  since the previous log, next to `loss` (the total objective that is trained);
- adds `eval_lm_loss`, `eval_mtp_loss` and `eval_perplexity` = exp(eval_lm_loss) to every evaluation's metrics
  (`eval_loss` is the total objective, CE + mtp_loss_weight * MTP, not comparable across models), so they land in
  the dict `trainer.evaluate()` returns, in `state.log_history` and in every reporting integration;
- applies the MTP loss-weight schedule of DeepSeek-V3 (config.mtp_loss_weight until mtp_late_fraction of max_steps,
  then config.mtp_loss_weight_late) at the start of every optimizer step, through the model's
  `scheduled_mtp_loss_weight`: the config, and so every saved config.json, keeps the weights the user set;
- warns when trl's SFTTrainer replaced the model's forward (its fused LM head trains the main CE only).

How the parts are collected: a forward hook on each DeepSeek causal LM (registered when the Trainer is built, or at
the latest when training begins) reads every forward's output, whose parts modeling_deepseek/objective.py computed.
Training forwards (training mode, gradients on) add to the train means. An eval-mode forward is held until
Trainer's `on_prediction_step` confirms it was an evaluation batch, so forwards of one's own between evaluations
never count. With gradient accumulation the model's loss is a share of the step's; the logged parts are each
forward's own means (objective.step_fraction).

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
import weakref

import torch
from transformers import TrainerCallback

from modeling_deepseek.objective import shifted_labels, step_fraction

from .compat import forward_replaced_by_trl


def deepseek_modules(model):
    """The Deepseek causal LMs inside `model` (which may be wrapped by PEFT, DDP or FSDP). Recognised by what the
    callback uses rather than by class: a model loaded as remote code has a class of its own."""
    if model is None:
        return []
    return [m for m in model.modules() if hasattr(m, "scheduled_mtp_loss_weight") and hasattr(m, "config")]


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


def forward_parts(output, kwargs: dict, split: str) -> dict:
    """The parts of one forward's objective to log, as this forward's own means: the output's main_loss is its
    share of the optimizer step under gradient accumulation (`num_items_in_batch`), so it is scaled back."""
    targets_BT = shifted_labels(kwargs.get("labels"), kwargs.get("shift_labels"))
    lm_loss = output.main_loss / step_fraction(targets_BT, kwargs.get("num_items_in_batch"))
    if split == "eval":
        return {"lm_loss": lm_loss, "mtp_loss": output.mtp_loss}
    return {"lm_loss": lm_loss, "mtp_loss": output.mtp_loss, "balance_loss": output.balance_loss,
            "maxvio": output.max_violation, "indexer_loss": getattr(output, "indexer_loss", None)}


class ForwardMetrics:
    """Means of the objective's parts over the forwards of the models it watches, per split ("train", "eval")."""

    def __init__(self):
        self._sums: dict[str, dict] = {"train": {}, "eval": {}}
        self._unconfirmed_eval: dict = {}
        self._watched: weakref.WeakSet = weakref.WeakSet()

    def watch(self, lm) -> None:
        if lm not in self._watched:
            self._watched.add(lm)
            lm.register_forward_hook(_RecordingHook(self), with_kwargs=True)

    def record(self, lm, kwargs: dict, output) -> None:
        has_loss = getattr(output, "main_loss", None) is not None  # (labels given, and not a return_dict=False tuple)
        if not lm.training:
            self._unconfirmed_eval = forward_parts(output, kwargs, "eval") if has_loss else {}
        elif has_loss and torch.is_grad_enabled():  # (not a no-grad forward in training mode: a reference model's)
            self._add("train", forward_parts(output, kwargs, "train"))

    def confirm_eval(self) -> None:
        """The last eval-mode forward was an evaluation batch: count it."""
        self._add("eval", self._unconfirmed_eval)
        self._unconfirmed_eval = {}

    def pop(self, split: str) -> dict[str, float]:
        """The means since the last pop, and a fresh start."""
        sums, self._sums[split] = self._sums[split], {}
        return {name: float(total) / count for name, (total, count) in sums.items()}

    def _add(self, split: str, values: dict) -> None:
        sums = self._sums[split]
        for name, value in values.items():
            if value is not None:  # detached device tensors: no host sync per step
                total, count = sums.get(name, (0.0, 0))
                sums[name] = (total + value.detach().float(), count + 1)


class _RecordingHook:
    """The forward hook of ForwardMetrics. It holds the metrics weakly, so that a finished Trainer's callback is not
    kept alive by the model it trained, and a copied or pickled model (a reference model) records nothing."""

    def __init__(self, metrics: ForwardMetrics | None = None):
        self._metrics = None if metrics is None else weakref.ref(metrics)

    def __call__(self, module, args, kwargs, output) -> None:
        metrics = None if self._metrics is None else self._metrics()
        if metrics is not None:
            metrics.record(module, kwargs, output)

    def __reduce__(self):
        return _RecordingHook, ()


class DeepseekTrainerCallback(TrainerCallback):
    def __init__(self):
        self.metrics = ForwardMetrics()

    def watch(self, model) -> None:
        """Record the forwards of the DeepSeek causal LMs inside `model` (Trainer's own events call it; a trainer
        that adds this callback after it was built calls it itself, before anything runs)."""
        for lm in deepseek_modules(model):
            self.metrics.watch(lm)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self.watch(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.watch(model)
        self.metrics.pop("train")  # training-mode forwards of one's own before train() are not this run's
        for lm in deepseek_modules(model):
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
            if getattr(cfg, "mtp_loss_weight_late", None) is not None and state.max_steps:
                late = state.global_step >= cfg.mtp_late_fraction * state.max_steps
                lm.scheduled_mtp_loss_weight = cfg.mtp_loss_weight_late if late else cfg.mtp_loss_weight

    def on_prediction_step(self, args, state, control, **kwargs):
        self.metrics.confirm_eval()

    def on_predict(self, args, state, control, **kwargs):
        self.metrics.pop("eval")  # predict() logs nothing: its forwards must not reach the next evaluation's numbers

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        lms = deepseek_modules(model)
        if logs is None or not lms:  # (the same on every process, as the all-reduce below requires)
            return
        prefix = _eval_prefix(logs)
        metrics = {}
        if prefix is not None:
            metrics = _mean_over_processes({f"{prefix}_{k}": v for k, v in self.metrics.pop("eval").items()}, args)
            if f"{prefix}_lm_loss" in metrics:
                lm_loss = metrics[f"{prefix}_lm_loss"]
                metrics[f"{prefix}_perplexity"] = math.exp(lm_loss) if lm_loss < 700 else math.inf
        elif "loss" in logs:
            metrics = self.metrics.pop("train")
            for lm in lms:
                if lm.scheduled_mtp_loss_weight is not None:
                    metrics["mtp_loss_weight"] = lm.scheduled_mtp_loss_weight
            metrics = _mean_over_processes(metrics, args)
        if metrics:
            _add_to_log(state, logs, metrics)
