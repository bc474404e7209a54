"""Multi-head latent attention (MLA, DeepSeek-V2 section 2.1).

Every token is compressed to one latent c_KV (kv_lora_rank values, after kv_a_layernorm) plus one decoupled RoPE key
shared by all heads (qk_rope_head_dim values). That pair is the only thing the cache holds: 512 + 64 = 576 values per
token per layer for V3, against 128 heads x (192 + 128) for the multi-head attention it replaces (71x smaller).

Per head, keys and values are linear in the latent: k_nope = W_UK c, v = W_UV c (the two halves of kv_b_proj). So
attention can run two ways over the same cache:

- expanded: rebuild per-head K and V from the latent, then ordinary attention through transformers' attention
  interface (eager / sdpa / ...). Cheap when the queries are many (training, prefill), since the K/V rebuild is
  shared by all of them.
- absorbed: fold W_UK into the query (q_nope W_UK gives a query in latent space) and apply W_UV after attending, so
  every head attends as MQA over the cached [latent | rope key] directly and nothing per head is built per cached
  token. Cheap when the queries are few (decode, speculative verification): the expanded rebuild costs
  S x kv_lora_rank x heads x (nope + v) per step, whatever T is.

`DeepseekAttention.forward` picks the cheaper path from the FLOP counts of both (`mla_impl="auto"`), or as told.

A DeepSeek-V3.2 layer (config.index_topk set) also has a lightning indexer (`self.indexer`, indexer.py) whose key is
cached beside the latent; sparse_attention.py then restricts each query to its top-k keys.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .compat import CPU_FLASH_ATTENTION
from .layers import DeepseekRMSNorm, per_head_matmul
from .parallel import local_shard, replicated_input
from .recompute import recompute, recompute_active
from .continuous_batching import is_paged_cache, paged_attention
from .cache import update_latent_cache
from .indexer import DeepseekIndexer
from .rope import apply_rope, softmax_scale
from .sparse_attention import indexed_attention


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain attention over per-head K/V: query [B, H, T, Dqk], key [B, H, S, Dqk], value [B, H, S, Dv]. The mask is
    additive or bool ("may attend", a caller's 4-D mask)."""
    scores_BHTS = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        T, S = scores_BHTS.shape[-2:]
        scores_BHTS = scores_BHTS + _additive_mask(attention_mask, T, S, scores_BHTS.device, scores_BHTS.dtype)
    probs_BHTS = F.softmax(scores_BHTS, dim=-1, dtype=torch.float32).to(query.dtype)
    probs_BHTS = F.dropout(probs_BHTS, p=dropout, training=module.training)
    out_BTHV = torch.matmul(probs_BHTS, value).transpose(1, 2).contiguous()
    return out_BTHV, probs_BHTS


def prefix_causal_sdpa(query, key, value, scaling: float):
    """SDPA for queries that are the last T of S positions with nothing masked but the future: a prefill chunk after
    the chunks before it. A [T, S] mask would make SDPA compute every block of the chunk x chunk square, masked or
    not (and materialise the mask); instead two flash calls, over the prefix (no mask) and over the chunk itself
    (is_causal: the masked half is skipped), merged by their log-sum-exps: softmax over the union of both key sets.
    CPU inference only (torch's CPU flash kernel returns the log-sum-exp). Returns [B, T, H, Dv], like the
    attention interface."""
    T, S = query.shape[2], key.shape[2]
    flash = CPU_FLASH_ATTENTION
    out_pre, lse_pre = flash(query, key[:, :, : S - T], value[:, :, : S - T], 0.0, False, scale=scaling)
    out_new, lse_new = flash(query, key[:, :, S - T :], value[:, :, S - T :], 0.0, True, scale=scaling)
    lse = torch.logaddexp(lse_pre, lse_new)
    out = out_pre.float() * (lse_pre - lse).exp().unsqueeze(-1) + out_new.float() * (lse_new - lse).exp().unsqueeze(-1)
    return out.to(query.dtype).transpose(1, 2)


def prefix_causal_applies(T: int, S: int, device: torch.device, impl: str) -> bool:
    """Whether prefix_causal_sdpa can serve T queries over S keys (see there); DeepseekModel then passes no mask."""
    return (1 < T < S and impl == "sdpa" and device.type == "cpu" and CPU_FLASH_ATTENTION is not None
            and not torch.is_grad_enabled())


def _is_bnb_linear(module: nn.Module) -> bool:
    """bitsandbytes' own quantized Linear (not a LoRA wrapper of one, which peft names alike), known without
    importing bitsandbytes: it dequantizes inside forward, which absorbed_weight uses."""
    cls = type(module)
    return cls.__name__ in ("Linear4bit", "Linear8bitLt") and cls.__module__.startswith("bitsandbytes.")


