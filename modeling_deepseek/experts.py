"""Routed experts stored fused, dispatched through transformers' experts interface.

All routed experts of a layer live in two 3-D parameters, in transformers' layout so that its checkpoint conversion
(per-expert `mlp.experts.{j}.{gate,up,down}_proj.weight` <-> fused), its experts kernels and peft's
`target_parameters` apply unchanged:

    gate_up_proj [E, 2I, D]   rows [0, I) are gate_proj, rows [I, 2I) up_proj
    down_proj    [E, D, I]

`@use_experts_implementation` makes `config.experts_implementation` (or `model.set_experts_implementation(...)`)
choose the kernel, as for transformers' own MoE models: "grouped_mm" (the default) sorts the T*K (token, expert)
pairs by expert and runs two grouped GEMMs over the contiguous per-expert segments, with offsets computed on the
device (no host synchronisation); "eager" is `forward` below, the readable reference: one dense matmul per expert
that got tokens.

The memory option `recompute_swiglu` (configuration.py) keeps each expert's gate and up outputs for backward and
recomputes act(gate) * up there. On the eager path the down projection is recomputed with it, so its input is not
kept either. transformers' grouped_mm kernel calls the down projection itself: there `_apply_gate` recomputes only
the activation, and the down projection keeps its input (FP8 training's grouped experts recompute both:
quant/fp8_training_modules.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations.moe import use_experts_implementation

from .recompute import recompute, recompute_active


def tokens_per_expert(expert_ids_TK: torch.Tensor, num_experts: int, weight_T1: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """Float counts [E] via scatter_add: unlike bincount, its output size never depends on the data (no host sync).
    `weight_T1` (1.0 / 0.0 per token) leaves tokens out of the count without indexing by a data-dependent mask."""
    ones_TK = torch.ones(expert_ids_TK.shape, device=expert_ids_TK.device)
    if weight_T1 is not None:
        ones_TK = ones_TK * weight_T1.float()
    return torch.zeros(num_experts, device=expert_ids_TK.device).scatter_add_(0, expert_ids_TK.reshape(-1),
                                                                             ones_TK.reshape(-1))


def run_experts_loop(x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor, expert_fn,
                     num_experts: int | None = None) -> torch.Tensor:
    """sum_k weight_{t,k} * expert_{id_{t,k}}(x_t), one expert at a time: `expert_fn(e, x_ND)` runs expert e on the
    tokens routed to it. The reference path, and the one for weights kept quantized per expert (bnb, FP8).
    Ids >= `num_experts` are skipped: under expert parallelism they mark tokens routed to another rank's experts."""
    out_TD = torch.zeros_like(x_TD)
    for e in expert_ids_TK.unique().tolist():
        if num_experts is not None and e >= num_experts:
            continue
        token_idx, slot = torch.where(expert_ids_TK == e)
        y = expert_fn(e, x_TD[token_idx])
        out_TD.index_add_(0, token_idx, (y * weights_TK[token_idx, slot, None]).to(x_TD.dtype))
    return out_TD


@use_experts_implementation
class DeepseekExperts(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        E, D, I = self.num_experts, self.hidden_dim, self.intermediate_dim
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))
        self.act_fn = ACT2FN[config.hidden_act]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Also accept the per-expert layout `{j}.{gate,up,down}_proj.weight` that save_pretrained writes: Trainer's
        resume feeds such a state dict to load_state_dict(strict=False) without transformers' key conversion."""
        projs = ("gate", "up", "down")
        names = [f"{prefix}{j}.{proj}_proj.weight" for j in range(self.num_experts) for proj in projs]
        if f"{prefix}gate_up_proj" not in state_dict and all(name in state_dict for name in names):
            g, u, d = ([state_dict.pop(f"{prefix}{j}.{proj}_proj.weight") for j in range(self.num_experts)]
                       for proj in projs)
            state_dict[f"{prefix}gate_up_proj"] = torch.cat((torch.stack(g), torch.stack(u)), dim=1)
            state_dict[f"{prefix}down_proj"] = torch.stack(d)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply_gate(self, gate_up_S2I: torch.Tensor) -> torch.Tensor:
        """act(gate) * up, for transformers' grouped_mm kernel (which calls it between its two grouped GEMMs)."""
        if recompute_active(self.config, "recompute_swiglu"):
            return recompute(self.swiglu, gate_up_S2I)
        return self.swiglu(gate_up_S2I)

    def swiglu(self, gate_up_S2I: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up_S2I.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def forward(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """The "eager" implementation: sum_k weight_{t,k} * expert_{id_{t,k}}(x_t), one expert at a time."""

        def swiglu_down(gate, up, down_DI):
            return F.linear(self.act_fn(gate) * up, down_DI)

        def expert(e, x_ND):
            gate, up = F.linear(x_ND, self.gate_up_proj[e]).chunk(2, dim=-1)
            if recompute_active(self.config, "recompute_swiglu"):
                return recompute(swiglu_down, gate, up, self.down_proj[e])
            return swiglu_down(gate, up, self.down_proj[e])

        return run_experts_loop(x_TD, expert_ids_TK, weights_TK, expert, self.num_experts)
