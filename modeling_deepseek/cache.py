"""The MLA cache: per token and layer, only the latent (kv_lora_rank) and the shared RoPE key (qk_rope_head_dim).

A transformers `Cache`, so `generate`, cropping for speculation, beam reordering and cache round trips work as
usual. Each layer keeps keys = latent [B, 1, S, C] and values = rope key [B, 1, S, R]: one "head" shared by every
query head, nothing per head is ever stored. Two layer kinds, both built on transformers' public `CacheLayerMixin`
and owning all of their state (so nothing here depends on how `DynamicLayer` keeps its own):

- `LatentLayer`: bf16/fp32, appended into a buffer that doubles when full, so a decode step writes one token
  instead of re-copying the whole cache (plain `torch.cat` makes a long generation quadratic in memory traffic).
- `FP8LatentLayer`: e4m3 values with one fp32 scale per token (amax / 448 over the token's row), half the bytes of
  bf16 (plus 8 bytes of scales per token and layer). A per-token scale needs no calibration and never goes stale
  as new tokens arrive, unlike a per-tensor scale frozen on the prompt. Reads dequantize to the compute dtype; the
  tokens of the forward that writes them are attended in full precision.

`DeepseekLatentCache(fp8=True)` selects the FP8 layers; `generate(..., latent_cache_dtype="fp8")` or
`config.latent_cache_dtype = "fp8"` does the same inside generate.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def _append(buf, view, new):
    """Write `new` after the `view.shape[-2]` filled slots of `buf`; returns (buffer, view of the filled part).

    The buffer doubles when full (amortised O(1) appends). It is rebuilt from `view` when the view no longer lies at
    the buffer's start (batch selection / beam reordering replace the views with fresh tensors); crop leaves a
    shorter view of the same buffer, whose tail is simply overwritten.
    """
    n, t = (view.shape[-2] if view is not None and view.numel() else 0), new.shape[-2]
    if buf is None or n and view.data_ptr() != buf.data_ptr() or buf.shape[-2] < n + t or buf.shape[0] != new.shape[0]:
        capacity = max(2 * (n + t), 64)
        grown = new.new_empty(*new.shape[:-2], capacity, new.shape[-1])
        if n:
            grown[..., :n, :] = view
        buf = grown
    buf[..., n : n + t, :] = new
    return buf, buf[..., : n + t, :]


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (x.float() / scale).to(FP8), scale


class LatentLayer(CacheLayerMixin):
    """One layer's latent cache. Its per-token tensors (`streams`) are views of growing buffers; every operation of
    the Cache API (crop, batch selection / repetition, beam reordering, reset) applies to all of them alike."""

    is_croppable = True
    is_sliding = False
    streams = ("keys", "values")

    def __init__(self, **kwargs):
        super().__init__()
        self._buffers = dict.fromkeys(self.streams)

    def lazy_initialization(self, key_states, value_states):
        self.device, self.dtype = key_states.device, key_states.dtype
        for name in self.streams:
            setattr(self, name, None)
        self.is_initialized = True

    def _write(self, **new) -> None:
        for name, tensor in new.items():
            self._buffers[name], view = _append(self._buffers[name], getattr(self, name), tensor)
            setattr(self, name, view)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._write(keys=key_states, values=value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.keys.shape[-2] if self.is_initialized and self.keys is not None else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def _map(self, fn) -> None:
        if self.get_seq_length() > 0:
            for name in self.streams:
                setattr(self, name, fn(getattr(self, name)))

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` tokens (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove:
            self._map(lambda t: t[..., :tokens_to_remove, :])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def reset(self) -> None:
        for name in self.streams:
            setattr(self, name, None)
        self._buffers = dict.fromkeys(self.streams)
        self.is_initialized = False

    def offload(self):
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.get_seq_length() > 0 and self.keys.device != self.device:
            self._map(lambda t: t.to(self.device, non_blocking=True))

    def nbytes(self) -> int:
        """Bytes of the cached tokens."""
        return sum(getattr(self, name).numel() * getattr(self, name).element_size() for name in self.streams)

    def nbytes_allocated(self) -> int:
        """Bytes of the growing buffers behind them (up to twice the cached tokens)."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values() if b is not None)


class FP8LatentLayer(LatentLayer):
    """Stores e4m3 + per-token scales; `keys` / `values` hold the fp8 tensors, reads return dequantized copies."""

    streams = ("keys", "key_scales", "values", "value_scales")

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        (qk, sk), (qv, sv) = quantize_per_token(key_states), quantize_per_token(value_states)
        self._write(keys=qk, key_scales=sk, values=qv, value_scales=sv)
        # The tokens being written attend to themselves in full precision (a prompt's own logits are exact); what
        # later forwards read back is the e4m3 copy.
        keys, values = self.dequantized()
        t = key_states.shape[-2]
        keys[..., -t:, :], values[..., -t:, :] = key_states, value_states
        return keys, values

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            (self.keys.float() * self.key_scales).to(self.dtype),
            (self.values.float() * self.value_scales).to(self.dtype),
        )


class DeepseekLatentCache(Cache):
    """A Cache of latent layers, created lazily per layer index (main layers and MTP layers alike)."""

    def __init__(self, fp8: bool = False, **kwargs):
        self.fp8 = fp8
        super().__init__(layer_class_to_replicate=FP8LatentLayer if fp8 else LatentLayer, **kwargs)

    def _per_token(self, layer_bytes) -> float:
        layers = [layer for layer in self.layers if layer.get_seq_length() > 0]
        tokens = max((layer.keys.shape[0] * layer.get_seq_length() for layer in layers), default=0)
        return sum(layer_bytes(layer) for layer in layers) / max(tokens, 1)

    def nbytes_per_token(self) -> float:
        """Bytes held per cached token, summed over layers (scales included for FP8)."""
        return self._per_token(LatentLayer.nbytes)

    def nbytes_allocated_per_token(self) -> float:
        """Bytes allocated per cached token (the buffers, spare room included)."""
        return self._per_token(LatentLayer.nbytes_allocated)
