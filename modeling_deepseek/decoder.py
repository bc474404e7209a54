"""One transformer block: pre-norm MLA, then pre-norm FFN (dense SwiGLU in the first layers, DeepSeekMoE after)."""

from __future__ import annotations

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention import DeepseekAttention
from .layers import DeepseekMLP, DeepseekRMSNorm
from .moe import DeepseekMoE


class DeepseekDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = DeepseekAttention(config, layer_idx)
        self.mlp = DeepseekMoE(config) if config.is_moe_layer(layer_idx) else DeepseekMLP(config)
        self.input_layernorm = DeepseekRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DeepseekRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attn_out, _ = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            **kwargs,
        )
        hidden_states = hidden_states + attn_out
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))

    @property
    def moe(self) -> DeepseekMoE | None:
        return self.mlp if isinstance(self.mlp, DeepseekMoE) else None
