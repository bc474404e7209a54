"""Decoupled rotary position embedding for MLA.

Only `qk_rope_head_dim` dimensions of each query head, and one key shared by all heads, are rotated; the rest of the
head (the "nope" part) carries no position so that it can be absorbed into the latent at decode time.

The frequencies (including YaRN's frequency interpolation and its cos/sin `attention_factor`) come from transformers'
`ROPE_INIT_FUNCTIONS`, so they are bit-identical to its DeepSeek classes. YaRN's other half, the *softmax* mscale, is
applied by the attention module through `softmax_scale()`. Dynamic NTK scaling recomputes the frequencies for inputs
longer than max_position_embeddings (and back for shorter ones) with transformers' own `dynamic_rope_update`. A
rope type outside SUPPORTED_ROPE_TYPES raises when the embedding is built, also for a config edited after it was
made.

Official DeepSeek weights rotate interleaved pairs (x0, x1), (x2, x3), ... (`rope_interleave=True`). We write the
rotated pairs de-interleaved, [rotated evens | rotated odds]: queries and keys get the same permutation, so their dot
products are unchanged and the cache never needs the interleaved layout back.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update

from .configuration import SUPPORTED_ROPE_TYPES


def yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def softmax_scale(config) -> float:
    """qk_head_dim^-0.5, times YaRN's mscale(factor, mscale_all_dim)^2 when YaRN is on (1.874 for V3)."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    rope = config.rope_parameters or {}
    if rope.get("rope_type", "default") != "default" and rope.get("mscale_all_dim"):
        m = yarn_mscale(rope["factor"], rope["mscale_all_dim"])
        scale *= m * m
    return scale


class DeepseekRotaryEmbedding(nn.Module):
    """Returns (cos, sin) of shape [B, T, qk_rope_head_dim / 2]: one angle per rotated pair."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.rope_type = (config.rope_parameters or {}).get("rope_type", "default")
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_parameters['rope_type'] = {self.rope_type!r} is not supported; use one of "
                             f"{SUPPORTED_ROPE_TYPES}")
        # Read by dynamic_rope_update: the length the current frequencies serve, and the trained one.
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        inv_freq, self.attention_scaling = self.compute_inv_freq()
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    def compute_inv_freq(self) -> tuple[torch.Tensor, float]:
        """Frequencies and cos/sin scale. Also re-run after from_pretrained, which builds buffers on the meta device."""
        rope = self.config.rope_parameters or {}
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default":
            return ROPE_INIT_FUNCTIONS[rope_type](self.config)
        dim = self.config.qk_rope_head_dim
        base = rope.get("rope_theta", self.config.rope_theta)
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles_BTP = position_ids_BT[..., None].float() * self.inv_freq.to(x.device)
        cos = angles_BTP.cos() * self.attention_scaling
        sin = angles_BTP.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x [B, heads, T, d] by (cos, sin) [B, T, d/2]; pairs are (2i, 2i+1) or (i, i + d/2)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
