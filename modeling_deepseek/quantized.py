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
   are routed to the generic path, `compat.avoid_bnb_cpu_avx512_packing`). The experts avoid both by quantizing each
   expert's matrix flattened.

2. DeepSeek FP8 checkpoints (`config.quantization_config.quant_method == "fp8"`, weights in e4m3 with a float32
   `weight_scale_inv` per 128 x 128 block; see fp8_format.py for the format). transformers' own FineGrainedFP8
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
   on Hopper when both dims are multiples of 128) with a dequantize-and-matmul fallback elsewhere;
   `fp8_gemm_backend="reference"` or `"scaled_mm"` chooses one for every FP8 module (fp8_gemm.py). The swap
   happens after transformers has loaded the model in the requested dtype, so loading peaks at the unquantized
   size; and the activation quantization is eager PyTorch (unfused), which at present costs more than the FP8 GEMM
   saves (H100, 4096 x 7168 x 2048: FP8 GEMM 0.10 ms, bf16 GEMM 0.15 ms, activation quantization 0.47 ms).
"""

from __future__ import annotations

import json
import os
import re

import torch
from torch import nn

from .bnb_experts import quantize_experts_bnb
from .compat import avoid_bnb_cpu_avx512_packing, bnb_modules_to_not_convert, optional_hub_file
from .experts import DeepseekExperts
from .fp8 import DeepseekFP8Experts, DeepseekFP8Linear
from .fp8_format import FP8_BLOCK, check_scale_shape, dequantize_weight_blockwise
from .fp8_gemm import check_backend

# --------------------------------------------------------------------------------------------------------------------
# from_pretrained hooks

_IGNORE_SCALES = r"\.weight_scale_inv$"
_NO_ATTR = object()
_EXPERT_KEY = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<j>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


class QuantizedLoadPlan:
    """What prepare_quantized_load found, for finish_quantized_load: the FP8 checkpoint's files and options."""

    def __init__(self, cls=None, files=None, fp8_config=None, keep_quantized=None, gemm_backend="auto"):
        self.cls = cls
        self.files = files or []
        self.fp8_config = fp8_config
        self.keep_quantized = keep_quantized
        self.gemm_backend = gemm_backend


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
    index = optional_hub_file(path, "model.safetensors.index.json", **hub)
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
    every one of them from the files. Takes the `fp8_keep_quantized` option (None: keep FP8 when the model is on CUDA)
    and `fp8_gemm_backend`, the backend of the FP8 modules kept ("auto", "reference" or "scaled_mm", fp8_gemm.py).
    """
    keep = kwargs.pop("fp8_keep_quantized", None)
    backend = kwargs.pop("fp8_gemm_backend", "auto")
    check_backend(backend, "from_pretrained(fp8_gemm_backend=...)")
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
    plan = QuantizedLoadPlan(cls, files, fp8_config, keep, backend)
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
        load_fp8_weights(model, plan.files, plan.keep_quantized, plan.gemm_backend)
        if info is not None and info.get("unexpected_keys"):
            info["unexpected_keys"] = type(info["unexpected_keys"])(
                k for k in info["unexpected_keys"] if not k.endswith("weight_scale_inv")
            )
        return model
    quantizer = getattr(model, "hf_quantizer", None)
    qc = getattr(quantizer, "quantization_config", None)
    method = getattr(qc, "quant_method", None)
    if getattr(method, "value", method) == "bitsandbytes":
        quantize_experts_bnb(model, qc, bnb_modules_to_not_convert(model))
        for module in model.modules():
            avoid_bnb_cpu_avx512_packing(module)
    return model


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
def load_fp8_weights(model: nn.Module, files: list[str], keep_quantized: bool | None = None,
                     backend: str = "auto") -> dict:
    """Write every FP8 weight of a DeepSeek-format checkpoint into `model`.

    keep_quantized False: dequantize into the existing parameters (in their dtype and device); per-expert keys go
    into the fused expert tensors. True: replace each Linear by a DeepseekFP8Linear and each DeepseekExperts whose
    experts are all FP8 by a DeepseekFP8Experts, on the device of the module, computing with `backend`. None: True
    when the model is on CUDA.
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
                check_scale_shape(w.shape, s, FP8_BLOCK, key)
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
                        w.to(dev), s.to(dev), module.bias, backend))
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
            model.set_submodule(experts_name, DeepseekFP8Experts(*stacks, act_fn=module.act_fn, backend=backend))
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
