"""What one row of transformers' paged latent cache holds: the FP8 latent and the V3.2 indexer keys under continuous
batching.

transformers' paged cache is one flat byte tensor, cut into pages by one allocator per attention kind. For MLA its
`MLACacheAllocator` views a page as one row per token holding the two latents (kv_lora_rank + qk_rope_head_dim values)
in the model's dtype. `LatentRowAllocator` keeps everything else of it (pages, blocks, read / write indices, prefix
sharing, forks that copy whole blocks as bytes) and changes only what a row holds: up to three streams, each in the
model's dtype or in e4m3 with its token's fp32 scale (quantized exactly as the FP8 layers of generate()'s cache do,
fp8_format.quantize_per_token):

    [ streams in the model dtype | streams in e4m3 | pad to 4 | one fp32 scale per e4m3 stream ]

The streams: the latent (C values), the RoPE key (R) and, for a DeepSeek-V3.2 model (DSA), the lightning indexer's key
(I = index_head_dim, one per token shared by the indexer's heads). The latent pair is in e4m3 with
latent_cache_dtype="fp8", the indexer key with index_cache_dtype="fp8". Bytes per token and layer for V3.2 (C = 512,
R = 64, I = 128), `row_bytes`:

    bf16 latent + bf16 indexer key      1,408      fp8 latent + bf16 indexer key     840
    bf16 latent + fp8 indexer key       1,284      fp8 latent + fp8 indexer key      716

(the e4m3 indexer key: 128 bytes + a 4-byte scale, against 256 in bf16 and 512 in fp32). The cache's size follows
from the allocator's bytes per block, so a `num_blocks` cache takes that share of the memory and a
`max_memory_percent` cache holds that many more tokens.

The engine's `cache.update(key, value, ...)` carries two tensors: the latent as the key, and the RoPE key and the
indexer key side by side as the value, split again by the attention (continuous_batching.paged_attention).

Reads dequantize to the compute dtype. As in the FP8 layers of generate()'s cache, the tokens a forward writes are
attended (and scored by the indexer) in full precision by that forward, and later forwards read the e4m3 copy. So a
request whose prompt is prefilled in one step gets exactly generate(latent_cache_dtype="fp8")'s tokens; a prompt
prefilled in chunks, after a shared cached prefix, or forked (the engine prefills it up to its last token, which each
copy runs) gets those of generate(latent_cache_dtype="fp8", prefill_chunk_size=...) split at the same places. A
request whose cache the engine drops under memory pressure and prefills again ("soft reset") is re-run in full
precision up to where it stopped, so its later tokens can differ from an uninterrupted run by the e4m3 rounding;
offloading to CPU memory copies the rows as bytes and changes nothing.

transformers' manager builds its PagedAttentionCache itself, and the cache picks its allocators itself; neither takes an
argument for another class. `use_paged_latent_rows(manager, ...)` makes one manager build a `PagedLatentCache`, whose
MLA allocator is a LatentRowAllocator (compat.build_paged_cache_with). Needs transformers >= 5.25 (MLACacheAllocator):
import this module only after continuous_batching.check_continuous_batching.
"""

from __future__ import annotations

import torch
from transformers.generation.continuous_batching.cache import PagedAttentionCache
from transformers.generation.continuous_batching.cache_allocators import MLACacheAllocator

from .compat import build_paged_cache_with
from .fp8_format import dequantize_per_token, quantize_per_token

SCALE_BYTES = 4  # one fp32 scale per e4m3 stream and token


