"""Export a model to the official DeepSeek checkpoint layout.

    python -m modeling_deepseek.export SRC DST [--fp8] [--dtype bfloat16] [--max-shard-size 5GB]

or, from Python, `export_official(src_or_model, dst, fp8=False)`. SRC is a folder written by our `save_pretrained`
(read tensor by tensor, so an export never holds more than one shard in memory) or a `DeepseekForCausalLM`.

What changes against our own save_pretrained:

- config.json says `model_type: "deepseek_v3"`, `architectures: ["DeepseekV3ForCausalLM"]` (V2-style softmax
  routers give `deepseek_v2` / `DeepseekV2ForCausalLM`) with the official field names: `rope_scaling` with a
  "type" key, `num_nextn_predict_layers`, `aux_loss_alpha` / `seq_aux` ... Our training and serving knobs
  (bias_update_speed, use_bias_update, seq_balance_alpha, mtp_loss_weight*, mtp_late_fraction, mla_impl,
  latent_cache_dtype) are not written, and no `auto_map` either: readers use their own DeepSeek code.
- routed experts are written one tensor per expert, `model.layers.{i}.mlp.experts.{j}.{gate,up,down}_proj.weight`,
  whatever the source holds (fused [E, 2I, D] / [E, D, I] tensors are split);
- each MTP module, at `model.layers.{num_hidden_layers + k}`, also carries the copies of the shared embedding and
  output head that the official files have (`embed_tokens.weight`, `shared_head.head.weight`);
- `e_score_correction_bias` is always float32;
- with `fp8=True`, the weights of every attention and FFN projection (dense, shared and routed experts, MTP blocks
  included) become e4m3 plus a float32 `weight_scale_inv` of 128x128 blocks (dequantised weight = fp8 * scale per
  block), and config.json carries the official `quantization_config`. Embeddings, the head, norms, routers and the
  MTP `eh_proj` keep their precision, as in the official FP8 release.

Files are written to a temporary name inside DST and moved into place with os.replace, so a reader never sees a
half-written file; checkpoints above `max_shard_size` are sharded with a `model.safetensors.index.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from .configuration import DeepseekConfig
from .fp8_format import FP8_QUANTIZATION_CONFIG, quantize_state_tensors


# Our config fields that the official files do not have.
TRAINING_ONLY_FIELDS = (
    "bias_update_speed",
    "use_bias_update",
    "seq_balance_alpha",
    "mtp_loss_weight",
    "mtp_loss_weight_late",
    "mtp_late_fraction",
    "mla_impl",
    "latent_cache_dtype",
    "index_cache_dtype",
    "dsa_impl",
)

# Fields copied unchanged, in the order of the official config.json (which is alphabetical).
_COPIED_FIELDS = (
    "attention_bias",
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
    "first_k_dense_replace",
    "hidden_act",
    "hidden_size",
    "initializer_range",
    "intermediate_size",
    "kv_lora_rank",
    "max_position_embeddings",
    "moe_intermediate_size",
    "moe_layer_freq",
    "n_group",
    "n_routed_experts",
    "n_shared_experts",
    "norm_topk_prob",
    "num_attention_heads",
    "num_experts_per_tok",
    "num_hidden_layers",
    "num_key_value_heads",
    "q_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "rms_norm_eps",
    "routed_scaling_factor",
    "scoring_func",
    "tie_word_embeddings",
    "topk_group",
    "topk_method",
    "use_cache",
    "v_head_dim",
    "vocab_size",
)

# Files of a source folder that belong in the export besides weights and config (tokenizer, generation defaults).
_SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
)

_FUSED_EXPERTS = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<name>gate_up_proj|down_proj)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


# ----------------------------------------------------------------------------------------------------------------
# config.json
def official_config_dict(config: DeepseekConfig, torch_dtype: torch.dtype | None = None, fp8: bool = False) -> dict:
    """The official config.json content for `config` (DeepSeek-V3 layout; V2 for softmax-routed models; V3.2, with
    its indexer fields, when the model has a lightning indexer)."""
    v3 = config.scoring_func == "sigmoid" or config.topk_method == "noaux_tc"
    kind = "V32" if config.index_topk is not None else "V3" if v3 else "V2"
    out: dict = {"architectures": [f"Deepseek{kind}ForCausalLM"], "model_type": f"deepseek_{kind.lower()}"}
    if config.index_topk is not None:
        out.update(index_topk=config.index_topk, index_n_heads=config.index_n_heads,
                   index_head_dim=config.index_head_dim)
    for name in _COPIED_FIELDS:
        out[name] = getattr(config, name)
    # The official names of the sequence-wise balance loss, and fields the official files always carry.
    out["aux_loss_alpha"] = config.seq_balance_alpha
    out["seq_aux"] = True
    out["ep_size"] = 1
    out["pretraining_tp"] = 1
    if v3:
        out["num_nextn_predict_layers"] = config.num_nextn_predict_layers
    if config.pad_token_id is not None:
        out["pad_token_id"] = config.pad_token_id
    if not config.rope_interleave:  # the official code always interleaves; transformers reads this field
        out["rope_interleave"] = False

    rope = dict(config.rope_parameters or {})
    out["rope_theta"] = rope.pop("rope_theta", None) or config.rope_theta
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    rope.pop("partial_rotary_factor", None)
    out["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}

    if torch_dtype is not None:
        out["torch_dtype"] = str(torch_dtype).removeprefix("torch.")
    if fp8:
        out["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    out["transformers_version"] = transformers.__version__
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------------------------------------------
# Tensors
def _source_tensors(src) -> tuple[DeepseekConfig, Iterator[tuple[str, torch.Tensor]], dict, Path | None]:
    """(config, iterator over (key, tensor), {"embed": ..., "head": ...}, source folder or None) for a folder or a
    model instance. The embedding and head are fetched up front: the MTP modules need their copies."""
    if isinstance(src, torch.nn.Module):
        if hasattr(src, "peft_config"):
            raise TypeError("export_official got a PEFT model: call merge_and_unload() first")
        config = src.config
        if getattr(config, "quantization_config", None) is not None:
            raise ValueError("export_official needs a full-precision model (this one is quantized)")
        state = src.state_dict()
        shared = {"embed": state.get("model.embed_tokens.weight"), "head": state.get("lm_head.weight")}
        return config, ((key, tensor.detach()) for key, tensor in state.items()), shared, None

    folder = Path(src)
    config = DeepseekConfig.from_pretrained(folder)
    if getattr(config, "quantization_config", None) is not None:
        raise ValueError(f"{folder} holds a quantized checkpoint; export from a full-precision one")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    elif (folder / "model.safetensors").is_file():
        with safe_open(folder / "model.safetensors", framework="pt") as f:
            weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {folder}")

    def read(key):
        if key not in weight_map:
            return None
        with safe_open(folder / weight_map[key], framework="pt") as f:
            return f.get_tensor(key)

    def from_files():
        for name in sorted(set(weight_map.values())):
            with safe_open(folder / name, framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)

    shared = {"embed": read("model.embed_tokens.weight"), "head": read("lm_head.weight")}
    return config, from_files(), shared, folder


def split_fused_experts(items) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) pairs with fused expert tensors split into DeepSeek's per-expert keys: [E, 2I, D] gate_up_proj
    -> gate (rows [0, I)) and up (rows [I, 2I)), [E, D, I] down_proj -> down. Everything else passes unchanged. The
    one splitter (the exporter and quant.fp8.quantize_checkpoint both use it)."""
    for key, tensor in items:
        fused = _FUSED_EXPERTS.match(key)
        if fused is None or tensor.ndim != 3:
            yield key, tensor
            continue
        prefix = fused["prefix"]
        for j in range(tensor.shape[0]):
            if fused["name"] == "gate_up_proj":
                gate, up = tensor[j].chunk(2, dim=0)
                yield f"{prefix}.{j}.gate_proj.weight", gate
                yield f"{prefix}.{j}.up_proj.weight", up
            else:
                yield f"{prefix}.{j}.down_proj.weight", tensor[j]


