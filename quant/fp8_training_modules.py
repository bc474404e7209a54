"""The modules and autograd functions of FP8 training (the recipe: quant/fp8_training.py).

`Float8TrainingLinear` and `Float8TrainingExperts` are subclasses of the modules they replace (`nn.Linear`,
`DeepseekExperts`) holding the same Parameters; their forwards run every GEMM in e4m3 through two autograd functions.
In the "NT" form of modeling_deepseek/fp8_gemm.py, the three GEMMs of a Linear y = x W^T (x [M, K], W [N, K],
M = tokens) are

    Fprop   y  = x  @ W^T     a = x  [M, K] (1 x 128)            b = W   [N, K] (128 x 128)
    Dgrad   dx = dy @ W       a = dy [M, N] (1 x 128 along N)    b = W^T [K, N] (128 x 128: W's blocks transposed)
    Wgrad   dW = dy^T @ x     a = dy^T [N, M] (1 x 128 along M)  b = x^T [K, M] (1 x 128 along M)

Wgrad contracts over tokens, so its operands are tiled 128 tokens at a time: the (128 x 1) tiling of dy and x,
written as 1 x 128 tiles of their transposes. Square weight blocks make W^T's quantization the transpose of W's, so
Dgrad reuses the forward's e4m3 weight (as DeepSeek-V3 does).

Routed experts: the tokens sorted by expert form one contiguous group per expert, and each group is a GEMM of its
own. Fprop and Dgrad tile along the channels, so grouping changes nothing for their operands; the Wgrad contraction
runs over each group's tokens, so its 128-token tiles start at every group's first token (`quantize_token_tiles`,
computed on the device from the group offsets: no host synchronisation). torch has no block-scaled grouped GEMM, so
both backends multiply the dequantized operands with torch's grouped_mm (fp32 on CPU, bf16 on CUDA): FP8 numerics,
high-precision GEMM.

With the memory option `recompute_swiglu`, act(gate) * up and the down projection run under
modeling_deepseek.recompute.recompute_packed with gate and up kept in e4m3 (1 x 128 tiles, `fp8_packer`): backward
dequantizes them, recomputes the SwiGLU output and runs the down projection's backward on it (V3: "cache the SwiGLU
inputs in FP8, recompute its output"). The down projection's own Fprop is run twice, its Wgrad sees the recomputed
output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from modeling_deepseek.compat import grouped_mm as _grouped_mm
from modeling_deepseek.experts import DeepseekExperts, run_experts_loop, tokens_per_expert
from modeling_deepseek.fp8_format import (
    dequantize_blockwise,
    dequantize_e5m6,
    dequantize_token_tiles,
    quantize_blockwise,
    quantize_e5m6,
    quantize_token_tiles,
)
from modeling_deepseek.recompute import recompute_active, recompute_packed
from modeling_deepseek.fp8_gemm import BLOCK, TILE, blockwise_mm, resolve_backend
from modeling_deepseek.parallel import is_sharded

from .fp8_tp import sharded_linear

if TYPE_CHECKING:  # the config is defined next to the conversion that hands it to these modules
    from .fp8_training import FP8TrainingConfig


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# --------------------------------------------------------------------------------------------------------------------
# The three GEMMs of a Linear


class _FP8Linear(torch.autograd.Function):
    """y [M, N] = x [M, K] @ w [N, K]^T with Fprop, Dgrad and Wgrad all in block-scaled e4m3."""

    @staticmethod
    def forward(ctx, x_MK, w_NK, config: FP8TrainingConfig, out_dtype: torch.dtype, cache_format: str):
        backend, p2 = resolve_backend(config.backend, x_MK.device), config.round_scales_to_power_of_2
        xq, xs = quantize_blockwise(x_MK, TILE, p2)
        wq, ws = quantize_blockwise(w_NK, BLOCK, p2)
        y_MN = blockwise_mm(xq, xs, wq, ws, BLOCK, out_dtype, backend)
        ctx.cache_format = cache_format if config.cache_fp8_activations else "high"
        if ctx.cache_format == "e4m3":  # Wgrad's operand, from the high-precision x: 128 tokens per tile
            ctx.save_for_backward(*quantize_blockwise(x_MK.t(), TILE, p2), wq, ws)
        elif ctx.cache_format == "e5m6":  # x in 1 x 128 tiles of the finer format, re-tiled for Wgrad in backward
            ctx.save_for_backward(*quantize_e5m6(x_MK, TILE), wq, ws)
        else:
            ctx.save_for_backward(x_MK, wq, ws)
        ctx.config, ctx.backend, ctx.dtypes, ctx.K = config, backend, (x_MK.dtype, w_NK.dtype), x_MK.shape[1]
        return y_MN

    @staticmethod
    def backward(ctx, dy_MN):
        config, backend, (x_dtype, w_dtype) = ctx.config, ctx.backend, ctx.dtypes
        p2 = config.round_scales_to_power_of_2
        if ctx.cache_format == "e4m3":
            xtq, xts, wq, ws = ctx.saved_tensors
        else:
            x_packed, *x_scale, wq, ws = ctx.saved_tensors
            # E5M6 (1 x 128, per token) -> e4m3 in 128 x 1 tiles (per channel, 128 tokens): V3's re-tiling
            x_MK = x_packed if ctx.cache_format == "high" else dequantize_e5m6(x_packed, x_scale[0], ctx.K, TILE)
            xtq, xts = quantize_blockwise(x_MK.t(), TILE, p2)
        dx = dw = None
        if ctx.needs_input_grad[0]:  # Dgrad: dy in 1 x 128 tiles along N, W^T's blocks are W's transposed
            dyq, dys = quantize_blockwise(dy_MN, TILE, p2)
            dx = blockwise_mm(dyq, dys, wq.t().contiguous(), ws.t(), BLOCK, x_dtype, backend)
        if ctx.needs_input_grad[1]:  # Wgrad: dy^T and x^T in 1 x 128 tiles along the tokens
            dytq, dyts = quantize_blockwise(dy_MN.t(), TILE, p2)
            dw = blockwise_mm(dytq, dyts, xtq, xts, TILE, w_dtype, backend)
        return dx, dw, None, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: FP8TrainingConfig,
               cache_format: str = "e4m3"):
    """F.linear with the FP8 training recipe (any leading dims; the bias is added in high precision). `cache_format`:
    how x is kept for Wgrad when config.cache_fp8_activations: "e4m3" (its 128 x 1 tiles) or "e5m6" (finer)."""
    if is_sharded(weight) or is_sharded(x):  # tensor parallelism: the GEMMs on the local shards (fp8_tp.py)
        return sharded_linear(x, weight, bias, lambda *local: fp8_linear(*local, config, cache_format))
    out_dtype = _out_dtype(x)
    lead, K = x.shape[:-1], x.shape[-1]
    with torch.autocast(x.device.type, enabled=False):
        y = _FP8Linear.apply(x.reshape(-1, K), weight, config, out_dtype, cache_format)
    y = y.view(*lead, weight.shape[0])
    return y if bias is None else y + bias.to(y.dtype)


class Float8TrainingLinear(nn.Linear):
    """An nn.Linear whose forward and backward GEMMs run in block-scaled FP8 (same `weight` / `bias` Parameters)."""

    fp8_config: FP8TrainingConfig
    cache_format: str = "e4m3"  # "e5m6" for the linear after attention (convert_to_fp8_training sets it)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: FP8TrainingConfig) -> "Float8TrainingLinear":
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        new.weight, new.bias = linear.weight, linear.bias  # the same Parameter objects
        new.fp8_config = config
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias, self.fp8_config, self.cache_format)

    def recompute_swiglu_into(self, gate: torch.Tensor, up: torch.Tensor, act_fn) -> torch.Tensor:
        """self(act_fn(gate) * up) with gate and up kept in e4m3 for backward and the rest recomputed there (V3's
        SwiGLU caching; DeepseekMLP calls it under the memory option recompute_swiglu)."""
        cfg = self.fp8_config

        def swiglu_down(gate, up, weight, bias):
            return fp8_linear(act_fn(gate) * up, weight, bias, cfg, self.cache_format)

        packer = fp8_packer(cfg)
        return recompute_packed(swiglu_down, (packer, packer, None, None), gate, up, self.weight, self.bias)

    def extra_repr(self) -> str:
        c = self.fp8_config
        return (f"{super().extra_repr()}, fp8 training 1x128 x 128x128, pow2_scales={c.round_scales_to_power_of_2}, "
                f"cache_fp8_activations={c.cache_fp8_activations} ({self.cache_format}), backend={c.backend}")


def fp8_packer(config: FP8TrainingConfig):
    """(pack, unpack) for recompute_packed: a recomputed region's input kept as e4m3 in 1 x 128 tiles (or as it is
    without cache_fp8_activations)."""
    if not config.cache_fp8_activations:
        return None
    p2 = config.round_scales_to_power_of_2
    return (lambda t: quantize_blockwise(t, TILE, p2), lambda q, s: dequantize_blockwise(q, s, TILE))


# --------------------------------------------------------------------------------------------------------------------
# The three GEMMs of the routed experts, per expert group


class _FP8GroupedMM(torch.autograd.Function):
    """y [S, N] with y_s = x_s @ w[e(s)]^T for rows sorted by expert (group e ends at offsets_E[e]), all three GEMMs
    on e4m3 operands. torch has no block-scaled grouped GEMM: the dequantized tiles go through grouped_mm."""

    @staticmethod
    def forward(ctx, x_SK, w_ENK, offsets_E, config: FP8TrainingConfig, out_dtype: torch.dtype, x_fp8=None):
        """x_fp8: x's e4m3 rows and 1 x 128 scales when they arrived quantized (FP8 dispatch, quant/fp8_dispatch.py):
        Fprop takes them as they are, and x_SK (their dequantized values) is Wgrad's operand."""
        p2 = config.round_scales_to_power_of_2
        cd = _grouped_compute_dtype(x_SK)
        wq, ws = quantize_blockwise(w_ENK, BLOCK, p2)
        x = dequantize_blockwise(*(x_fp8 or quantize_blockwise(x_SK, TILE, p2)), TILE, cd)
        y_SN = _grouped_mm(x, dequantize_blockwise(wq, ws, BLOCK, cd).transpose(1, 2), offs=offsets_E)
        if config.cache_fp8_activations:
            ctx.save_for_backward(*quantize_token_tiles(x_SK, offsets_E, p2), wq, ws, offsets_E)
        else:
            ctx.save_for_backward(x_SK, wq, ws, offsets_E)
        ctx.config, ctx.dtypes = config, (x_SK.dtype, w_ENK.dtype)
        return y_SN.to(out_dtype)

    @staticmethod
    def backward(ctx, dy_SN):
        config, (x_dtype, w_dtype) = ctx.config, ctx.dtypes
        p2 = config.round_scales_to_power_of_2
        if config.cache_fp8_activations:
            xq, xs, tile_S, wq, ws, offsets_E = ctx.saved_tensors
        else:
            x_SK, wq, ws, offsets_E = ctx.saved_tensors
            xq, xs, tile_S = quantize_token_tiles(x_SK, offsets_E, p2)
        cd = _grouped_compute_dtype(dy_SN)
        dx = dw = None
        if ctx.needs_input_grad[0]:  # Dgrad per group: dy in 1 x 128 tiles along N, the weights' blocks
            dy = dequantize_blockwise(*quantize_blockwise(dy_SN, TILE, p2), TILE, cd)
            dx = _grouped_mm(dy, dequantize_blockwise(wq, ws, BLOCK, cd), offs=offsets_E).to(x_dtype)
        if ctx.needs_input_grad[1]:  # Wgrad per group: 128-token tiles starting at each group's first token
            dyq, dys, dy_tile_S = quantize_token_tiles(dy_SN, offsets_E, p2)
            dy = dequantize_token_tiles(dyq, dys, dy_tile_S).to(cd)
            dw = grouped_wgrad(dy, dequantize_token_tiles(xq, xs, tile_S).to(cd), offsets_E).to(w_dtype)
        return dx, dw, None, None, None, None


