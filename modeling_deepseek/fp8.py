"""DeepSeek's FP8 block format on the model side: e4m3 weights with one float32 `weight_scale_inv` per 128 x 128
block, 1 x 128 activation groups, block-scaled GEMMs (F.scaled_mm on Hopper) with a dequantize-and-matmul fallback,
and the FP8 Linear / experts modules that keep weights in e4m3. See quantized.py for how checkpoints load, and
quant/fp8.py for the format and the checkpoint writer.

One tile quantizer serves everything: `quantize_blockwise(x, block_size)` / `dequantize_blockwise` for any br x bc
tile of the last two dims (1 x 128 activations, 128 x 128 weights, 128 x 1 for the weight-gradient GEMM of FP8
training in quant/fp8_training.py); the weight / activation helpers below are its checkpoint-format spellings, and
`quantize_state_tensors` is the one FP8 checkpoint writer.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from .experts import DeepseekExperts, run_experts_loop

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
FP8_BLOCK = 128
FP8_QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
}

# --------------------------------------------------------------------------------------------------------------------
# FP8 block quantization (DeepSeek's checkpoint format)

# The weights DeepSeek's release stores in FP8: the attention and FFN projections of every block (experts, shared
# experts and MTP blocks included). Embedding, heads, norms, the router and MTP's eh_proj stay in high precision.
FP8_WEIGHT_PATTERN = re.compile(
    r"^(model\.)?layers\.\d+\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight$"
)


def should_quantize(key: str, tensor: torch.Tensor) -> bool:
    """Whether a checkpoint tensor is stored in FP8 (a 2-D floating projection weight, see FP8_WEIGHT_PATTERN)."""
    return tensor.ndim == 2 and tensor.is_floating_point() and FP8_WEIGHT_PATTERN.match(key) is not None


def is_high_precision_key(key: str) -> bool:
    """Checkpoint weights DeepSeek keeps out of FP8: embedding, output heads, norms, the MoE router and its bias."""
    parts = key.split(".")
    return (
        "embed_tokens" in parts
        or "lm_head" in parts
        or ".shared_head.head." in f".{key}"
        or key.endswith("norm.weight")
        or key.endswith(".mlp.gate.weight")
        or key.endswith("e_score_correction_bias")
    )


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def scale_grid_shape(shape, block: int = FP8_BLOCK) -> tuple[int, ...]:
    """Shape of `weight_scale_inv` for a weight of `shape` [..., out, in]: [..., ceil(out/block), ceil(in/block)]."""
    *lead, rows, cols = shape
    return (*lead, _cdiv(rows, block), _cdiv(cols, block))


def _fp8_scale(amax: torch.Tensor, pow2_scale: bool = False) -> torch.Tensor:
    """Dequantization multiplier of a tile from its amax: amax / 448 (1 for an all-zero tile, never below the
    smallest normal fp32). With `pow2_scale` it is rounded up to a power of two (V3.1, Transformer Engine's default),
    so that scaling is exact in any float format and amax still maps to at most 448."""
    scale = torch.where(amax > 0, (amax / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny), torch.ones_like(amax))
    if pow2_scale:
        mantissa, exponent = torch.frexp(scale)  # scale = m * 2^e, m in [0.5, 1): the next power of two is 2^e
        scale = torch.where(mantissa == 0.5, scale, torch.ldexp(torch.ones_like(scale), exponent))
    return scale


def quantize_blockwise(x: torch.Tensor, block_size: tuple[int, int] = (1, FP8_BLOCK),
                       pow2_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., rows, cols] -> (e4m3 x of the same shape, float32 scale [..., ceil(rows/br), ceil(cols/bc)]).

    One tile is br x bc entries of the last two dims; per tile: scale = amax / 448 (the dequantization multiplier,
    the checkpoints' `weight_scale_inv`), q = round_to_e4m3(x / scale). The tile grid is anchored at 0 and ragged
    edge tiles are zero-padded first, so padding never raises an amax. The tilings in use:

        (1, 128)    activations and output gradients: one scale per row per 128 columns; scale [..., ceil(n/128)]
                    (a 1-D x counts as one row)
        (128, 128)  weights: scale [..., ceil(out/128), ceil(in/128)]
        (128, 1)    the same 1 x 128 tiles along the first dim (tokens), as the weight-gradient GEMM needs them
    """
    br, bc = block_size
    if x.ndim == 1:
        if br != 1:
            raise ValueError(f"quantize_blockwise: a 1-D tensor needs block_size (1, n), got {block_size}")
        q, s = quantize_blockwise(x.unsqueeze(0), block_size, pow2_scale)
        return q.squeeze(0), s.squeeze(0)
    if x.ndim < 2 or not x.is_floating_point():
        raise ValueError(f"quantize_blockwise needs a floating [..., rows, cols] tensor, got {x.dtype} "
                         f"{tuple(x.shape)}")
    *lead, rows, cols = x.shape
    R, C = _cdiv(rows, br), _cdiv(cols, bc)
    padded = F.pad(x.float(), (0, C * bc - cols, 0, R * br - rows))  # zeros: they never raise a tile's amax
    tiles = padded.unflatten(-1, (C, bc)).unflatten(-3, (R, br))  # [..., R, br, C, bc]
    scale = _fp8_scale(tiles.abs().amax(dim=(-3, -1)), pow2_scale)  # [..., R, C]
    q = (tiles / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.flatten(-4, -3).flatten(-2, -1)[..., :rows, :cols].contiguous()
    return q, scale.contiguous()


def _check_scale_shape(shape, scale_inv: torch.Tensor, block, name: str = "weight") -> None:
    br, bc = (block, block) if isinstance(block, int) else block
    expected = (*shape[:-2], _cdiv(shape[-2], br), _cdiv(shape[-1], bc))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"{name}: weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} for a weight of shape "
            f"{tuple(shape)} in {br} x {bc} blocks"
        )


def dequantize_blockwise(x_fp8: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int] = (1, FP8_BLOCK),
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_blockwise`: x * scale of its tile, in `dtype` (the grid is fixed by `block_size`, never
    inferred from the scale shape: with ragged edges ceil(out/128) does not divide out)."""
    if x_fp8.ndim == 1:
        return dequantize_blockwise(x_fp8.unsqueeze(0), scale.unsqueeze(0), block_size, dtype).squeeze(0)
    _check_scale_shape(x_fp8.shape, scale, block_size, "x")
    br, bc = block_size
    rows, cols = x_fp8.shape[-2:]
    s = scale.float()
    if br > 1:
        s = s.repeat_interleave(br, dim=-2)[..., :rows, :]
    if bc > 1:
        s = s.repeat_interleave(bc, dim=-1)[..., :cols]
    return (x_fp8.float() * s).to(dtype)


def quantize_weight_blockwise(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight [..., out, in] -> (e4m3 weight, float32 weight_scale_inv [..., ceil(out/b), ceil(in/b)]): the
    checkpoint format, `quantize_blockwise` with block x block tiles."""
    if w.ndim < 2:
        raise ValueError(f"quantize_weight_blockwise needs a [..., out, in] weight, got shape {tuple(w.shape)}")
    return quantize_blockwise(w, (block, block))


def dequantize_weight_blockwise(
    w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of `quantize_weight_blockwise` (weight * scale_inv of its block, in `dtype`)."""
    _check_scale_shape(w_fp8.shape, scale_inv, block)
    return dequantize_blockwise(w_fp8, scale_inv, (block, block), dtype)


def quantize_activation_groupwise(x: torch.Tensor, group: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [M, K] -> (e4m3 [M, K], float32 scale [M, ceil(K/group)]): V3's online 1 x 128 tile scaling."""
    return quantize_blockwise(x, (1, group))


def quantize_state_tensors(tensors, stats: dict | None = None, block: int = FP8_BLOCK):
    """(key, tensor) pairs in a checkpoint's layout -> the same in DeepSeek's FP8 format: every weight that
    `should_quantize` selects becomes e4m3 plus its `weight_scale_inv`, everything else passes unchanged. The one FP8
    checkpoint writer (quant.fp8.quantize_checkpoint and the exporter's --fp8 both stream through it). `stats`, if
    given, collects counts and bytes before / after."""
    for key, tensor in tensors:
        before = tensor.numel() * tensor.element_size()
        if should_quantize(key, tensor):
            q, scale_inv = quantize_weight_blockwise(tensor, block)
            out = ((key, q), (key.removesuffix("weight") + "weight_scale_inv", scale_inv))
        else:
            out = ((key, tensor),)
        if stats is not None:
            stats["quantized" if len(out) == 2 else "kept"] += 1
            stats["bytes_before"] += before
            stats["bytes_after"] += sum(t.numel() * t.element_size() for _, t in out)
        yield from out


def fp8_block_matmul_reference(x: torch.Tensor, w_fp8: torch.Tensor, scale_inv: torch.Tensor,
                               block: int = FP8_BLOCK) -> torch.Tensor:
    """What the FP8 GEMM computes, in fp32: 1 x 128 quantized activations times 128 x 128 dequantized weights."""
    xq, xs = quantize_activation_groupwise(x.reshape(-1, x.shape[-1]), block)
    x_deq = dequantize_blockwise(xq, xs, (1, block))
    y = x_deq @ dequantize_weight_blockwise(w_fp8, scale_inv, block, torch.float32).t()
    return y.view(*x.shape[:-1], -1)


# How fp8_block_linear computes: "auto" (block-scaled FP8 GEMM where supported, else dequantize-and-matmul),
# "dequantize" (always dequantize-and-matmul), or "reference" (fp32 simulation of the FP8 GEMM, activations quantized
# in 1 x 128 groups too: for checking the GEMM on a GPU against the same arithmetic).
FP8_GEMM_BACKEND = "auto"


def _scaled_mm_supported(x: torch.Tensor, w_fp8: torch.Tensor, block: int) -> bool:
    """Block-scaled FP8 GEMM: CUDA Hopper (sm90) with torch.nn.functional.scaled_mm, 128-multiple K and N."""
    if not (x.is_cuda and w_fp8.is_cuda and block == 128 and hasattr(F, "scaled_mm") and hasattr(F, "ScalingType")):
        return False
    N, K = w_fp8.shape
    return N % 128 == 0 and K % 128 == 0 and torch.cuda.get_device_capability(x.device)[0] == 9


def fp8_block_linear(x: torch.Tensor, w_fp8: torch.Tensor, scale_inv: torch.Tensor, bias: torch.Tensor | None = None,
                     block: int = FP8_BLOCK) -> torch.Tensor:
    """y = x W^T for an e4m3 W with per-block scale_inv.

    On Hopper: activations are quantized per token in 1 x 128 groups and the product runs as one block-scaled FP8
    GEMM (F.scaled_mm, BlockWise1x128 x BlockWise128x128, fp32 accumulation, bf16 output). Elsewhere (CPU, other
    GPUs, ragged shapes): W is dequantized to x's dtype and multiplied normally.
    """
    if FP8_GEMM_BACKEND == "reference":
        y = fp8_block_matmul_reference(x, w_fp8, scale_inv, block).to(x.dtype)
        return y if bias is None else y + bias.to(y.dtype)
    if FP8_GEMM_BACKEND == "auto" and _scaled_mm_supported(x, w_fp8, block):
        lead, K = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, K)
        rows = x2.shape[0]
        if rows % 16:  # cuBLAS (12.9+) finds no block-scaled kernel for some row counts (1, 17, 33): pad with zeros
            x2 = F.pad(x2, (0, 0, 0, 16 - rows % 16))
        xq, xs = quantize_activation_groupwise(x2, block)
        # Layouts the kernel wants: scale_a [M, K/128] with strides (1, M); scale_b [round_up(K/128, 4), N/128] with
        # strides (1, round_up(K/128, 4)), i.e. the weight's scale grid transposed, its columns padded to 4.
        M, kb = xs.shape
        scale_a = torch.empty_strided((M, kb), (1, M), dtype=torch.float32, device=xs.device)
        scale_a.copy_(xs)
        l4 = _cdiv(kb, 4) * 4
        sb = scale_inv.float().new_ones(scale_inv.shape[0], l4)
        sb[:, :kb] = scale_inv
        scale_b = sb.t()
        ST = F.ScalingType
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        y = F.scaled_mm(xq, w_fp8.t(), scale_a, ST.BlockWise1x128, scale_b, ST.BlockWise128x128,
                        output_dtype=out_dtype)
        y = y[:rows].to(x.dtype).view(*lead, -1)
        return y if bias is None else y + bias.to(y.dtype)
    w = dequantize_weight_blockwise(w_fp8, scale_inv, block, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


class DeepseekFP8Linear(nn.Module):
    """A Linear holding DeepSeek's FP8 format: `weight` e4m3 [out, in] and `weight_scale_inv` float32
    [ceil(out/128), ceil(in/128)] (the dequantization multiplier per 128 x 128 block). See `fp8_block_linear`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, block: int = FP8_BLOCK,
                 device=None):
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, block
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        self.weight_scale_inv = nn.Parameter(
            torch.ones(scale_grid_shape((out_features, in_features), block), dtype=torch.float32, device=device),
            requires_grad=False,
        )
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_quantized(cls, w_fp8: torch.Tensor, scale_inv: torch.Tensor, bias: torch.Tensor | None = None,
                       block: int = FP8_BLOCK) -> "DeepseekFP8Linear":
        _check_scale_shape(w_fp8.shape, scale_inv, block)
        out_f, in_f = w_fp8.shape
        module = cls(in_f, out_f, bias=bias is not None, block=block, device="meta")
        module.weight = nn.Parameter(w_fp8.to(FP8_DTYPE), requires_grad=False)
        module.weight_scale_inv = nn.Parameter(scale_inv.float().contiguous(), requires_grad=False)
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear, block: int = FP8_BLOCK) -> "DeepseekFP8Linear":
        w_fp8, scale_inv = quantize_weight_blockwise(linear.weight.detach(), block)
        return cls.from_quantized(w_fp8, scale_inv, linear.bias, block)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_weight_blockwise(self.weight, self.weight_scale_inv, self.block, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_block_linear(x, self.weight, self.weight_scale_inv, self.bias, self.block)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 {self.block}x{self.block}"


class DeepseekFP8Experts(nn.Module):
    """Routed experts kept in FP8: per projection an e4m3 stack [E, out, in] with its scale grid [E, R, C].

    gate and up stay separate stacks (in the checkpoint each has its own block grid; fusing [gate; up] rows would
    misalign the grid whenever moe_intermediate_size is not a multiple of 128). Same forward signature as
    DeepseekExperts; loops over the experts that received tokens, one FP8 linear per projection.
    """

    def __init__(self, gate_fp8, gate_scale, up_fp8, up_scale, down_fp8, down_scale, act_fn, block: int = FP8_BLOCK):
        super().__init__()
        self.block = block
        self.num_experts = gate_fp8.shape[0]
        self.act_fn = act_fn
        for name, value in (("gate_proj", gate_fp8), ("up_proj", up_fp8), ("down_proj", down_fp8)):
            setattr(self, name, nn.Parameter(value.to(FP8_DTYPE), requires_grad=False))
        for name, value, w in (("gate_proj_scale_inv", gate_scale, gate_fp8), ("up_proj_scale_inv", up_scale, up_fp8),
                               ("down_proj_scale_inv", down_scale, down_fp8)):
            _check_scale_shape(w.shape, value, block, name)
            setattr(self, name, nn.Parameter(value.float().contiguous(), requires_grad=False))

    @classmethod
    def from_experts(cls, experts: DeepseekExperts, block: int = FP8_BLOCK) -> "DeepseekFP8Experts":
        I = experts.intermediate_dim
        gate, up = experts.gate_up_proj.detach().split([I, I], dim=1)
        parts = [*quantize_weight_blockwise(gate, block), *quantize_weight_blockwise(up, block),
                 *quantize_weight_blockwise(experts.down_proj.detach(), block)]
        return cls(*parts, act_fn=experts.act_fn, block=block)

    def forward(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                load_E: torch.Tensor | None = None) -> torch.Tensor:  # load_E: unused, the loop finds its experts
        b = self.block

        def expert(e, x_ND):
            gate = fp8_block_linear(x_ND, self.gate_proj[e], self.gate_proj_scale_inv[e], block=b)
            up = fp8_block_linear(x_ND, self.up_proj[e], self.up_proj_scale_inv[e], block=b)
            return fp8_block_linear(self.act_fn(gate) * up, self.down_proj[e], self.down_proj_scale_inv[e], block=b)

        return run_experts_loop(x_TD, expert_ids_TK, weights_TK, expert)
