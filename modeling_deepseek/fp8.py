"""The FP8 inference modules: a Linear and the routed experts holding DeepSeek's FP8 checkpoint format (e4m3 weights
with one float32 `weight_scale_inv` per 128 x 128 block, see fp8_format.py) and computing with it.

Each FP8 projection quantizes its activations on the fly in 1 x 128 groups and runs one block-scaled GEMM
(fp8_gemm.py). The module's `backend` chooses how: "auto" (the default) runs F.scaled_mm on Hopper when both weight
dims are multiples of 128 and otherwise dequantizes the weight to the activations' dtype for a plain matmul (padding a
ragged weight for the kernel would copy the whole weight on every call); "scaled_mm" always runs the kernel (raising
where it cannot); "reference" simulates the same FP8 GEMM in fp32 anywhere, to check the kernel against.
quantized.py builds these modules when it loads an FP8 checkpoint (`from_pretrained(..., fp8_gemm_backend=)`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .experts import DeepseekExperts, run_experts_loop
from .fp8_format import (
    FP8_BLOCK,
    FP8_DTYPE,
    check_scale_shape,
    dequantize_weight_blockwise,
    quantize_blockwise,
    quantize_weight_blockwise,
    scale_grid_shape,
)
from .fp8_gemm import BLOCK, TILE, blockwise_mm, check_backend, resolve_backend, scaled_mm_available


def fp8_block_linear(x: torch.Tensor, w_fp8: torch.Tensor, scale_inv: torch.Tensor, bias: torch.Tensor | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """y = x W^T (+ bias) for an e4m3 W [N, K] with its 128 x 128 scale grid, computed by `backend` (module
    docstring). The GEMM outputs bf16 and the result comes back in x's dtype."""
    if backend == "auto":
        N, K = w_fp8.shape
        if not (N % FP8_BLOCK == 0 and K % FP8_BLOCK == 0 and scaled_mm_available(x.device)):
            w = dequantize_weight_blockwise(w_fp8, scale_inv, FP8_BLOCK, x.dtype)
            return F.linear(x, w, None if bias is None else bias.to(x.dtype))
        backend = "scaled_mm"  # just checked: no second capability check per call
    else:
        backend = resolve_backend(backend, x.device)
    lead, K = x.shape[:-1], x.shape[-1]
    xq, xs = quantize_blockwise(x.reshape(-1, K), TILE)
    y = blockwise_mm(xq, xs, w_fp8, scale_inv, BLOCK, x.dtype, backend).view(*lead, -1)
    return y if bias is None else y + bias.to(y.dtype)


class DeepseekFP8Linear(nn.Module):
    """A Linear holding DeepSeek's FP8 format: `weight` e4m3 [out, in] and `weight_scale_inv` float32
    [ceil(out/128), ceil(in/128)] (the dequantization multiplier per 128 x 128 block). See `fp8_block_linear`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, backend: str = "auto"):
        super().__init__()
        check_backend(backend, type(self).__name__)
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        self.weight_scale_inv = nn.Parameter(
            torch.ones(scale_grid_shape((out_features, in_features)), dtype=torch.float32, device=device),
            requires_grad=False,
        )
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_quantized(cls, w_fp8: torch.Tensor, scale_inv: torch.Tensor, bias: torch.Tensor | None = None,
                       backend: str = "auto") -> "DeepseekFP8Linear":
        check_scale_shape(w_fp8.shape, scale_inv, FP8_BLOCK)
        out_f, in_f = w_fp8.shape
        module = cls(in_f, out_f, bias=bias is not None, device="meta", backend=backend)
        module.weight = nn.Parameter(w_fp8.to(FP8_DTYPE), requires_grad=False)
        module.weight_scale_inv = nn.Parameter(scale_inv.float().contiguous(), requires_grad=False)
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str = "auto") -> "DeepseekFP8Linear":
        w_fp8, scale_inv = quantize_weight_blockwise(linear.weight.detach())
        return cls.from_quantized(w_fp8, scale_inv, linear.bias, backend)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_weight_blockwise(self.weight, self.weight_scale_inv, FP8_BLOCK, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_block_linear(x, self.weight, self.weight_scale_inv, self.bias, self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 128x128, "
                f"backend={self.backend}")


class DeepseekFP8Experts(nn.Module):
    """Routed experts kept in FP8: per projection an e4m3 stack [E, out, in] with its scale grid [E, R, C].

    gate and up stay separate stacks (in the checkpoint each has its own block grid; fusing [gate; up] rows would
    misalign the grid whenever moe_intermediate_size is not a multiple of 128). Same forward signature as
    DeepseekExperts; loops over the experts that received tokens, one FP8 linear per projection.
    """

    def __init__(self, gate_fp8, gate_scale, up_fp8, up_scale, down_fp8, down_scale, act_fn, backend: str = "auto"):
        super().__init__()
        check_backend(backend, type(self).__name__)
        self.backend = backend
        self.num_experts = gate_fp8.shape[0]
        self.act_fn = act_fn
        for name, value in (("gate_proj", gate_fp8), ("up_proj", up_fp8), ("down_proj", down_fp8)):
            setattr(self, name, nn.Parameter(value.to(FP8_DTYPE), requires_grad=False))
        for name, value, w in (("gate_proj_scale_inv", gate_scale, gate_fp8), ("up_proj_scale_inv", up_scale, up_fp8),
                               ("down_proj_scale_inv", down_scale, down_fp8)):
            check_scale_shape(w.shape, value, FP8_BLOCK, name)
            setattr(self, name, nn.Parameter(value.float().contiguous(), requires_grad=False))

    @classmethod
    def from_experts(cls, experts: DeepseekExperts, backend: str = "auto") -> "DeepseekFP8Experts":
        I = experts.intermediate_dim
        gate, up = experts.gate_up_proj.detach().split([I, I], dim=1)
        parts = [*quantize_weight_blockwise(gate), *quantize_weight_blockwise(up),
                 *quantize_weight_blockwise(experts.down_proj.detach())]
        return cls(*parts, act_fn=experts.act_fn, backend=backend)

    def forward(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        def expert(e, x_ND):
            gate = fp8_block_linear(x_ND, self.gate_proj[e], self.gate_proj_scale_inv[e], backend=self.backend)
            up = fp8_block_linear(x_ND, self.up_proj[e], self.up_proj_scale_inv[e], backend=self.backend)
            return fp8_block_linear(self.act_fn(gate) * up, self.down_proj[e], self.down_proj_scale_inv[e],
                                    backend=self.backend)

        return run_experts_loop(x_TD, expert_ids_TK, weights_TK, expert)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, fp8 e4m3 128x128, backend={self.backend}"
