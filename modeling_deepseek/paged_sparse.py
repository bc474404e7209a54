"""DeepSeek-V3.2's sparse attention (DSA) under continuous batching: the indexer over paged rows, decode tokens that
read only their top-k latent rows.

transformers' paged engine packs the step's requests in one row (continuous_batching.py) and its `cache.update` hands
attention every cached row of every request, copied out of the pages: for a V3.2 model that would be the whole
context's latent at every decode step, the very traffic sparse attention exists to avoid. Here the paged rows
(paged_fp8.LatentRowAllocator: latent, RoPE key, indexer key per token) are written through `PagedLatentCache.
write_rows`, and read position by position (`PagedRows.read`):

- decode tokens (one query per request) read all of their request's indexer keys (index_head_dim values per cached
  token, e4m3 with index_cache_dtype="fp8"), score them with the layer's lightning indexer, keep the top k, and read
  only those k latent rows (kv_lora_rank + qk_rope_head_dim values each) to attend over, absorbed, in latent space
  (sparse_attention.gathered_attention). The decode tokens of all requests go as one padded batch: padding keys are
  not allowed for the indexer and not valid for attention. A request whose context k covers is read whole, no
  indexer run (every allowed key would be selected: the same computation).
- prefill chunks read their request's rows whole and run the layer's own indexed attention
  (sparse_attention.indexed_attention, causal over the chunk's keys): the same code as generate()'s forwards.

So each request gets the tokens generate() gives it (the e4m3 streams read back as in paged_fp8's docstring), while a
decode step reads per layer S x index_head_dim + k x (kv_lora_rank + qk_rope_head_dim) values per request instead of
S x (kv_lora_rank + qk_rope_head_dim + index_head_dim). `dsa_impl` "masked" and "dense", and a kv_b_proj that cannot
be absorbed, take the whole-rows path for decode tokens too.
"""

from __future__ import annotations

import torch

from .sparse_attention import gathered_attention, indexed_attention


def paged_indexed_attention(attn, x_1TD, q_low_1TX, q_nope, q_rope, latent_1TC, k_rope_1TR, index_keys_1TI, cos, sin,
                            cache, kwargs, segments) -> torch.Tensor:
    """Write this step's rows (latent, rope key, indexer key) into the paged cache and attend request by request
    (`segments`: (q0, q1, k0, k1) per request, continuous_batching._segments); returns [1, sum T_i, H, V].

    x / q_low / index keys [1, sum T_i, *]; q_nope / q_rope [1, H, sum T_i, *]; latent / k_rope [1, sum T_i, *]
    (rope already applied); cos / sin [1, sum T_i, R]."""
    rows = cache.write_rows(attn.layer_idx, kwargs, latent=latent_1TC[0], rope=k_rope_1TR[0], index=index_keys_1TI[0])
    H, total_q = q_nope.shape[1], q_nope.shape[2]
    out_1THV = q_nope.new_zeros(1, total_q, H, attn.v_head_dim)
    gather = attn.config.dsa_impl == "sparse" and attn.absorbable()
    decode = []
    for q0, q1, k0, k1 in segments(kwargs, total_q):
        if gather and q1 - q0 == 1:
            decode.append((q0, k0, k1))
            continue
        positions = torch.arange(k0, k1, device=q_nope.device)
        latent_SC, k_rope_SR, keys_SI = rows.read(("latent", "rope", "index"), positions)
        out, _ = indexed_attention(attn, x_1TD[:, q0:q1], q_low_1TX[:, q0:q1], q_nope[:, :, q0:q1],
                                   q_rope[:, :, q0:q1], latent_SC[None, None], k_rope_SR[None, None], keys_SI[None],
                                   cos[:, q0:q1], sin[:, q0:q1], None, False)
        out_1THV[:, q0:q1] = out
    if decode:
        _sparse_decode(attn, x_1TD, q_low_1TX, q_nope, q_rope, cos, sin, rows, decode, out_1THV)
    return out_1THV


def _sparse_decode(attn, x_1TD, q_low_1TX, q_nope, q_rope, cos, sin, rows, decode, out_1THV) -> None:
    """D single-query requests at once: indexer over each one's keys (padded to the longest), top-k, then absorbed
    attention over the k latent rows each reads."""
    device, indexer = q_nope.device, attn.indexer
    q_idx = torch.tensor([q0 for q0, _, _ in decode], device=device)
    starts = torch.tensor([k0 for _, k0, _ in decode], device=device)
    lengths = torch.tensor([k1 - k0 for _, k0, k1 in decode], device=device)
    D, S = len(decode), int(lengths.max())
    allowed_D1S = (torch.arange(S, device=device) < lengths[:, None]).unsqueeze(1)
    if S <= indexer.topk:  # k covers every request's context: every allowed key is selected, the indexer is moot
        topk_D1K, valid_D1K = torch.arange(S, device=device).expand(D, 1, S), allowed_D1S
    else:
        # Every indexer key of every request (the indexer is O(S) per query), padding rows repeating a request's
        # first key and not allowed.
        (keys_XI,) = rows.read(("index",), _positions(starts, lengths, allowed_D1S))
        x_D1D, q_low_D1X = x_1TD[0, q_idx].unsqueeze(1), q_low_1TX[0, q_idx].unsqueeze(1)
        cos_D1R, sin_D1R = cos[0, q_idx].unsqueeze(1), sin[0, q_idx].unsqueeze(1)
        scores_D1S = indexer.scores(x_D1D, attn.q_a_layernorm(q_low_D1X), cos_D1R, sin_D1R, keys_XI.view(D, S, -1),
                                    allowed_D1S)
        topk_D1K, valid_D1K = indexer.select(scores_D1S, allowed_D1S)
    K = topk_D1K.shape[-1]
    # Only the selected latent rows are read (a not-valid pick reads its request's first row, then ignored).
    picks_DK = torch.where(valid_D1K[:, 0], topk_D1K[:, 0], 0) + starts[:, None]
    latent_XC, k_rope_XR = rows.read(("latent", "rope"), picks_DK.reshape(-1))
    qn = q_nope[0, :, q_idx].transpose(0, 1).unsqueeze(2)  # [D, H, 1, nope]
    qr = q_rope[0, :, q_idx].transpose(0, 1).unsqueeze(2)
    order_D1K = torch.arange(K, device=device).expand(D, 1, K)  # the gathered rows are already each query's own
    out, _ = gathered_attention(attn, qn, qr, latent_XC.view(D, 1, K, -1), k_rope_XR.view(D, 1, K, -1), order_D1K,
                                valid_D1K, want_probs=False)
    out_1THV[0, q_idx] = out[:, 0]


def _positions(starts_D: torch.Tensor, lengths_D: torch.Tensor, allowed_D1S: torch.Tensor) -> torch.Tensor:
    """Read positions of D requests' keys padded to S each ([D * S]; padding repeats the request's first key)."""
    S = allowed_D1S.shape[-1]
    offsets_DS = torch.arange(S, device=starts_D.device).expand(len(starts_D), S)
    return (starts_D[:, None] + torch.where(allowed_D1S[:, 0], offsets_DS, 0)).reshape(-1)
