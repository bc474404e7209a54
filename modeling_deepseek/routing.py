"""Token-to-expert routing: DeepSeek-V3's sigmoid group-limited routing and DeepSeek-V2's softmax routing.

V3 (`topk_method="noaux_tc"`, `scoring_func="sigmoid"`):
  1. affinity s = sigmoid(x W^T), in fp32 whatever the model dtype (a high-precision island of the FP8 recipe);
  2. selection scores s + b, where b = `e_score_correction_bias` is the auxiliary-loss-free balancing bias. The bias
     steers *which* experts are chosen, never how much they weigh;
  3. group-limited: a group is scored by the sum of its two best biased scores, only the best `topk_group` groups
     stay, the others are masked with -inf (masking with 0 would let a masked expert win when scores go negative);
  4. top-k over what is left; gate weights are the *unbiased* s of the chosen experts, normalised to sum to one when
     `norm_topk_prob`, then times `routed_scaling_factor`.
V2 (`scoring_func="softmax"`): softmax affinities, `greedy` top-k or `group_limited_greedy` (groups scored by their
max); weights are the softmax probabilities, either normalised to sum to one (`norm_topk_prob`) or times
`routed_scaling_factor`, never both (as the official V2 code does).

The bias is updated outside the model, once per optimizer step (see balancing.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .compat import keep_fp32_buffers


class DeepseekTopkRouter(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config  # the routing rule: scoring_func, topk_method, n_group, topk_group, norm_topk_prob, ...
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.n_routed_experts
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))
        if config.topk_method == "noaux_tc":
            # fp32 always: a gamma = 1e-3 nudge vanishes in bf16 next to values near 1.
            self.e_score_correction_bias = nn.Buffer(torch.zeros(self.num_experts, dtype=torch.float32))
            # Tokens per expert since the last bias update. Not saved: it is zero at every optimizer-step boundary,
            # which is where checkpoints are taken.
            self.pending_load = nn.Buffer(torch.zeros(self.num_experts, dtype=torch.float32), persistent=False)
        else:
            self.e_score_correction_bias = None
        self.has_pending_load = False
        self.forwards_since_update = 0

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) must not round the balancing state: keep the fp32 values, follow the device only.
        return keep_fp32_buffers(self, fn, recurse, ("e_score_correction_bias", "pending_load"))

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns router logits [T, E], gate weights [T, K], expert ids [T, K] and affinities [T, E] (fp32)."""
        cfg = self.config
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        scores_TE = logits_TE.sigmoid() if cfg.scoring_func == "sigmoid" else logits_TE.softmax(dim=-1)
        choice_TE = scores_TE.detach()
        if self.e_score_correction_bias is not None:
            choice_TE = choice_TE + self.e_score_correction_bias
        if cfg.topk_method != "greedy" and cfg.topk_group < cfg.n_group:
            choice_TE = self._mask_to_best_groups(choice_TE)
        expert_ids_TK = torch.topk(choice_TE, k=self.top_k, dim=-1, sorted=False).indices
        weights_TK = scores_TE.gather(1, expert_ids_TK)
        if cfg.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        if cfg.scoring_func == "sigmoid" or not cfg.norm_topk_prob:  # V2 normalises *or* scales, V3 does both
            weights_TK = weights_TK * cfg.routed_scaling_factor
        return logits_TE, weights_TK, expert_ids_TK, scores_TE

    def _mask_to_best_groups(self, choice_TE: torch.Tensor) -> torch.Tensor:
        T, cfg = choice_TE.shape[0], self.config
        grouped_TGe = choice_TE.view(T, cfg.n_group, -1)
        if cfg.topk_method == "noaux_tc":
            group_score_TG = grouped_TGe.topk(2, dim=-1).values.sum(dim=-1)
        else:  # group_limited_greedy
            group_score_TG = grouped_TGe.amax(dim=-1)
        best_groups_TG = torch.topk(group_score_TG, k=cfg.topk_group, dim=-1, sorted=False).indices
        keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, best_groups_TG, True)
        return grouped_TGe.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(T, -1)


def sequence_balance_loss(scores_BTE: torch.Tensor, expert_ids_BTK: torch.Tensor, alpha: float,
                          token_mask_BT: torch.Tensor | None = None) -> torch.Tensor:
    """V3's complementary sequence-wise balance loss (eq. 17-20), averaged over sequences.

    f_i = E / (K T) * (tokens of the sequence routed to expert i);  P_i = mean over the sequence of s_i / sum_j s_j;
    loss = alpha * sum_i f_i P_i. Gradients flow through P (the affinities), not through the discrete counts f.
    With `token_mask_BT`, T counts a sequence's real tokens only and padding takes no part in f or P.
    """
    B, T, E = scores_BTE.shape
    K = expert_ids_BTK.shape[-1]
    mask_BT = torch.ones(B, T, device=scores_BTE.device) if token_mask_BT is None else token_mask_BT.float()
    tokens_B1 = mask_BT.sum(dim=1, keepdim=True).clamp_min(1)
    counts_BE = torch.zeros(B, E, device=scores_BTE.device).scatter_add_(
        1, expert_ids_BTK.reshape(B, -1), mask_BT.repeat_interleave(K, dim=1)
    )
    f_BE = counts_BE * E / (K * tokens_B1)
    p_BE = (scores_BTE / scores_BTE.sum(dim=-1, keepdim=True) * mask_BT[..., None]).sum(dim=1) / tokens_B1
    return alpha * (f_BE * p_BE).sum(dim=-1).mean()