class LatentRowAllocator(MLACacheAllocator):
    """transformers' MLA allocator whose rows hold the latent, the RoPE key and optionally the indexer key, each in the
    model dtype or e4m3 + a per-token scale (module docstring); built from the MLACacheAllocator the paged cache made
    for the same layers."""

    def __init__(self, mla: MLACacheAllocator, index_head_dim: int = 0, latent_fp8: bool = False,
                 index_fp8: bool = False):
        if index_fp8 and not index_head_dim:
            raise ValueError("index_cache_dtype='fp8' needs a model with the indexer (DeepSeek-V3.2's index_head_dim)")
        C, R = mla.kv_lora_rank, mla.row_numel - mla.kv_lora_rank
        self.kv_lora_rank, self.cache_dtype = C, mla.cache_dtype
        self.index_head_dim = index_head_dim
        # (name, width, e4m3?) in the order update() takes and returns them
        self.streams = [("latent", C, latent_fp8), ("rope", R, latent_fp8)]
        if index_head_dim:
            self.streams.append(("index", index_head_dim, index_fp8))
        self.row_numel = sum(width for _, width, _ in self.streams)  # values per row, as MLACacheAllocator counts
        # Byte layout: model-dtype streams first (aligned to their itemsize), then e4m3 streams, then the fp32 scales
        # on a 4-byte boundary, so that every stream can be viewed in its dtype in place.
        self.offsets, at = {}, 0
        for name, width, fp8 in sorted(self.streams, key=lambda s: s[2]):
            self.offsets[name] = at
            at += width * (1 if fp8 else self.cache_dtype.itemsize)
        self.fp8_streams = [name for name, _, fp8 in self.streams if fp8]
        self.scales_offset = -(-at // SCALE_BYTES) * SCALE_BYTES
        row_bytes = self.scales_offset + SCALE_BYTES * len(self.fp8_streams)
        align = max(self.cache_dtype.itemsize, SCALE_BYTES if self.fp8_streams else 1)
        self.row_bytes = -(-row_bytes // align) * align
        self._before_cache_tensor_init(
            index=mla.index,
            layer_indices=mla.layer_indices,
            tokens_per_page=mla.tokens_per_page,
            bytes_per_page=self.row_bytes * mla.tokens_per_page,
            allow_block_sharing=mla.use_block_sharing,
        )

    def register_cache_tensor(self, bytes_per_sector, non_trash_bytes, cache_tensor, pool) -> None:
        """Views the byte tensor as one row of `row_bytes` per token (the trash sectors included), and each layer's
        rows as one column slice per stream (in its storage dtype: model dtype, or e4m3 bytes) plus the scales."""
        self.bytes_per_sector = bytes_per_sector
        self._copy_view = cache_tensor.view(-1, self.bytes_per_block)  # whole blocks, for forks
        total_tokens = ((non_trash_bytes + 2 * bytes_per_sector) // self.bytes_per_page) * self.tokens_per_page
        rows_NB = cache_tensor[: total_tokens * self.row_bytes].view(total_tokens, self.row_bytes)
        self._after_cache_tensor_init(non_trash_bytes, bytes_per_sector, rows_NB, pool)
        self._row_views: dict[int, tuple[dict[str, torch.Tensor], torch.Tensor]] = {}
        n_scales = len(self.fp8_streams)
        for i, layer_idx in enumerate(self.layer_indices):
            rows = self.cache_tensor[i * self.tokens_per_page :]
            views = {}
            for name, width, fp8 in self.streams:
                at = self.offsets[name]
                size = width * (1 if fp8 else self.cache_dtype.itemsize)
                views[name] = rows[:, at : at + size] if fp8 else rows[:, at : at + size].view(self.cache_dtype)
            scales = (rows[:, self.scales_offset : self.scales_offset + SCALE_BYTES * n_scales].view(torch.float32)
                      if n_scales else None)
            self._row_views[layer_idx] = (views, scales)

    def write(self, layer_idx: int, new: dict[str, torch.Tensor], write_index: torch.Tensor) -> None:
        """Store the new tokens of every stream ({name: [T, width]}) at the rows of `write_index`."""
        views, scales_NK = self._row_views[layer_idx]
        new_scales = []
        for name, _, fp8 in self.streams:
            tensor = new[name]
            if fp8:
                q, scale = quantize_per_token(tensor)
                tensor = q.view(torch.uint8)  # e4m3 has no index_copy_ kernel on every device: copied as bytes
                new_scales.append(scale)
            views[name].index_copy_(0, write_index, tensor.to(views[name].dtype))
        if new_scales:
            scales_NK.index_copy_(0, write_index, torch.cat(new_scales, dim=-1))

    def read(self, layer_idx: int, name: str, rows_S: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Stream `name` at the physical rows `rows_S`, in `dtype` ([S, width]; e4m3 streams dequantized)."""
        views, scales_NK = self._row_views[layer_idx]
        values = views[name].index_select(0, rows_S)
        if name not in self.fp8_streams:
            return values.to(dtype)
        k = self.fp8_streams.index(name)
        return dequantize_per_token(values, scales_NK.index_select(0, rows_S)[:, k : k + 1], dtype)

    def update(self, key_states, value_states, layer_idx, read_index, write_index):
        """The engine's update: writes the new tokens (latent [T, 1, C] as the key, RoPE key and indexer key side by
        side, [T, 1, R (+ I)], as the value) and returns every row of `read_index` ([S, 1, *], the batch's requests one after
        the other) in the compute dtype (see PagedRows)."""
        widths = [w for _, w, _ in self.streams[1:]]
        new = dict(zip(self.stream_names, (key_states.flatten(1), *value_states.flatten(1).split(widths, -1))))
        rows = PagedRows(self, layer_idx, new, read_index, write_index)
        if read_index.numel() == 0:  # no request reads cached rows: attention needs only the new ones
            return key_states, value_states
        latent, *rest = rows.read(self.stream_names)
        return latent.unsqueeze(1), torch.cat(rest, dim=-1).unsqueeze(1)

    @property
    def stream_names(self) -> list[str]:
        return [name for name, _, _ in self.streams]


class PagedRows:
    """One layer's rows for one step of the engine, written on construction: the batch's keys in read order (the
    requests one after the other, `cu_seq_lens_k`), of which `read` hands out all or only some positions. Sparse
    attention reads every indexer key but only the selected latent rows (paged_sparse.py); a read never copies more.

    Rows written by this step are handed out as they came (full precision), the others as stored. Where the engine
    reads no cached row (every request of the step starts from nothing), the keys are the new tokens themselves."""

    def __init__(self, allocator: LatentRowAllocator, layer_idx: int, new: dict[str, torch.Tensor],
                 read_index: torch.Tensor, write_index: torch.Tensor):
        self.allocator, self.layer_idx, self.new = allocator, layer_idx, new
        self.dtype = next(iter(new.values())).dtype
        allocator.write(layer_idx, new, write_index)
        self.read_index = read_index
        self.fresh_S = None  # per read position: which new token it is (-1: a cached one), for e4m3 streams
        if read_index.numel() and allocator.fp8_streams:
            written, read_at = _positions_of(write_index, read_index)
            self.fresh_S = torch.full_like(read_index, -1)
            self.fresh_S[read_at] = written

    def __len__(self) -> int:
        return self.read_index.numel() or next(iter(self.new.values())).shape[0]

    def read(self, names, positions: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Streams `names` at read `positions` (int64 [P], default: all), each [P, width] in the compute dtype."""
        if self.read_index.numel() == 0:
            return [self.new[n] if positions is None else self.new[n].index_select(0, positions) for n in names]
        rows_P = self.read_index if positions is None else self.read_index.index_select(0, positions)
        out = []
        for name in names:
            values = self.allocator.read(self.layer_idx, name, rows_P, self.dtype)
            if name in self.allocator.fp8_streams:
                fresh_P = self.fresh_S if positions is None else self.fresh_S.index_select(0, positions)
                at = (fresh_P >= 0).nonzero().squeeze(1)
                values[at] = self.new[name].index_select(0, fresh_P[at]).to(values.dtype)
            out.append(values)
        return out


class FP8LatentAllocator(LatentRowAllocator):
    """The latent pair in e4m3 with per-token scales (latent_cache_dtype="fp8"): C + R bytes and two fp32 scales
    per token and layer, 584 bytes for V3 against 1,152 in bf16 (2,304 in fp32); with the indexer, its key in e4m3 too
    unless index_fp8=False."""

    def __init__(self, mla: MLACacheAllocator, index_head_dim: int = 0, index_fp8: bool | None = None):
        index_fp8 = bool(index_head_dim) if index_fp8 is None else index_fp8
        super().__init__(mla, index_head_dim, latent_fp8=True, index_fp8=index_fp8)


def _positions_of(write_index: torch.Tensor, read_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, j) pairs with write_index[i] == read_index[j]. A real token's slot is written once per step; padding
    tokens write to the write-trash slot, which is never read."""
    if write_index.numel() == 0:
        return write_index, write_index
    sorted_w, order = write_index.sort()
    at = torch.searchsorted(sorted_w, read_index).clamp_max(sorted_w.numel() - 1)
    hit = sorted_w[at] == read_index
    return order[at[hit]], hit.nonzero().squeeze(1)


class PagedLatentCache(PagedAttentionCache):
    """transformers' PagedAttentionCache whose MLA layers are stored by a LatentRowAllocator with the class's
    `index_head_dim` (0: no indexer key), `latent_fp8` and `index_fp8` (`paged_latent_cache_class` makes one)."""

    index_head_dim, latent_fp8, index_fp8 = 0, False, False

    def _create_allocator(self, *args, **kwargs):
        allocator = super()._create_allocator(*args, **kwargs)
        if not isinstance(allocator, MLACacheAllocator):
            return allocator
        if self.latent_fp8:
            return FP8LatentAllocator(allocator, self.index_head_dim, self.index_fp8)
        return LatentRowAllocator(allocator, self.index_head_dim, index_fp8=self.index_fp8)

    @torch.compiler.disable  # as the engine's own update: the cache tensor's views do not trace
    def write_rows(self, layer_idx: int, kwargs: dict, **new: torch.Tensor) -> PagedRows:
        """Write one layer's new tokens, stream by stream ({name: [T, width]}: latent, rope, index), and return the
        step's rows to read from. Like the engine's `update`, it selects this layer's `cu_seq_lens_k` in `kwargs`."""
        allocator = self.layer_to_allocator[layer_idx]
        kwargs["cu_seq_lens_k"] = kwargs["cu_seq_lens_k"][allocator.layer_type].to(torch.int32)
        kwargs["max_length_k"] = kwargs["max_length_k"][allocator.layer_type]
        if kwargs.get("block_table") is not None or not isinstance(allocator, LatentRowAllocator):
            raise RuntimeError("the paged latent rows are read through their indices: a block-table (flash) step or "
                               "another allocator cannot run the indexer's sparse attention")
        return PagedRows(allocator, layer_idx, new, kwargs["read_index"][allocator.index],
                         kwargs["write_index"][allocator.index])


class FP8PagedLatentCache(PagedLatentCache):
    """transformers' PagedAttentionCache whose MLA layers are stored by an FP8LatentAllocator (no indexer key)."""

    latent_fp8 = True


def paged_latent_cache_class(index_head_dim: int = 0, latent_fp8: bool = False, index_fp8: bool = False):
    """The PagedAttentionCache class whose rows hold these streams (transformers' own where they are its own: the
    latent pair in the model dtype and nothing else)."""
    if not index_head_dim and not latent_fp8:
        return PagedAttentionCache
    if not index_head_dim:
        return FP8PagedLatentCache
    name = "PagedIndexedLatentCache" + ("FP8" if latent_fp8 else "") + ("FP8Index" if index_fp8 else "")
    return type(name, (PagedLatentCache,), {"index_head_dim": index_head_dim, "latent_fp8": latent_fp8,
                                            "index_fp8": index_fp8, "__module__": __name__})


def use_paged_latent_rows(manager, index_head_dim: int = 0, latent_fp8: bool = False, index_fp8: bool = False) -> None:
    """Make transformers' continuous-batching `manager` store these streams per row (before its cache is built)."""
    cache_class = paged_latent_cache_class(index_head_dim, latent_fp8, index_fp8)
    if cache_class is not PagedAttentionCache:
        build_paged_cache_with(manager, cache_class)


def use_fp8_latent_cache(manager) -> None:
    """Make transformers' continuous-batching `manager` store the latent in e4m3 (before its cache is built)."""
    use_paged_latent_rows(manager, latent_fp8=True)
