"""ZeRO-1 under the pipeline: each pipeline rank's optimizer state sharded over its data-parallel replicas.

    runner = PipelineRunner(model, "dualpipev", 8, pipeline_mesh(pp_size=2))     # world 4: pp 2 x dp 2
    optimizer = pipeline_optimizer(runner, zero1=True, lr=1e-3)                  # AdamW, state split over "dp"
    runner.train_step(ids, labels_BT=ids); runner.clip_grad_norm_(1.0); optimizer.step(); optimizer.zero_grad()

DeepSeek-V3 trained with ZeRO-1 data parallelism: weights and gradients whole on every replica, the optimizer state
(V3: fp32 master weights and bf16 AdamW moments, 8 B a parameter, more than the bf16 weights themselves) split over the
replicas. The sharding is torch's own ZeroRedundancyOptimizer: each replica steps its part of the parameters with a
local optimizer and broadcasts the updated part to the others. Nothing else of the runner changes: the gradients are
summed over "dp" in full before the step (train_step), so the global norm clip (clip_grad_norm_) and the aux-loss-free
bias update (balancing.py's optimizer pre-hook, which all-reduces the expert counts over "dp") see what they see
without ZeRO-1, and the parameters each replica ends the step with are bit-identical to an unsharded AdamW's (the
same per-element update, run once and copied).

Which group each parameter's state shards over. A parameter replicated over the data-parallel ranks of its pipeline
rank (every one but the routed experts under expert parallelism) shards over that group (`runner.dp_group`). Under
expert parallelism on the runner's (ep, pp) mesh, each ep rank's expert shard exists on that rank only: its state is
already 1/ep of the experts' and has no replica to shard over, so a plain optimizer of the same class steps it. With
ep below the replica count (`pipeline_mesh(pp, expert_parallel=True, ep_size=...)`, V3's EP64 inside DP128) each
expert shard sits on the dp / ep ranks of its "dp_replicate" group, and its state shards over those. The two are
stepped as one `ShardedOptimizer` (what an LR scheduler and the trainer take). Each optimizer step fires
torch's optimizer hooks once per inner optimizer: the first one applies the balancing update and resets the counts,
the later ones find every count zero (sign 0, no change), and every rank of the group makes the same calls, so the
collective inside stays matched.

Checkpoints. `optimizer_shard_state` is this rank's part only (the ZeroRedundancyOptimizer's state_dict format, global
parameter indices, holding this rank's entries); `load_optimizer_shard_state` restores it into an optimizer built the
same way on the same rank: the partition depends only on the parameters' order and sizes, so resume is bit-exact.
"""

from __future__ import annotations

import sys

import torch

from .compat import zero_local_optimizer

_ZERO_MODULE = "torch.distributed.optim.zero_redundancy_optimizer"


def _zero_class():
    # Imported when ZeRO-1 is asked for, not with this module: torch.distributed.optim scripts its functional
    # optimizers with torch.jit at import, dozens of deprecation warnings for every run that never shards.
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer


def _is_zero(optimizer) -> bool:
    """Whether `optimizer` is a ZeroRedundancyOptimizer (none can exist before its module is imported)."""
    module = sys.modules.get(_ZERO_MODULE)
    return module is not None and isinstance(optimizer, module.ZeroRedundancyOptimizer)


