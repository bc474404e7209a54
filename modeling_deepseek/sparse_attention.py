"""DeepSeek Sparse Attention (DSA, DeepSeek-V3.2): every query attends to the `index_topk` earlier tokens its lightning
indexer (indexer.py) scores highest, over the same MLA latent as V3.

transformers' DeepseekV32 (and DeepSeek's reference inference code) apply the selection as a mask on dense attention:
the cost still grows with the whole context, K and V re-expanded for every cached token at every step. Here the
selection is applied by gathering: in the absorbed form of MLA (attention.py) every head attends in latent space over
[latent | rope key] rows, 576 values per token for V3.2, so each query gathers its k rows once for all heads and
attends to them alone. Per query and layer that is k x 576 values read and H x k x (2 x 512 + 64) multiply-adds,
whatever the context; only the indexer (index_n_heads x index_head_dim per key, and a top-k) still reads every key.

`config.dsa_impl` picks how the selection is applied, all three on the same weights:

- "sparse": the gather above, in query blocks of at most `GATHER_BLOCK_BYTES` of gathered rows (a long prefill never
  holds [T, k, 576] at once). Where k covers every key of the forward (k >= S) the selection keeps every allowed
  key, so plain attention runs (expanded or absorbed, attention.py) and the indexer is skipped: the same logits.
  Which form serves the selection follows the MLA path choice (`mla_impl`): "absorbed" always gathers,
  "expanded" always masks, and "auto" takes the cheaper by multiply-adds (`gather_is_cheaper`). Per (query, key,
  head) the gathered latent form costs 2 x 512 + 64 against the expanded form's 192 + 128, so a prefill whose
  queries see few more than k keys (the first chunk of a long prompt) runs masked and expanded, as DeepSeek's own
  V3.2 prefill runs short sequences in a "masked MHA mode"; decode steps and later chunks gather. A kv_b_proj that
  cannot be absorbed (a LoRA adapter on it) always takes the masked path.
- "masked": dense attention under the top-k mask, transformers' DeepseekV32 semantics (the parity reference).
- "dense": attention ignores the indexer, which still runs when its training record is asked for (V3.2's dense
  warm-up trains the indexer towards dense attention).

A query allowed fewer than k keys selects some forbidden ones (score -inf); they are masked here too, so padding and
the causal edge behave exactly as in the masked reference.
"""

from __future__ import annotations

import torch

from .indexer import IndexerRecord, allowed_keys, head_summed_distribution
from .layers import per_head_matmul
from .parallel import replicated_input

# Upper bound on the rows gathered at once in a query block ([block, k, latent + rope] in the model dtype).
GATHER_BLOCK_BYTES = 32 * 2**20


