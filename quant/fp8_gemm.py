"""Block-scaled FP8 GEMMs for training: one interface, a CPU reference and a Hopper backend.

Every GEMM of FP8 training is written here in one form, "NT": both operands hold the contraction dim K last,

    out[M, N] = a[M, K] @ b[N, K]^T      a: e4m3 in 1 x 128 tiles along K (one scale per row per 128 of K)
                                         b: e4m3 in 128 x 128 blocks (a weight) or in 1 x 128 tiles along K

so that the three GEMMs of a Linear y = x W^T (x [M, K], W [N, K], M = tokens) are

    Fprop   y  = x  @ W^T     a = x  [M, K] (1 x 128)            b = W   [N, K] (128 x 128)
    Dgrad   dx = dy @ W       a = dy [M, N] (1 x 128 along N)    b = W^T [K, N] (128 x 128: W's blocks transposed)
    Wgrad   dW = dy^T @ x     a = dy^T [N, M] (1 x 128 along M)  b = x^T [K, M] (1 x 128 along M)

Wgrad contracts over tokens, so its operands are tiled 128 tokens at a time: the (128 x 1) tiling of dy and x,
written here as 1 x 128 tiles of their transposes. Square weight blocks make W^T's quantization the transpose of
W's, so Dgrad reuses the forward's e4m3 weight (as DeepSeek-V3 does).

Backends (`blockwise_mm(..., backend=)`):

- "reference": dequantize each tile (e4m3 value x its fp32 scale) and multiply in fp32. Exactly what a block-scaled
  GEMM with fp32 accumulation computes, up to the summation order; runs anywhere, and is what CI tests.
- "cuda": torch.nn.functional.scaled_mm with ScalingType.BlockWise1x128 x BlockWise128x128 (or x BlockWise1x128
  for Wgrad) on Hopper (sm90, cuBLAS 12.9+), fp32 accumulation, bf16 output. Ragged dims are zero-padded to the
  kernel's granularity (K and N to 128, M to 16); zero tiles get scale 1 and add nothing.

Routed experts (`grouped_mm_fp8`): the tokens sorted by expert form one contiguous group per expert, and each group
is a GEMM of its own. Fprop and Dgrad tile along the channels, so grouping changes nothing for their operands; the
Wgrad contraction runs over each group's tokens, so its 128-token tiles start at every group's first token
(`quantize_token_tiles`, computed on the device from the group offsets: no host synchronisation). torch has no
block-scaled grouped GEMM, so both backends multiply the dequantized operands with torch's grouped_mm (fp32 on CPU,
bf16 on CUDA): FP8 numerics, high-precision GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from modeling_deepseek.compat import grouped_mm as _grouped_mm
from modeling_deepseek.fp8 import FP8_BLOCK, FP8_DTYPE, _cdiv, _fp8_scale, dequantize_blockwise

TILE = (1, FP8_BLOCK)
BLOCK = (FP8_BLOCK, FP8_BLOCK)
BACKENDS = ("auto", "reference", "cuda")


def cuda_backend_available(device: torch.device | str | None = None) -> bool:
    """Block-scaled FP8 GEMMs need a Hopper GPU (compute capability 9.x) and torch's F.scaled_mm with ScalingType."""
    if not (torch.cuda.is_available() and hasattr(F, "scaled_mm") and hasattr(F, "ScalingType")):
        return False
    return torch.cuda.get_device_capability(device)[0] == 9


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto" -> "cuda" for tensors on a Hopper GPU, else "reference"."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown FP8 GEMM backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "cuda" if device.type == "cuda" and cuda_backend_available(device) else "reference"
    return backend


# --------------------------------------------------------------------------------------------------------------------
# Dense NT GEMM


def blockwise_mm(a_fp8: torch.Tensor, a_scale: torch.Tensor, b_fp8: torch.Tensor, b_scale: torch.Tensor,
                 b_block: tuple[int, int], out_dtype: torch.dtype, backend: str = "reference") -> torch.Tensor:
    """a [M, K] (1 x 128 tiles) @ b [N, K]^T (b_block tiles) -> [M, N] in out_dtype, accumulated in fp32."""
    if backend == "cuda":
        return _blockwise_mm_cuda(a_fp8, a_scale, b_fp8, b_scale, b_block, out_dtype)
    a = dequantize_blockwise(a_fp8, a_scale, TILE)
    b = dequantize_blockwise(b_fp8, b_scale, b_block)
    return (a @ b.t()).to(out_dtype)