def _grouped_compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.bfloat16 if x.is_cuda else torch.float32  # CUDA's grouped_mm takes bf16; the CPU reference fp32


class Float8TrainingExperts(DeepseekExperts):
    """DeepseekExperts (same `gate_up_proj` [E, 2I, D] / `down_proj` [E, D, I] Parameters) whose grouped path runs
    all three GEMMs of each expert group in FP8; the per-expert loop (odd shapes) uses `fp8_linear` per expert."""

    fp8_config: FP8TrainingConfig

    @classmethod
    def from_experts(cls, experts: DeepseekExperts, config: FP8TrainingConfig) -> "Float8TrainingExperts":
        new = cls.__new__(cls)
        new.__dict__.update(experts.__dict__)  # every attribute, the same Parameter objects under the same names
        for registry in ("_parameters", "_buffers", "_modules"):
            setattr(new, registry, dict(getattr(experts, registry)))
        new.fp8_config = config
        return new

    def _use_loop(self) -> bool:
        impl = getattr(self, "implementation", None) or getattr(getattr(self, "config", None),
                                                               "_experts_implementation", None)
        return impl in ("loop", "eager")

    def _grouped_ok(self, x: torch.Tensor) -> bool:
        """grouped_mm needs 16-byte aligned rows of D, 2I and I in the compute dtype."""
        size = torch.finfo(_grouped_compute_dtype(x)).bits // 8
        return all((width * size) % 16 == 0 for width in (self.hidden_dim, self.intermediate_dim))

    def forward(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The per-expert counts are taken here, over every (token, expert) pair: the MoE layer's balancing counts
        leave padding out and would misplace the segments. `x_fp8` = (e4m3 x [T, D], scales [T, ceil(D/128)]): x as
        FP8 dispatch delivered it (x_TD is its dequantized copy); the up-projection's Fprop uses it unchanged (the
        per-expert loop, for odd shapes, quantizes x_TD again)."""
        if self._use_loop() or not self._grouped_ok(x_TD):
            return self.forward_loop(x_TD, expert_ids_TK, weights_TK)
        T, K = expert_ids_TK.shape
        cfg, out_dtype = self.fp8_config, _out_dtype(x_TD)
        order_S = expert_ids_TK.reshape(-1).argsort(stable=True)  # each expert's rows become one segment
        x_SD = x_TD[order_S // K]
        if x_fp8 is not None:
            x_fp8 = (x_fp8[0][order_S // K], x_fp8[1][order_S // K])
        if getattr(self, "_is_expert_parallel", False):
            # Under expert parallelism, id num_experts marks a route to another rank's expert (sorted last). Those rows
            # are zeroed and join the last group: zero rows add nothing to its GEMMs, amax or Wgrad tiles, and output
            # zero, with no host synchronisation.
            local_S = expert_ids_TK.reshape(-1)[order_S] < self.num_experts
            x_SD = torch.where(local_S.unsqueeze(-1), x_SD, torch.zeros((), dtype=x_SD.dtype, device=x_SD.device))
            expert_ids_TK = expert_ids_TK.clamp_max(self.num_experts - 1)
        offsets_E = tokens_per_expert(expert_ids_TK, self.num_experts).cumsum(0).to(torch.int32)  # segment ends
        def swiglu_down(gate_up_S2I, down_EDI, offsets_E):
            gate_SI, up_SI = gate_up_S2I.chunk(2, dim=-1)
            return _FP8GroupedMM.apply((self.act_fn(gate_SI) * up_SI).contiguous(), down_EDI, offsets_E, cfg, out_dtype)

        with torch.autocast(x_TD.device.type, enabled=False):
            gate_up_S2I = _FP8GroupedMM.apply(x_SD, self.gate_up_proj, offsets_E, cfg, out_dtype, x_fp8)
            if recompute_active(self.config, "recompute_swiglu"):  # V3: SwiGLU's input cached in FP8, output recomputed
                y_SD = recompute_packed(swiglu_down, (fp8_packer(cfg), None, None), gate_up_S2I, self.down_proj,
                                        offsets_E)
            else:
                y_SD = swiglu_down(gate_up_S2I, self.down_proj, offsets_E)
        y_SD = y_SD * weights_TK.reshape(-1)[order_S].unsqueeze(-1).to(y_SD.dtype)
        y_TKD = torch.empty_like(y_SD).index_copy_(0, order_S, y_SD).view(T, K, -1)
        return y_TKD.sum(dim=1).to(out_dtype)

    def forward_loop(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        cfg = self.fp8_config

        def swiglu_down(gate, up, down_DI):
            return fp8_linear(self.act_fn(gate) * up, down_DI, None, cfg)

        def expert(e, x_ND):
            gate, up = fp8_linear(x_ND, self.gate_up_proj[e], None, cfg).chunk(2, dim=-1)
            if recompute_active(self.config, "recompute_swiglu"):
                packer = fp8_packer(cfg)
                return recompute_packed(swiglu_down, (packer, packer, None), gate, up, self.down_proj[e])
            return swiglu_down(gate, up, self.down_proj[e])

        return run_experts_loop(x_TD, expert_ids_TK, weights_TK, expert, self.num_experts)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, fp8 training grouped 1x128 x 128x128"


# --------------------------------------------------------------------------------------------------------------------
# Grouped weight gradient


def _aligned_rows(x_SC: torch.Tensor, offsets_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """grouped_mm with the groups along the contraction wants the token count 16-byte aligned: pad zero rows at the
    end (inside the last group, where they add nothing)."""
    S = x_SC.shape[0]
    pad = -S % (16 // x_SC.element_size())
    if pad == 0:
        return x_SC, offsets_E
    offsets = offsets_E.clone()
    offsets[-1] = S + pad
    return F.pad(x_SC, (0, 0, 0, pad)), offsets


def grouped_wgrad(dy_SN: torch.Tensor, x_SK: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """dW[e] = dy_e^T @ x_e for every group e of sorted rows -> [E, N, K] (zeros for an empty group)."""
    dy, offs = _aligned_rows(dy_SN, offsets_E)
    x, _ = _aligned_rows(x_SK, offsets_E)
    return _grouped_mm(dy.t().contiguous(), x, offs=offs)