def _additive_mask(attention_mask: torch.Tensor | None, T: int, S: int, device, dtype) -> torch.Tensor | None:
    """Turn transformers' mask (bool "may attend", additive float, or None = causal) into an additive [*, T, S] mask."""
    if attention_mask is None:
        if T == 1:
            return None
        # Queries are the last T positions of S keys: query t sees keys up to S - T + t.
        allowed = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)
        attention_mask = allowed
    if attention_mask.dtype == torch.bool:
        mask = torch.zeros(attention_mask.shape, dtype=dtype, device=device)
        return mask.masked_fill(~attention_mask, torch.finfo(dtype).min)
    return attention_mask[..., -S:].to(dtype)


class DeepseekAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        self.attention_dropout = config.attention_dropout
        self.num_key_value_groups = 1  # the expanded path builds one K/V per head
        self.is_causal = True
        self.scaling = softmax_scale(config)
        # "auto" | "absorbed" | "expanded": which MLA path runs (see the module docstring).
        self.mla_impl = getattr(config, "mla_impl", "auto")

        H, C, R = self.num_heads, config.kv_lora_rank, config.qk_rope_head_dim
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(config.hidden_size, H * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.hidden_size, config.q_lora_rank, bias=config.attention_bias)
            self.q_a_layernorm = DeepseekRMSNorm(config.q_lora_rank, config=config)
            self.q_b_proj = nn.Linear(config.q_lora_rank, H * self.qk_head_dim, bias=False)
        # One projection gives [latent (C) | shared rope key (R)]: the only per-token state that is cached.
        self.kv_a_proj_with_mqa = nn.Linear(config.hidden_size, C + R, bias=config.attention_bias)
        self.kv_a_layernorm = DeepseekRMSNorm(C, config=config)
        # Per head: [W_UK (nope rows) | W_UV (v rows)] stacked, head-major.
        self.kv_b_proj = nn.Linear(C, H * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_head_dim, config.hidden_size, bias=config.attention_bias)
        # DeepSeek-V3.2: the lightning indexer choosing each query's top-k keys (sparse_attention.py).
        self.indexer = DeepseekIndexer(config, layer_idx) if config.index_topk is not None else None

    # ------------------------------------------------------------------------------------------------------------
    def project_query(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.up_project_query(self.q_a_proj(x_BTD) if self.q_lora_rank is not None else self.q_proj(x_BTD))

    def up_project_query(self, q_low_BTX: torch.Tensor) -> torch.Tensor:
        """q_a_proj's output (q_lora_rank wide) -> per-head queries [B, H, T, nope + rope]; with a full-rank q_proj,
        its output, only reshaped."""
        B, T, _ = q_low_BTX.shape
        q = q_low_BTX if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(q_low_BTX))
        # -1, not num_heads: under tensor parallelism q_b_proj / q_proj give this rank's heads only.
        return q.view(B, T, -1, self.qk_head_dim).transpose(1, 2)

    def compress_kv(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached pair: normalised latent [B, 1, T, C] and (not yet rotated) rope key [B, 1, T, R]."""
        latent_BTC, k_rope_BTR = self.kv_a_proj_with_mqa(x_BTD).split([self.kv_lora_rank, self.qk_rope_head_dim], -1)
        return self.kv_a_layernorm(latent_BTC).unsqueeze(1), k_rope_BTR.unsqueeze(1)

    def absorbable(self) -> bool:
        """The absorbed path needs kv_b_proj as one plain [H * (nope + v), C] matrix: a float nn.Linear, or a quantized
        one (FP8, bitsandbytes) that can hand out its dequantized weight. Not under LoRA: the adapter adds a low-rank
        term the matrix would miss."""
        w = getattr(self.kv_b_proj, "weight", None)
        if type(self.kv_b_proj) is nn.Linear:
            return w is not None and w.dtype.is_floating_point
        return hasattr(self.kv_b_proj, "dequantized_weight") or _is_bnb_linear(self.kv_b_proj)

    def absorbed_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """kv_b_proj's weight in `dtype`. A quantized kv_b_proj is dequantized once and kept (as DeepSeek's own
        inference code does); the copy is remade when the weight object, the dtype or the device changes."""
        proj = self.kv_b_proj
        if type(proj) is nn.Linear:
            return local_shard(proj.weight)  # under tensor parallelism: the rows of this rank's heads
        cached = getattr(self, "_absorbed_weight", None)
        if (cached is None or cached[0] is not proj.weight or cached[1].dtype != dtype
                or cached[1].device != proj.weight.device):
            if hasattr(proj, "dequantized_weight"):
                w = proj.dequantized_weight(dtype)
            else:  # bitsandbytes: run the identity through the layer, which dequantizes with its own kernels
                eye = torch.eye(proj.in_features, dtype=dtype, device=proj.weight.device)
                w = proj(eye).t().contiguous()
            cached = (proj.weight, w.to(dtype))
            self._absorbed_weight = cached
        return cached[1]

    def use_absorbed(self, T: int, S: int) -> bool:
        if self.mla_impl != "auto":
            return self.mla_impl == "absorbed" and self.absorbable()
        # Training forwards take the expanded path (what the backward wants, dropout included); a no-grad forward of a
        # model left in training mode (TRL generates so) decodes like eval, the two paths being exact alike.
        if self.training and (torch.is_grad_enabled() or self.attention_dropout > 0) or not self.absorbable():
            return False
        C, R, nope, v = self.kv_lora_rank, self.qk_rope_head_dim, self.qk_nope_head_dim, self.v_head_dim
        # Multiply-adds per head. Expanded: rebuild K/V for S keys, then attend. Absorbed: absorb T queries and
        # outputs, then attend over (C + R)-wide keys and C-wide values.
        expanded = S * C * (nope + v) + T * S * (nope + R + v)
        absorbed = T * C * (nope + v) + T * S * (2 * C + R)
        return absorbed < expanded

    # ------------------------------------------------------------------------------------------------------------
    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, output_attentions=False,
                **kwargs):
        """Returns (output [B, T, D], attention probabilities [B, H, T, S] when output_attentions, else None).

        With the memory option `recompute_mla_up_proj` (while autograd records) the low-rank activations are all that
        is kept for backward: the query's up-projection (q_a_layernorm, q_b_proj), kv_b_proj's per-head keys and
        values and the attention core over them run again in backward. The core goes with them: its saved inputs
        are exactly the up-projections' outputs, 128 heads x (192 + 192 + 128) values per token for V3 against the
        1536 + 576 of the low-rank pair."""
        B, T, _ = hidden_states.shape
        q_low_BTX = self.q_a_proj(hidden_states) if self.q_lora_rank is not None else self.q_proj(hidden_states)
        latent_B1TC, k_rope_B1TR = self.compress_kv(hidden_states)
        cos, sin = position_embeddings
        k_rope_B1TR = apply_rope(k_rope_B1TR, cos, sin, self.config.rope_interleave)
        index_keys_BSD = None if self.indexer is None else self.indexer.keys(hidden_states, cos, sin)

        if is_paged_cache(cache):  # continuous batching: many requests packed in one row (continuous_batching.py)
            q_nope, q_rope = self.rotated_query(q_low_BTX, cos, sin)
            indexer_inputs = None if self.indexer is None else (hidden_states, q_low_BTX, index_keys_BSD, cos, sin)
            out_BTHV = paged_attention(self, q_nope, q_rope, latent_B1TC, k_rope_B1TR, cache, kwargs, indexer_inputs)
            return self.o_proj(out_BTHV.reshape(B, T, -1)), None
        if cache is not None:  # the cache sees only the compressed pair (and the indexer's key)
            latent_B1TC, k_rope_B1TR, index_keys_BSD = update_latent_cache(
                cache, self.layer_idx, latent_B1TC, k_rope_B1TR, index_keys_BSD)

        def attend(q_low_BTX, latent_B1SC, k_rope_B1SR, cos, sin):
            q_nope, q_rope = self.rotated_query(q_low_BTX, cos, sin)
            if self.indexer is not None:
                return indexed_attention(self, hidden_states, q_low_BTX, q_nope, q_rope, latent_B1SC, k_rope_B1SR,
                                         index_keys_BSD, cos, sin, attention_mask, output_attentions, **kwargs)
            return self.attend(q_nope, q_rope, latent_B1SC, k_rope_B1SR, attention_mask, output_attentions, **kwargs)

        args = (q_low_BTX, latent_B1TC, k_rope_B1TR, cos, sin)
        out_BTHV, weights = (recompute(attend, *args) if recompute_active(self.config, "recompute_mla_up_proj")
                             else attend(*args))
        return self.o_proj(out_BTHV.reshape(B, T, -1)), (weights if output_attentions else None)

    def rotated_query(self, q_low_BTX, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_nope, rotated q_rope), [B, H, T, *] each, from the query's low-rank activation."""
        q_nope, q_rope = self.up_project_query(q_low_BTX).split([self.qk_nope_head_dim, self.qk_rope_head_dim], -1)
        return q_nope, apply_rope(q_rope, cos, sin, self.config.rope_interleave)

    def attend(self, q_nope, q_rope, latent_B1SC, k_rope_B1SR, attention_mask, output_attentions, **kwargs):
        """Attention of T queries over the S cached keys, on the path `use_absorbed` picks: (out [B, T, H, v],
        probabilities or None)."""
        T, S = q_nope.shape[2], latent_B1SC.shape[2]
        if self.use_absorbed(T, S):
            out_BTHV, weights = self.absorbed_attention(q_nope, q_rope, latent_B1SC, k_rope_B1SR, attention_mask)
        else:
            # Attention probabilities exist only where they are materialised: the eager kernel.
            impl = "eager" if output_attentions else self.config._attn_implementation
            out_BTHV, weights = self.expanded_attention(q_nope, q_rope, latent_B1SC, k_rope_B1SR, attention_mask,
                                                        impl, **kwargs)
        return out_BTHV, weights

    def expanded_attention(self, q_nope, q_rope, latent_B1SC, k_rope_B1SR, attention_mask, impl, **kwargs):
        B, H, _, _ = q_nope.shape
        S = latent_B1SC.shape[2]
        kv_BHSK = self.kv_b_proj(latent_B1SC.squeeze(1)).view(B, S, H, -1).transpose(1, 2)
        k_nope, value = kv_BHSK.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        key = torch.cat((k_nope, k_rope_B1SR.expand(-1, H, -1, -1)), dim=-1)
        query = torch.cat((q_nope, q_rope), dim=-1)
        # SDPA's flash kernels (CPU and CUDA) need one head dim for q, k and v; with v_head_dim < qk_head_dim it
        # falls back to the math kernel, which materialises [B, H, T, S] scores. Zero-padding V costs
        # (qk - v) / v more V traffic and selects the flash kernel; the padded output columns are dropped.
        pad = self.qk_head_dim - self.v_head_dim if impl == "sdpa" else 0
        if pad > 0:
            value = F.pad(value, (0, pad))
        T = query.shape[2]
        if attention_mask is None and T > 1:  # plain causal: only sdpa & co. read is_causal, and only for T == S
            if prefix_causal_applies(T, S, query.device, impl):  # a chunk after a prefix
                out_BTHV = prefix_causal_sdpa(query, key, value, self.scaling)
                return (out_BTHV[..., : self.v_head_dim] if pad > 0 else out_BTHV), None
            if T < S or impl == "eager":
                attention_mask = _additive_mask(None, T, S, query.device, query.dtype)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)
        out_BTHV, weights = attention_interface(
            self, query, key, value, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs,
        )
        if pad > 0:
            out_BTHV = out_BTHV[..., : self.v_head_dim]
        return out_BTHV, weights

    def absorbed_attention(self, q_nope, q_rope, latent_B1SC, k_rope_B1SR, attention_mask):
        B, H, T, _ = q_nope.shape
        C, S = self.kv_lora_rank, latent_B1SC.shape[2]
        w_HKC = self.absorbed_weight(q_nope.dtype).view(H, self.qk_nope_head_dim + self.v_head_dim, C)
        # The latent feeds this rank's heads directly (not through kv_b_proj, whose input gradient the engine sums
        # over the tensor-parallel ranks): sum its gradient here.
        latent_B1SC = replicated_input(latent_B1SC, self.kv_b_proj.weight)
        w_uk_HNC, w_uv_HVC = w_HKC.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)
        q_latent_BHTC = per_head_matmul(q_nope, w_uk_HNC)  # [B, H, T, nope] x [H, nope, C]
        # MQA: all H x T query rows of a sequence attend to the same latent keys, so the heads are folded into the
        # rows and each sequence runs one [H*T, C] x [C, S] GEMM. (A matmul broadcasting [B, 1, S, C] over the head
        # dim copies the latent once per head on some backends: an [H, C, S] copy per layer and step in bf16 on CPU.)
        latent_BSC, k_rope_BSR = latent_B1SC.squeeze(1), k_rope_B1SR.squeeze(1)
        scores_BXS = torch.bmm(q_rope.reshape(B, H * T, -1), k_rope_BSR.transpose(1, 2))
        scores_BXS = torch.baddbmm(scores_BXS, q_latent_BHTC.reshape(B, H * T, C), latent_BSC.transpose(1, 2))
        scores_BHTS = scores_BXS.view(B, H, T, S).float() * self.scaling
        mask = _additive_mask(attention_mask, T, S, scores_BHTS.device, torch.float32)
        if mask is not None:
            scores_BHTS = scores_BHTS + mask
        probs_BHTS = scores_BHTS.softmax(dim=-1).to(latent_BSC.dtype)
        ctx_BHTC = torch.bmm(probs_BHTS.view(B, H * T, S), latent_BSC).view(B, H, T, C)
        out_BHTV = per_head_matmul(ctx_BHTC, w_uv_HVC.transpose(1, 2))  # [B, H, T, C] x [H, C, v]
        return out_BHTV.transpose(1, 2), probs_BHTS
