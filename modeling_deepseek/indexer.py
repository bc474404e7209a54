"""DeepSeek-V3.2's lightning indexer: which earlier tokens each query attends to under sparse attention (DSA).

Per query t and earlier token s the indexer scores

    I[t, s] = sum_h  w[t, h] * ReLU(q[t, h] . k[s])          (h over index_n_heads, V3.2: 64)

with q[t, h] = wq_b(q_a_layernorm(q_a_proj(x_t))) (the main attention's low-rank query, index_head_dim wide, V3.2:
128), one key per token k[s] = LayerNorm(wk(x_s)) shared by all heads, RoPE (half-split pairs, not the main
attention's interleaved ones) on the first qk_rope_head_dim dimensions of both, and per-head weights w[t] =
weights_proj(x_t). The scale is transformers' (and DeepSeek's reference code's): head_dim^-0.5 on the dot product and
n_heads^-0.5 on the weights. DeepSeek's kernels also Hadamard-rotate q and k and score in FP8; the rotation is
orthogonal (q . k is unchanged) and the FP8 rounding is a precision choice, so the scores here are fp32 and equal to
transformers' DeepseekV32Indexer on the same weights.

Each query keeps the `index_topk` tokens of highest score among those its attention mask allows; sparse_attention.py
applies that selection. The key is what the cache keeps beside the latent (cache.py, stream "index_keys"): index_head_dim
values per token and layer, against the latent's 576.

The scores are computed query block by query block so that the fp32 [T, heads, S] intermediate of a long prefill stays
within `SCORE_BLOCK_BYTES` (16K queries x 64 heads x 16K keys would be 64 GiB in one piece). Under autograd the
scores keep their graph (the indexer's training objective, indexer_loss.py, needs it); at inference they are plain.

What a forward leaves for the training objective (`DeepseekIndexer.record = True`): `last_record`, an IndexerRecord
with the indexer's scores over the keys, the selected indices, and the main attention's head-summed, L1-normalised
probabilities (detached), over all keys (dense and masked paths) or over the selected ones (sparse path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .rope import apply_rope

# Upper bound on the fp32 [queries, heads, keys] block scored at once (the head-weighted sum needs it whole).
SCORE_BLOCK_BYTES = 64 * 2**20


@dataclass
class IndexerRecord:
    """One attention layer's indexer state after a forward (`DeepseekIndexer.record`): what the KL objectives read.

    scores_BTS: indexer scores I[t, s], fp32, -inf where the attention mask forbids s (with the graph to the
        indexer's weights when autograd recorded the forward).
    topk_BTK: the selected keys' indices (int64), or None where nothing was selected (dsa_impl "dense", or k >= the
        number of keys so that every allowed key is attended).
    valid_BTK: which of the selected keys the mask allows (a query with fewer than k allowed keys selects forbidden
        ones too, which attention ignores); None with topk_BTK None.
    attention_BTX: the main attention's probabilities summed over heads and L1-normalised, detached: over the keys
        (X = S) when topk_BTK is None, else over the selected keys (X = K, zero where not valid).
    """

    scores_BTS: torch.Tensor
    topk_BTK: torch.Tensor | None
    valid_BTK: torch.Tensor | None
    attention_BTX: torch.Tensor | None = None


def head_summed_distribution(probs_BHTX: torch.Tensor) -> torch.Tensor:
    """Attention probabilities [B, H, T, X] -> their sum over heads, L1-normalised per query, fp32, detached: the
    distribution V3.2 trains the indexer towards."""
    summed_BTX = probs_BHTX.detach().float().sum(1)
    return summed_BTX / summed_BTX.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def allowed_keys(attention_mask: torch.Tensor | None, B: int, T: int, S: int, device) -> torch.Tensor:
    """The keys each query may attend to, as bool [B or 1, T, S], from what the attention layers receive: a bool
    ("may attend") or additive float [B, 1, T, S] mask, or None (causal: the queries are the last T of S keys)."""
    if attention_mask is None:
        return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T).unsqueeze(0)
    mask = attention_mask[:, 0, -T:, -S:] if attention_mask.dim() == 4 else attention_mask[..., -T:, -S:]
    if mask.dtype == torch.bool:
        return mask
    # transformers' additive masks put dtype.min (not -inf) at forbidden keys.
    return mask > torch.finfo(mask.dtype).min / 2


class DeepseekIndexer(nn.Module):
    """The lightning indexer of one attention layer; parameter names are transformers' (and the official V3.2 keys
    under `self_attn.indexer.`): wq_b, wk, k_norm (a LayerNorm, with bias), weights_proj."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.head_dim = config.index_n_heads, config.index_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.topk = config.index_topk
        self.wq_b = nn.Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(config.hidden_size, self.n_heads, bias=False)
        self.softmax_scale = self.head_dim**-0.5
        # Training-objective hooks (indexer_loss.py / trainers): keep this forward's IndexerRecord, and compute the
        # indexer from detached inputs (V3.2's sparse stage: its loss trains the indexer alone).
        self.record = False
        self.detach_input = False
        self.last_record: IndexerRecord | None = None

    def _rotate(self, x_BNTD: torch.Tensor, cos, sin) -> torch.Tensor:
        """RoPE on the first rope_dim dimensions (half-split pairs), the rest passed through."""
        rot, rest = x_BNTD.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat((apply_rope(rot, cos, sin, interleave=False), rest), dim=-1)

    def keys(self, x_BTD: torch.Tensor, cos, sin) -> torch.Tensor:
        """The per-token key [B, T, index_head_dim], rotated: what the cache stores."""
        if self.detach_input:
            x_BTD = x_BTD.detach()
        k_B1TD = self.k_norm(self.wk(x_BTD)).unsqueeze(1)
        return self._rotate(k_B1TD, cos, sin).squeeze(1)

    def scores(self, x_BTD, q_resid_BTX, cos, sin, keys_BSD, allowed_BTS, causal: bool = False) -> torch.Tensor:
        """I[t, s] for the T current queries over the S keys, fp32 [B, T, S], -inf where `allowed_BTS` is False.
        `causal`: the queries are the last T of the S keys and see no later key, so a query block scores only the
        keys up to its last query (half the work of a one-shot prefill).

        The dot products run in the keys' dtype (the model's: fp32 as transformers' indexer, bf16 GEMMs with fp32
        accumulation in a bf16 model, where DeepSeek's kernel uses FP8); the ReLU'd products are weighted and
        summed over heads in fp32."""
        if self.detach_input:
            x_BTD, q_resid_BTX = x_BTD.detach(), q_resid_BTX.detach()
        B, T, _ = x_BTD.shape
        S, N, D = keys_BSD.shape[1], self.n_heads, self.head_dim
        q_BNTD = self.wq_b(q_resid_BTX).view(B, T, N, D).transpose(1, 2)
        q_BTND = self._rotate(q_BNTD, cos, sin).transpose(1, 2).to(keys_BSD.dtype)
        weights_BTN = self.weights_proj(x_BTD.to(self.weights_proj.weight.dtype)).float()
        weights_BTN = weights_BTN * (N**-0.5 * self.softmax_scale)  # ReLU(a x) = a ReLU(x) for a > 0
        block = max(1, SCORE_BLOCK_BYTES // (4 * N * S * B))
        if T <= block:  # decode and short forwards: one block, no copy
            return self._score_block(keys_BSD, q_BTND, weights_BTN).masked_fill(~allowed_BTS, float("-inf"))
        scores_BTS = torch.full((B, T, S), float("-inf"), device=x_BTD.device)
        for t0 in range(0, T, block):
            t1 = min(T, t0 + block)
            s1 = S - T + t1 if causal else S
            scores_BTS[:, t0:t1, :s1] = self._score_block(keys_BSD[:, :s1], q_BTND[:, t0:t1], weights_BTN[:, t0:t1])
        return scores_BTS.masked_fill_(~allowed_BTS, float("-inf"))  # in place: [T, S] fp32 is a prefill's largest

    def _score_block(self, keys_BSD, q_BtND, weights_BtN) -> torch.Tensor:
        """The scores of t queries over S keys, [B, t, S]: one GEMM per sequence, ReLU in place, then the weighted sum
        over heads in fp32. A decode step (t = 1) multiplies keys [S, D] by the query's [D, N] and sums heads as an
        [S, N] x [N, 1] product: the cache is read in its own layout (CPU bf16 GEMMs copy a transposed operand, which
        would be the whole key cache). A block of queries multiplies [t*N, D] by the keys' [D, S] instead: the
        products are then read once per query as [1, N] x [N, S] (summing heads from [S, t*N] needs a permuted
        copy, 2.5x slower overall on CPU)."""
        B, S, D = keys_BSD.shape
        t, N = q_BtND.shape[1], self.n_heads
        if t == 1:
            dots_BSN = torch.bmm(keys_BSD, q_BtND.reshape(B, N, D).transpose(1, 2))
            return torch.bmm(dots_BSN.relu_().float(), weights_BtN.transpose(1, 2)).transpose(1, 2)
        dots_BXS = torch.bmm(q_BtND.reshape(B, -1, D), keys_BSD.transpose(1, 2))
        relu_BtNS = dots_BXS.relu_().float().view(B, t, N, S)
        return torch.matmul(weights_BtN.unsqueeze(-2), relu_BtNS).squeeze(-2)

    def select(self, scores_BTS: torch.Tensor, allowed_BTS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k keys of each query: (indices [B, T, K] int64, valid [B, T, K]), K = min(index_topk, S). A query
        with fewer than K allowed keys also gets forbidden ones (score -inf), marked not valid."""
        K = min(self.topk, scores_BTS.shape[-1])
        topk_BTK = scores_BTS.detach().topk(K, dim=-1).indices
        valid_BTK = allowed_BTS.expand(scores_BTS.shape[0], -1, -1).gather(-1, topk_BTK)
        return topk_BTK, valid_BTK
