"""The e4m3 format, in one place: what an FP8 tensor and its scales are, for checkpoints, caches and training.

Every FP8 tensor of this package is `torch.float8_e4m3fn` (1 sign, 4 exponent, 3 mantissa bits, largest finite value
448, no infinities) plus float32 scales, one per tile. One rule gives every scale:

    scale = amax(tile) / 448        (1 for an all-zero tile; rounded up to a power of two with pow2_scale)
    q     = e4m3(x / scale)         dequantized: q * scale

`scale` is the dequantization multiplier, which DeepSeek's checkpoints call `weight_scale_inv`. The tilings in use:

    (128, 128)        checkpoint weights and FP8 training's weights: `quantize_weight_blockwise`
    (1, 128)          activations and output gradients, per token per 128 channels: `quantize_blockwise`
    (1, row length)   the latent caches (generate's and the paged one), one scale per token: `quantize_per_token`
    (128, 1)          FP8 training's weight-gradient operands, 128 tokens per tile (`quantize_blockwise` of the
                      transpose), restarting at every expert's first token for grouped experts: `quantize_token_tiles`

One finer format sits beside e4m3: E5M6 (1 sign, 5 exponent, 6 mantissa bits: float16's exponent with 4 mantissa
bits fewer; largest finite value 65024, no infinities used), with power-of-two scales in 1 x 128 tiles. DeepSeek-V3
caches the input of the linear after attention (o_proj) in it for backward (report 3.3.3), where e4m3's 3 mantissa
bits lose too much. There is no such torch dtype: `quantize_e5m6` rounds to the E5M6 grid and packs two 12-bit codes
into 3 bytes, 1.5 bytes per entry (e4m3: 1, bf16: 2), plus a float32 scale per 128 entries.

The tile grid is anchored at 0 and ragged edge tiles are zero-padded before their amax is taken (zeros never raise
it), so a 160-row weight has row blocks [0, 128) and [128, 160), never two of 80: a reader must use the fixed block
size, never infer it from the scale grid's shape. `should_quantize` says which checkpoint weights DeepSeek stores in
FP8, and `quantize_state_tensors` is the one FP8 checkpoint writer (quant.fp8.quantize_checkpoint and the exporter's
--fp8 both stream through it).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
FP8_BLOCK = 128
FP8_QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
}

# The weights DeepSeek's release stores in FP8: the attention and FFN projections of every block (experts, shared
# experts and MTP blocks included; V3.2's indexer wq_b and wk). Embedding, heads, norms, the router, MTP's eh_proj and
# the indexer's weights_proj stay in high precision.
FP8_WEIGHT_PATTERN = re.compile(
    r"^(model\.)?layers\.\d+\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj"
    r"|indexer\.wq_b|indexer\.wk)"
    r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight$"
)


def should_quantize(key: str, tensor: torch.Tensor) -> bool:
    """Whether a checkpoint tensor is stored in FP8 (a 2-D floating projection weight, see FP8_WEIGHT_PATTERN)."""
    return tensor.ndim == 2 and tensor.is_floating_point() and FP8_WEIGHT_PATTERN.match(key) is not None


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers: the number of tiles of size b along a dim of size a."""
    return -(-a // b)


def scale_grid_shape(shape, block: int = FP8_BLOCK) -> tuple[int, ...]:
    """Shape of `weight_scale_inv` for a weight of `shape` [..., out, in]: [..., ceil(out/block), ceil(in/block)]."""
    *lead, rows, cols = shape
    return (*lead, cdiv(rows, block), cdiv(cols, block))


def fp8_scale(amax: torch.Tensor, pow2_scale: bool = False, fmt_max: float = FP8_MAX) -> torch.Tensor:
    """Dequantization multiplier of a tile from its amax: amax / 448 (1 for an all-zero tile, never below the
    smallest normal fp32). With `pow2_scale` it is rounded up to a power of two (V3.1, Transformer Engine's default),
    so that scaling is exact in any float format and amax still maps to at most 448."""
    scale = torch.where(amax > 0, (amax / fmt_max).clamp_min(torch.finfo(torch.float32).tiny), torch.ones_like(amax))
    if pow2_scale:
        mantissa, exponent = torch.frexp(scale)  # scale = m * 2^e, m in [0.5, 1): the next power of two is 2^e
        scale = torch.where(mantissa == 0.5, scale, torch.ldexp(torch.ones_like(scale), exponent))
    return scale


def _to_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # The clamp keeps a quotient that rounds a hair past 448 finite (e4m3fn has no infinity: the cast would give NaN).
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_blockwise(x: torch.Tensor, block_size: tuple[int, int] = (1, FP8_BLOCK),
                       pow2_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., rows, cols] -> (e4m3 x of the same shape, float32 scale [..., ceil(rows/br), ceil(cols/bc)]).

    One tile is br x bc entries of the last two dims (a 1-D x counts as one row); see the module docstring for the
    scale rule and the tilings in use.
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
    return _quantize_tiles(x, block_size, pow2_scale, FP8_MAX, _to_e4m3)


def _quantize_tiles(x: torch.Tensor, block_size: tuple[int, int], pow2_scale: bool, fmt_max: float, cast):
    """The tiling of `quantize_blockwise` for any format: cast(tiles, scales) gives the stored values."""
    br, bc = block_size
    *lead, rows, cols = x.shape
    R, C = cdiv(rows, br), cdiv(cols, bc)
    padded = F.pad(x.float(), (0, C * bc - cols, 0, R * br - rows))  # zeros: they never raise a tile's amax
    tiles = padded.unflatten(-1, (C, bc)).unflatten(-3, (R, br))  # [..., R, br, C, bc]
    scale = fp8_scale(tiles.abs().amax(dim=(-3, -1)), pow2_scale, fmt_max)  # [..., R, C]
    q = cast(tiles, scale[..., :, None, :, None])
    q = q.flatten(-4, -3).flatten(-2, -1)[..., :rows, :cols].contiguous()
    return q, scale.contiguous()


def check_scale_shape(shape, scale: torch.Tensor, block, name: str = "weight") -> None:
    """Raise, naming `name`, unless `scale` is the tile grid of a tensor of `shape` in `block` (int: square) tiles."""
    br, bc = (block, block) if isinstance(block, int) else block
    expected = (*shape[:-2], cdiv(shape[-2], br), cdiv(shape[-1], bc))
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"{name}: weight_scale_inv has shape {tuple(scale.shape)}, expected {expected} for a weight of shape "
            f"{tuple(shape)} in {br} x {bc} blocks"
        )


