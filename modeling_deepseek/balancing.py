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
  reference-model forwards never count, nor do the routers of a frozen main model (`router.bias_frozen`, set by
  trainers/indexer_training.py for DeepSeek-V3.2's dense warm-up, where only the indexers train);
- `update_balancing_bias(model)` applies the sign rule and resets the counts. It runs automatically from a global
  torch optimizer step pre-hook, once per real optimizer step, for every tracked model that owns parameters of
  that optimizer. This covers a plain PyTorch loop, transformers' Trainer, TRL and accelerate without extra code,
  and gradient accumulation (counts sum over micro-batches, the hook fires once per step). When the step is
  skipped (fp16 overflow), the counts simply carry over to the next one.
- With torch.distributed initialised, the counts of all routers are all-reduced in one call before the update, so
  every rank applies the identical update and the biases never drift apart. Every rank joins that call at every
  optimizer step, whatever its own forwards counted (an all-reduce that some ranks skip would hang the others), over
  the data-parallel group: `set_balancing_group(model, group)`, by default the whole world. Ranks that see the same
  tokens (tensor-parallel peers) only scale every count alike, which the sign rule ignores.
- An optimizer that is not a torch Optimizer, or whose parameters are not the model's (DeepSpeed ZeRO, FSDP1
  without use_orig_params), never fires the hook: after `STALE_FORWARDS` training forwards without an update the
  model warns once, naming the fix (call `update_balancing_bias(model)` after each optimizer step).

torchtitan and Megatron place the update at the same point (before the optimizer step, after gradients are final).
"""

from __future__ import annotations

import warnings
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


# track and record_loads run eagerly under torch.compile (a graph break in a compiled training forward): they register
# an optimizer hook and count forwards in Python ints, which a traced graph would have to guard on, step after step.
@torch.compiler.disable
def track(model: nn.Module) -> None:
    """Make `model`'s biases follow every optimizer step that updates its parameters."""
    global _hook_handle
    _tracked_models.add(model)
    if _hook_handle is None:
        _hook_handle = register_optimizer_step_pre_hook(_before_optimizer_step)


STALE_FORWARDS = 1024  # training forwards without a bias update before the model warns (far above any accumulation)


def set_balancing_group(model: nn.Module, group) -> None:
    """All-reduce the expert counts of `model` over `group` (a torch.distributed process group: the data-parallel
    ranks) instead of the whole world."""
    model.balancing_group = group


@torch.compiler.disable
def record_loads(moe_layers: list[nn.Module], config) -> None:
    """Add the counts the MoE layers just produced to their routers' pending counts (training forwards only)."""
    if not (torch.is_grad_enabled() and bias_update_enabled(config)):
        return
    for moe in moe_layers:
        if (moe.training and moe.last_load_E is not None and moe.gate.e_score_correction_bias is not None
                and not getattr(moe.gate, "bias_frozen", False)):
            gate = moe.gate
            gate.pending_load.add_(moe.last_load_E.to(gate.pending_load.device))
            gate.has_pending_load = True
            gate.forwards_since_update += 1
            if gate.forwards_since_update == STALE_FORWARDS:
                warnings.warn(
                    f"the aux-loss-free balancing bias has not moved for {STALE_FORWARDS} training forwards: no torch "
                    "optimizer step reached this model's parameters (DeepSpeed ZeRO, FSDP1 without "
                    "use_orig_params=True, or an optimizer that is not a torch.optim.Optimizer). Call "
                    "modeling_deepseek.update_balancing_bias(model) after each optimizer step.", stacklevel=3)


def _world_size(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def update_balancing_bias(model: nn.Module) -> None:
    """Apply b_i += gamma * sign(mean_load - load_i) to every router of `model` and reset the counts.

    Call it yourself only if no torch optimizer step reaches the model (see the module docstring); otherwise the
    optimizer hook already does. In a distributed run every rank must call it, at the same steps.
    """
    routers = balancing_routers(model)
    group = getattr(model, "balancing_group", None)
    distributed = _world_size(group) > 1
    if not routers or not (distributed or any(r.has_pending_load for r in routers)):
        return
    gamma = model.config.bias_update_speed
    loads_LE = torch.stack([r.pending_load for r in routers])
    if distributed:
        dist.all_reduce(loads_LE, group=group)  # every rank applies the update of the global batch
    for router, load_E in zip(routers, loads_LE):
        # A router that no rank used since the last step (an MTP block skipped) has all-zero counts: sign 0, no change.
        router.e_score_correction_bias.add_(gamma * torch.sign(load_E.mean() - load_E))
        router.pending_load.zero_()
        router.has_pending_load = False
        router.forwards_since_update = 0


def _owns(optimizer: torch.optim.Optimizer, model: nn.Module) -> bool:
    ids = _optimizer_param_ids.get(optimizer)
    n_params = sum(len(g["params"]) for g in optimizer.param_groups)
    if ids is None or len(ids) != n_params:
        ids = frozenset(id(p) for g in optimizer.param_groups for p in g["params"])
        _optimizer_param_ids[optimizer] = ids
    return any(id(p) in ids for p in model.parameters())


def _before_optimizer_step(optimizer, args, kwargs) -> None:
    for model in list(_tracked_models):
        routers = balancing_routers(model)
        # In a distributed run the update is collective: join it whether or not this rank counted anything.
        active = _world_size(getattr(model, "balancing_group", None)) > 1 or any(r.has_pending_load for r in routers)
        if routers and active and _owns(optimizer, model):
            update_balancing_bias(model)
