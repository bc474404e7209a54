"""Quantized weights for DeepseekForCausalLM: DeepSeek's FP8 block format and bitsandbytes 4-bit / 8-bit experts.

This file is the model side of quantization; it is copied with the model as remote code, so it imports nothing
outside this package but torch, safetensors, transformers and (lazily) bitsandbytes. The user-facing tools
(`quant.fp8.quantize_checkpoint`, `quant.memory_report`) live in the `quant` package.

`DeepseekPreTrainedModel.from_pretrained` calls `prepare_quantized_load` before transformers' loader and
`finish_quantized_load` after it:

1. bitsandbytes (`quantization_config=BitsAndBytesConfig(load_in_4bit=True)` or `load_in_8bit=True`):
   transformers' bnb integration only swaps modules whose type is exactly `nn.Linear`
   (`replace_with_bnb_linear`), so attention, dense MLPs and shared experts become `Linear4bit` / `Linear8bitLt`
   while the fused routed experts (3-D `gate_up_proj` [E, 2I, D] / `down_proj` [E, D, I] of `DeepseekExperts`)
   load in full precision, untouched (modules it does not know are simply left alone). After loading, each
   `DeepseekExperts` not excluded by the quantizer's `modules_to_not_convert` is replaced by a
   `DeepseekBnbExperts` holding the same weights in NF4/FP4 (the config's `bnb_4bit_quant_type`,
   `bnb_4bit_use_double_quant`, `bnb_4bit_compute_dtype`) or int8 (LLM.int8's vector-wise, one absmax scale per
   output row), one layer at a time. The router (`mlp.gate`, a `DeepseekTopkRouter`, never an `nn.Linear`), its
   `e_score_correction_bias`, the norms, the embedding and `lm_head` (transformers' default skip of the output
   embedding) stay in high precision, as in DeepSeek-V3's FP8 recipe. save_pretrained writes the experts
   dequantized (fused float tensors); reloading requantizes them to the same codes.
   bitsandbytes 0.50.2 on CPU: its 4-bit Linear kernels need in_features % 64 == 0 (else the AVX512 path crashes
   and the generic path dequantizes wrongly) and its AVX512-BF16 path needs out_features % 32 == 0 (such layers
   are routed to the generic path, `_avoid_bnb_cpu_packing_crash`). The experts avoid both by quantizing each
   expert's matrix flattened.

2. DeepSeek FP8 checkpoints (`config.quantization_config.quant_method == "fp8"`, weights in e4m3 with a float32
   `weight_scale_inv` per 128 x 128 block; see quant/fp8.py for the format). transformers' own FineGrainedFP8
   loader derives the block size from the scale grid (rows // scale_rows), which is wrong for ragged edge blocks
   (a 192-row q_b_proj has row blocks of 128 and 64, not 2 of 96) and raises when the division is not exact
   (DeepSeek-V3's kv_a_proj_with_mqa: 576 rows, 5 row blocks). So `prepare_quantized_load` takes the FP8 config
   off the config handed to transformers (which then loads the e4m3 tensors as placeholders), and
   `finish_quantized_load` reads every quantized weight from the checkpoint's safetensors and dequantizes it with
   the fixed 128 x 128 grid into the model's parameters, the fused experts included. A weight stored in FP8
   without its `weight_scale_inv` raises an error naming the key, before anything is loaded.
   `fp8_keep_quantized=True` (the default when the model lands on CUDA) instead swaps the Linears for
   `DeepseekFP8Linear` and the routed experts for `DeepseekFP8Experts`, which keep e4m3 weights and run
   block-scaled FP8 GEMMs (1 x 128 activation groups, 128 x 128 weight blocks, `torch.nn.functional.scaled_mm`
   on Hopper when both dims are multiples of 128) with a dequantize-and-matmul fallback elsewhere
   (`FP8_GEMM_BACKEND` forces one). The swap happens after transformers has loaded the model in the requested
   dtype, so loading peaks at the unquantized size; and the activation quantization is eager PyTorch (unfused),
   which at present costs more than the FP8 GEMM saves (H100, 4096 x 7168 x 2048: FP8 GEMM 0.10 ms, bf16 GEMM
   0.15 ms, activation quantization 0.47 ms).
"""

from __future__ import annotations

import json
import os
import re