def gather_rows(x_BSW: torch.Tensor, idx_BtK: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x[b, idx[b, t, j]] as [B * t, K, W], into `out` (rows x W, reused across blocks) when given. One index_select
    per sequence: a cache's [S, W] rows are contiguous within a sequence (not across: its buffer outgrows S), and
    index_select copies whole rows (several times faster on CPU than advanced indexing or gather)."""
    B, t, K = idx_BtK.shape
    W = x_BSW.shape[-1]
    if out is None:
        rows = [x_BSW[b].index_select(0, idx_BtK[b].reshape(-1)) for b in range(B)]
        return (rows[0] if B == 1 else torch.cat(rows)).view(B * t, K, W)
    for b in range(B):
        torch.index_select(x_BSW[b], 0, idx_BtK[b].reshape(-1), out=out[b * t * K:(b + 1) * t * K])
    return out[: B * t * K].view(B * t, K, W)


def sparse_latent_attention(q_latent_BHTC, q_rope_BHTR, latent_BSC, k_rope_BSR, topk_BTK, valid_BTK, scaling: float,
                            want_probs: bool = False):
    """Absorbed MLA over each query's selected keys only: (context [B, T, H, C] in latent space, probabilities
    [B, H, T, K] fp32 or None). `q_latent` is q_nope already multiplied by W_UK; K is topk_BTK's last dimension.

    Without autograd the gathered rows of every query block land in one pair of buffers allocated per call: a fresh
    multi-megabyte tensor per block costs its page faults again each time (10-20x the copy itself on CPU)."""
    B, H, T, C = q_latent_BHTC.shape
    R, K = q_rope_BHTR.shape[-1], topk_BTK.shape[-1]
    block = min(T, max(1, GATHER_BLOCK_BYTES // (B * K * (C + R) * latent_BSC.element_size())))
    reuse = not torch.is_grad_enabled() and not torch.compiler.is_compiling() and T > block
    latent_buf = latent_BSC.new_empty(B * block * K, C) if reuse else None
    k_rope_buf = k_rope_BSR.new_empty(B * block * K, R) if reuse else None
    context_BTHC = q_latent_BHTC.new_empty(B, T, H, C) if reuse else None
    contexts, probs = [], []
    for t0 in range(0, T, block):
        t1 = min(T, t0 + block)
        n = B * (t1 - t0)
        idx_BtK = topk_BTK[:, t0:t1]
        # One gather of k rows per query, shared by all H heads.
        latent_XKC = gather_rows(latent_BSC, idx_BtK, latent_buf)
        k_rope_XKR = gather_rows(k_rope_BSR, idx_BtK, k_rope_buf)
        q_latent_XHC = q_latent_BHTC[:, :, t0:t1].transpose(1, 2).reshape(n, H, C)
        q_rope_XHR = q_rope_BHTR[:, :, t0:t1].transpose(1, 2).reshape(n, H, R)
        # Keys as the GEMMs' row operand, [K, 576] x [576, H]: the gathered rows are read as they lie (a transposed
        # bf16 operand is copied first on CPU) and only the small query side is transposed.
        scores_XKH = torch.bmm(k_rope_XKR, q_rope_XHR.transpose(1, 2))
        scores_XKH = torch.baddbmm(scores_XKH, latent_XKC, q_latent_XHC.transpose(1, 2)).float() * scaling
        # dtype.min rather than -inf: a query with no allowed key (a padding row) gets a finite, ignored output.
        invalid_XK1 = ~valid_BTK[:, t0:t1].reshape(n, K, 1)
        probs_XHK = scores_XKH.masked_fill(invalid_XK1, torch.finfo(torch.float32).min).softmax(1).transpose(1, 2)
        context_XHC = torch.bmm(probs_XHK.to(latent_XKC.dtype), latent_XKC)
        if reuse:
            context_BTHC[:, t0:t1] = context_XHC.view(B, t1 - t0, H, C)
        else:
            contexts.append(context_XHC.view(B, t1 - t0, H, C))
        if want_probs:
            probs.append(probs_XHK.view(B, t1 - t0, H, K).transpose(1, 2))
    if not reuse:
        context_BTHC = torch.cat(contexts, dim=1) if len(contexts) > 1 else contexts[0]
    return context_BTHC, (torch.cat(probs, dim=2) if want_probs else None)


def gathered_attention(attn, q_nope, q_rope, latent_B1SC, k_rope_B1SR, topk_BTK, valid_BTK, want_probs: bool):
    """The "sparse" path of one attention layer: absorb W_UK into the queries, attend over the selected latent rows,
    apply W_UV. Returns (out [B, T, H, v], probabilities [B, H, T, K] or None)."""
    H, C = q_nope.shape[1], attn.kv_lora_rank
    w_HKC = attn.absorbed_weight(q_nope.dtype).view(H, attn.qk_nope_head_dim + attn.v_head_dim, C)
    w_uk_HNC, w_uv_HVC = w_HKC.split([attn.qk_nope_head_dim, attn.v_head_dim], dim=1)
    latent_B1SC = replicated_input(latent_B1SC, attn.kv_b_proj.weight)  # as in absorbed_attention (tensor parallel)
    q_latent_BHTC = per_head_matmul(q_nope, w_uk_HNC)
    context_BTHC, probs_BHTK = sparse_latent_attention(
        q_latent_BHTC, q_rope, latent_B1SC.squeeze(1), k_rope_B1SR.squeeze(1), topk_BTK, valid_BTK, attn.scaling,
        want_probs)
    out_BHTV = per_head_matmul(context_BTHC.transpose(1, 2), w_uv_HVC.transpose(1, 2))
    return out_BHTV.transpose(1, 2), probs_BHTK


def gather_is_cheaper(attn, T: int, S: int, K: int) -> bool:
    """Whether gathering K latent rows per query costs fewer multiply-adds than expanded attention of the T queries
    over all S keys under the top-k mask (module docstring); `mla_impl` "absorbed" / "expanded" decide instead."""
    if attn.mla_impl != "auto":
        return attn.mla_impl == "absorbed"
    C, R, nope, v = attn.kv_lora_rank, attn.qk_rope_head_dim, attn.qk_nope_head_dim, attn.v_head_dim
    masked = S * C * (nope + v) + T * S * (nope + R + v)  # per head: rebuild K / V for S keys, attend to all of them
    gathered = T * C * (nope + v) + T * K * (2 * C + R)  # per head: absorb T queries, attend to K latent rows each
    return gathered < masked


def indexed_attention(attn, x_BTD, q_low_BTX, q_nope, q_rope, latent_B1SC, k_rope_B1SR, index_keys_BSD, cos, sin,
                      attention_mask, output_attentions: bool, **kwargs):
    """Attention of a layer with a lightning indexer, on the path config.dsa_impl names (module docstring). Returns
    (out [B, T, H, v], probabilities [B, H, T, S] when output_attentions, else None); with `indexer.record` the
    indexer's IndexerRecord is left on `indexer.last_record`."""
    indexer, impl = attn.indexer, attn.config.dsa_impl
    B, H, T, _ = q_nope.shape
    S = latent_B1SC.shape[2]
    if impl == "sparse" and not (attn.absorbable() and gather_is_cheaper(attn, T, S, min(indexer.topk, S))):
        impl = "masked"  # the same selection, applied as a mask (module docstring)
    covered = indexer.topk >= S  # every allowed key is selected: plain attention is the same computation
    allowed_BTS = allowed_keys(attention_mask, B, T, S, q_nope.device)
    need_scores = indexer.record or (impl != "dense" and not covered)
    scores_BTS = None
    if need_scores:
        scores_BTS = indexer.scores(x_BTD, attn.q_a_layernorm(q_low_BTX), cos, sin, index_keys_BSD, allowed_BTS,
                                    causal=attention_mask is None)
    want_probs = output_attentions or indexer.record

    topk_BTK = valid_BTK = None
    if impl == "dense" or covered:
        out_BTHV, probs = attn.attend(q_nope, q_rope, latent_B1SC, k_rope_B1SR, attention_mask, want_probs, **kwargs)
        selected_probs = probs
    else:
        topk_BTK, valid_BTK = indexer.select(scores_BTS, allowed_BTS)
        if impl == "masked":
            selected_BTS = torch.zeros_like(allowed_BTS.expand(B, -1, -1)).scatter_(-1, topk_BTK, True)
            mask_B1TS = (selected_BTS & allowed_BTS).unsqueeze(1)
            out_BTHV, probs = attn.attend(q_nope, q_rope, latent_B1SC, k_rope_B1SR, mask_B1TS, want_probs, **kwargs)
            selected_probs = None if probs is None else probs.gather(-1, topk_BTK.unsqueeze(1).expand(-1, H, -1, -1))
        else:
            out_BTHV, selected_probs = gathered_attention(attn, q_nope, q_rope, latent_B1SC, k_rope_B1SR, topk_BTK,
                                                          valid_BTK, want_probs)
            probs = None
            if output_attentions:  # the dense [B, H, T, S] view of what was attended
                probs = selected_probs.new_zeros(B, H, T, S).scatter_(
                    -1, topk_BTK.unsqueeze(1).expand(-1, H, -1, -1), selected_probs * valid_BTK.unsqueeze(1))
    if indexer.record:
        attention = None if selected_probs is None else head_summed_distribution(
            selected_probs if valid_BTK is None else selected_probs * valid_BTK.unsqueeze(1))
        indexer.last_record = IndexerRecord(scores_BTS, topk_BTK, valid_BTK, attention)
    return out_BTHV, (probs if output_attentions else None)
