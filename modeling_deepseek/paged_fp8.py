"""The FP8 latent under continuous batching: e4m3 rows with per-token scales in transformers' paged cache.

transformers' paged cache is one flat byte tensor, cut into pages by one allocator per attention kind. For MLA its
`MLACacheAllocator` views a page as one row per token holding the two latents (kv_lora_rank + qk_rope_head_dim values)
in the model's dtype. `FP8LatentAllocator` keeps everything else of it (pages, blocks, read / write indices, prefix
sharing, forks that copy whole blocks as bytes) and changes only what a row holds: the same two latents in e4m3, each
with its token's fp32 scale, quantized exactly as `FP8LatentLayer` does inside generate() (fp8_format.quantize_per_token):

    [ latent e4m3 (C bytes) | rope key e4m3 (R bytes) | pad to 4 | latent scale fp32 | rope key scale fp32 ]

For V3 (C = 512, R = 64) that is 584 bytes per token and layer against 1,152 in bf16 (2,304 in fp32). The cache's
size follows from the allocator's bytes per block, so a `num_blocks` cache takes half the memory and a
`max_memory_percent` cache holds twice the tokens.

Reads dequantize to the compute dtype. As in FP8LatentLayer, the tokens a forward writes are attended by that forward
in full precision and later forwards read the e4m3 copy. So a request whose prompt is prefilled in one step gets
exactly generate(latent_cache_dtype="fp8")'s tokens; a prompt prefilled in chunks, after a shared cached prefix, or
forked (the engine prefills it up to its last token, which each copy runs) gets those of
generate(latent_cache_dtype="fp8", prefill_chunk_size=...) split at the same places. A request whose cache the engine
drops under memory pressure and prefills again ("soft reset") is re-run in full precision up to where it stopped, so
its later tokens can differ from an uninterrupted run by the e4m3 rounding; offloading to CPU memory copies the rows
as bytes and changes nothing.

transformers' manager builds its PagedAttentionCache itself, and the cache picks its allocators itself; neither takes an
argument for another class. `use_fp8_latent_cache(manager)` makes one manager build an `FP8PagedLatentCache`, whose
MLA allocator is an FP8LatentAllocator (compat.build_paged_cache_with). Needs transformers >= 5.25 (MLACacheAllocator):
import this module only after continuous_batching.check_continuous_batching.
"""

from __future__ import annotations

import torch
from transformers.generation.continuous_batching.cache import PagedAttentionCache
from transformers.generation.continuous_batching.cache_allocators import MLACacheAllocator

from .fp8_format import dequantize_per_token, quantize_per_token
from .compat import build_paged_cache_with

SCALE_BYTES = 4  # one fp32 scale per latent and token


