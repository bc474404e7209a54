"""What the model needs to run under transformers' distributed engine besides its plans (configuration.py,
modeling.py): the plans themselves shard the weights and hook the modules; these helpers cover the two places where
MLA uses a sharded weight outside that weight's module, and the checks that a layout splits heads and experts whole.

- The absorbed path (attention.py) multiplies by kv_b_proj's weight directly: under tensor parallelism that weight is
  a DTensor whose local rows are this rank's heads (W_UK / W_UV of heads h*H/tp .. (h+1)*H/tp), which `local_shard`
  hands out. The latent then feeds those heads without passing kv_b_proj's forward, where the engine sums the input
  gradient over the ranks; `replicated_input` does that sum for it.
- `check_parallel_layout` refuses a tp_size that does not divide the attention heads, or an ep_size that does not
  divide the routed experts, before the engine shards anything (a column split would cut a head in two), and a
  layout the installed transformers' engine cannot build.
"""

from __future__ import annotations

import torch
import transformers

from .compat import EMPTY_TP_PLAN_RELEASE, engine_takes_empty_tp_plan

try:  # torch built without distributed support has no DTensor: nothing is ever sharded then
    from torch.distributed.tensor import DTensor, Partial, Replicate
except ImportError:  # pragma: no cover
    DTensor = None


def is_sharded(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor parameter (its gradient flows back to that shard); a plain tensor as it is."""
    return t.to_local() if is_sharded(t) else t


def replicated_input(x: torch.Tensor, sharded_weight: torch.Tensor) -> torch.Tensor:
    """`x`, identical on every rank, about to be used with this rank's shard of `sharded_weight`: identity forward,
    and in backward the ranks' partial gradients of `x` are summed (what a colwise layer does for its input)."""
    if not (is_sharded(sharded_weight) and torch.is_grad_enabled() and x.requires_grad):
        return x
    mesh = sharded_weight.device_mesh
    if mesh.ndim > 1:
        mesh = mesh["tp"]
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])


def check_parallel_layout(config, distributed_config) -> None:
    """ValueError naming the numbers when tp_size does not divide the attention heads or ep_size the routed experts."""
    if distributed_config is None:
        return
    get = distributed_config.get if isinstance(distributed_config, dict) else (
        lambda name, default=None: getattr(distributed_config, name, default))
    tp_size, ep_size, tp_plan = get("tp_size") or 1, get("ep_size") or 1, get("tp_plan")
    if get("enable_expert_parallel", False) and ep_size == 1:  # the deprecated spelling of ep_size = tp_size
        ep_size, tp_plan = tp_size, {} if tp_plan is None else tp_plan
    if tp_size > 1 and tp_plan == {} and not engine_takes_empty_tp_plan():
        raise ValueError(
            f"expert parallelism alone (tp_plan={{}} with tp_size={tp_size}, or enable_expert_parallel=True) needs "
            f"transformers >= {EMPTY_TP_PLAN_RELEASE}: the distributed engine of transformers {transformers.__version__} "
            "refuses an empty tp_plan. Use DistributedConfig(tp_size=N, ep_size=N) (heads and experts split) or "
            "DistributedConfig(fsdp_size=N, ep_size=N) (experts split, the rest FSDP-sharded), or upgrade transformers")
    heads = config.num_attention_heads
    if tp_size > 1 and tp_plan != {} and heads % tp_size:
        raise ValueError(
            f"tp_size={tp_size} does not divide num_attention_heads={heads}: tensor parallelism gives every rank whole "
            f"heads (their W_UK / W_UV rows of kv_b_proj); use a tp_size that divides {heads}")
    experts = config.n_routed_experts
    if ep_size > 1 and experts % ep_size:
        raise ValueError(
            f"ep_size={ep_size} does not divide n_routed_experts={experts}: expert parallelism gives every rank "
            f"n_routed_experts / ep_size whole experts; use an ep_size that divides {experts}")
