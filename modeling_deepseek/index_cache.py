"""DeepSeek-V3.2's indexer keys in generate()'s latent caches (cache.py), in the model dtype or in e4m3.

A V3.2 model (config.index_topk set) caches its lightning indexer's key per token and layer beside the latent pair:
stream "index_keys", [B, 1, S, index_head_dim]. In the model dtype that is 256 bytes per token and layer at V3.2's
width (128) in bf16, beside the latent pair's 1,152. With index_cache_dtype="fp8" (the config field, a generation
config's, or generate(index_cache_dtype="fp8")) the key is stored in e4m3 with one fp32 scale per token (stream
"index_key_scales"): 132 bytes. That is the paged rows' format (paged_fp8.py), read back the same way, so generate()
and the continuous-batching engine give the same tokens: a forward scores the tokens it writes with their
full-precision keys, and later forwards read the e4m3 copy (as FP8LatentLayer does for the latent). It is independent
of latent_cache_dtype: every latent layer kind (dynamic or static, latent in the model dtype or in e4m3) holds either.
"""

from __future__ import annotations

import torch

from .fp8_format import FP8_DTYPE as FP8, dequantize_per_token, quantize_per_token


class IndexKeyStream:
    """The indexer-key part of a latent layer: the streams it adds, their layout, what an update stores in them and
    what the indexer reads back. The layer sets `index_dim` (None: no indexer) and `index_fp8`, and keeps in `_slots`
    where its last update wrote (what its `_write` returned)."""

    index_dim: int | None
    index_fp8: bool

    def _index_streams(self) -> tuple[str, ...]:
        if not self.index_dim:
            return ()
        return ("index_keys", "index_key_scales") if self.index_fp8 else ("index_keys",)

    def _index_layout(self, key_states) -> dict[str, tuple[int, torch.dtype]]:
        if not self.index_dim:
            return {}
        if self.index_fp8:
            return {"index_keys": (self.index_dim, FP8), "index_key_scales": (1, torch.float32)}
        return {"index_keys": (self.index_dim, key_states.dtype)}

    def _index_stream(self, index_keys) -> dict[str, torch.Tensor]:
        """The indexer-key streams of an update, checked against the layer's streams."""
        if (index_keys is None) != (not self.index_dim):
            raise ValueError("a DeepSeek-V3.2 layer's cache holds its indexer keys: build the cache from the model's "
                             "config (index_topk) and pass index_keys with every update" if self.index_dim else
                             "this latent cache was built without an indexer-key stream (config.index_topk unset)")
        if index_keys is None:
            return {}
        if not self.index_fp8:
            return {"index_keys": index_keys}
        q, scale = quantize_per_token(index_keys)
        return {"index_keys": q, "index_key_scales": scale}

    def read_index_keys(self, new_B1TD: torch.Tensor) -> torch.Tensor:
        """All cached indexer keys [B, 1, S, D] after an update that wrote `new_B1TD`: with index_fp8 dequantized to
        its dtype, the tokens just written in full precision."""
        if not self.index_fp8:
            return self.index_keys
        keys_B1SD = dequantize_per_token(self.index_keys, self.index_key_scales, new_B1TD.dtype)
        self._put(keys_B1SD, self._slots, new_B1TD)
        return keys_B1SD