class ShardedOptimizer(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, stepped, zeroed, scheduled and saved as one.

    Optimizer.__init__ is deliberately not run: the parameters belong to the parts, whose own steps fire torch's
    optimizer hooks; the wrapper's step firing them again would add nothing but one more collective per hook.
    `param_groups` are the parts' own group dicts, so an LR scheduler setting "lr" on them sets the parts'."""

    def __init__(self, parts: list[torch.optim.Optimizer]):
        self.parts = list(parts)
        self.defaults = dict(self.parts[0].defaults)
        self.state = {}  # the parts hold the state

    @property
    def param_groups(self) -> list[dict]:
        # Read anew each time: a part's load_state_dict replaces its group dicts, and a list taken once would leave
        # the LR scheduler setting "lr" on the old ones after a resume.
        return [group for part in self.parts for group in part.param_groups]

    def step(self, closure=None):
        if closure is not None:
            raise ValueError("ShardedOptimizer.step takes no closure: its parts step in turn on the same gradients")
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"parts": [optimizer_shard_state(part) for part in self.parts]}

    def load_state_dict(self, state_dict) -> None:
        for part, state in zip(self.parts, state_dict["parts"], strict=True):
            load_optimizer_shard_state(part, state)


def pipeline_optimizer(runner, zero1: bool = False, optimizer_class: type = torch.optim.AdamW,
                       **defaults) -> torch.optim.Optimizer:
    """The optimizer of `runner`'s parameters: `optimizer_class(params, **defaults)`, or with `zero1` its state
    sharded over the data-parallel replicas (see the module docstring for which group each parameter takes)."""
    params = runner.parameters()
    if not zero1:
        return optimizer_class(params, **defaults)
    local = {id(p) for p in runner.expert_params}
    replicated = [p for p in params if id(p) not in local]
    experts = [p for p in params if id(p) in local]
    if len(replicated) < runner.dp_size:
        raise ValueError(f"ZeRO-1 over {runner.dp_size} data-parallel ranks needs at least as many parameters to "
                         f"shard, this pipeline rank has {len(replicated)}")
    zero_cls = _zero_class()
    zero = zero_cls(replicated, optimizer_class, process_group=runner.dp_group, **defaults)
    if not experts:
        return zero
    if runner.expert_replica_group is None:  # each shard on one rank of the pipeline rank's replicas
        return ShardedOptimizer([zero, optimizer_class(experts, **defaults)])
    return ShardedOptimizer([zero, zero_cls(experts, optimizer_class, process_group=runner.expert_replica_group,
                                            **defaults)])


def optimizer_shard_state(optimizer: torch.optim.Optimizer) -> dict:
    """This rank's part of the optimizer state, for its own checkpoint file (see the module docstring)."""
    if isinstance(optimizer, ShardedOptimizer):
        return optimizer.state_dict()
    if not _is_zero(optimizer):
        return optimizer.state_dict()
    # The ZeroRedundancyOptimizer format with global indices (parameters numbered over its param_groups in order,
    # as its own state_dict numbers them), holding this rank's entries only: its load_state_dict takes exactly those.
    full = torch.optim.Optimizer.state_dict(optimizer)
    index = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    local = zero_local_optimizer(optimizer)
    local_params = [p for group in local.param_groups for p in group["params"]]
    full["state"] = {index[id(local_params[i])]: state for i, state in local.state_dict()["state"].items()}
    return full


def load_optimizer_shard_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Restore what `optimizer_shard_state` saved on this rank."""
    optimizer.load_state_dict(state)
    if _is_zero(optimizer):
        # Its load_state_dict also leaves a copy of the loaded entries in the wrapper's own `state`, which no step
        # reads (the local optimizer holds the live state): dropped, so a resumed rank holds one copy, not two.
        optimizer.state.clear()


def optimizer_state_numel(optimizer: torch.optim.Optimizer) -> int:
    """Elements of tensor state this rank's optimizer holds (the AdamW moments: 2 per parameter it steps)."""
    if isinstance(optimizer, ShardedOptimizer):
        return sum(optimizer_state_numel(part) for part in optimizer.parts)
    if _is_zero(optimizer):
        optimizer = zero_local_optimizer(optimizer)
    return sum(v.numel() for state in optimizer.state.values() for v in state.values()
               if torch.is_tensor(v) and v.dim() > 0)


__all__ = ["ShardedOptimizer", "load_optimizer_shard_state", "optimizer_shard_state", "optimizer_state_numel",
           "pipeline_optimizer"]
