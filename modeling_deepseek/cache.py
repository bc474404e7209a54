"""The MLA cache: per token and layer, only the latent (kv_lora_rank) and the shared RoPE key (qk_rope_head_dim).

transformers' own cache types with latent layers inside: `DeepseekLatentCache` is a `DynamicCache`, what generate()
and a forward with use_cache=True start from; `DeepseekStaticLatentCache` a `StaticCache`, what generate builds for
cache_implementation="static" (an argument, the generation config or generation_config.json). generate, its compiled
path, cropping for speculation, beam reordering and cache round trips work as usual. Each layer keeps keys = latent
[B, 1, S, C] and values = rope key [B, 1, S, R]: one "head" shared by every query head, nothing per head is ever
stored. Two layer kinds, both built on transformers' public `CacheLayerMixin` and owning all of their state (so
nothing here depends on how `DynamicLayer` keeps its own):

- `LatentLayer`: bf16/fp32, appended into a buffer that doubles when full, so a decode step writes one token
  instead of re-copying the whole cache (plain `torch.cat` makes a long generation quadratic in memory traffic).
- `FP8LatentLayer`: e4m3 values with one fp32 scale per token (amax / 448 over the token's row), half the bytes of
  bf16 (plus 8 bytes of scales per token and layer). A per-token scale needs no calibration and never goes stale
  as new tokens arrive, unlike a per-tensor scale frozen on the prompt. Reads dequantize to the compute dtype; the
  tokens of the forward that writes them are attended in full precision.

A DeepSeek-V3.2 model (config.index_topk set) also caches its lightning indexer's key per token and layer, in the
model dtype or (index_cache_dtype="fp8") in e4m3: index_cache.py; `update_latent_cache` writes all streams at once.

`DeepseekLatentCache(fp8=True)` selects the FP8 layers; `generate(..., latent_cache_dtype="fp8")` or
`config.latent_cache_dtype = "fp8"` does the same inside generate (`index_fp8` / index_cache_dtype: the indexer key).

`DeepseekStaticLatentCache(config, max_cache_len)` is the fixed-size kind, for `torch.compile` and CUDA graphs: every
layer preallocates `[B, 1, max_cache_len, C]` and `[B, 1, max_cache_len, R]` (e4m3 plus scales with fp8=True) at
fixed addresses, writes the new tokens in place at the positions held in a tensor, and hands attention the whole
buffer: the mask (transformers' `create_causal_mask`, sized by `get_mask_sizes`) hides the slots not yet written. No
shape, address or Python int changes from one decode step to the next, so a compiled step never recompiles and a
captured CUDA graph replays. transformers' generate would build its per-head caches, which cannot hold the latent
pair; the model has it build these (`latent_cache_for_generate`, through compat.BuildsGenerationCache).
"""

from __future__ import annotations

from functools import partial

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, StaticCache

from .compat import mark_static_address
from .fp8_format import FP8_DTYPE as FP8, dequantize_per_token, quantize_per_token
from .index_cache import IndexKeyStream


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


