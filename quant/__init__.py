"""Quantization utilities for the DeepSeek models (FP8 block-wise weights, bitsandbytes integration).

- `quant.fp8`: DeepSeek-V3's FP8 checkpoint format (e4m3 weights, float32 `weight_scale_inv` per 128 x 128 block):
  write an FP8 checkpoint from a bf16/fp32 one (`quantize_checkpoint`) and bound its error
  (`quantization_error_bound`). `DeepseekForCausalLM.from_pretrained(fp8_folder)` loads such a folder (dequantized
  on CPU, FP8 GEMMs on CUDA, in `DeepseekFP8Linear` / `DeepseekFP8Experts`). The format itself, which the model side
  needs too, is modeling_deepseek/fp8_format.py; the block-scaled GEMM is modeling_deepseek/fp8_gemm.py.
- `quant.fp8_training.convert_to_fp8_training(model, FP8TrainingConfig(...))`: training in FP8 as DeepSeek-V3 did
  it, all three GEMMs of every projection and routed-expert group in e4m3 with 1 x 128 / 128 x 128 online scales
  (the modules in quant/fp8_training_modules.py); `quant.adamw_bf16_moments.AdamWBF16Moments`, V3's optimizer.
- bitsandbytes: `DeepseekForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_4bit=True))`
  (or `load_in_8bit=True`) quantizes the Linears (transformers) and the fused routed experts (this package's
  `DeepseekBnbExperts`, modeling_deepseek/bnb_experts.py); router, norms, embedding and lm_head stay full precision.
- `memory_report(model)`: bytes by category, quantization statistics included.
"""

from __future__ import annotations

from torch import nn

from modeling_deepseek.bnb_experts import DeepseekBnbExperts, quantize_experts_bnb
from modeling_deepseek.fp8 import DeepseekFP8Experts, DeepseekFP8Linear

from .adamw_bf16_moments import AdamWBF16Moments
from .fp8 import quantize_checkpoint
from .fp8_training import FP8TrainingConfig, FP8TrainingReport, convert_to_fp8_training

CATEGORIES = ("experts", "attention", "embeddings", "other")


def _category(name: str) -> str:
    parts = name.split(".")
    if "experts" in parts or "shared_experts" in parts:
        return "experts"  # routed experts (mlp.experts.*) and shared experts (mlp.shared_experts.*)
    if "self_attn" in parts:
        return "attention"
    if "embed_tokens" in parts or "lm_head" in parts or name.startswith("lm_head"):
        return "embeddings"  # input embedding and output head
    return "other"  # norms, router (mlp.gate), dense-layer MLPs, MTP projections


def _quant_state_tensors(param) -> list:
    """bitsandbytes keeps a 4-bit Linear's statistics (absmax, code, nested state) on the weight's quant_state, outside
    the module's parameters and buffers: they are memory all the same."""
    qs = getattr(param, "quant_state", None)
    if qs is None:
        return []
    tensors = [getattr(qs, name, None) for name in ("absmax", "code", "offset")]
    state2 = getattr(qs, "state2", None)
    if state2 is not None:
        tensors += [getattr(state2, "absmax", None), getattr(state2, "code", None)]
    return [t for t in tensors if t is not None and hasattr(t, "element_size")]


def memory_report(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's weights by category: experts (routed and shared), attention, embeddings (embed_tokens and
    lm_head), other (norms, router, dense MLPs, MTP projections), and total.

    Counts every parameter and buffer once (tied weights once), like `get_memory_footprint()`, plus the quantization
    statistics that bitsandbytes' Linear4bit keeps outside them, so `total >= model.get_memory_footprint()`.
    """
    report = dict.fromkeys(CATEGORIES, 0)
    seen: set[int] = set()

    def add(name: str, tensor) -> None:
        key = id(tensor)
        if key in seen:
            return
        seen.add(key)
        report[_category(name)] += tensor.numel() * tensor.element_size()

    for name, param in model.named_parameters(remove_duplicate=True):
        add(name, param)
        for t in _quant_state_tensors(param):
            add(name, t)
    for name, buf in model.named_buffers(remove_duplicate=True):
        add(name, buf)
    report["total"] = sum(report[c] for c in CATEGORIES)
    return report


__all__ = [
    "memory_report",
    "CATEGORIES",
    "DeepseekBnbExperts",
    "DeepseekFP8Linear",
    "DeepseekFP8Experts",
    "quantize_experts_bnb",
    "quantize_checkpoint",
    "FP8TrainingConfig",
    "FP8TrainingReport",
    "convert_to_fp8_training",
    "AdamWBF16Moments",
]