import torch
import torch.nn.functional as F
from torch import nn

from .experts import DeepseekExperts

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


def quantize_weight_blockwise(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight [..., out, in] -> (e4m3 weight of the same shape, float32 weight_scale_inv [..., ceil(out/b), ceil(in/b)]).

    Per block: scale_inv = amax / 448 (the dequantization multiplier), q = round_to_e4m3(w / scale_inv). Edge blocks
    are zero-padded to block x block first, so padding never raises an amax. An all-zero block gets scale_inv 1.
    """
    if w.ndim < 2:
        raise ValueError(f"quantize_weight_blockwise needs a [..., out, in] weight, got shape {tuple(w.shape)}")
    *lead, rows, cols = w.shape
    R, C = _cdiv(rows, block), _cdiv(cols, block)
    padded = w.new_zeros(*lead, R * block, C * block, dtype=torch.float32)
    padded[..., :rows, :cols] = w.float()
    blocks = padded.unflatten(-1, (C, block)).unflatten(-3, (R, block))  # [..., R, b, C, b]
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., R, C]
    scale_inv = torch.where(amax > 0, (amax / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny), torch.ones_like(amax))
    q = (blocks / scale_inv[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.flatten(-4, -3).flatten(-2, -1)[..., :rows, :cols].contiguous()
    return q, scale_inv.contiguous()


def _check_scale_shape(shape, scale_inv: torch.Tensor, block: int, name: str = "weight") -> None:
    expected = scale_grid_shape(shape, block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"{name}: weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} for a weight of shape "
            f"{tuple(shape)} in {block} x {block} blocks"
        )


def dequantize_weight_blockwise(
    w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of `quantize_weight_blockwise`: weight * scale_inv of its block, in `dtype` (the grid is fixed by
    `block`, never inferred from the scale shape: with ragged edges ceil(out/block) does not divide out)."""
    _check_scale_shape(w_fp8.shape, scale_inv, block)
    rows, cols = w_fp8.shape[-2:]
    scale = scale_inv.float().repeat_interleave(block, dim=-2)[..., :rows, :]
    scale = scale.repeat_interleave(block, dim=-1)[..., :cols]
    return (w_fp8.float() * scale).to(dtype)


def quantize_activation_groupwise(x: torch.Tensor, group: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [M, K] -> (e4m3 [M, K], float32 scale [M, ceil(K/group)]): V3's online 1 x 128 tile scaling."""
    M, K = x.shape
    G = _cdiv(K, group)
    if K % group:
        x = F.pad(x, (0, G * group - K))  # zeros: they never raise a group's amax
    tiles = x.reshape(M, G, group)
    amax = tiles.abs().amax(dim=-1).float()
    scale = torch.where(amax > 0, (amax / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny), torch.ones_like(amax))
    q = (tiles.float() / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(M, G * group)[:, :K]
    return q.contiguous(), scale


def fp8_block_matmul_reference(x: torch.Tensor, w_fp8: torch.Tensor, scale_inv: torch.Tensor,
                               block: int = FP8_BLOCK) -> torch.Tensor:
    """What the FP8 GEMM computes, in fp32: 1 x 128 quantized activations times 128 x 128 dequantized weights."""
    xq, xs = quantize_activation_groupwise(x.reshape(-1, x.shape[-1]), block)
    x_deq = (xq.float().view(xq.shape[0], -1) * xs.repeat_interleave(block, dim=-1)[:, : x.shape[-1]])
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

    def forward(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        out_TD = torch.zeros_like(x_TD)
        b = self.block
        for e in expert_ids_TK.unique().tolist():
            token_idx, slot = torch.where(expert_ids_TK == e)
            x = x_TD[token_idx]
            gate = fp8_block_linear(x, self.gate_proj[e], self.gate_proj_scale_inv[e], block=b)
            up = fp8_block_linear(x, self.up_proj[e], self.up_proj_scale_inv[e], block=b)
            y = fp8_block_linear(self.act_fn(gate) * up, self.down_proj[e], self.down_proj_scale_inv[e], block=b)
            out_TD.index_add_(0, token_idx, (y * weights_TK[token_idx, slot, None]).to(x_TD.dtype))
        return out_TD


# --------------------------------------------------------------------------------------------------------------------
# bitsandbytes routed experts


def _bnb_functional():
    import bitsandbytes.functional as bnbF

    return bnbF


class DeepseekBnbExperts(nn.Module):
    """DeepseekExperts with bitsandbytes-quantized weights: 4-bit (NF4 / FP4, optional double quantization) or int8.

    Storage (same parameter names as DeepseekExperts, so per-category accounting and `named_parameters` read alike):
      4-bit: `gate_up_proj` uint8 [E, 2I*D/2] and `down_proj` uint8 [E, D*I/2], two 4-bit codes per byte, each expert
             quantized on its own (flattened, in blocks of `blocksize` values with one absmax each, as
             bnb.functional.quantize_4bit does), so one expert can be dequantized without touching the others.
             Buffers `<name>_absmax` [E, n/blocksize] (float32, or uint8 with double quantization plus
             `<name>_offset` [E] and `<name>_absmax2` [E, n/blocksize/256]); `quant_map` (the 16 NF4/FP4 levels).
      8-bit: `gate_up_proj` int8 [E, 2I, D] and `down_proj` int8 [E, D, I] with LLM.int8's vector-wise scales
             `<name>_SCB` [E, rows] (the absmax of each output row; w ~= int8 * SCB / 127).
    The forward has DeepseekExperts' signature and loops over the experts that received tokens, dequantizing one
    expert at a time into `compute_dtype`: the peak extra memory is one expert's weights, whatever E is (dequantizing
    a whole V3 layer for a grouped GEMM would take 22 GiB in bf16).
    """

    def __init__(self, experts: DeepseekExperts, bits: int = 4, quant_type: str = "nf4",
                 compute_dtype: torch.dtype | None = None, double_quant: bool = False, blocksize: int = 64):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        self.bits = bits
        self.num_experts = experts.num_experts
        self.hidden_dim = experts.hidden_dim
        self.intermediate_dim = experts.intermediate_dim
        self.act_fn = experts.act_fn
        self.quant_type = quant_type if bits == 4 else "int8"
        self.double_quant = bool(double_quant) and bits == 4
        self.blocksize = blocksize
        self.compute_dtype = compute_dtype
        self.original_dtype = experts.gate_up_proj.dtype
        D, I = self.hidden_dim, self.intermediate_dim
        self.shapes = {"gate_up_proj": (2 * I, D), "down_proj": (D, I)}
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(experts, name).detach()
            if bits == 8:
                self._quantize_int8(name, w)
            else:
                self._quantize_4bit(name, w)

    # -- storage ------------------------------------------------------------------------------------------------------
    def _quantize_int8(self, name: str, w: torch.Tensor) -> None:
        E, R, C = w.shape
        CB, SCB, _ = _bnb_functional().int8_vectorwise_quant(w.reshape(E * R, C).to(torch.float16))
        setattr(self, name, nn.Parameter(CB.view(E, R, C), requires_grad=False))
        setattr(self, f"{name}_SCB", nn.Buffer(SCB.float().view(E, R)))

    def _quantize_4bit(self, name: str, w: torch.Tensor) -> None:
        bnbF = _bnb_functional()
        packed, absmax, offset, absmax2 = [], [], [], []
        for e in range(w.shape[0]):
            # Flattened: bitsandbytes' CPU dequantize kernel mishandles 2-D shapes whose last dim is not a multiple of
            # the block size (0.50.2), while the flat layout is exact on every backend.
            q, qs = bnbF.quantize_4bit(w[e].reshape(-1).contiguous(), blocksize=self.blocksize,
                                       compress_statistics=self.double_quant, quant_type=self.quant_type,
                                       quant_storage=torch.uint8)
            packed.append(q.reshape(-1))
            absmax.append(qs.absmax)
            if qs.nested:
                offset.append(qs.offset.reshape(()))
                absmax2.append(qs.state2.absmax)
        setattr(self, name, nn.Parameter(torch.stack(packed), requires_grad=False))
        setattr(self, f"{name}_absmax", nn.Buffer(torch.stack(absmax)))
        if "quant_map" not in self._buffers:
            self.register_buffer("quant_map", qs.code.clone())  # the 16 NF4 / FP4 levels
        if self.double_quant:
            setattr(self, f"{name}_offset", nn.Buffer(torch.stack(offset).float()))
            setattr(self, f"{name}_absmax2", nn.Buffer(torch.stack(absmax2)))
            if "nested_quant_map" not in self._buffers:  # the 8-bit code of the absmax values, and its block size
                self.register_buffer("nested_quant_map", qs.state2.code.clone())
                self.nested_blocksize = qs.state2.blocksize

    # -- dequantization -------------------------------------------------------------------------------------------
    def dequantize_expert(self, name: str, e: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Expert e's `gate_up_proj` [2I, D] or `down_proj` [D, I] in `dtype` (default: the compute dtype)."""
        dtype = dtype or self.compute_dtype or self.original_dtype
        rows, cols = self.shapes[name]
        bnbF = _bnb_functional()
        if self.bits == 8:
            w = bnbF.int8_vectorwise_dequant(getattr(self, name)[e], getattr(self, f"{name}_SCB")[e].contiguous())
            return w.to(dtype)
        from bitsandbytes.functional import QuantState

        state2 = None
        offset = None
        if self.double_quant:
            state2 = QuantState(absmax=getattr(self, f"{name}_absmax2")[e], code=self.nested_quant_map,
                                blocksize=self.nested_blocksize, dtype=torch.float32)
            offset = getattr(self, f"{name}_offset")[e]
        qs = QuantState(absmax=getattr(self, f"{name}_absmax")[e], shape=torch.Size([rows * cols]), code=self.quant_map,
                        blocksize=self.blocksize, quant_type=self.quant_type, dtype=dtype, offset=offset, state2=state2)
        return bnbF.dequantize_4bit(getattr(self, name)[e], qs).view(rows, cols)

    def dequantize(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The full (gate_up_proj [E, 2I, D], down_proj [E, D, I]) stacks, dequantized."""
        return tuple(torch.stack([self.dequantize_expert(n, e, dtype) for e in range(self.num_experts)])
                     for n in ("gate_up_proj", "down_proj"))

    # -- state dict: the fused float layout of DeepseekExperts ----------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Saved as DeepseekExperts would be (fused float tensors in the original dtype), so that save_pretrained
        writes a checkpoint that loads anywhere; loading it with a BitsAndBytesConfig quantizes the experts again,
        to the same codes (dequantized values requantize exactly)."""
        gate_up, down = self.dequantize(self.original_dtype)
        destination[prefix + "gate_up_proj"] = gate_up
        destination[prefix + "down_proj"] = down

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name in ("gate_up_proj", "down_proj"):
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            w = state_dict[key]
            expected = (self.num_experts, *self.shapes[name])
            if tuple(w.shape) != expected:
                error_msgs.append(f"size mismatch for {key}: got {tuple(w.shape)}, expected {expected}")
                continue
            device = getattr(self, name).device
            (self._quantize_int8 if self.bits == 8 else self._quantize_4bit)(name, w.to(device))

    def forward(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x_TD.dtype
        out_TD = torch.zeros_like(x_TD)
        for e in expert_ids_TK.unique().tolist():
            token_idx, slot = torch.where(expert_ids_TK == e)
            x = x_TD[token_idx].to(dtype)
            gate, up = F.linear(x, self.dequantize_expert("gate_up_proj", e, dtype)).chunk(2, dim=-1)
            y = F.linear(self.act_fn(gate) * up, self.dequantize_expert("down_proj", e, dtype))
            out_TD.index_add_(0, token_idx, (y * weights_TK[token_idx, slot, None]).to(x_TD.dtype))
        return out_TD

    def extra_repr(self) -> str:
        kind = f"{self.quant_type}{' double-quant' if self.double_quant else ''}" if self.bits == 4 else "int8 vector-wise"
        return (f"num_experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, "
                f"{kind}, compute_dtype={self.compute_dtype}")


def _should_convert(name: str, modules_to_not_convert) -> bool:
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:  # same rule, for other transformers versions: prefix, boundary regex or suffix
        def should_convert_module(full_name, patterns):
            boundary = r"(?:(?<=\.)|(?=\.|$))"
            return not any(re.match(rf"(?:{p}){boundary}", full_name) or full_name.endswith(p) for p in patterns or [])
    return should_convert_module(name, list(modules_to_not_convert or []))


def quantize_experts_bnb(model: nn.Module, quantization_config, modules_to_not_convert=None) -> int:
    """Replace every DeepseekExperts (not excluded by `modules_to_not_convert`) with a DeepseekBnbExperts built from
    a transformers BitsAndBytesConfig. Returns the number of modules replaced."""
    if getattr(quantization_config, "load_in_8bit", False):
        options = dict(bits=8)
    elif getattr(quantization_config, "load_in_4bit", False):
        compute_dtype = getattr(quantization_config, "bnb_4bit_compute_dtype", None)
        if isinstance(compute_dtype, str):
            compute_dtype = getattr(torch, compute_dtype)
        options = dict(bits=4, quant_type=getattr(quantization_config, "bnb_4bit_quant_type", "nf4"),
                       compute_dtype=compute_dtype,
                       double_quant=getattr(quantization_config, "bnb_4bit_use_double_quant", False))
    else:
        return 0
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is DeepseekExperts and _should_convert(name, modules_to_not_convert)]
    for name, module in targets:  # one layer at a time: each full-precision stack is freed as soon as it is replaced
        model.set_submodule(name, DeepseekBnbExperts(module, **options))
    return len(targets)


# --------------------------------------------------------------------------------------------------------------------
# from_pretrained hooks

_IGNORE_SCALES = r"\.weight_scale_inv$"
_NO_ATTR = object()
_EXPERT_KEY = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<j>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


class QuantizedLoadPlan:
    """What prepare_quantized_load found, for finish_quantized_load: the FP8 checkpoint's files and options."""

    def __init__(self, cls=None, files=None, fp8_config=None, keep_quantized=None):
        self.cls = cls
        self.files = files or []
        self.fp8_config = fp8_config
        self.keep_quantized = keep_quantized


def _fp8_config_of(config) -> dict | None:
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    return qc if qc.get("quant_method") == "fp8" else None


_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


def _checkpoint_files(path: str, kwargs: dict) -> list[str]:
    subfolder = kwargs.get("subfolder") or ""
    if os.path.isdir(path):
        folder = os.path.join(path, subfolder)
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                return [os.path.join(folder, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
        return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".safetensors"))
    from transformers.utils import cached_file

    hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False, **hub)
    if index is not None:
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [cached_file(path, name, **hub) for name in names]
    return [cached_file(path, "model.safetensors", **hub)]


def _check_fp8_scales(files: list[str]) -> None:
    """Every e4m3 weight needs its weight_scale_inv; raise naming the first ones that lack it (headers only)."""
    from safetensors import safe_open

    fp8_keys, keys = [], set()
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                keys.add(key)
                if f.get_slice(key).get_dtype() in ("F8_E4M3", "F8_E4M3FN"):
                    fp8_keys.append(key)
    missing = [k for k in fp8_keys if k.removesuffix("weight") + "weight_scale_inv" not in keys]
    if missing:
        raise KeyError(
            f"FP8 checkpoint: {len(missing)} e4m3 weight(s) have no `weight_scale_inv`: "
            f"{', '.join(sorted(missing)[:10])}{' ...' if len(missing) > 10 else ''} "
            f"(expected e.g. `{missing[0].removesuffix('weight')}weight_scale_inv`)"
        )


def prepare_quantized_load(cls, args: tuple, kwargs: dict):
    """Called by from_pretrained before transformers' loader. Returns (args, kwargs, plan).

    For a DeepSeek FP8 checkpoint (config.quantization_config.quant_method == "fp8") the FP8 config is taken off the
    config handed to transformers, so that its FineGrainedFP8 loader (wrong grid for ragged blocks, see the module
    docstring) never runs: the e4m3 tensors land in the model as placeholders and `finish_quantized_load` rewrites
    every one of them from the files. Takes the `fp8_keep_quantized` option (None: keep FP8 when the model is on CUDA).
    """
    keep = kwargs.pop("fp8_keep_quantized", None)
    _restore_ignore_patterns(cls)  # in case an earlier load raised between the two hooks
    path = args[0] if args else kwargs.get("pretrained_model_name_or_path")
    if path is None or kwargs.get("state_dict") is not None or kwargs.get("gguf_file") is not None:
        return args, kwargs, None
    config = kwargs.get("config")
    if config is None or isinstance(config, (str, os.PathLike)):
        hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        try:
            config = cls.config_class.from_pretrained(config or path, **hub)
        except Exception:  # transformers' own loading will report it
            return args, kwargs, None
        # Only for an FP8 checkpoint is this config handed on to transformers.
        if _fp8_config_of(config) is None:
            return args, kwargs, None
    else:
        if _fp8_config_of(config) is None:
            return args, kwargs, None
        import copy

        config = copy.deepcopy(config)
    fp8_config = _fp8_config_of(config)
    if fp8_config.get("weight_block_size", [FP8_BLOCK, FP8_BLOCK]) != [FP8_BLOCK, FP8_BLOCK] or fp8_config.get(
        "fmt", "e4m3"
    ) != "e4m3":
        raise NotImplementedError(f"only e4m3 with 128 x 128 blocks is supported, got {fp8_config}")
    if kwargs.get("quantization_config") is not None:
        raise NotImplementedError(
            "quantization_config on an FP8 checkpoint: load it without, save_pretrained a bf16 copy, and quantize that"
        )
    del config.quantization_config
    kwargs["config"] = config
    files = _checkpoint_files(str(path), kwargs)
    _check_fp8_scales(files)
    plan = QuantizedLoadPlan(cls, files, fp8_config, keep)
    # The scales are read by finish_quantized_load, not by transformers: keep them out of its "unexpected" report.
    _PENDING_IGNORE[cls] = cls.__dict__.get("_keys_to_ignore_on_load_unexpected", _NO_ATTR)
    cls._keys_to_ignore_on_load_unexpected = [*(cls._keys_to_ignore_on_load_unexpected or []), _IGNORE_SCALES]
    return args, kwargs, plan


_PENDING_IGNORE: dict = {}


def _restore_ignore_patterns(cls) -> None:
    if cls in _PENDING_IGNORE:
        original = _PENDING_IGNORE.pop(cls)
        if original is _NO_ATTR:
            if "_keys_to_ignore_on_load_unexpected" in cls.__dict__:
                delattr(cls, "_keys_to_ignore_on_load_unexpected")
        else:
            cls._keys_to_ignore_on_load_unexpected = original


def finish_quantized_load(model, info: dict, plan: QuantizedLoadPlan | None):
    """Called by from_pretrained on the loaded model. Returns the model.

    - bitsandbytes: quantizes the routed experts like transformers quantized the Linears (see quantize_experts_bnb).
    - FP8 checkpoint: dequantizes every FP8 weight from the files into the model, or keeps it FP8 (see load_fp8_weights).
    """
    if plan is not None:
        _restore_ignore_patterns(plan.cls)
        load_fp8_weights(model, plan.files, keep_quantized=plan.keep_quantized)
        if info is not None and info.get("unexpected_keys"):
            info["unexpected_keys"] = type(info["unexpected_keys"])(
                k for k in info["unexpected_keys"] if not k.endswith("weight_scale_inv")
            )
        return model
    quantizer = getattr(model, "hf_quantizer", None)
    qc = getattr(quantizer, "quantization_config", None)
    method = getattr(qc, "quant_method", None)
    if getattr(method, "value", method) == "bitsandbytes":
        quantize_experts_bnb(model, qc, getattr(quantizer, "modules_to_not_convert", None))
        _avoid_bnb_cpu_packing_crash(model)
    return model


def _avoid_bnb_cpu_packing_crash(model: nn.Module) -> None:
    """bitsandbytes 0.50's CPU Linear4bit repacks its weight for AVX512-BF16 kernels on the first forward and asserts
    out_features % 32 == 0 (e.g. kv_a_proj_with_mqa of a small model: kv_lora_rank + rope = 80). Such layers are sent
    down bitsandbytes' generic path instead, which has no such constraint as long as in_features is a multiple of the
    4-bit block size (it dequantizes wrongly otherwise, so those are left to fail loudly)."""
    for module in model.modules():
        if not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        blocksize = getattr(getattr(module, "weight", None), "blocksize", 64) or 64
        if module.out_features % 32 and module.in_features % blocksize == 0:
            module.support_avx512bf16_for_cpu = False


def _param_index(model: nn.Module) -> tuple[dict, str]:
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    return params, getattr(model, "base_model_prefix", "model")


def _model_key(key: str, names, prefix: str) -> str | None:
    if key in names:
        return key
    if key.startswith(prefix + ".") and key[len(prefix) + 1:] in names:
        return key[len(prefix) + 1:]
    return None


@torch.no_grad()
def load_fp8_weights(model: nn.Module, files: list[str], keep_quantized: bool | None = None) -> dict:
    """Write every FP8 weight of a DeepSeek-format checkpoint into `model`.

    keep_quantized False: dequantize into the existing parameters (in their dtype and device); per-expert keys go
    into the fused expert tensors. True: replace each Linear by a DeepseekFP8Linear and each DeepseekExperts whose
    experts are all FP8 by a DeepseekFP8Experts, on the device of the module. None: True when the model is on CUDA.
    Returns counts of what was done.
    """
    from safetensors import safe_open

    if keep_quantized is None:
        keep_quantized = next(model.parameters()).is_cuda
    params, prefix = _param_index(model)
    expert_names = {name for name, m in model.named_modules() if isinstance(m, DeepseekExperts)}
    pending_experts: dict[str, dict] = {}
    stats = {"dequantized": 0, "fp8_linear": 0, "fp8_experts": 0, "skipped": 0}
    for file in files:
        with safe_open(file, framework="pt") as f:
            keys = set(f.keys())
            for key in sorted(keys):
                if not key.endswith(".weight") or f.get_slice(key).get_dtype() not in ("F8_E4M3", "F8_E4M3FN"):
                    continue
                w = f.get_tensor(key)
                s = f.get_tensor(key.removesuffix("weight") + "weight_scale_inv")
                _check_scale_shape(w.shape, s, FP8_BLOCK, key)
                m = _EXPERT_KEY.match(key)
                if m is not None:
                    experts = _model_key(m["prefix"], expert_names, prefix)
                    if experts is None:
                        stats["skipped"] += 1
                        continue
                    if keep_quantized:  # gathered, stacked once every expert of the layer has been read
                        pending_experts.setdefault(experts, {})[(int(m["j"]), m["proj"])] = (w, s)
                    else:
                        _copy_expert(model.get_submodule(experts), int(m["j"]), m["proj"], w, s)
                        stats["dequantized"] += 1
                    continue
                name = _model_key(key, params, prefix)
                if name is None:
                    stats["skipped"] += 1  # e.g. MTP weights when the model was built without MTP
                    continue
                module_name = name.removesuffix(".weight")
                module = model.get_submodule(module_name)
                if keep_quantized and type(module) is nn.Linear:
                    dev = module.weight.device
                    model.set_submodule(module_name, DeepseekFP8Linear.from_quantized(
                        w.to(dev), s.to(dev), module.bias))
                    stats["fp8_linear"] += 1
                else:
                    p = params[name]
                    p.copy_(dequantize_weight_blockwise(w.to(p.device), s.to(p.device), FP8_BLOCK, p.dtype))
                    stats["dequantized"] += 1
    for experts_name, parts in pending_experts.items():
        module = model.get_submodule(experts_name)
        E = module.num_experts
        complete = all((j, p) in parts for j in range(E) for p in ("gate_proj", "up_proj", "down_proj"))
        dev = module.gate_up_proj.device
        if keep_quantized and complete:
            stacks = []
            for proj in ("gate_proj", "up_proj", "down_proj"):
                stacks += [torch.stack([parts[(j, proj)][0] for j in range(E)]).to(dev),
                           torch.stack([parts[(j, proj)][1] for j in range(E)]).to(dev)]
            model.set_submodule(experts_name, DeepseekFP8Experts(*stacks, act_fn=module.act_fn))
            stats["fp8_experts"] += 1
            continue
        for (j, proj), (w, s) in parts.items():
            _copy_expert(module, j, proj, w, s)
            stats["dequantized"] += 1
    model.fp8_load_stats = stats
    return stats


def _copy_expert(module: DeepseekExperts, j: int, proj: str, w_fp8: torch.Tensor, scale_inv: torch.Tensor) -> None:
    """Dequantize expert j's gate_proj / up_proj / down_proj into the fused tensors (gate rows first, then up)."""
    I = module.intermediate_dim
    target = module.down_proj if proj == "down_proj" else module.gate_up_proj
    rows = slice(None) if proj == "down_proj" else (slice(0, I) if proj == "gate_proj" else slice(I, 2 * I))
    dev = target.device
    target[j, rows].copy_(dequantize_weight_blockwise(w_fp8.to(dev), scale_inv.to(dev), FP8_BLOCK, target.dtype))