class LatentLayer(IndexKeyStream, CacheLayerMixin):
    """One layer's latent cache. Its per-token tensors (`streams`) are views of growing buffers; every operation of
    the Cache API (crop, batch selection / repetition, beam reordering, reset) applies to all of them alike."""

    is_croppable = True
    is_sliding = False
    streams = ("keys", "values")

    def __init__(self, index_dim: int | None = None, index_fp8: bool = False, **kwargs):
        super().__init__()
        self.index_dim, self.index_fp8 = index_dim, bool(index_dim) and index_fp8
        self.streams = type(self).streams + self._index_streams()  # DeepSeek-V3.2: the indexer's key (index_cache.py)
        self._buffers = dict.fromkeys(self.streams)

    def lazy_initialization(self, key_states, value_states):
        self.device, self.dtype = key_states.device, key_states.dtype
        for name in self.streams:
            setattr(self, name, None)
        self.is_initialized = True

    def stream_layout(self, key_states, value_states) -> dict[str, tuple[int, torch.dtype]]:
        """Per stream: last dimension and dtype of what is stored (the static layers preallocate from it)."""
        return {"keys": (key_states.shape[-1], key_states.dtype), "values": (value_states.shape[-1], value_states.dtype),
                **self._index_layout(key_states)}

    def _write(self, **new):
        """Store the new tokens of every stream; returns where they went, for `_put`."""
        for name, tensor in new.items():
            self._buffers[name], view = _append(self._buffers[name], getattr(self, name), tensor)
            setattr(self, name, view)
        return next(iter(new.values())).shape[-2]

    @staticmethod
    def _put(full, slots, new) -> None:
        """Write `new` into a read-back copy of a stream at the slots `_write` returned (the last `slots` tokens)."""
        full[..., -slots:, :] = new

    def update(self, key_states, value_states, *args, index_keys=None, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._slots = self._write(keys=key_states, values=value_states, **self._index_stream(index_keys))
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

    def update(self, key_states, value_states, *args, index_keys=None, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        (qk, sk), (qv, sv) = quantize_per_token(key_states), quantize_per_token(value_states)
        slots = self._slots = self._write(keys=qk, key_scales=sk, values=qv, value_scales=sv,
                                          **self._index_stream(index_keys))
        # The tokens being written attend to themselves in full precision (a prompt's own logits are exact); what
        # later forwards read back is the e4m3 copy.
        keys, values = self.dequantized()
        self._put(keys, slots, key_states)
        self._put(values, slots, value_states)
        return keys, values

    def stream_layout(self, key_states, value_states) -> dict[str, tuple[int, torch.dtype]]:
        C, R = key_states.shape[-1], value_states.shape[-1]
        return {"keys": (C, FP8), "key_scales": (1, torch.float32), "values": (R, FP8), "value_scales": (1, torch.float32),
                **self._index_layout(key_states)}

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (dequantize_per_token(self.keys, self.key_scales, self.dtype),
                dequantize_per_token(self.values, self.value_scales, self.dtype))


class StaticLatentLayer(LatentLayer):
    """One layer's fixed-size latent cache: every stream is one `[B, 1, max_cache_len, width]` buffer, allocated once
    and marked static for dynamo; the number of tokens written is a 0-d tensor (`cumulative_length`), so that writing
    a token changes no Python value a compiled graph would guard on. `update` returns the whole buffers."""

    is_compileable = True

    def __init__(self, max_cache_len: int, index_dim: int | None = None, index_fp8: bool = False, **kwargs):
        super().__init__(index_dim, index_fp8)
        self.max_cache_len = max_cache_len
        self.cumulative_length = torch.tensor(0, dtype=torch.long)

    def lazy_initialization(self, key_states, value_states):
        self.device, self.dtype = key_states.device, key_states.dtype
        self.batch_size = key_states.shape[0]
        for name, (width, dtype) in self.stream_layout(key_states, value_states).items():
            setattr(self, name, torch.zeros(self.batch_size, 1, self.max_cache_len, width, dtype=dtype,
                                            device=self.device))
        self.cumulative_length = self.cumulative_length.to(self.device)
        self._mark_static()
        self.is_initialized = True

    def _mark_static(self) -> None:
        # Fixed addresses: a compiled graph reads the buffers in place, and CUDA graphs can replay over them. (Not
        # possible while tracing: a cache allocated inside a compiled prefill is simply not marked.)
        if not torch.compiler.is_compiling():
            for name in self.streams:
                mark_static_address(getattr(self, name))
            mark_static_address(self.cumulative_length)

    def _write(self, **new):
        t = next(iter(new.values())).shape[-2]
        # Checked where it costs nothing: with no compiled graph around, and on the CPU or for a prompt (a read of the
        # position on a GPU would stall every decode step). Past the end, index_copy_ fails on its own in eager mode.
        if not torch.compiler.is_compiling():
            batch = next(iter(new.values())).shape[0]
            if batch != self.batch_size:
                raise ValueError(f"the static latent cache was allocated for batch size {self.batch_size}, got {batch}")
            if t > 1 or self.device.type == "cpu":
                filled = int(self.cumulative_length)
                if filled + t > self.max_cache_len:
                    raise ValueError(f"the static latent cache holds max_cache_len={self.max_cache_len} tokens: "
                                     f"{filled} cached + {t} new do not fit; build it with a larger max_cache_len")
        positions = torch.arange(t, device=self.device) + self.cumulative_length
        for name, tensor in new.items():
            buf = getattr(self, name)
            if buf.dtype == FP8:  # no index_copy_ kernel for e4m3 on every device: copy the bytes
                buf, tensor = buf.view(torch.uint8), tensor.view(torch.uint8)
            buf.index_copy_(2, positions, tensor)
        self.cumulative_length.add_(t)
        return positions

    @staticmethod
    def _put(full, slots, new) -> None:
        full.index_copy_(2, slots, new)

    def get_seq_length(self):
        return self.cumulative_length if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `-tokens_to_remove` tokens: the next writes overwrite them."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if self.is_initialized:
            self.cumulative_length.sub_(-tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:  # in place: the addresses stay
            for name in self.streams:
                buf = getattr(self, name)
                buf.copy_(buf.index_select(0, beam_idx.to(buf.device)))

    def _rebatch(self, fn) -> None:
        """A new batch size needs new buffers (eager only); they are marked static again."""
        if self.is_initialized:
            for name in self.streams:
                setattr(self, name, fn(getattr(self, name)).contiguous())
            self.batch_size = self.keys.shape[0]
            self._mark_static()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rebatch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rebatch(lambda t: t[indices])

    def reset(self) -> None:
        if self.is_initialized:
            for name in self.streams:
                getattr(self, name).zero_()
        self.cumulative_length.zero_()

    def offload(self):
        raise NotImplementedError("a static latent cache stays on its device (its buffers have fixed addresses)")

    def nbytes(self) -> int:
        return self.nbytes_allocated() * int(self.get_seq_length()) // self.max_cache_len

    def nbytes_allocated(self) -> int:
        return sum(getattr(self, name).numel() * getattr(self, name).element_size() for name in self.streams)


class StaticFP8LatentLayer(StaticLatentLayer, FP8LatentLayer):
    """The static buffers of FP8LatentLayer's streams (e4m3 values, fp32 per-token scales)."""


class LatentCacheMixin:
    """What both latent caches add to transformers' Cache: which layers they hold (`fp8`) and what those cost."""

    fp8: bool

    def _per_token(self, layer_bytes) -> float:
        layers = [layer for layer in self.layers if layer.get_seq_length() > 0]
        tokens = max((layer.keys.shape[0] * int(layer.get_seq_length()) for layer in layers), default=0)
        return sum(layer_bytes(layer) for layer in layers) / max(tokens, 1)

    def nbytes_per_token(self) -> float:
        """Bytes held per cached token, summed over layers (scales included for FP8)."""
        return self._per_token(lambda layer: layer.nbytes())

    def nbytes_allocated_per_token(self) -> float:
        """Bytes allocated per cached token (the buffers, spare room included)."""
        return self._per_token(lambda layer: layer.nbytes_allocated())


def index_dim(config) -> int | None:
    """Width of the indexer-key stream a cache for `config` holds: index_head_dim for DeepSeek-V3.2, else none."""
    return config.index_head_dim if config is not None and getattr(config, "index_topk", None) is not None else None


def update_latent_cache(cache, layer_idx: int, latent_B1TC, k_rope_B1TR, index_keys_BTD=None):
    """Write one layer's new tokens (latent, rope key and, for DeepSeek-V3.2, the indexer key [B, T, D]) into `cache`;
    returns all of its cached (latent, rope key, indexer keys [B, S, D] or None)."""
    if index_keys_BTD is None:
        return (*cache.update(latent_B1TC, k_rope_B1TR, layer_idx), None)
    if not isinstance(cache, LatentCacheMixin):
        raise ValueError(f"{type(cache).__name__} cannot hold DeepSeek-V3.2's indexer keys: use the model's own "
                         "DeepseekLatentCache or DeepseekStaticLatentCache")
    latent_B1SC, k_rope_B1SR = cache.update(latent_B1TC, k_rope_B1TR, layer_idx, index_keys=index_keys_BTD.unsqueeze(1))
    return latent_B1SC, k_rope_B1SR, cache.layers[layer_idx].read_index_keys(index_keys_BTD.unsqueeze(1)).squeeze(1)


class DeepseekLatentCache(LatentCacheMixin, DynamicCache):
    """transformers' DynamicCache over latent layers, created lazily per layer index (main layers and MTP layers
    alike): what generate() and a forward with use_cache=True start from.

    Takes what transformers passes to a DynamicCache: `config` (its `latent_cache_dtype` picks the FP8 layers unless
    `fp8` says otherwise, its `index_cache_dtype` e4m3 indexer keys unless `index_fp8` does) and `offloading` (each
    layer's tokens go to the CPU between its uses; CUDA only).
    """

    def __init__(self, config=None, fp8: bool | None = None, offloading: bool = False,
                 offload_only_non_sliding: bool = False, index_fp8: bool | None = None):
        self.fp8 = fp8 if fp8 is not None else config is not None and config.latent_cache_dtype == "fp8"
        self.index_fp8 = (index_fp8 if index_fp8 is not None else
                          config is not None and config.index_cache_dtype == "fp8")
        # DynamicCache's own __init__ builds per-head layers from the config; the latent layers are replicated per
        # layer index instead, on the first write to it.
        layer = partial(FP8LatentLayer if self.fp8 else LatentLayer, index_dim=index_dim(config),
                        index_fp8=self.index_fp8)
        Cache.__init__(self, layer_class_to_replicate=layer, offloading=offloading, offload_only_non_sliding=offload_only_non_sliding)


class DeepseekStaticLatentCache(LatentCacheMixin, StaticCache):
    """transformers' StaticCache over fixed-size latent layers, for compiled decoding: one StaticLatentLayer
    (StaticFP8LatentLayer with fp8=True, or config.latent_cache_dtype = "fp8") per decoder layer, each allocated on
    its first write or all at once by `early_initialization`. What generate(cache_implementation="static") builds.

        cache = DeepseekStaticLatentCache(model.config, max_cache_len=4096)
        model(ids, cache=cache, use_cache=True)      # prefill, then one token per call, compiled or not

    `num_layers`: how many layer indices it holds (default config.num_hidden_layers, as transformers' StaticCache);
    MTP speculation's own cache holds the MTP modules' indices too. `offloading` is refused: the buffers keep their
    addresses on their device for the life of the cache.
    """

    def __init__(self, config, max_cache_len: int, fp8: bool | None = None, num_layers: int | None = None,
                 offloading: bool = False, index_fp8: bool | None = None):
        if not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"max_cache_len must be a positive integer, got {max_cache_len!r}")
        if offloading:
            raise ValueError("a static latent cache cannot be offloaded: its buffers keep fixed addresses")
        self.fp8 = fp8 if fp8 is not None else config.latent_cache_dtype == "fp8"
        self.index_fp8 = index_fp8 if index_fp8 is not None else config.index_cache_dtype == "fp8"
        self.max_cache_len = max_cache_len
        self.latent_widths = (config.kv_lora_rank, config.qk_rope_head_dim)
        layer = StaticFP8LatentLayer if self.fp8 else StaticLatentLayer
        n = config.num_hidden_layers if num_layers is None else num_layers
        # StaticCache's own __init__ builds per-head layers from the config; these hold the latent pair.
        Cache.__init__(self, layers=[layer(max_cache_len, index_dim(config), self.index_fp8) for _ in range(n)])

    def early_initialization(self, batch_size: int, dtype: torch.dtype, device, layers=None) -> None:
        """Allocate the buffers of `layers` (indices; default: all) now rather than on their first write: needed when
        the first forward is itself compiled, since buffers allocated while tracing cannot be marked static."""
        C, R = self.latent_widths
        for i in range(len(self.layers)) if layers is None else layers:
            if not self.layers[i].is_initialized:
                self.layers[i].lazy_initialization(torch.empty(batch_size, 1, 0, C, dtype=dtype, device=device),
                                                   torch.empty(batch_size, 1, 0, R, dtype=dtype, device=device))


def static_latent_cache_for_generate(model, generation_config, batch_size: int, needed: int, fp8: bool,
                                     prompt_length: int | None = None, slots_per_token: int = 1,
                                     layers=None, index_fp8: bool | None = None) -> DeepseekStaticLatentCache:
    """The DeepseekStaticLatentCache of one generate call of `model`, which writes `needed` slots (the prompt's tokens
    and `slots_per_token` per new token but the last, which never goes through a forward). The generation config's
    `max_cache_len` must hold them (a clear error now, not a failed write mid-generation); without it, never shorter
    than the previous call's, so that a compiled step sees the same shapes again. Its `layers` (default: the decoder
    layers) are allocated now, for the `batch_size` prompts times their beams / returned sequences: a compiled
    prefill could not mark them static."""
    length = generation_config.max_cache_len
    if length is None:
        length = model._static_cache_len = max(needed, getattr(model, "_static_cache_len", 0))
    elif needed > length:
        each = f" ({slots_per_token} slots per token under MTP speculation)" if slots_per_token > 1 else ""
        what = (f"the prompt ({prompt_length} tokens) is longer than" if (prompt_length or 0) > length else
                f"the prompt and max_new_tokens{each} need {needed} slots, more than")
        raise ValueError(f"cache_implementation='static': {what} max_cache_len={length}")
    layers = range(model.config.num_hidden_layers) if layers is None else layers
    cache = DeepseekStaticLatentCache(model.config, length, fp8=fp8, num_layers=max(layers) + 1, index_fp8=index_fp8)
    rows = batch_size * max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
    cache.early_initialization(rows, model.dtype, model.device, layers)
    return cache


def uses_static_cache(generation_config, config) -> bool:
    """Whether a generation asks for the static latent cache (cache_implementation="static"); None and "dynamic"
    mean the DeepseekLatentCache. The others (offloaded, quantized) hold per-head keys and values and raise."""
    implementation = generation_config.cache_implementation
    if implementation not in (None, "dynamic", "static"):
        raise ValueError(
            f"generate(cache_implementation={implementation!r}) is not supported: DeepSeek's MLA caches one "
            f"{config.latent_cache_dim}-wide latent per token (DeepseekLatentCache), which the per-head "
            "offloaded / quantized caches cannot hold. Leave cache_implementation unset, or use 'static'."
        )
    return implementation == "static"


def latent_cache_for_generate(model, generation_config, batch_size: int, max_cache_length: int, fp8: bool,
                              index_fp8: bool | None = None) -> DeepseekLatentCache | DeepseekStaticLatentCache:
    """The cache transformers' generate() starts `model` from, in place of its own DynamicCache / StaticCache (which
    hold per-head keys and values): a DeepseekLatentCache, or with cache_implementation="static" a
    DeepseekStaticLatentCache for the `max_cache_length` slots generate computed for the call."""
    if not uses_static_cache(generation_config, model.config):
        return DeepseekLatentCache(config=model.config, fp8=fp8, index_fp8=index_fp8)
    new = generation_config.max_new_tokens
    return static_latent_cache_for_generate(model, generation_config, batch_size, max_cache_length, fp8,
                                            index_fp8=index_fp8, prompt_length=None if new is None else max_cache_length + 1 - new)