def dequantize_blockwise(x_fp8: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int] = (1, FP8_BLOCK),
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_blockwise`: x * scale of its tile, in `dtype` (the grid is fixed by `block_size`, never
    inferred from the scale shape: with ragged edges ceil(out/128) does not divide out)."""
    if x_fp8.ndim == 1:
        return dequantize_blockwise(x_fp8.unsqueeze(0), scale.unsqueeze(0), block_size, dtype).squeeze(0)
    check_scale_shape(x_fp8.shape, scale, block_size, "x")
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
    return dequantize_blockwise(w_fp8, scale_inv, (block, block), dtype)


# --------------------------------------------------------------------------------------------------------------------
# One scale per token: the latent caches


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., tokens, width] -> (e4m3 x, float32 scale [..., tokens, 1]): one tile per token's whole row. A
    per-token scale needs no calibration and never goes stale as tokens arrive (a per-tensor one frozen on the
    prompt would)."""
    return quantize_blockwise(x, (1, x.shape[-1]))


def dequantize_per_token(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """e4m3 values [..., X] (or their bytes, uint8) times their tokens' fp32 scales [..., 1], in `dtype`."""
    return e4m3_to_float32(q.view(FP8_DTYPE)).mul_(scale).to(dtype)


_E4M3_PAIR_TABLE: torch.Tensor | None = None


def e4m3_to_float32(q: torch.Tensor) -> torch.Tensor:
    """e4m3 -> float32, bit-identical to `q.float()`. torch's cast converts one element at a time on the CPU, and a
    decode step converts the whole cache; there, a table of all 65,536 byte pairs (512 KiB: two float32 per entry,
    built with that same cast) converts two values per lookup, ~1.6x faster. Elsewhere, and while compiling, the
    cast."""
    global _E4M3_PAIR_TABLE
    if q.device.type != "cpu" or q.shape[-1] % 2 or torch.compiler.is_compiling():
        return q.float()
    if _E4M3_PAIR_TABLE is None:
        codes = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)  # entry i: the pair i - 2**15
        _E4M3_PAIR_TABLE = codes.view(FP8_DTYPE).float().view(torch.int64)  # the two bytes in memory order
    pairs = q.contiguous().view(torch.int16).to(torch.int32).add_(2**15)
    return _E4M3_PAIR_TABLE.index_select(0, pairs.flatten()).view(torch.float32).view(q.shape)


# --------------------------------------------------------------------------------------------------------------------
# E5M6: the finer cache format of the linear after attention

E5M6_MAX = 65024.0  # (2 - 2**-6) * 2**15
_E5M6_MIN_EXP = -13  # frexp exponent of the smallest normal, 2**-14; below it the grid is fixed at 2**-20


def _to_e5m6_grid(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale rounded to the nearest E5M6 value (ties to even), as float32."""
    v = (x / scale).clamp(-E5M6_MAX, E5M6_MAX)
    _, exponent = torch.frexp(v)  # v = m * 2**e, m in [0.5, 1): 7 significant bits are a step of 2**(e - 7)
    step = torch.ldexp(torch.ones_like(v), exponent.clamp_min(_E5M6_MIN_EXP) - 7)
    return (torch.round(v / step) * step).clamp(-E5M6_MAX, E5M6_MAX)


def quantize_e5m6(x: torch.Tensor, block_size: tuple[int, int] = (1, FP8_BLOCK)) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., rows, cols] -> (packed uint8 [..., rows, 3 * ceil(cols / 2)], float32 power-of-two scales per tile).

    Every E5M6 value is a float16 whose 4 lowest mantissa bits are 0: its 12-bit code is the float16 bit pattern
    shifted right by 4, and two codes fill 3 bytes."""
    grid, scale = _quantize_tiles(x, block_size, True, E5M6_MAX, _to_e5m6_grid)
    codes = (grid.to(torch.float16).view(torch.int16).to(torch.int32) >> 4) & 0xFFF
    codes = F.pad(codes, (0, codes.shape[-1] % 2))
    a, b = codes[..., 0::2], codes[..., 1::2]
    packed = torch.stack((a >> 4, ((a & 0xF) << 4) | (b >> 8), b & 0xFF), dim=-1)
    return packed.flatten(-2).to(torch.uint8), scale


def dequantize_e5m6(packed: torch.Tensor, scale: torch.Tensor, cols: int, block_size: tuple[int, int] = (1, FP8_BLOCK),
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_e5m6` for a tensor whose last dim was `cols` wide."""
    triples = packed.to(torch.int32).unflatten(-1, (-1, 3))
    a = (triples[..., 0] << 4) | (triples[..., 1] >> 4)
    b = ((triples[..., 1] & 0xF) << 8) | triples[..., 2]
    codes = torch.stack((a, b), dim=-1).flatten(-2)[..., :cols]
    values = (codes << 4).to(torch.int16).view(torch.float16).float()
    check_scale_shape(values.shape, scale, block_size, "x")
    br, bc = block_size
    s = scale.repeat_interleave(br, dim=-2)[..., : values.shape[-2], :] if br > 1 else scale
    s = s.repeat_interleave(bc, dim=-1)[..., :cols] if bc > 1 else s
    return (values * s).to(dtype)


# --------------------------------------------------------------------------------------------------------------------
# 128-token tiles restarting at every group: the grouped experts' weight-gradient operands


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
    amax = x.new_zeros(cdiv(S, FP8_BLOCK) + E, C).scatter_reduce_(
        0, tile_S[:, None].expand(S, C), x.abs(), reduce="amax", include_self=True)
    scale = fp8_scale(amax, pow2_scale)
    return _to_e4m3(x, scale[tile_S]), scale, tile_S


def dequantize_token_tiles(q_SC: torch.Tensor, scale: torch.Tensor, tile_S: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_token_tiles`, in float32."""
    return q_SC.float() * scale[tile_S]


# --------------------------------------------------------------------------------------------------------------------
# The checkpoint writer


def quantize_state_tensors(tensors, stats: dict | None = None, block: int = FP8_BLOCK):
    """(key, tensor) pairs in a checkpoint's layout -> the same in DeepSeek's FP8 format: every weight that
    `should_quantize` selects becomes e4m3 plus its `weight_scale_inv`, everything else passes unchanged. `stats`, if
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
