"""bitsandbytes 4-bit (NF4 / FP4) and int8 storage for the fused routed experts, which transformers' bnb integration
leaves in full precision (it only swaps exact nn.Linear modules). See quantized.py for when it is applied.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from .compat import bnb_should_convert
from .experts import DeepseekExperts, run_experts_loop

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

        def expert(e, x_ND):
            gate, up = F.linear(x_ND.to(dtype), self.dequantize_expert("gate_up_proj", e, dtype)).chunk(2, dim=-1)
            return F.linear(self.act_fn(gate) * up, self.dequantize_expert("down_proj", e, dtype))

        return run_experts_loop(x_TD, expert_ids_TK, weights_TK, expert)

    def extra_repr(self) -> str:
        kind = f"{self.quant_type}{' double-quant' if self.double_quant else ''}" if self.bits == 4 else "int8 vector-wise"
        return (f"num_experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, "
                f"{kind}, compute_dtype={self.compute_dtype}")


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
               if type(module) is DeepseekExperts and bnb_should_convert(name, modules_to_not_convert or [])]
    for name, module in targets:  # one layer at a time: each full-precision stack is freed as soon as it is replaced
        model.set_submodule(name, DeepseekBnbExperts(module, **options))
    return len(targets)