def _pad_fp8(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad an e4m3 matrix (through its bytes: byte 0 is +0.0 in e4m3)."""
    if x.shape == (rows, cols):
        return x.contiguous()
    return F.pad(x.view(torch.uint8), (0, cols - x.shape[1], 0, rows - x.shape[0])).view(FP8_DTYPE)


def _pad_ones(s: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return F.pad(s.float(), (0, cols - s.shape[1], 0, rows - s.shape[0]), value=1.0)


def _blockwise_mm_cuda(a_fp8, a_scale, b_fp8, b_scale, b_block, out_dtype):
    M, K = a_fp8.shape
    N = b_fp8.shape[0]
    Mp, Kp, Np = _cdiv(M, 16) * 16, _cdiv(K, 128) * 128, _cdiv(N, 128) * 128
    kb = Kp // 128
    a = _pad_fp8(a_fp8, Mp, Kp)
    b = _pad_fp8(b_fp8, Np, Kp)
    # scale_a [M, K/128] outer-dim-major (strides (1, M)), as cuBLAS reads 1 x 128 scales.
    scale_a = torch.empty_strided((Mp, kb), (1, Mp), dtype=torch.float32, device=a.device)
    scale_a.copy_(_pad_ones(a_scale, Mp, kb))
    ST = F.ScalingType
    if tuple(b_block) == BLOCK:
        # b's block grid [N/128, K/128], columns padded to a multiple of 4, handed over transposed (strides (1, l4)).
        l4 = _cdiv(kb, 4) * 4
        scale_b, recipe_b = _pad_ones(b_scale, Np // 128, l4).t(), ST.BlockWise128x128
    elif tuple(b_block) == TILE:
        scale_b, recipe_b = _pad_ones(b_scale, Np, kb).t().contiguous(), ST.BlockWise1x128  # [K/128, N]
    else:
        raise ValueError(f"blockwise_mm: b must be in 128 x 128 or 1 x 128 tiles, got {b_block}")
    y = F.scaled_mm(a, b.t(), scale_a, ST.BlockWise1x128, scale_b, recipe_b, output_dtype=torch.bfloat16)
    return y[:M, :N].to(out_dtype)


# --------------------------------------------------------------------------------------------------------------------
# Grouped (per expert) operands


def quantize_token_tiles(x_SC: torch.Tensor, offsets_E: torch.Tensor, pow2_scale: bool = False):
    """Rows sorted by group (group e ends at offsets_E[e]) -> (e4m3 x [S, C], scale [max tiles, C], tile_S [S]).

    Tiles are 128 consecutive rows of one group (128 x 1: one scale per tile per column), each group's first tile
    starting at its first row, so that no tile mixes two experts' tokens. A tile's index is its group's tile base
    plus (row - group start) // 128; there are at most ceil(S / 128) + E tiles, a bound known from the shapes, so
    nothing here waits for the host.
    """
    S, C = x_SC.shape
    E = offsets_E.shape[0]
    ends = offsets_E.long()
    starts = torch.cat((ends.new_zeros(1), ends[:-1]))
    tiles_E = (ends - starts + FP8_BLOCK - 1) // FP8_BLOCK
    base_E = tiles_E.cumsum(0) - tiles_E
    rows_S = torch.arange(S, device=x_SC.device)
    group_S = torch.searchsorted(ends, rows_S, right=True).clamp_max(E - 1)
    tile_S = base_E[group_S] + (rows_S - starts[group_S]) // FP8_BLOCK
    x = x_SC.float()
    amax = x.new_zeros(_cdiv(S, FP8_BLOCK) + E, C).scatter_reduce_(
        0, tile_S[:, None].expand(S, C), x.abs(), reduce="amax", include_self=True)
    scale = _fp8_scale(amax, pow2_scale)
    q = (x / scale[tile_S]).clamp(-448.0, 448.0).to(FP8_DTYPE)
    return q, scale, tile_S


def dequantize_token_tiles(q_SC: torch.Tensor, scale: torch.Tensor, tile_S: torch.Tensor) -> torch.Tensor:
    return q_SC.float() * scale[tile_S]


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
