"""Multi-token prediction (DeepSeek-V3 section 2.2).

D sequential modules; module k (1-based) predicts token i+k+1 at position i from

    h'_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)])     (embedding first, as in the official weights)
    h^k  = TransformerBlock_k(h')
    logits^k = lm_head(shared_head.norm(h^k))

where h^0 is the main model's final hidden state (after model.norm, as transformers' MtpModel, vLLM and SGLang feed
it, so the same weights draft the same tokens everywhere) and Emb / lm_head are the main model's own (shared, not
copied).
Training adds lambda/D * sum_k CE_k to the loss; at inference the modules draft tokens for self-speculative decoding.

Sequences keep their full length T at every depth: the token stream is shifted left by k and the k positions that
fall off the end are filled with padding whose predictions are masked out of the loss. Every depth therefore reuses
the main model's causal mask and rotary angles, and position i always means token i.

The weights live where the official checkpoints put them, `model.layers.{num_hidden_layers + k - 1}`: a decoder
block with the extra `enorm`, `hnorm`, `eh_proj` and `shared_head.norm`. The official files also store copies of
the shared embedding and head there (`embed_tokens`, `shared_head.head`); loading ignores them.
"""

from __future__ import annotations

import torch
from torch import nn

from .decoder import DeepseekDecoderLayer
from .layers import DeepseekRMSNorm


class DeepseekSharedHead(nn.Module):
    """Holds the MTP module's final norm under the official name `shared_head.norm`; the head itself is lm_head."""

    def __init__(self, config):
        super().__init__()
        self.norm = DeepseekRMSNorm(config.hidden_size, eps=config.rms_norm_eps, config=config)


def mtp_inputs(h_prev_BTD: torch.Tensor, embeds_BTD: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair h^{k-1}_i with Emb(t_{i+k}): the embeddings shifted left by `depth`, zero-padded at the end."""
    shifted = torch.zeros_like(embeds_BTD)
    shifted[:, : embeds_BTD.shape[1] - depth] = embeds_BTD[:, depth:]
    return h_prev_BTD, shifted


def mtp_labels(shift_labels_BT: torch.Tensor, depth: int, ignore_index: int = -100,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Targets for depth k from the main model's (already shifted) targets: position i is scored on t_{i+k+1}.

    With `position_ids` of sequences packed in one row (restarting at each sequence), position i is not scored where
    t_{i+k} belongs to the next sequence (its position is not i's + k): the module would pair one sequence's hidden
    state with another's token."""
    T = shift_labels_BT.shape[1]
    shifted = torch.full_like(shift_labels_BT, ignore_index)
    shifted[:, : T - depth] = shift_labels_BT[:, depth:]
    if position_ids is not None and depth < T:
        pos_BT = position_ids.expand_as(shift_labels_BT)
        crosses_BT = pos_BT[:, depth:] != pos_BT[:, : T - depth] + depth
        shifted[:, : T - depth] = shifted[:, : T - depth].masked_fill(crosses_BT, ignore_index)
    return shifted


class DeepseekMTPLayer(DeepseekDecoderLayer):
    """A decoder block plus the MTP input projection, stored at model.layers.{num_hidden_layers + k - 1}."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.enorm = DeepseekRMSNorm(config.hidden_size, eps=config.rms_norm_eps, config=config)
        self.hnorm = DeepseekRMSNorm(config.hidden_size, eps=config.rms_norm_eps, config=config)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = DeepseekSharedHead(config)

    def forward(self, h_prev_BTD, next_embeds_BTD, **block_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """h^{k-1} and Emb(t_{i+k}) in; (h^k, shared_head.norm(h^k)) out. The norm runs inside this forward so that
        wrappers that own the module's parameters only during its forward (FSDP2) see it there."""
        x_BTD = self.eh_proj(torch.cat((self.enorm(next_embeds_BTD), self.hnorm(h_prev_BTD)), dim=-1))
        h_BTD = super().forward(x_BTD, **block_kwargs)
        return h_BTD, self.shared_head.norm(h_BTD)
