"""The MLA cache: per token and layer, only the latent (kv_lora_rank) and the shared RoPE key (qk_rope_head_dim).

A transformers `Cache`, so `generate`, cropping for speculation and `past_key_values` round trips work as usual. Each
layer keeps keys = latent [B, 1, S, C] and values = rope key [B, 1, S, R]: one "head" shared by every query head,
nothing per head is ever stored. Two layer kinds:

- `LatentLayer`: bf16/fp32, appended into a buffer that doubles when full, so a decode step writes one token
  instead of re-copying the whole cache (plain `torch.cat` makes a long generation quadratic in memory traffic).
- `FP8LatentLayer`: e4m3 values with one fp32 scale per token (amax / 448 over the token's row), half the bytes of
  bf16 (plus 8 bytes of scales per token and layer). A per-token scale needs no calibration and never goes stale
  as new tokens arrive, unlike a per-tensor scale frozen on the prompt. Reads dequantize to the compute dtype.

`DeepseekLatentCache(fp8=True)` selects the FP8 layers; `generate(..., latent_cache_dtype="fp8")` or
`config.latent_cache_dtype = "fp8"` does the same inside generate.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def _append(buf, view, new):
    """Write `new` after the `view.shape[-2]` filled slots of `buf`; returns (buffer, view of the filled part).

    The buffer doubles when full (amortised O(1) appends). It is rebuilt from `view` when the view no longer lies at
    the buffer's start (batch_select_indices / reorder_cache replace the views with fresh tensors); crop leaves a
    shorter view of the same buffer, whose tail is simply overwritten.
    """
    n, t = (view.shape[-2] if view.numel() else 0), new.shape[-2]
    if buf is None or view.numel() and view.data_ptr() != buf.data_ptr() or buf.shape[-2] < n + t:
        capacity = max(2 * (n + t), 64)
        grown = new.new_empty(*new.shape[:-2], capacity, new.shape[-1])
        if n:
            grown[..., :n, :] = view
        buf = grown
    buf[..., n : n + t, :] = new
    return buf, buf[..., : n + t, :]


class LatentLayer(DynamicLayer):
    """DynamicLayer with amortised O(1) appends; `keys` / `values` are views of the filled part of the buffers."""

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        self._k_buf = self._v_buf = None

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._k_buf, self.keys = _append(self._k_buf, self.keys, key_states)
        self._v_buf, self.values = _append(self._v_buf, self.values, value_states)
        return self.keys, self.values


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (x.float() / scale).to(FP8), scale


class FP8LatentLayer(DynamicLayer):
    """Stores e4m3 + per-token scales; `keys` / `values` hold the fp8 tensors, reads return dequantized copies."""

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        self.keys = torch.empty(*key_states.shape[:-2], 0, key_states.shape[-1], dtype=FP8, device=self.device)
        self.values = torch.empty(*value_states.shape[:-2], 0, value_states.shape[-1], dtype=FP8, device=self.device)
        self.key_scales = torch.empty(*key_states.shape[:-2], 0, 1, device=self.device)
        self.value_scales = torch.empty(*value_states.shape[:-2], 0, 1, device=self.device)
        self._bufs = [None] * 4  # growing buffers behind keys, key_scales, values, value_scales

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        qk, sk = quantize_per_token(key_states)
        qv, sv = quantize_per_token(value_states)
        # Growing buffers like LatentLayer: torch.cat would re-copy the whole fp8 cache at every decode step.
        views = (self.keys, self.key_scales, self.values, self.value_scales)
        grown = [_append(b, v, x) for b, v, x in zip(self._bufs, views, (qk, sk, qv, sv))]
        self._bufs = [b for b, _ in grown]
        self.keys, self.key_scales, self.values, self.value_scales = (v for _, v in grown)
        return self.dequantized()

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            (self.keys.float() * self.key_scales).to(self.dtype),
            (self.values.float() * self.value_scales).to(self.dtype),
        )

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if tokens_to_remove and self.is_initialized:
            self.key_scales = self.key_scales[..., :tokens_to_remove, :]
            self.value_scales = self.value_scales[..., :tokens_to_remove, :]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.is_initialized:
            self.key_scales, self.value_scales = self.key_scales[indices], self.value_scales[indices]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.is_initialized:
            self.key_scales = self.key_scales.index_select(0, beam_idx.to(self.device))
            self.value_scales = self.value_scales.index_select(0, beam_idx.to(self.device))


class DeepseekLatentCache(Cache):
    """A Cache of latent layers, created lazily per layer index (main layers and MTP layers alike)."""

    def __init__(self, fp8: bool = False, **kwargs):
        self.fp8 = fp8
        super().__init__(layer_class_to_replicate=FP8LatentLayer if fp8 else LatentLayer, **kwargs)

    def nbytes_per_token(self) -> float:
        """Bytes held per cached token, summed over layers (scales included for FP8)."""
        total, tokens = 0, 0
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            tensors = [layer.keys, layer.values] + ([layer.key_scales, layer.value_scales] if self.fp8 else [])
            total += sum(t.numel() * t.element_size() for t in tensors)
            tokens = max(tokens, layer.keys.shape[0] * layer.keys.shape[-2])
        return total / max(tokens, 1)
