"""Routed experts stored fused, computed as grouped GEMMs.

All routed experts of a layer live in two 3-D parameters, in transformers' layout so that its checkpoint conversion
(per-expert `mlp.experts.{j}.{gate,up,down}_proj.weight` <-> fused) and peft's `target_parameters` apply unchanged:

    gate_up_proj [E, 2I, D]   rows [0, I) are gate_proj, rows [I, 2I) up_proj
    down_proj    [E, D, I]

`forward` (the fast path) sorts the T*K (token, expert) pairs by expert and runs two grouped GEMMs
(torch.nn.functional.grouped_mm) over the contiguous per-expert segments. Group offsets are computed on the device,
so nothing waits for the host: no `.tolist()`, no `nonzero()`, no data-dependent Python branch.

`forward_loop` is the readable reference the tests compare against: one dense matmul per expert that got tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

_grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm


def _grouped_mm_ok(x: torch.Tensor, gate_up: torch.Tensor) -> bool:
    """grouped_mm needs float weights and 16-byte aligned rows for D, 2I and I (bf16 widths multiple of 8)."""
    if gate_up.dtype not in (torch.float32, torch.bfloat16, torch.float16) or x.dtype != gate_up.dtype:
        return False
    two_i, d = gate_up.shape[-2:]
    return all((width * gate_up.element_size()) % 16 == 0 for width in (d, two_i, two_i // 2))


def tokens_per_expert(expert_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Float counts [E] via scatter_add: unlike bincount, its output size never depends on the data (no host sync)."""
    ids_S = expert_ids_TK.reshape(-1)
    return torch.zeros(num_experts, device=ids_S.device).scatter_add_(0, ids_S, torch.ones(ids_S.shape, device=ids_S.device))


def run_experts_loop(x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor, expert_fn) -> torch.Tensor:
    """sum_k weight_{t,k} * expert_{id_{t,k}}(x_t), one expert at a time: `expert_fn(e, x_ND)` runs expert e on the
    tokens routed to it. The reference path, and the one for weights kept quantized per expert (bnb, FP8)."""
    out_TD = torch.zeros_like(x_TD)
    for e in expert_ids_TK.unique().tolist():
        token_idx, slot = torch.where(expert_ids_TK == e)
        y = expert_fn(e, x_TD[token_idx])
        out_TD.index_add_(0, token_idx, (y * weights_TK[token_idx, slot, None]).to(x_TD.dtype))
    return out_TD


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
        # "grouped" (default) or "loop"; the loop is the reference, and the fallback for odd shapes or dtypes.
        self.implementation = "grouped"

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

    def forward(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                load_E: torch.Tensor | None = None) -> torch.Tensor:
        """`load_E`: tokens_per_expert(expert_ids_TK) when the caller has it already (the MoE layer counts anyway)."""
        if self.implementation == "loop" or not _grouped_mm_ok(x_TD, self.gate_up_proj):
            return self.forward_loop(x_TD, expert_ids_TK, weights_TK)
        T, K = expert_ids_TK.shape
        # Sort the T*K (token, expert) pairs by expert: each expert's rows become one contiguous segment.
        order_S = expert_ids_TK.reshape(-1).argsort(stable=True)
        token_of_S = order_S // K
        if load_E is None:
            load_E = tokens_per_expert(expert_ids_TK, self.num_experts)
        offsets_E = load_E.cumsum(0).to(torch.int32)  # segment ends

        x_SD = x_TD[token_of_S]
        gate_up_S2I = _grouped_mm(x_SD, self.gate_up_proj.transpose(1, 2), offs=offsets_E)
        gate_SI, up_SI = gate_up_S2I.chunk(2, dim=-1)
        h_SI = (self.act_fn(gate_SI) * up_SI).contiguous()
        y_SD = _grouped_mm(h_SI, self.down_proj.transpose(1, 2), offs=offsets_E)

        y_SD = y_SD * weights_TK.reshape(-1)[order_S].unsqueeze(-1).to(y_SD.dtype)
        # Un-sort and sum each token's K expert outputs (scatter back to [T*K], then a dense reduction).
        y_TKD = torch.empty_like(y_SD).index_copy_(0, order_S, y_SD).view(T, K, -1)
        return y_TKD.sum(dim=1).to(x_TD.dtype)

    def forward_loop(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        def expert(e, x_ND):
            gate, up = F.linear(x_ND, self.gate_up_proj[e]).chunk(2, dim=-1)
            return F.linear(self.act_fn(gate) * up, self.down_proj[e])

        return run_experts_loop(x_TD, expert_ids_TK, weights_TK, expert)
