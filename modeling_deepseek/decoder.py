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
        self.input_layernorm = DeepseekRMSNorm(config.hidden_size, eps=config.rms_norm_eps, config=config)
        self.post_attention_layernorm = DeepseekRMSNorm(config.hidden_size, eps=config.rms_norm_eps, config=config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        token_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        **kwargs,
    ) -> torch.Tensor:
        """`token_mask` [B, T]: False at padding, which the MoE leaves out of its load statistics. With
        `output_attentions` the attention runs eagerly and returns its probabilities, which transformers' output
        capturing records (DeepseekPreTrainedModel._can_record_outputs)."""
        attn_out, _ = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            output_attentions=output_attentions,
            **kwargs,
        )
        hidden_states = hidden_states + attn_out
        normed = self.post_attention_layernorm(hidden_states)
        if self.moe is None:
            return hidden_states + self.mlp(normed)
        return hidden_states + self.mlp(normed, token_mask)

    @property
    def moe(self) -> DeepseekMoE | None:
        return self.mlp if isinstance(self.mlp, DeepseekMoE) else None