class FP8LatentAllocator(MLACacheAllocator):
    """transformers' MLA allocator with rows of e4m3 values and per-token scales (module docstring), built from the
    MLACacheAllocator the paged cache made for the same layers."""

    def __init__(self, mla: MLACacheAllocator):
        self.kv_lora_rank, self.row_numel, self.cache_dtype = mla.kv_lora_rank, mla.row_numel, mla.cache_dtype
        # The scales start on a 4-byte boundary of every row, so that they can be viewed as fp32 in place.
        self.scales_offset = -(-self.row_numel // SCALE_BYTES) * SCALE_BYTES
        self.row_bytes = self.scales_offset + 2 * SCALE_BYTES
        self._before_cache_tensor_init(
            index=mla.index,
            layer_indices=mla.layer_indices,
            tokens_per_page=mla.tokens_per_page,
            bytes_per_page=self.row_bytes * mla.tokens_per_page,
            allow_block_sharing=mla.use_block_sharing,
        )

    def register_cache_tensor(self, bytes_per_sector, non_trash_bytes, cache_tensor, pool) -> None:
        """Views the byte tensor as one row of `row_bytes` per token (the trash sectors included), and each layer's
        rows as three column slices: latent bytes [N, C], rope key bytes [N, R], scales [N, 2] fp32."""
        self.bytes_per_sector = bytes_per_sector
        self._copy_view = cache_tensor.view(-1, self.bytes_per_block)  # whole blocks, for forks
        total_tokens = ((non_trash_bytes + 2 * bytes_per_sector) // self.bytes_per_page) * self.tokens_per_page
        rows_NB = cache_tensor[: total_tokens * self.row_bytes].view(total_tokens, self.row_bytes)
        self._after_cache_tensor_init(non_trash_bytes, bytes_per_sector, rows_NB, pool)
        C, W = self.kv_lora_rank, self.row_numel
        self._row_views: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for i, layer_idx in enumerate(self.layer_indices):
            rows = self.cache_tensor[i * self.tokens_per_page :]
            scales_N2 = rows[:, self.scales_offset : self.row_bytes].view(torch.float32)
            self._row_views[layer_idx] = (rows[:, :C], rows[:, C:W], scales_N2)

    def update(self, key_states, value_states, layer_idx, read_index, write_index):
        """Writes the new latents ([T, 1, C] and rotated keys [T, 1, R]) as e4m3 + scales and returns every row of
        `read_index` ([S, 1, *], the batch's requests one after the other) in the compute dtype: the rows written
        now as they came, the others dequantized."""
        latent_TC, k_rope_TR = key_states.flatten(1), value_states.flatten(1)
        latent_bytes, rope_bytes, scales_N2 = self._row_views[layer_idx]
        (latent_q, latent_scale), (rope_q, rope_scale) = quantize_per_token(latent_TC), quantize_per_token(k_rope_TR)
        # e4m3 has no index_copy_ kernel on every device: the values are copied as bytes.
        latent_bytes.index_copy_(0, write_index, latent_q.view(torch.uint8))
        rope_bytes.index_copy_(0, write_index, rope_q.view(torch.uint8))
        scales_N2.index_copy_(0, write_index, torch.cat([latent_scale, rope_scale], dim=-1))
        if read_index.numel() == 0:  # no request reads cached rows: attention needs only the new ones
            return key_states, value_states

        scales_S2 = scales_N2.index_select(0, read_index)
        latent_SC = dequantize_per_token(latent_bytes.index_select(0, read_index), scales_S2[:, :1], latent_TC.dtype)
        k_rope_SR = dequantize_per_token(rope_bytes.index_select(0, read_index), scales_S2[:, 1:], k_rope_TR.dtype)
        # Where the rows written now are read back (the last tokens of their requests), they stay in full precision.
        written, read_at = _positions_of(write_index, read_index)
        latent_SC[read_at] = latent_TC[written]
        k_rope_SR[read_at] = k_rope_TR[written]
        return latent_SC.unsqueeze(1), k_rope_SR.unsqueeze(1)


def _positions_of(write_index: torch.Tensor, read_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, j) pairs with write_index[i] == read_index[j]. A real token's slot is written once per step; padding
    tokens write to the write-trash slot, which is never read."""
    if write_index.numel() == 0:
        return write_index, write_index
    sorted_w, order = write_index.sort()
    at = torch.searchsorted(sorted_w, read_index).clamp_max(sorted_w.numel() - 1)
    hit = sorted_w[at] == read_index
    return order[at[hit]], hit.nonzero().squeeze(1)


class FP8PagedLatentCache(PagedAttentionCache):
    """transformers' PagedAttentionCache whose MLA layers are stored by an FP8LatentAllocator."""

    def _create_allocator(self, *args, **kwargs):
        allocator = super()._create_allocator(*args, **kwargs)
        return FP8LatentAllocator(allocator) if isinstance(allocator, MLACacheAllocator) else allocator


def use_fp8_latent_cache(manager) -> None:
    """Make transformers' continuous-batching `manager` store the latent in e4m3 (before its cache is built)."""
    build_paged_cache_with(manager, FP8PagedLatentCache)
