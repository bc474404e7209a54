"""DeepSeekMoE: shared experts that every token passes through, plus fine-grained routed experts.

    y = shared_experts(x) + sum_{k} g_k(x) * expert_{i_k}(x)

Routing is in routing.py, the fused experts in experts.py. Besides its output, every forward leaves two things
on the module for the model to collect, so that per-step bookkeeping never happens inside a layer that gradient
checkpointing may run twice:

    last_load_E          tokens routed to each expert in this forward (for balancing and MaxVio); padding
                         positions (attention_mask 0) are left out, prompt tokens are not: they cost expert compute
    last_balance_loss    the sequence-wise balance loss (V3 eq. 17) over the real tokens, or None when
                         seq_balance_alpha == 0 or outside training

The router logits [B*T, E] reach `output_router_logits` through transformers' output capturing (the router's output).
"""

from __future__ import annotations

import torch
from torch import nn

from .experts import DeepseekExperts, tokens_per_expert
from .layers import DeepseekMLP
from .routing import DeepseekTopkRouter, sequence_balance_loss


class DeepseekMoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.gate = DeepseekTopkRouter(config)
        self.experts = DeepseekExperts(config)
        self.shared_experts = (
            DeepseekMLP(config, intermediate_size=config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )
        self.last_load_E: torch.Tensor | None = None
        self.last_balance_loss: torch.Tensor | None = None

    def forward(self, x_BTD: torch.Tensor, token_mask_BT: torch.Tensor | None = None) -> torch.Tensor:
        """`token_mask_BT`: True for real tokens, False for padding (None: all real)."""
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        logits_NE, weights_NK, expert_ids_NK, scores_NE = self.gate(x_ND)
        valid_N = None if token_mask_BT is None else token_mask_BT.reshape(-1, 1).to(weights_NK.dtype)
        self.last_load_E = tokens_per_expert(expert_ids_NK.detach(), self.gate.num_experts, valid_N)
        y_BTD = self.experts(x_ND, expert_ids_NK, weights_NK).view(B, T, D)
        if self.shared_experts is not None:
            y_BTD = y_BTD + self.shared_experts(x_BTD)

        alpha = self.config.seq_balance_alpha
        self.last_balance_loss = None
        if alpha > 0 and self.training and torch.is_grad_enabled():
            self.last_balance_loss = sequence_balance_loss(
                scores_NE.view(B, T, -1), expert_ids_NK.view(B, T, -1), alpha,
                None if token_mask_BT is None else token_mask_BT.view(B, T),
            )
        return y_BTD
