"""FP8 training as DeepSeek-V3 did it (report section 3.3): every Linear and expert GEMM in e4m3, block-scaled.

    from quant.fp8_training import convert_to_fp8_training
    model = convert_to_fp8_training(model)          # in place; also returns the model
    print(model.fp8_training_report)                # what was converted, what stayed high precision, and why

The recipe
----------
A Linear y = x W^T runs three GEMMs per step, and all three take e4m3 operands with online scales
(scale = amax / 448 per tile, optionally rounded up to a power of two):

    Fprop   y  = x  W^T    x in 1 x 128 tiles (per token, per 128 channels)     W in 128 x 128 blocks
    Dgrad   dx = dy W      dy in 1 x 128 tiles (per token, per 128 channels)    W's blocks, transposed
    Wgrad   dW = dy^T x    dy and x in 128 x 1 tiles (128 tokens, per channel): the contraction runs over tokens

Every operand is quantized from the high-precision tensor, never from an already quantized copy (Wgrad's x tiles
are taken from x in the forward, next to Fprop's). Products accumulate in fp32 (modeling_deepseek/fp8_gemm.py).
Ragged edges are zero-padded, so every projection converts whatever its shape. Master weights, their gradients and
everything outside the GEMMs keep the model's precision.

Activations saved for backward are Wgrad's operand only, and with `cache_fp8_activations` (the default) they are
kept as e4m3 plus scales, 1 byte per entry instead of 4 (fp32) or 2 (bf16); turning it off saves x and quantizes it
in backward: the same numbers either way (tests/test_fp8_training.py checks the gradients are identical).

The memory recipe of V3 (report 3.3.3) is on by default, each piece switchable off by its field:

- the input of the linear after attention (o_proj) is cached in E5M6 (modeling_deepseek/fp8_format.py: 5 exponent
  and 6 mantissa bits, power-of-two scales per 1 x 128 tile, 1.5 bytes per entry packed) and re-tiled in backward
  into e4m3 128 x 1 tiles for Wgrad: finer than e4m3 where V3 found it mattered (`cache_o_proj_input_e5m6`);
- the model's memory options (configuration.py) are set on its config: norms and the MLA up-projections recomputed
  in backward, the LM / MTP heads through the chunked cross-entropy, and the SwiGLU of the experts, shared experts
  and dense MLPs recomputed from its inputs cached in e4m3 (`recompute_*`, `chunked_cross_entropy`). The report
  lists which are on.

The modules are in quant/fp8_training_modules.py. The routed experts (`Float8TrainingExperts`) run their grouped
path, tokens sorted by expert, with all three GEMMs per expert group in FP8 (Wgrad's 128-token tiles start at each
expert's first token) and no host synchronisation.

What stays in high precision, as in V3: the embedding, the output head (`lm_head`, which MTP's shared head reuses),
the MoE router and its bias (not Linears), every norm, attention's core (scores, softmax, weighted sum: inside
attention, between its projections) and MTP's `eh_proj`. Modules that are not `nn.Linear` / `DeepseekExperts` are
never touched.

How it plugs in
---------------
The converted modules are subclasses of the ones they replace (`nn.Linear`, `DeepseekExperts`) holding the same
Parameter objects under the same names: optimizers built before the conversion keep working, state dicts and
`save_pretrained` stay in the standard high-precision layout, and DDP / FSDP2 / Trainer see ordinary parameters.
A model sharded at load by transformers' distributed engine (DistributedConfig tp / ep / fsdp, any mix) is converted
by swapping each module's class in place: FSDP2 and the engine's tensor- and expert-parallel wrappers hold those very
objects, and the wrappers, which call the forward they captured at load, are pointed at the FP8 one
(`modeling_deepseek.compat.rebind_engine_forward`). The FP8 GEMMs then run on each rank's local shards
(quant/fp8_tp.py) between the engine's own collectives; `quant.fp8_dispatch` moves the experts' tokens in FP8.
accelerate: convert before `accelerator.prepare` with `mixed_precision="bf16"` or `"no"`. accelerate's own
`mixed_precision="fp8"` converts every `nn.Linear` subclass to torchao's `Float8Linear`; a converted model refuses
to train after that happened (a clear error on the first training forward) instead of silently running another
recipe. Under `torch.autocast` the FP8 GEMMs output the autocast dtype.

The optimizer side of V3's recipe, fp32 master weights and gradients with bf16 AdamW moments, is
`quant.adamw_bf16_moments.AdamWBF16Moments` (any model; pass it to Trainer with `optimizers=(opt, None)`).

`recipe="tensorwise"` / `"rowwise"` hand the Linears over to torchao's float8 training (when installed), with the
same high-precision islands, for comparison.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field

from torch import nn

from modeling_deepseek.attention import DeepseekAttention
from modeling_deepseek.bnb_experts import DeepseekBnbExperts
from modeling_deepseek.compat import rebind_engine_forward
from modeling_deepseek.configuration import MEMORY_OPTIONS
from modeling_deepseek.experts import DeepseekExperts
from modeling_deepseek.fp8 import DeepseekFP8Experts, DeepseekFP8Linear
from modeling_deepseek.fp8_gemm import check_backend, scaled_mm_available
from modeling_deepseek.layers import DeepseekRMSNorm
from modeling_deepseek.routing import DeepseekTopkRouter

from .fp8_training_modules import Float8TrainingExperts, Float8TrainingLinear

RECIPES = ("blockwise", "tensorwise", "rowwise")


@dataclass(frozen=True)
class FP8TrainingConfig:
    """How `convert_to_fp8_training` converts (the names follow torchao's Float8LinearConfig where they overlap).

    recipe                      "blockwise" (DeepSeek-V3: 1 x 128 activations, 128 x 128 weights); "tensorwise" or
                                "rowwise" hand over to torchao's recipes (needs torchao)
    round_scales_to_power_of_2  round every scale up to a power of two (V3 for some activations, V3.1 everywhere)
    cache_fp8_activations       keep the tensors saved for backward in e4m3 with their scales (else high precision)
    backend                     "auto" (scaled_mm on a Hopper GPU, else reference), "reference" or "scaled_mm"
                                (modeling_deepseek/fp8_gemm.py)
    convert_experts             also run the routed experts' grouped GEMMs in FP8
    cache_o_proj_input_e5m6     keep the input of the linear after attention (o_proj) in the finer E5M6 format with
                                power-of-two scales, re-tiled 1 x 128 -> 128 x 1 for Wgrad (V3 3.3.3); else e4m3
    recompute_norms, recompute_mla_up_proj, recompute_swiglu, chunked_cross_entropy
                                the model's memory options (modeling_deepseek/configuration.py), all on as in V3's
                                recipe: the conversion sets them on the model's config. Under FP8 the SwiGLU inputs
                                are kept in e4m3 (V3: "cache the SwiGLU inputs in FP8, recompute its output")
    """

    recipe: str = "blockwise"
    round_scales_to_power_of_2: bool = False
    cache_fp8_activations: bool = True
    backend: str = "auto"
    convert_experts: bool = True
    cache_o_proj_input_e5m6: bool = True
    recompute_norms: bool = True
    recompute_mla_up_proj: bool = True
    recompute_swiglu: bool = True
    chunked_cross_entropy: bool = True

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"FP8TrainingConfig: unknown recipe {self.recipe!r}; choose one of {RECIPES}")
        check_backend(self.backend, "FP8TrainingConfig")


@dataclass
class FP8TrainingReport:
    """What `convert_to_fp8_training` did: module name -> what it became / why it stayed in high precision."""

    recipe: str
    converted: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    memory: dict[str, bool] = field(default_factory=dict)  # memory option -> on (set on the model's config)

    def __str__(self) -> str:
        lines = [f"FP8 training ({self.recipe}): {len(self.converted)} modules converted, "
                 f"{len(self.kept)} kept in high precision"]
        lines += [f"  memory option {name}: {'on' if on else 'off'}" for name, on in self.memory.items()]
        lines += [f"  fp8   {name}: {what}" for name, what in self.converted.items()]
        lines += [f"  high  {name}: {why}" for name, why in self.kept.items()]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Conversion

# Linears kept in high precision by name, and why (V3 report section 3.3).
_HIGH_PRECISION_LINEARS = {
    "lm_head": "output head (also MTP's shared head)",
    "head": "output head",
    "eh_proj": "MTP input projection eh_proj",
}


def _refuse_quantized(model: nn.Module) -> None:
    """A model already holding bitsandbytes or FP8 inference weights, or non-floating weights, cannot train in FP8."""
    bnb = sys.modules.get("bitsandbytes")  # a model holding its layers has imported it
    bnb_classes = (DeepseekBnbExperts, *((bnb.nn.Linear4bit, bnb.nn.Linear8bitLt) if bnb is not None else ()))
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    for name, module in model.named_modules():
        if isinstance(module, bnb_classes):
            raise ValueError(f"convert_to_fp8_training: module {name!r} holds bitsandbytes weights "
                             f"({type(module).__name__}); FP8 training needs the full-precision model "
                             "(load it without quantization_config)")
        if isinstance(module, (DeepseekFP8Linear, DeepseekFP8Experts)):
            raise ValueError(f"convert_to_fp8_training: module {name!r} holds FP8 inference weights "
                             f"({type(module).__name__}); load the checkpoint with fp8_keep_quantized=False")
        for pname, p in module.named_parameters(recurse=False):
            if not p.is_floating_point():
                raise ValueError(f"convert_to_fp8_training: {name or 'model'}.{pname} is {p.dtype}; FP8 training "
                                 "needs floating-point (fp32 / bf16) master weights")
    if qc is not None:
        raise ValueError(f"convert_to_fp8_training: the model is quantized ({qc}); convert a full-precision model")


def _output_heads(model: nn.Module) -> set[int]:
    """ids of the model's output head (kept in high precision whatever it is named)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {id(head)} if head is not None else set()


def _high_precision_reason(name: str, module: nn.Module, heads: set[int]) -> str | None:
    leaf = name.rsplit(".", 1)[-1]
    if id(module) in heads:
        return "output head"
    if leaf in _HIGH_PRECISION_LINEARS:
        return _HIGH_PRECISION_LINEARS[leaf]
    return None


def convert_to_fp8_training(model: nn.Module, config: FP8TrainingConfig | None = None,
                            module_filter_fn=None) -> nn.Module:
    """Convert `model` in place to FP8 training and return it; `model.fp8_training_report` says what changed.

    module_filter_fn(module, fqn) -> bool, as in torchao: False keeps a candidate Linear / experts module in high
    precision. Converting a converted model changes nothing.
    """
    config = config or FP8TrainingConfig()
    if config.backend == "scaled_mm" and not scaled_mm_available():
        raise RuntimeError("convert_to_fp8_training: backend='scaled_mm' needs a Hopper GPU (sm90) and torch's "
                           "F.scaled_mm; none is available here. Use backend='auto' or 'reference'.")
    _refuse_quantized(model)
    in_place = _loaded_sharded(model)
    if config.recipe != "blockwise":
        if in_place:
            raise ValueError(f"convert_to_fp8_training: recipe {config.recipe!r} (torchao) replaces modules, which a "
                             "model sharded at load (DistributedConfig) cannot take; use recipe='blockwise'")
        return _convert_with_torchao(model, config, module_filter_fn)

    report = FP8TrainingReport(config.recipe)
    heads = _output_heads(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, (Float8TrainingLinear, Float8TrainingExperts)):
            report.converted[name] = f"{type(module).__name__} (already converted, unchanged)"
            continue
        if isinstance(module, nn.Embedding):
            report.kept[name] = "embedding"
        elif isinstance(module, (DeepseekRMSNorm, nn.LayerNorm)):
            report.kept[name] = "norm"
        elif isinstance(module, DeepseekTopkRouter):
            report.kept[name] = "MoE router and its e_score_correction_bias"
        elif isinstance(module, DeepseekAttention):
            report.kept[name] = "attention core (scores, softmax, weighted sum); its projections are listed apart"
        elif isinstance(module, (nn.Linear, DeepseekExperts)):
            if isinstance(module, nn.Linear) and (reason := _high_precision_reason(name, module, heads)):
                report.kept[name] = reason
            elif isinstance(module, DeepseekExperts) and not config.convert_experts:
                report.kept[name] = "routed experts (convert_experts=False)"
            elif module_filter_fn is not None and not module_filter_fn(module, name):
                report.kept[name] = "module_filter_fn"
            elif isinstance(module, nn.Linear):
                new = (_adopt(module, Float8TrainingLinear, config) if in_place
                       else Float8TrainingLinear.from_linear(module, config))
                model.set_submodule(name, new)
                report.converted[name] = f"Linear {module.in_features} -> {module.out_features}"
                if name.endswith("self_attn.o_proj") and config.cache_o_proj_input_e5m6:
                    new.cache_format = "e5m6"
                    report.converted[name] += ", input cached in E5M6 (pow2 scales), re-tiled for Wgrad"
            else:
                model.set_submodule(name, _adopt(module, Float8TrainingExperts, config) if in_place
                                    else Float8TrainingExperts.from_experts(module, config))
                D, I = module.hidden_dim, module.intermediate_dim
                report.converted[name] = f"routed experts, grouped: {module.num_experts} x ({D} -> 2x{I} -> {D})"
    _guard_against_replacement(model)
    _set_memory_options(model, config, report)
    model.fp8_training_report = report
    return model


def _set_memory_options(model: nn.Module, config: FP8TrainingConfig, report: FP8TrainingReport) -> None:
    """V3's recomputation and chunked cross-entropy: the model's own memory options, switched as `config` says."""
    model_config = getattr(model, "config", None)
    if model_config is None or not hasattr(model_config, "recompute_norms"):
        return  # not a DeepSeek model of this package: nothing reads the options
    for name in MEMORY_OPTIONS:
        setattr(model_config, name, getattr(config, name))
        report.memory[name] = getattr(config, name)


def _loaded_sharded(model: nn.Module) -> bool:
    """Whether transformers' distributed engine sharded `model` at load (from_pretrained(distributed_config=...)).
    Then the conversion keeps every module object (the class is swapped in place, see `_adopt`): FSDP2 gathers and
    frees the parameters of the very modules it wrapped, and the tensor- / expert-parallel wrappers hold them."""
    return bool(getattr(model, "is_distributed_loading_by_transformers", False))


def _adopt(module: nn.Module, cls: type, config: FP8TrainingConfig) -> nn.Module:
    """Turn `module` itself into its FP8 training subclass (same object, same Parameters, same hooks). Under tensor
    or expert parallelism the engine's wrapper called the forward it captured at load (the old class's): it is
    pointed at the FP8 forward, so the engine's collectives stay as they are around FP8 GEMMs on the local shards."""
    module.__class__ = cls
    module.fp8_config = config
    rebind_engine_forward(module)
    return module


def _convert_with_torchao(model: nn.Module, config: FP8TrainingConfig, module_filter_fn) -> nn.Module:
    """recipe "tensorwise" / "rowwise": torchao's float8 training for the Linears, with the same islands."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as err:
        raise ImportError(f"recipe {config.recipe!r} hands over to torchao's float8 training: pip install torchao "
                          "(or the fp8-compare extra)") from err
    ao_config = Float8LinearConfig.from_recipe_name(config.recipe)
    if config.backend == "reference":
        ao_config = dataclasses.replace(ao_config, emulate=True)
    report = FP8TrainingReport(f"torchao {config.recipe}")
    heads = _output_heads(model)

    def keep(module, fqn):
        if not isinstance(module, nn.Linear):
            return False
        reason = _high_precision_reason(fqn, module, heads)
        if reason is None and module_filter_fn is not None and not module_filter_fn(module, fqn):
            reason = "module_filter_fn"
        if reason is None and (module.in_features % 16 or module.out_features % 16):
            reason = "torchao needs in and out features divisible by 16"
        if reason is not None:
            report.kept[fqn] = reason
            return False
        report.converted[fqn] = f"torchao Float8Linear {config.recipe}"
        return True

    convert_to_float8_training(model, config=ao_config, module_filter_fn=keep)
    for name, module in model.named_modules():
        if isinstance(module, DeepseekExperts):
            report.kept[name] = "routed experts: torchao's recipes convert Linears only"
    model.fp8_training_report = report
    return model


def _guard_against_replacement(model: nn.Module) -> None:
    """accelerate's mixed_precision="fp8" (torchao backend) swaps every nn.Linear subclass for torchao's Float8Linear
    before wrapping: check once, at the first training forward, that no converted module was replaced that way."""
    if getattr(model, "_fp8_training_guard", None) is not None:
        return

    def check(module, args, kwargs):
        if not module.training:
            return None
        # By name: torchao's Float8Linear is not part of its public API.
        replaced = [name for name, m in module.named_modules()
                    if type(m).__name__ == "Float8Linear" and type(m).__module__.startswith("torchao")]
        if replaced and module.fp8_training_report.recipe == "blockwise":
            raise RuntimeError(
                f"FP8 training: {len(replaced)} Linears of this model (e.g. {replaced[0]!r}) were replaced by "
                "torchao's Float8Linear after convert_to_fp8_training (accelerate's mixed_precision='fp8' does "
                "this), which would train with torchao's tensorwise recipe instead of DeepSeek's block-wise one. Keep "
                "convert_to_fp8_training and create the Accelerator with mixed_precision='bf16' or 'no'.")
        module._fp8_training_guard.remove()
        module._fp8_training_guard = True
        return None

    model._fp8_training_guard = model.register_forward_pre_hook(check, with_kwargs=True)
