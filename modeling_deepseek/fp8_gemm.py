"""The block-scaled FP8 GEMM: one interface, one capability check, two backends, for inference and training alike.

Every FP8 GEMM of this package is written in one form, "NT": both operands hold the contraction dim K last,

    out[M, N] = a[M, K] @ b[N, K]^T      a: e4m3 in 1 x 128 tiles along K (one scale per row per 128 of K)
                                         b: e4m3 in 128 x 128 blocks (a weight) or in 1 x 128 tiles along K

Backends, one vocabulary wherever a backend is chosen (`FP8TrainingConfig.backend` for training, the `backend` of
DeepseekFP8Linear / DeepseekFP8Experts, set by `from_pretrained(..., fp8_gemm_backend=)`, for inference):

- "scaled_mm": torch.nn.functional.scaled_mm with ScalingType.BlockWise1x128 x BlockWise128x128 (or x BlockWise1x128)
  on Hopper (sm90, cuBLAS 12.9+), fp32 accumulation, bf16 output. Ragged dims are zero-padded to the kernel's
  granularity (K and N to 128, M to 16); zero tiles get scale 1 and add nothing. Raises where it cannot run.
- "reference": dequantize each tile (e4m3 value x its fp32 scale) and multiply in fp32. Exactly what the block-scaled
  GEMM computes, up to the summation order; runs anywhere, and is what CI tests.
- "auto": "scaled_mm" where `scaled_mm_available` says it runs, else the caller's high-precision path (training: the
  reference; inference: the weight dequantized to the activations' dtype, a plain matmul).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fp8_format import FP8_BLOCK, FP8_DTYPE, cdiv, dequantize_blockwise

FP8_GEMM_BACKENDS = ("auto", "reference", "scaled_mm")
TILE = (1, FP8_BLOCK)
BLOCK = (FP8_BLOCK, FP8_BLOCK)


def check_backend(backend: str, owner: str) -> None:
    """Raise, naming `owner`, unless `backend` is one of FP8_GEMM_BACKENDS."""
    if backend not in FP8_GEMM_BACKENDS:
        raise ValueError(f"{owner}: unknown FP8 GEMM backend {backend!r}; choose one of {FP8_GEMM_BACKENDS}")


def scaled_mm_available(device: torch.device | str | None = None) -> bool:
    """Whether the block-scaled FP8 GEMM runs on `device` (None: the current CUDA device): a Hopper GPU (compute
    capability 9.x) and torch's F.scaled_mm with ScalingType."""
    if device is not None and torch.device(device).type != "cuda":
        return False
    if not (torch.cuda.is_available() and hasattr(F, "scaled_mm") and hasattr(F, "ScalingType")):
        return False
    return torch.cuda.get_device_capability(device)[0] == 9


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto" -> "scaled_mm" where it runs on `device`, else "reference"; "scaled_mm" raises where it cannot run."""
    check_backend(backend, "resolve_backend")
    if backend == "auto":
        return "scaled_mm" if scaled_mm_available(device) else "reference"
    if backend == "scaled_mm" and not scaled_mm_available(device):
        raise RuntimeError(f"FP8 GEMM backend 'scaled_mm' needs tensors on a Hopper GPU (sm90) and torch's "
                           f"F.scaled_mm; got a {device} tensor. Use backend='auto' or 'reference'.")
    return backend


def blockwise_mm(a_fp8: torch.Tensor, a_scale: torch.Tensor, b_fp8: torch.Tensor, b_scale: torch.Tensor,
                 b_block: tuple[int, int], out_dtype: torch.dtype, backend: str = "reference") -> torch.Tensor:
    """a [M, K] (1 x 128 tiles) @ b [N, K]^T (b_block tiles) -> [M, N] in out_dtype, accumulated in fp32.
    `backend` is "reference" or "scaled_mm" (see `resolve_backend` for "auto")."""
    if backend == "scaled_mm":
        return _blockwise_scaled_mm(a_fp8, a_scale, b_fp8, b_scale, b_block, out_dtype)
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


def _blockwise_scaled_mm(a_fp8, a_scale, b_fp8, b_scale, b_block, out_dtype):
    M, K = a_fp8.shape
    N = b_fp8.shape[0]
    # cuBLAS (12.9+) finds no block-scaled kernel for some row counts (1, 17, 33): M is padded to 16 too.
    Mp, Kp, Np = cdiv(M, 16) * 16, cdiv(K, 128) * 128, cdiv(N, 128) * 128
    kb = Kp // 128
    a = _pad_fp8(a_fp8, Mp, Kp)
    b = _pad_fp8(b_fp8, Np, Kp)
    # scale_a [M, K/128] outer-dim-major (strides (1, M)), as cuBLAS reads 1 x 128 scales.
    scale_a = torch.empty_strided((Mp, kb), (1, Mp), dtype=torch.float32, device=a.device)
    scale_a.copy_(_pad_ones(a_scale, Mp, kb))
    ST = F.ScalingType
    if tuple(b_block) == BLOCK:
        # b's block grid [N/128, K/128], columns padded to a multiple of 4, handed over transposed (strides (1, l4)).
        l4 = cdiv(kb, 4) * 4
        scale_b, recipe_b = _pad_ones(b_scale, Np // 128, l4).t(), ST.BlockWise128x128
    elif tuple(b_block) == TILE:
        scale_b, recipe_b = _pad_ones(b_scale, Np, kb).t().contiguous(), ST.BlockWise1x128  # [K/128, N]
    else:
        raise ValueError(f"blockwise_mm: b must be in 128 x 128 or 1 x 128 tiles, got {b_block}")
    y = F.scaled_mm(a, b.t(), scale_a, ST.BlockWise1x128, scale_b, recipe_b, output_dtype=torch.bfloat16)
    return y[:M, :N].to(out_dtype)
