"""Auxiliary-loss-free load balancing (DeepSeek-V3 section 2.1.2), kept outside the model's forward.

Each router of the V3 kind carries `e_score_correction_bias` b (fp32). It is added to the affinities for *selection
only*. After every optimizer step,

    b_i += gamma * sign(mean_load - load_i)

where load_i counts the tokens routed to expert i by the training forwards since the previous step: overloaded
experts become less attractive, idle ones more. No gradient, no loss term, so nothing interferes with the LM loss.

How the counts travel:
- a MoE layer leaves its per-forward counts on itself (`last_load_E`);
- the model's forward (never re-run by gradient checkpointing, unlike a layer) adds them to each router's
  `pending_load` buffer, and only for training forwards with gradients on: eval, `torch.no_grad()` generation and
  reference-model forwards never count;
- `update_balancing_bias(model)` applies the sign rule and resets the counts. It runs automatically from a global
  torch optimizer step pre-hook, once per real optimizer step, for every tracked model that owns parameters of
  that optimizer. This covers a plain PyTorch loop, transformers' Trainer, TRL and accelerate without extra code,
  and gradient accumulation (counts sum over micro-batches, the hook fires once per step). When the step is
  skipped (fp16 overflow), the counts simply carry over to the next one.
- With torch.distributed initialised, the counts of all routers are all-reduced in one call before the update, so
  every rank applies the identical update and the biases never drift apart.

torchtitan and Megatron place the update at the same point (before the optimizer step, after gradients are final).
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

_tracked_models: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_optimizer_param_ids: "weakref.WeakKeyDictionary[torch.optim.Optimizer, frozenset[int]]" = weakref.WeakKeyDictionary()
_hook_handle = None


def balancing_routers(model: nn.Module) -> list[nn.Module]:
    """Routers that carry a balancing bias (V3-style, topk_method='noaux_tc'), in layer order."""
    return [m for m in model.modules() if getattr(m, "e_score_correction_bias", None) is not None]


def bias_update_enabled(config) -> bool:
    return bool(config.use_bias_update) and config.bias_update_speed > 0 and config.topk_method == "noaux_tc"


def track(model: nn.Module) -> None:
    """Make `model`'s biases follow every optimizer step that updates its parameters."""
    global _hook_handle
    _tracked_models.add(model)
    if _hook_handle is None:
        _hook_handle = register_optimizer_step_pre_hook(_before_optimizer_step)


def record_loads(moe_layers: list[nn.Module], config) -> None:
    """Add the counts the MoE layers just produced to their routers' pending counts (training forwards only)."""
    if not (torch.is_grad_enabled() and bias_update_enabled(config)):
        return
    for moe in moe_layers:
        if moe.training and moe.last_load_E is not None and moe.gate.e_score_correction_bias is not None:
            moe.gate.pending_load.add_(moe.last_load_E.to(moe.gate.pending_load.device))
            moe.gate.has_pending_load = True


@torch.no_grad()
def update_balancing_bias(model: nn.Module) -> None:
    """Apply b_i += gamma * sign(mean_load - load_i) to every router of `model` and reset the counts.

    Call it yourself only if you drive the bias by hand (e.g. with `config.use_bias_update` and a custom optimizer
    wrapper that is not a torch Optimizer); otherwise the optimizer hook already does.
    """
    routers = [r for r in balancing_routers(model) if r.has_pending_load]
    if not routers:
        return
    gamma = model.config.bias_update_speed
    loads_LE = torch.stack([r.pending_load for r in routers])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(loads_LE)  # every rank applies the update of the global batch
    for router, load_E in zip(routers, loads_LE):
        router.e_score_correction_bias.add_(gamma * torch.sign(load_E.mean() - load_E))
        router.pending_load.zero_()
        router.has_pending_load = False


def max_violation(load_LE: torch.Tensor) -> torch.Tensor:
    """MaxVio per layer: max_i load_i / mean load - 1 (0 is perfect balance)."""
    return load_LE.amax(dim=-1) / load_LE.mean(dim=-1).clamp_min(1e-9) - 1


def _owns(optimizer: torch.optim.Optimizer, model: nn.Module) -> bool:
    ids = _optimizer_param_ids.get(optimizer)
    n_params = sum(len(g["params"]) for g in optimizer.param_groups)
    if ids is None or len(ids) != n_params:
        ids = frozenset(id(p) for g in optimizer.param_groups for p in g["params"])
        _optimizer_param_ids[optimizer] = ids
    return any(id(p) in ids for p in model.parameters())


def _before_optimizer_step(optimizer, args, kwargs) -> None:
    for model in list(_tracked_models):
        if any(r.has_pending_load for r in balancing_routers(model)) and _owns(optimizer, model):
            update_balancing_bias(model)
