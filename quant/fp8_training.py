"""FP8 training as DeepSeek-V3 did it (report section 3.3): every Linear and expert GEMM in e4m3, block-scaled.

    from quant.fp8 import convert_to_fp8_training
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
are taken from x in the forward, next to Fprop's). Products accumulate in fp32 (quant/fp8_gemm.py). Ragged edges
are zero-padded, so every projection converts whatever its shape. Master weights, their gradients and everything
outside the GEMMs keep the model's precision.

Activations saved for backward are Wgrad's operand only, and with `cache_fp8_activations` (the default) they are
kept as e4m3 plus scales, 1 byte per entry instead of 4 (fp32) or 2 (bf16); turning it off saves x and quantizes it
in backward: the same numbers either way (tests/test_fp8_training.py checks the gradients are identical).

The routed experts (`Float8TrainingExperts`) run their grouped path, tokens sorted by expert, with all three GEMMs
per expert group in FP8 (Wgrad's 128-token tiles start at each expert's first token) and no host synchronisation.

What stays in high precision, as in V3: the embedding, the output head (`lm_head`, which MTP's shared head reuses),
the MoE router and its bias (not Linears), every norm, attention's core (scores, softmax, weighted sum: inside
attention, between its projections) and MTP's `eh_proj`. Modules that are not `nn.Linear` / `DeepseekExperts` are
never touched.

How it plugs in
---------------
The converted modules are subclasses of the ones they replace (`nn.Linear`, `DeepseekExperts`) holding the same
Parameter objects under the same names: optimizers built before the conversion keep working, state dicts and
`save_pretrained` stay in the standard high-precision layout, and DDP / FSDP2 / Trainer see ordinary parameters.
accelerate: convert before `accelerator.prepare` with `mixed_precision="bf16"` or `"no"`. accelerate's own
`mixed_precision="fp8"` converts every `nn.Linear` subclass to torchao's `Float8Linear`; a converted model refuses
to train after that happened (a clear error on the first training forward) instead of silently running another
recipe. Under `torch.autocast` the FP8 GEMMs output the autocast dtype.

The optimizer side of V3's recipe, fp32 master weights and gradients with bf16 AdamW moments, is
`AdamWBF16Moments` (any model; pass it to Trainer with `optimizers=(opt, None)`).

`recipe="tensorwise"` / `"rowwise"` hand the Linears over to torchao's float8 training (when installed), with the
same high-precision islands, for comparison.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from modeling_deepseek.experts import DeepseekExperts, run_experts_loop, tokens_per_expert
from modeling_deepseek.fp8 import quantize_blockwise

from .fp8_gemm import (
    BACKENDS,
    BLOCK,
    TILE,
    _grouped_mm,
    blockwise_mm,
    cuda_backend_available,
    dequantize_blockwise,
    dequantize_token_tiles,
    grouped_wgrad,
    quantize_token_tiles,
    resolve_backend,
)

RECIPES = ("blockwise", "tensorwise", "rowwise")


@dataclass(frozen=True)
class FP8TrainingConfig:
    """How `convert_to_fp8_training` converts (the names follow torchao's Float8LinearConfig where they overlap).

    recipe                      "blockwise" (DeepSeek-V3: 1 x 128 activations, 128 x 128 weights); "tensorwise" or
                                "rowwise" hand over to torchao's recipes (needs torchao)
    round_scales_to_power_of_2  round every scale up to a power of two (V3 for some activations, V3.1 everywhere)
    cache_fp8_activations       keep the tensors saved for backward in e4m3 with their scales (else high precision)
    backend                     "auto" (cuda on a Hopper GPU, else reference), "reference" or "cuda"
    convert_experts             also run the routed experts' grouped GEMMs in FP8
    """

    recipe: str = "blockwise"
    round_scales_to_power_of_2: bool = False
    cache_fp8_activations: bool = True
    backend: str = "auto"
    convert_experts: bool = True

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"FP8TrainingConfig: unknown recipe {self.recipe!r}; choose one of {RECIPES}")
        if self.backend not in BACKENDS:
            raise ValueError(f"FP8TrainingConfig: unknown backend {self.backend!r}; choose one of {BACKENDS}")


@dataclass
class FP8TrainingReport:
    """What `convert_to_fp8_training` did: module name -> what it became / why it stayed in high precision."""

    recipe: str
    converted: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"FP8 training ({self.recipe}): {len(self.converted)} modules converted, "
                 f"{len(self.kept)} kept in high precision"]
        lines += [f"  fp8   {name}: {what}" for name, what in self.converted.items()]
        lines += [f"  high  {name}: {why}" for name, why in self.kept.items()]
        return "\n".join(lines)


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _backend(config: FP8TrainingConfig, x: torch.Tensor) -> str:
    backend = resolve_backend(config.backend, x.device)
    if backend == "cuda" and not (x.is_cuda and cuda_backend_available(x.device)):
        raise RuntimeError(f"FP8 backend 'cuda' needs tensors on a Hopper GPU, got a {x.device} tensor")
    return backend


# --------------------------------------------------------------------------------------------------------------------
# The three GEMMs of a Linear


class _FP8Linear(torch.autograd.Function):
    """y [M, N] = x [M, K] @ w [N, K]^T with Fprop, Dgrad and Wgrad all in block-scaled e4m3."""

    @staticmethod
    def forward(ctx, x_MK, w_NK, config: FP8TrainingConfig, out_dtype: torch.dtype):
        backend, p2 = _backend(config, x_MK), config.round_scales_to_power_of_2
        xq, xs = quantize_blockwise(x_MK, TILE, p2)
        wq, ws = quantize_blockwise(w_NK, BLOCK, p2)
        y_MN = blockwise_mm(xq, xs, wq, ws, BLOCK, out_dtype, backend)
        if config.cache_fp8_activations:  # Wgrad's operand, from the high-precision x: 128 tokens per tile
            ctx.save_for_backward(*quantize_blockwise(x_MK.t(), TILE, p2), wq, ws)
        else:
            ctx.save_for_backward(x_MK, wq, ws)
        ctx.config, ctx.backend, ctx.dtypes = config, backend, (x_MK.dtype, w_NK.dtype)
        return y_MN

    @staticmethod
    def backward(ctx, dy_MN):
        config, backend, (x_dtype, w_dtype) = ctx.config, ctx.backend, ctx.dtypes
        p2 = config.round_scales_to_power_of_2
        if config.cache_fp8_activations:
            xtq, xts, wq, ws = ctx.saved_tensors
        else:
            x_MK, wq, ws = ctx.saved_tensors
            xtq, xts = quantize_blockwise(x_MK.t(), TILE, p2)
        dx = dw = None
        if ctx.needs_input_grad[0]:  # Dgrad: dy in 1 x 128 tiles along N, W^T's blocks are W's transposed
            dyq, dys = quantize_blockwise(dy_MN, TILE, p2)
            dx = blockwise_mm(dyq, dys, wq.t().contiguous(), ws.t(), BLOCK, x_dtype, backend)
        if ctx.needs_input_grad[1]:  # Wgrad: dy^T and x^T in 1 x 128 tiles along the tokens
            dytq, dyts = quantize_blockwise(dy_MN.t(), TILE, p2)
            dw = blockwise_mm(dytq, dyts, xtq, xts, TILE, w_dtype, backend)
        return dx, dw, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: FP8TrainingConfig):
    """F.linear with the FP8 training recipe (any leading dims; the bias is added in high precision)."""
    out_dtype = _out_dtype(x)
    lead, K = x.shape[:-1], x.shape[-1]
    with torch.autocast(x.device.type, enabled=False):
        y = _FP8Linear.apply(x.reshape(-1, K), weight, config, out_dtype)
    y = y.view(*lead, weight.shape[0])
    return y if bias is None else y + bias.to(y.dtype)


class Float8TrainingLinear(nn.Linear):
    """An nn.Linear whose forward and backward GEMMs run in block-scaled FP8 (same `weight` / `bias` Parameters)."""

    fp8_config: FP8TrainingConfig

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: FP8TrainingConfig) -> "Float8TrainingLinear":
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        new.weight, new.bias = linear.weight, linear.bias  # the same Parameter objects
        new.fp8_config = config
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias, self.fp8_config)

    def extra_repr(self) -> str:
        c = self.fp8_config
        return (f"{super().extra_repr()}, fp8 training 1x128 x 128x128, pow2_scales={c.round_scales_to_power_of_2}, "
                f"cache_fp8_activations={c.cache_fp8_activations}, backend={c.backend}")


# --------------------------------------------------------------------------------------------------------------------
# The three GEMMs of the routed experts, per expert group


class _FP8GroupedMM(torch.autograd.Function):
    """y [S, N] with y_s = x_s @ w[e(s)]^T for rows sorted by expert (group e ends at offsets_E[e]), all three GEMMs
    on e4m3 operands. torch has no block-scaled grouped GEMM: the dequantized tiles go through grouped_mm."""

    @staticmethod
    def forward(ctx, x_SK, w_ENK, offsets_E, config: FP8TrainingConfig, out_dtype: torch.dtype):
        p2 = config.round_scales_to_power_of_2
        cd = _grouped_compute_dtype(x_SK)
        wq, ws = quantize_blockwise(w_ENK, BLOCK, p2)
        x = dequantize_blockwise(*quantize_blockwise(x_SK, TILE, p2), TILE, cd)
        y_SN = _grouped_mm(x, dequantize_blockwise(wq, ws, BLOCK, cd).transpose(1, 2), offs=offsets_E)
        if config.cache_fp8_activations:
            ctx.save_for_backward(*quantize_token_tiles(x_SK, offsets_E, p2), wq, ws, offsets_E)
        else:
            ctx.save_for_backward(x_SK, wq, ws, offsets_E)
        ctx.config, ctx.dtypes = config, (x_SK.dtype, w_ENK.dtype)
        return y_SN.to(out_dtype)

    @staticmethod
    def backward(ctx, dy_SN):
        config, (x_dtype, w_dtype) = ctx.config, ctx.dtypes
        p2 = config.round_scales_to_power_of_2
        if config.cache_fp8_activations:
            xq, xs, tile_S, wq, ws, offsets_E = ctx.saved_tensors
        else:
            x_SK, wq, ws, offsets_E = ctx.saved_tensors
            xq, xs, tile_S = quantize_token_tiles(x_SK, offsets_E, p2)
        cd = _grouped_compute_dtype(dy_SN)
        dx = dw = None
        if ctx.needs_input_grad[0]:  # Dgrad per group: dy in 1 x 128 tiles along N, the weights' blocks
            dy = dequantize_blockwise(*quantize_blockwise(dy_SN, TILE, p2), TILE, cd)
            dx = _grouped_mm(dy, dequantize_blockwise(wq, ws, BLOCK, cd), offs=offsets_E).to(x_dtype)
        if ctx.needs_input_grad[1]:  # Wgrad per group: 128-token tiles starting at each group's first token
            dyq, dys, dy_tile_S = quantize_token_tiles(dy_SN, offsets_E, p2)
            dy = dequantize_token_tiles(dyq, dys, dy_tile_S).to(cd)
            dw = grouped_wgrad(dy, dequantize_token_tiles(xq, xs, tile_S).to(cd), offsets_E).to(w_dtype)
        return dx, dw, None, None, None


def _grouped_compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.bfloat16 if x.is_cuda else torch.float32  # CUDA's grouped_mm takes bf16; the CPU reference fp32


class Float8TrainingExperts(DeepseekExperts):
    """DeepseekExperts (same `gate_up_proj` [E, 2I, D] / `down_proj` [E, D, I] Parameters) whose grouped path runs
    all three GEMMs of each expert group in FP8; the per-expert loop (odd shapes) uses `fp8_linear` per expert."""

    fp8_config: FP8TrainingConfig

    @classmethod
    def from_experts(cls, experts: DeepseekExperts, config: FP8TrainingConfig) -> "Float8TrainingExperts":
        new = cls.__new__(cls)
        new.__dict__.update(experts.__dict__)  # every attribute, the same Parameter objects under the same names
        for registry in ("_parameters", "_buffers", "_modules"):
            setattr(new, registry, dict(getattr(experts, registry)))
        new.fp8_config = config
        return new

    def _use_loop(self) -> bool:
        impl = getattr(self, "implementation", None) or getattr(getattr(self, "config", None),
                                                               "_experts_implementation", None)
        return impl in ("loop", "eager")

    def _grouped_ok(self, x: torch.Tensor) -> bool:
        """grouped_mm needs 16-byte aligned rows of D, 2I and I in the compute dtype."""
        size = torch.finfo(_grouped_compute_dtype(x)).bits // 8
        return all((width * size) % 16 == 0 for width in (self.hidden_dim, self.intermediate_dim))

    def forward(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                load_E: torch.Tensor | None = None) -> torch.Tensor:
        """`load_E` (an older caller's per-expert counts) is not used: counts that leave padding out (the MoE
        layer's balancing counts) would misplace the segments, so they are always counted here, over every pair."""
        if self._use_loop() or not self._grouped_ok(x_TD):
            return self.forward_loop(x_TD, expert_ids_TK, weights_TK)
        T, K = expert_ids_TK.shape
        cfg, out_dtype = self.fp8_config, _out_dtype(x_TD)
        order_S = expert_ids_TK.reshape(-1).argsort(stable=True)  # each expert's rows become one segment
        offsets_E = tokens_per_expert(expert_ids_TK, self.num_experts).cumsum(0).to(torch.int32)  # segment ends
        with torch.autocast(x_TD.device.type, enabled=False):
            gate_up_S2I = _FP8GroupedMM.apply(x_TD[order_S // K], self.gate_up_proj, offsets_E, cfg, out_dtype)
            gate_SI, up_SI = gate_up_S2I.chunk(2, dim=-1)
            h_SI = (self.act_fn(gate_SI) * up_SI).contiguous()
            y_SD = _FP8GroupedMM.apply(h_SI, self.down_proj, offsets_E, cfg, out_dtype)
        y_SD = y_SD * weights_TK.reshape(-1)[order_S].unsqueeze(-1).to(y_SD.dtype)
        y_TKD = torch.empty_like(y_SD).index_copy_(0, order_S, y_SD).view(T, K, -1)
        return y_TKD.sum(dim=1).to(out_dtype)

    def forward_loop(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        cfg = self.fp8_config

        def expert(e, x_ND):
            gate, up = fp8_linear(x_ND, self.gate_up_proj[e], None, cfg).chunk(2, dim=-1)
            return fp8_linear(self.act_fn(gate) * up, self.down_proj[e], None, cfg)

        return run_experts_loop(x_TD, expert_ids_TK, weights_TK, expert)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, fp8 training grouped 1x128 x 128x128"


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
    from modeling_deepseek.bnb_experts import DeepseekBnbExperts
    from modeling_deepseek.fp8 import DeepseekFP8Experts, DeepseekFP8Linear

    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    for name, module in model.named_modules():
        kind = type(module).__module__.split(".")[0]
        if kind == "bitsandbytes" or isinstance(module, DeepseekBnbExperts):
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
    if config.backend == "cuda" and not cuda_backend_available():
        raise RuntimeError("convert_to_fp8_training: backend='cuda' needs a Hopper GPU (sm90) and torch's "
                           "F.scaled_mm; none is available here. Use backend='auto' or 'reference'.")
    _refuse_quantized(model)
    in_place = _loaded_sharded(model)
    if config.recipe != "blockwise":
        if in_place:
            raise ValueError(f"convert_to_fp8_training: recipe {config.recipe!r} (torchao) replaces modules, which a "
                             "model sharded at load (DistributedConfig) cannot take; use recipe='blockwise'")
        return _convert_with_torchao(model, config, module_filter_fn)

    report = FP8TrainingReport(config.recipe)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    heads = {id(head)} if head is not None else set()
    for name, module in list(model.named_modules()):
        if isinstance(module, (Float8TrainingLinear, Float8TrainingExperts)):
            report.converted[name] = f"{type(module).__name__} (already converted, unchanged)"
            continue
        if isinstance(module, nn.Embedding):
            report.kept[name] = "embedding"
        elif type(module).__name__.endswith("RMSNorm") or isinstance(module, (nn.LayerNorm,)):
            report.kept[name] = "norm"
        elif type(module).__name__ == "DeepseekTopkRouter":
            report.kept[name] = "MoE router and its e_score_correction_bias"
        elif type(module).__name__ == "DeepseekAttention":
            report.kept[name] = "attention core (scores, softmax, weighted sum); its projections are listed apart"
        elif isinstance(module, (nn.Linear, DeepseekExperts)):
            if isinstance(module, nn.Linear) and (reason := _high_precision_reason(name, module, heads)):
                report.kept[name] = reason
            elif isinstance(module, DeepseekExperts) and not config.convert_experts:
                report.kept[name] = "routed experts (convert_experts=False)"
            elif module_filter_fn is not None and not module_filter_fn(module, name):
                report.kept[name] = "module_filter_fn"
            elif isinstance(module, nn.Linear):
                model.set_submodule(name, _adopt(module, Float8TrainingLinear, config) if in_place
                                    else Float8TrainingLinear.from_linear(module, config))
                report.converted[name] = f"Linear {module.in_features} -> {module.out_features}"
            else:
                model.set_submodule(name, _adopt(module, Float8TrainingExperts, config) if in_place
                                    else Float8TrainingExperts.from_experts(module, config))
                D, I = module.hidden_dim, module.intermediate_dim
                report.converted[name] = f"routed experts, grouped: {module.num_experts} x ({D} -> 2x{I} -> {D})"
    _guard_against_replacement(model)
    model.fp8_training_report = report
    return model


def _loaded_sharded(model: nn.Module) -> bool:
    """Whether transformers' distributed engine sharded `model` at load (from_pretrained(distributed_config=...)).
    FSDP2 gathers and frees the parameters of the very module objects it wrapped, so conversion must keep them (the
    class is swapped in place). Tensor- and expert-parallel layers run the engine's forward around the module's
    original one, which no conversion reaches: refused rather than left silently in high precision."""
    if not getattr(model, "is_distributed_loading_by_transformers", False):
        return False
    dc = model.config.distributed_config
    if dc.tp_size > 1 or dc.ep_size > 1:
        raise ValueError(
            f"convert_to_fp8_training: the model was loaded with tp_size={dc.tp_size}, ep_size={dc.ep_size}; the "
            "engine's tensor- and expert-parallel forwards wrap the original modules, which FP8 conversion cannot "
            "reach. FP8 training runs on a model loaded with DistributedConfig(fsdp_size=N) (FSDP2 alone)")
    return True


def _adopt(module: nn.Module, cls: type, config: FP8TrainingConfig) -> nn.Module:
    """Turn `module` itself into its FP8 training subclass (same object, same Parameters, same hooks)."""
    module.__class__ = cls
    module.fp8_config = config
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
    get_head = getattr(model, "get_output_embeddings", None)
    heads = {id(get_head())} if callable(get_head) and get_head() is not None else set()

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


# --------------------------------------------------------------------------------------------------------------------
# The optimizer: fp32 master weights, bf16 moments (V3)


class AdamWBF16Moments(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments) whose two moments are stored in bf16, as DeepSeek-V3
    trains: master weights and gradients stay fp32, the moments take half the memory. Each update is computed in
    fp32 and only the stored moments are rounded. torch's AdamW cannot do this (it keeps moments in the parameter's
    dtype and refuses mixed dtypes). Loading a state dict casts the moments back to bf16."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (beta1, beta2), lr, eps, wd = group["betas"], group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["step"] += 1
                g = p.grad.float()
                m = state["exp_avg"].float().lerp_(g, 1 - beta1)
                v = state["exp_avg_sq"].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                t = state["step"]
                denom = (v / (1 - beta2**t)).sqrt_().add_(eps)
                p.mul_(1 - lr * wd)
                p.addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-lr / (1 - beta1**t))
        return loss

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for state in self.state.values():  # torch casts floating state to the parameter's dtype on load
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(torch.bfloat16)
