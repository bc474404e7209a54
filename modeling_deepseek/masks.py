"""The attention masks of one forward: built once and shared by every block, checked where the caller hands them in.

A caller passes a [B, S] padding mask, or a 4-D mask [B or 1, 1 or heads, T, S] (bool "may attend" or additive
float, e.g. block-diagonal for sequences packed in one row) that every attention path applies as given. From it each
forward builds what the attention layers read: the [B, 1, T, S] causal mask (or none where attention can run causal
without one) and, for the MoE layers, which of the current tokens are padding.
"""

from __future__ import annotations

import torch
from transformers.masking_utils import create_causal_mask

from .attention import prefix_causal_applies
from .compat import cache_kwargs
from .continuous_batching import is_paged_cache


def causal_mask(config, inputs_embeds, attention_mask, cache, position_ids) -> torch.Tensor | None:
    """The mask every attention layer of this forward applies; None where none is needed (a prefill chunk without
    padding on CPU runs prefix + causal attention; continuous batching attends request by request)."""
    T = inputs_embeds.shape[1]
    if is_paged_cache(cache):
        return None
    static = cache is not None and cache.is_compileable  # attends over its whole buffer, under a mask
    past = cache.get_seq_length() if T > 1 and cache is not None and not static else 0  # decode: skipped
    if not static and prefix_causal_applies(T, past + T, inputs_embeds.device, config._attn_implementation) and (
            attention_mask is None or (attention_mask.dim() == 2 and bool(attention_mask.all()))):  # CPU only
        return None
    return create_causal_mask(
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        # With no mask, attention takes the queries for the last T of the S keys; a static cache's S is its whole
        # buffer, so its mask is always built.
        allow_is_causal_skip=not static,
        **cache_kwargs(cache),
    )


def check_attention_mask(attention_mask: torch.Tensor | None, inputs: torch.Tensor) -> None:
    """A padding mask [B, S], or a 4-D mask [B or 1, 1 or heads, T, S] that every attention path applies as given
    (bool: True may attend; float: added to the scores). Any other shape raises here, naming it."""
    if attention_mask is None or attention_mask.dim() == 2:
        return
    B, T = inputs.shape[:2]
    shape = tuple(attention_mask.shape)
    if attention_mask.dim() != 4 or shape[0] not in (1, B) or shape[2] != T or shape[3] < T:
        raise ValueError(
            f"attention_mask of shape {shape} is neither a padding mask [batch, keys] nor a 4-D mask "
            f"[batch, 1, queries, keys] for {B} sequence(s) of {T} token(s) (keys >= queries: past tokens first)"
        )


def padding_free_tokens(attention_mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
    """[B, T] bool, False at the padding positions of the T current tokens (2-D masks only; None: no padding known).
    A decode step's single token is never padding, so nothing is built for it."""
    if attention_mask is None or attention_mask.dim() != 2 or T == 1:
        return None
    return attention_mask[:, -T:].bool()