def _official_tensors(config, items, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """Rename / split our tensors into the official layout (per-expert keys, fp32 bias), casting floats to dtype."""
    for key, tensor in split_fused_experts(items):
        if key.endswith("e_score_correction_bias"):
            yield key, tensor.to(torch.float32)
        else:
            yield key, _cast(tensor, dtype)


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and tensor.is_floating_point():
        return tensor.to(dtype)
    return tensor


def _with_mtp_copies(config, tensors, embed, head) -> Iterator[tuple[str, torch.Tensor]]:
    """Add `embed_tokens.weight` and `shared_head.head.weight` to every MTP module, as the official files do.

    The copies are emitted next to the first tensor of each MTP layer; copies already in the source (an official
    checkpoint re-exported) are dropped and rebuilt from the main embedding and head.
    """
    N, D = config.num_hidden_layers, config.num_nextn_predict_layers
    if D and embed is None:
        raise ValueError("the checkpoint has no model.embed_tokens.weight to copy into the MTP modules")
    head = embed if head is None else head  # tied embeddings
    done: set[int] = set()
    for key, tensor in tensors:
        layer = _LAYER.match(key)
        if layer and int(layer.group(1)) >= N:
            if key.endswith((".embed_tokens.weight", ".shared_head.head.weight")):
                continue
            idx = int(layer.group(1))
            if idx not in done:
                done.add(idx)
                yield f"model.layers.{idx}.embed_tokens.weight", embed
                yield f"model.layers.{idx}.shared_head.head.weight", head
        yield key, tensor
    missing = set(range(N, N + D)) - done
    if missing:
        raise ValueError(f"the checkpoint lacks the MTP module(s) at model.layers.{sorted(missing)}")


# ----------------------------------------------------------------------------------------------------------------
# Writing
def _atomic_target(dst: Path, name: str) -> Path:
    fd, tmp = tempfile.mkstemp(dir=dst, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def write_json_atomic(path: Path, content: dict) -> None:
    tmp = _atomic_target(path.parent, path.name)
    try:
        tmp.write_text(json.dumps(content, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_shards(tensors, dst: Path, max_shard_bytes: int) -> tuple[dict[str, str], int, list[str]]:
    """Write tensors to shards of at most max_shard_bytes (one oversized tensor gets its own shard)."""
    temp_files: list[Path] = []
    shard_keys: list[list[str]] = []
    current: dict[str, torch.Tensor] = {}
    current_bytes = total = 0

    def flush():
        nonlocal current, current_bytes
        if not current:
            return
        tmp = _atomic_target(dst, "shard")
        temp_files.append(tmp)
        save_file(current, str(tmp), metadata={"format": "pt"})
        shard_keys.append(list(current))
        current, current_bytes = {}, 0

    try:
        seen = set()
        for key, tensor in tensors:
            if key in seen:
                raise ValueError(f"duplicate tensor {key}")
            seen.add(key)
            nbytes = tensor.numel() * tensor.element_size()
            if current and current_bytes + nbytes > max_shard_bytes:
                flush()
            # A private contiguous copy: slices of fused tensors and the MTP copies must not share storage.
            current[key] = tensor.detach().to("cpu").contiguous().clone()
            current_bytes += nbytes
            total += nbytes
        flush()
        n = len(temp_files)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for tmp, name in zip(temp_files, names):
            os.replace(tmp, dst / name)
    except BaseException:
        for tmp in temp_files:
            tmp.unlink(missing_ok=True)
        raise
    weight_map = {key: name for keys, name in zip(shard_keys, names) for key in keys}
    return weight_map, total, names


def _parse_size(size: int | str) -> int:
    return transformers.utils.hub.convert_file_size_to_int(size)


def export_official(
    src_or_model,
    dst: str | os.PathLike,
    fp8: bool = False,
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write `src_or_model` (a folder saved by our save_pretrained, or a DeepseekForCausalLM) to `dst` in the
    official DeepSeek-V3 layout. `dtype` casts the floating-point weights (default: keep them; the routing bias
    stays float32 always); `fp8=True` stores the projection weights as e4m3 with 128x128 block scales.
    Returns the destination folder.
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    config, items, shared, src_folder = _source_tensors(src_or_model)

    embed, head = (None if t is None else _cast(t, dtype) for t in (shared["embed"], shared["head"]))
    tensors = _with_mtp_copies(config, _official_tensors(config, items, dtype), embed, head)
    if fp8:
        tensors = quantize_state_tensors(tensors)
    weight_map, total, names = _write_shards(tensors, dst, _parse_size(max_shard_size))

    if dtype is None:  # config.json's torch_dtype: the dtype the (unquantized) embedding was written in
        key = "model.embed_tokens.weight"
        with safe_open(dst / weight_map[key], framework="pt") as f:
            stored = f.get_slice(key).get_dtype()
        dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(stored, torch.float32)
    index_path = dst / "model.safetensors.index.json"
    if len(names) > 1:
        write_json_atomic(index_path, {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json_atomic(dst / "config.json", official_config_dict(config, torch_dtype=dtype, fp8=fp8))

    # Side files: from the source folder, or the model's own generation config.
    if src_folder is not None:
        for name in _SIDE_FILES:
            if (src_folder / name).is_file() and (src_folder / name).resolve() != (dst / name).resolve():
                tmp = _atomic_target(dst, name)
                shutil.copyfile(src_folder / name, tmp)
                os.replace(tmp, dst / name)
    elif getattr(src_or_model, "generation_config", None) is not None:
        write_json_atomic(dst / "generation_config.json", src_or_model.generation_config.to_diff_dict())

    # Weight files of an earlier export to the same folder that this one did not rewrite.
    for stale in dst.glob("model*.safetensors"):
        if stale.name not in names:
            stale.unlink()
    if len(names) == 1 and index_path.exists():
        index_path.unlink()
    return dst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_deepseek.export",
        description="Write a checkpoint in the official DeepSeek-V3 layout (per-expert keys, MTP with its copies).",
    )
    parser.add_argument("src", help="folder written by DeepseekForCausalLM.save_pretrained")
    parser.add_argument("dst", help="output folder")
    parser.add_argument("--fp8", action="store_true", help="e4m3 projection weights with 128x128 weight_scale_inv")
    parser.add_argument("--dtype", default=None, help="cast weights, e.g. bfloat16 (default: keep the source dtype)")
    parser.add_argument("--max-shard-size", default="5GB", help="shard above this size (default 5GB)")
    args = parser.parse_args(argv)
    out = export_official(args.src, args.dst, fp8=args.fp8, dtype=args.dtype, max_shard_size=args.max_shard_size)
    print(f"exported {args.src} -> {out}")


if __name__ == "__main__":
    main()
