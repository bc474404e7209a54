"""Small building blocks shared by attention, MoE and MTP: RMSNorm, the SwiGLU MLP, and the per-head product that
absorbed MLA multiplies by W_UK / W_UV (per_head_matmul).

Both honour the model's memory options (configuration.py, recompute.py) when given the config: `recompute_norms`
keeps a norm's input only, `recompute_swiglu` keeps an MLP's gate and up outputs only (act(gate) * up, the largest
activation of a dense FFN, and the down projection over it are run again in backward).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from .parallel import is_sharded
from .recompute import recompute, recompute_active


class DeepseekRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, config=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.config = config  # read at each forward for `recompute_norms`; None: never recomputes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if recompute_active(self.config, "recompute_norms"):
            return recompute(self.normalize, x)
        return self.normalize(x)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (a "high-precision island" in V3's FP8 recipe), scale in the input dtype.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class DeepseekMLP(nn.Module):
    """SwiGLU FFN: the dense layers, and the shared experts (with intermediate = n_shared * moe_intermediate)."""

    def __init__(self, config, intermediate_size: int | None = None):
        super().__init__()
        intermediate_size = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if recompute_active(self.config, "recompute_swiglu"):
            # An FP8 training down projection (quant/fp8_training_modules.py) keeps gate and up in e4m3 instead. Looked
            # up on the class: an adapter wrapping it (peft forwards unknown attributes to the base layer) must not
            # be bypassed. Nor may a tensor-parallel one: the engine's wrapper around its forward lays out its input
            # and output, so a sharded down projection is recomputed through its own call (inputs kept as they are).
            packed = getattr(type(self.down_proj), "recompute_swiglu_into", None)
            if packed is not None and not is_sharded(self.down_proj.weight):
                return packed(self.down_proj, gate, up, self.act_fn)
            return recompute(self.swiglu_down, gate, up)
        return self.swiglu_down(gate, up)

    def swiglu_down(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(gate) * up)


def per_head_matmul(x_BHTI: torch.Tensor, w_HIO: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, I] times w [H, I, O] -> [B, H, T, O], as one bmm over heads with B x T rows each. (torch.matmul
    broadcasts w over B and reshapes the expanded view, which copies all of w when it is strided, as kv_b_proj's
    W_UK / W_UV halves are: 16 MB per layer and decode step in bf16 at V3's widths.)"""
    B, H, T, I = x_BHTI.shape
    out_HXO = torch.bmm(x_BHTI.transpose(0, 1).reshape(H, B * T, I), w_HIO)
    return out_HXO.view(H, B, T, -1).transpose(0, 1)
