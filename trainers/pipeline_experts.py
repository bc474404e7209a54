"""Expert parallelism inside the pipeline stages: pipeline x expert parallel on a (ep, pp) mesh.

transformers' engine refuses `ep_size` with `pp_size > 1`, so the pipeline runner shards the experts of its own
stages. The layout is DeepSeek-V3's (PP16 x EP64 with ZeRO-1 DP), scaled down:

    mesh (ep, pp)     rank (e, p) holds pipeline rank p's stages; the ep ranks of one pipeline rank see
                      different sequences (data parallel over "ep") and split every local MoE layer's routed experts:
                      ep rank e keeps experts [e L, (e + 1) L), L = n_routed_experts / ep

Each MoE layer's (token, expert) pairs travel to the expert's ep rank and back by all_to_all over the ep group. That
exchange is not written here: it is the engine's own `EPImplementation` (transformers' "all_to_all", or any
registered one, e.g. quant.fp8_dispatch's FP8 dispatch), reached by name through its public registry and given the
experts module with its local shard, exactly as the engine's `ep_dispatch_experts` style gives it. The shard is a
plain Parameter (the engine's placeholders are DTensors, which the pipeline's gradient all-reduce, norm clipping and
per-rank checkpoints would each have to special-case).

Gradients. An expert's gradient already sums every ep rank's tokens (the combine all_to_all's backward brought them
to its rank), so it stays local; every other parameter is replicated over "ep" and its gradient is summed over it
(`expert_parameters` tells the runner which is which). The aux-loss-free counts are the router's, over all experts,
and are all-reduced over the ep group as over any data-parallel group (balancing.py).

Under the pipeline schedules every rank of a pipeline runs the same action list, so the ep ranks of one pipeline
rank enter each layer's all_to_all for the same (stage, micro-batch) in the same order; the collectives sit in the
forward and in the input-gradient (I) half of a split backward (both are on the path from the stage input to its
output), never in the weight-gradient (W) half.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from modeling_deepseek.compat import ep_implementation_class
from modeling_deepseek.experts import DeepseekExperts

from .pipeline_overlap import MarkedExperts, exchange_ends, exchange_starts


def _local_rows(param: nn.Parameter, rank: int, size: int) -> nn.Parameter:
    return nn.Parameter(param.detach().chunk(size, dim=0)[rank].clone(), requires_grad=param.requires_grad)


def shard_experts(modules: list[nn.Module], ep_mesh: DeviceMesh, tp_mesh: DeviceMesh,
                  implementation: str = "all_to_all", baton=None) -> list[nn.Parameter]:
    """Keep this ep rank's slice of every DeepseekExperts under `modules` and route its tokens through the EP
    implementation named `implementation`. Returns the expert Parameters (local shards), each once. `baton`: a
    trainers.pipeline_overlap.Baton whose hand-over marks go around each exchange (and time it)."""
    ep_rank, ep_size = ep_mesh.get_local_rank(), ep_mesh.size()
    impl_cls = ep_implementation_class(implementation)
    sharded, params = set(), []
    for experts in (m for module in modules for m in module.modules() if isinstance(m, DeepseekExperts)):
        if id(experts) in sharded:
            continue
        sharded.add(id(experts))
        if experts.num_experts % ep_size:
            raise ValueError(f"{experts.num_experts} routed experts do not split over {ep_size} expert-parallel ranks")
        for name in ("gate_up_proj", "down_proj"):
            setattr(experts, name, _local_rows(getattr(experts, name), ep_rank, ep_size))
            params.append(getattr(experts, name))
        experts.num_experts //= ep_size
        experts._is_expert_parallel = True  # the engine's flag: ids >= num_experts are other ranks' experts
        impl = impl_cls(experts, ep_mesh, tp_mesh)  # the impl takes experts.forward (local ids) first
        if baton is not None:
            impl.experts_forward = MarkedExperts(impl.experts_forward, baton)
        _install(experts, impl, baton)
    return params


def _install(experts: nn.Module, implementation, baton=None) -> None:
    """experts.forward becomes the EP implementation, in a closure over `implementation` shaped as the engine's own
    (EpDispatchExpertsParallel.install_forward), so that compat.rebind_engine_forward reaches it after a class swap
    (convert_to_fp8_training). With a `baton`, hand-over marks before the dispatch and after the combine."""

    def ep_forward(x_TD, expert_ids_TK, weights_TK):
        if baton is None:
            return implementation(x_TD, expert_ids_TK, weights_TK).to(x_TD.dtype)
        out_TD = implementation(exchange_starts(x_TD, baton), expert_ids_TK, weights_TK)
        return exchange_ends(out_TD, baton).to(x_TD.dtype)

    experts.forward = ep_forward


def gather_expert_shards(state_dicts: list[dict], ep_ranks: list[int], expert_names: set[str]) -> dict:
    """One full state dict from every rank's: expert parameters concatenated over the ep ranks in ep order (rank
    order within a pipeline rank), everything else taken from whichever rank has it."""
    merged, shards = {}, {}
    for state, ep_rank in zip(state_dicts, ep_ranks):
        for name, value in state.items():
            if name in expert_names:
                shards.setdefault(name, {})[ep_rank] = value
            else:
                merged[name] = value
    for name, by_rank in shards.items():
        merged[name] = torch.cat([by_rank[e] for e in sorted(by_rank)], dim=0)
    return merged


def expert_grad_sq_norm(params: list[nn.Parameter], ep_group) -> torch.Tensor:
    """Squared norm of the expert gradients over the whole ep group (each rank holds a different shard). Every rank
    joins the all-reduce, with or without gradients."""
    grads = [p.grad for p in params if p.grad is not None]
    sq = torch.stack([g.float().pow(2).sum() for g in grads]).sum() if grads else torch.zeros(())
    dist.all_reduce(sq, group=ep_group)
    return sq


__all__ = ["expert_grad_sq_norm", "gather_expert_shards", "shard_experts"]
