"""FP8 block quantization in DeepSeek-V3's checkpoint format.

The format
----------
DeepSeek-V3 ships its Linear weights in FP8 **e4m3** (`torch.float8_e4m3fn`: 1 sign, 4 exponent, 3 mantissa bits,
largest finite value 448, no infinities). One e4m3 number cannot cover the range of a whole weight matrix, so every
weight is cut into **128 x 128 blocks** and each block gets its own scale:

    for a weight W [out, in] and block (i, j) = W[128 i : 128 (i+1), 128 j : 128 (j+1)]:
        amax          = max |block|
        scale_inv     = amax / 448                 (float32; 1.0 for an all-zero block)
        stored block  = e4m3( block / scale_inv )   (round to nearest; |.| <= 448 so nothing saturates)
        dequantized   = stored block * scale_inv

The checkpoint stores, next to each quantized `*.weight` (dtype float8_e4m3fn, same shape as the original), a
float32 `*.weight_scale_inv` of shape [ceil(out/128), ceil(in/128)]. Despite its name `weight_scale_inv` holds the
**dequantization multiplier** (1 / the quantization scale 448 / amax), which is what a kernel multiplies by.

Ragged edges: when out or in is not a multiple of 128, the last row/column of blocks is partial. It is handled as if
zero-padded to a full block before the amax is taken (zeros never raise an amax), so its scale comes from its real
entries only, and the grid is always anchored at 0 with a fixed block of 128: a 160-row weight has row blocks
[0, 128) and [128, 160), never two blocks of 80. A loader must therefore use the fixed block size, not
out // ceil(out/128).

Error: within a block every entry is scaled into [-448, 448] and rounded to 3 mantissa bits, so the relative error
of a normal e4m3 number is at most 2^-4 (half a unit in the last place), and entries small enough to land among
the e4m3 subnormals (below 2^-6 after scaling) get an absolute error of at most 2^-10 in scaled units:

    |dequantized - w|  <=  2^-4 |w|  +  2^-10 * scale_inv        (elementwise; hence <= amax / 16 per block)

What is quantized (mirroring DeepSeek's release, V3 report section 3.3): every projection of attention, dense
MLPs, shared and routed experts, in every block including the MTP block (`should_quantize`). What stays in high
precision (the checkpoint's bf16/fp32): the embedding, the output heads (`lm_head`, `shared_head.head`), every
norm, the MoE router (`mlp.gate.weight`) and its `e_score_correction_bias`, and MTP's `eh_proj` (which serving
engines build as a plain high-precision Linear).

config.json carries
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                             "weight_block_size": [128, 128]}
"activation_scheme: dynamic" means activations are not stored quantized: at run time each token's activations are
quantized on the fly in 1 x 128 groups (one scale per token per 128 input features), and the GEMM multiplies e4m3
activations by e4m3 weights, applying both scales per 128-long slice of the contraction while accumulating in fp32.

Loading such a folder with `DeepseekForCausalLM.from_pretrained(folder)`: on CPU (or with `fp8_keep_quantized=False`)
every quantized weight is dequantized on load to the requested dtype, the per-expert `experts.{j}.*_proj` keys
into the fused expert tensors; on CUDA the weights stay FP8 in `DeepseekFP8Linear` / `DeepseekFP8Experts`
(modeling_deepseek/fp8.py), whose forward runs block-scaled FP8 GEMMs (modeling_deepseek/fp8_gemm.py). The format
itself (quantizers, scale rule, which keys) is modeling_deepseek/fp8_format.py, where the model side can import it.

This module holds the quantization work: `quantize_checkpoint`, which streams through the same tensor writer
(`quantize_state_tensors`) and fused-expert splitter (`split_fused_experts`) as the exporter's --fp8
(`python -m modeling_deepseek.export`; the two differ only in the config they write: ours, loadable by
`from_pretrained`, against the official one), and `quantization_error_bound`, the bound above. Training in FP8 (the
same tiles, all three GEMMs of every projection, online scales) is quant/fp8_training.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from modeling_deepseek.export import split_fused_experts, write_json_atomic
from modeling_deepseek.fp8_format import FP8_BLOCK, FP8_QUANTIZATION_CONFIG, quantize_state_tensors

__all__ = ["quantization_error_bound", "quantize_checkpoint"]

# Names this module used to hold, and where each lives now. Importing one from here still works, with a
# DeprecationWarning that names the new place (the public home of the training API is the `quant` package itself).
MOVED = {
    **dict.fromkeys(("FP8TrainingConfig", "FP8TrainingReport", "convert_to_fp8_training"), "quant.fp8_training"),
    **dict.fromkeys(("Float8TrainingLinear", "Float8TrainingExperts", "fp8_linear"), "quant.fp8_training_modules"),
    "AdamWBF16Moments": "quant.adamw_bf16_moments",
    **dict.fromkeys(("DeepseekFP8Linear", "DeepseekFP8Experts", "fp8_block_linear"), "modeling_deepseek.fp8"),
    **dict.fromkeys(("FP8_DTYPE", "FP8_MAX", "quantize_blockwise",
                     "dequantize_blockwise", "quantize_weight_blockwise", "dequantize_weight_blockwise",
                     "scale_grid_shape", "should_quantize"), "modeling_deepseek.fp8_format"),
}


def __getattr__(name: str):
    if name not in MOVED:
        raise AttributeError(f"module 'quant.fp8' has no attribute {name!r}")
    import importlib
    import warnings

    warnings.warn(f"quant.fp8.{name} moved to {MOVED[name]}.{name}; import it from there", DeprecationWarning,
                  stacklevel=2)
    return getattr(importlib.import_module(MOVED[name]), name)


def quantization_error_bound(w: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """Elementwise bound on |dequantize(quantize(w)) - w|: 2^-4 |w| + 2^-10 scale_inv (see the module docstring)."""
    rows, cols = w.shape[-2:]
    s = scale_inv.float().repeat_interleave(block, -2)[..., :rows, :].repeat_interleave(block, -1)[..., :cols]
    return w.float().abs() * 2.0**-4 + s * 2.0**-10


def quantize_checkpoint(src_folder: str | os.PathLike, dst_folder: str | os.PathLike, block: int = FP8_BLOCK) -> dict:
    """Write a DeepSeek-format FP8 checkpoint of the bf16/fp32 checkpoint in `src_folder` (a save_pretrained folder).

    Every weight that `should_quantize` selects becomes e4m3 plus its `weight_scale_inv`; all other tensors are copied
    unchanged. Fused expert tensors, if the source has them, are written as DeepSeek's per-expert keys. Shards keep
    their file names (the index is rewritten); config.json gains `quantization_config`; every other file (generation
    config, tokenizer, remote code) is copied. Returns counts and bytes before / after.
    """
    src, dst = Path(src_folder), Path(dst_folder)
    if block != FP8_BLOCK:
        raise ValueError(f"DeepSeek's FP8 format uses {FP8_BLOCK} x {FP8_BLOCK} blocks; got block={block}")
    config = json.loads((src / "config.json").read_text())
    if config.get("quantization_config"):
        raise ValueError(f"{src} is already quantized ({config['quantization_config'].get('quant_method')})")
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors files in {src}")
    dst.mkdir(parents=True, exist_ok=True)

    stats = {"quantized": 0, "kept": 0, "bytes_before": 0, "bytes_after": 0}
    weight_map: dict[str, str] = {}
    for shard in shards:
        with safe_open(src / shard, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        out = dict(quantize_state_tensors(split_fused_experts(tensors.items()), stats, block))
        out = {key: t.contiguous() for key, t in out.items()}
        tmp = dst / f".{shard}.tmp"  # atomic: a reader never sees a half-written shard
        save_file(out, tmp, metadata={**metadata, "format": "pt"})
        os.replace(tmp, dst / shard)
        weight_map.update({key: shard for key in out})
        del tensors, out

    index_name = "model.safetensors.index.json"
    if (src / index_name).exists() or len(shards) > 1:
        index = {"metadata": {"total_size": stats["bytes_after"]}, "weight_map": dict(sorted(weight_map.items()))}
        write_json_atomic(dst / index_name, index)

    config["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG, weight_block_size=[block, block])
    write_json_atomic(dst / "config.json", dict(sorted(config.items())))
    for p in src.iterdir():
        if p.is_file() and p.suffix != ".safetensors" and p.name not in ("config.json", index_name):
            shutil.copy2(p, dst / p.name)
    return stats
