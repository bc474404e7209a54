"""The cost ledger: what a config costs, computed on the meta device (no memory, any size).

    python -m modeling_deepseek.ledger hub_configs/deepseek-v3 [--json] [--context 4096]
    python -m modeling_deepseek.ledger hub_configs/deepseek-v3 --tp 8 --ep 8      (bytes per rank, from the plans)

For DeepSeek-V3 it reports 671B total parameters, ~37.5B active per token, ~11.5B in the MTP module, and a KV cache
of 576 x 61 x 2 = 70,272 bf16 bytes per token against 4,997,120 for the multi-head-attention equivalent (71x).

- total_params: the main model (embedding, all layers, final norm, head); MTP modules are listed separately.
- active_params: parameters one token touches: everything but the (E - K) routed experts it does not visit.
- kv_cache_bytes_per_token: MLA caches the latent and the shared RoPE key, kv_lora_rank + qk_rope_head_dim values
  per layer; mha_kv_cache_bytes_per_token: the per-head K (nope + rope) and V that MLA replaces.
- flops_per_token: forward multiply-adds x 2 over the active weights, plus attention scores and weighted sums over
  `context` cached tokens (expanded form, as in training); training is ~3x that.
- mtp_flops_per_token: the same for the MTP modules when they train: each module's active weights, its attention,
  and one more pass through the shared output head. mtp_train_overhead = mtp_flops_per_token / flops_per_token is
  the share MTP adds to a training step: 3.7% for V3 at 4K context (one MTP module next to 61 layers), 40% for the
  4-layer `small` demo config.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .configuration import DeepseekConfig
from .modeling import DeepseekForCausalLM

BF16_BYTES = 2


def load_config(path: str | Path) -> DeepseekConfig:
    path = Path(path)
    if path.is_file():
        return DeepseekConfig.from_dict(json.loads(path.read_text()))
    return DeepseekConfig.from_pretrained(str(path))


def ledger(config: DeepseekConfig, context: int = 4096) -> dict:
    with torch.device("meta"):
        model = DeepseekForCausalLM(config)
    N = config.num_hidden_layers
    D = config.num_nextn_predict_layers
    inactive_share = 1 - config.num_experts_per_tok / config.n_routed_experts
    main_params = mtp_params = main_inactive = mtp_inactive = 0
    for name, p in model.named_parameters():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        is_mtp = layer is not None and layer >= N
        inactive = p.numel() * inactive_share if ".mlp.experts." in name else 0
        if is_mtp:
            mtp_params, mtp_inactive = mtp_params + p.numel(), mtp_inactive + inactive
        else:
            main_params, main_inactive = main_params + p.numel(), main_inactive + inactive

    active = main_params - int(round(main_inactive))
    head_params = model.lm_head.weight.numel()
    H = config.num_attention_heads
    qk, v = config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim
    attn_flops_per_layer = 2 * H * (qk + v) * context
    attn_flops = N * attn_flops_per_layer
    mtp_flops = 2 * (mtp_params - int(round(mtp_inactive)) + D * head_params) + D * attn_flops_per_layer
    return {
        "config": config.name_or_path or None,
        "total_params": main_params,
        "active_params": active,
        "mtp_params": mtp_params,
        "kv_cache_values_per_token_per_layer": config.latent_cache_dim,
        "kv_cache_bytes_per_token": config.latent_cache_dim * N * BF16_BYTES,
        "mha_kv_cache_bytes_per_token": H * (qk + v) * N * BF16_BYTES,
        "kv_cache_reduction": H * (qk + v) / config.latent_cache_dim,
        "context": context,
        "flops_per_token": 2 * active + attn_flops,
        "train_flops_per_token": 3 * (2 * active + attn_flops),
        "mtp_flops_per_token": mtp_flops,
        "mtp_train_overhead": mtp_flops / (2 * active + attn_flops),
    }


# Plan styles that split a weight over the ranks of their group (the others keep it whole: mla_kv_a_proj, replicate).
TP_SPLITTING = ("colwise", "rowwise", "colwise_gather_output", "colwise_rep", "rowwise_rep", "rowwise_split_input",
                "embedding_rowwise", "embedding_colwise", "packed_colwise", "packed_rowwise")
EP_SPLITTING = ("grouped_gemm",)


def _plan_matcher(plan: dict[str, str], styles: tuple[str, ...]):
    """name -> whether a rule of `plan` with a splitting style names it (or the module holding it)."""
    import re

    rules = [re.compile(re.escape(k).replace(r"\*", r"\d+")) for k, style in plan.items() if style in styles]
    return lambda name: any(r.fullmatch(name) or r.fullmatch(name.rpartition(".")[0]) for r in rules)


def parallel_bytes(config: DeepseekConfig, tp_size: int = 1, ep_size: int = 1, fsdp_size: int = 1,
                   split_heads: bool = True, weight_bytes: float = BF16_BYTES) -> dict:
    """Bytes of weights and of latent cache one rank holds under DistributedConfig(tp_size, ep_size, fsdp_size),
    from the model's own plans (configuration.py, modeling.py) applied to a meta-device model, MTP included.

    Tensor parallelism splits what its plan splits (heads, MLPs, embedding, head) by tp_size; expert parallelism the
    routed experts by ep_size, and FSDP what remains over its ranks (experts over fsdp * tp / ep). The latent cache
    is computed whole on every tensor-parallel rank (one latent per token, shared by the heads), so a rank holds the
    cache of every sequence its tensor-parallel group serves: 576 x 61 x 2 B per token for V3 at any tp_size.
    `split_heads=False` is DistributedConfig(tp_size=N, tp_plan={}, ep_size=N): expert parallelism alone over the
    tensor-parallel ranks, the rest whole."""
    if ep_size > 1 and (ep_size % tp_size or (fsdp_size * tp_size) % ep_size):
        raise ValueError(f"ep_size={ep_size} must be a multiple of tp_size={tp_size} and divide fsdp_size * tp_size "
                         f"= {fsdp_size * tp_size} (transformers' DistributedConfig)")
    with torch.device("meta"):
        model = DeepseekForCausalLM(config)
    ep_plan = model.ep_plan if ep_size > 1 else {}
    tp_plan = model.tp_plan if tp_size > 1 and split_heads else {}
    in_ep, in_tp = _plan_matcher(ep_plan, EP_SPLITTING), _plan_matcher(tp_plan, TP_SPLITTING)
    efsdp = fsdp_size * tp_size // ep_size if ep_size > 1 else fsdp_size
    held = {"routed_experts": 0.0, "tensor_parallel": 0.0, "whole": 0.0}
    total = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if in_ep(name):
            held["routed_experts"] += p.numel() / (ep_size * efsdp)
        elif in_tp(name):
            held["tensor_parallel"] += p.numel() / (tp_size * fsdp_size)
        elif ".mlp.experts." in name:
            held["routed_experts"] += p.numel() / fsdp_size
        else:
            held["whole"] += p.numel() / fsdp_size
    weights = sum(held.values()) * weight_bytes
    return {
        "tp_size": tp_size, "ep_size": ep_size, "fsdp_size": fsdp_size, "split_heads": split_heads,
        "weight_bytes_per_rank": int(round(weights)),
        "weight_bytes_total": total * weight_bytes,
        "weight_bytes_by_kind": {k: int(round(v * weight_bytes)) for k, v in held.items()},
        "latent_cache_bytes_per_token_per_rank": config.latent_cache_dim * config.num_hidden_layers * BF16_BYTES,
        "mha_cache_bytes_per_token_per_rank": (config.num_attention_heads // (tp_size if split_heads else 1)) * (
            config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim) * config.num_hidden_layers
        * BF16_BYTES,
    }


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def format_table(row: dict) -> str:
    lines = [
        ("total parameters (no MTP)", _human(row["total_params"])),
        ("active parameters / token", _human(row["active_params"])),
        ("MTP parameters (unique)", _human(row["mtp_params"])),
        ("KV cache / token, MLA latent (bf16)", f"{row['kv_cache_bytes_per_token']:,} B"),
        ("KV cache / token, MHA equivalent (bf16)", f"{row['mha_kv_cache_bytes_per_token']:,} B"),
        ("KV cache reduction", f"{row['kv_cache_reduction']:.1f}x"),
        (f"forward FLOPs / token @ {row['context']} ctx", _human(row["flops_per_token"])),
        ("training FLOPs / token", _human(row["train_flops_per_token"])),
        ("MTP forward FLOPs / token", _human(row["mtp_flops_per_token"])),
        ("MTP share added to training", f"{100 * row['mtp_train_overhead']:.1f}%"),
    ]
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)


def format_parallel(row: dict) -> str:
    gb = 1e9
    kinds = row["weight_bytes_by_kind"]
    lines = [
        ("layout", f"tp_size={row['tp_size']} ep_size={row['ep_size']} fsdp_size={row['fsdp_size']}"
                   + ("" if row["split_heads"] else " tp_plan={}")),
        ("weights / rank (bf16)", f"{row['weight_bytes_per_rank'] / gb:.1f} GB of {row['weight_bytes_total'] / gb:.1f}"),
        ("  routed experts", f"{kinds['routed_experts'] / gb:.1f} GB"),
        ("  tensor-parallel split", f"{kinds['tensor_parallel'] / gb:.1f} GB"),
        ("  whole on the rank", f"{kinds['whole'] / gb:.1f} GB"),
        ("latent cache / token / rank (bf16)", f"{row['latent_cache_bytes_per_token_per_rank']:,} B"),
        ("MHA cache / token / rank (bf16)", f"{row['mha_cache_bytes_per_token_per_rank']:,} B"),
    ]
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a folder with config.json, or a config.json file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--context", type=int, default=4096, help="context length for the attention FLOPs")
    parser.add_argument("--tp", type=int, default=1, help="with --tp / --ep / --fsdp: bytes per rank instead")
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--fsdp", type=int, default=1)
    parser.add_argument("--no-split-heads", action="store_true", help="tp_plan={}: expert parallelism alone")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    if (args.tp, args.ep, args.fsdp) != (1, 1, 1):
        row = parallel_bytes(config, args.tp, args.ep, args.fsdp, split_heads=not args.no_split_heads)
        print(json.dumps(row) if args.json else format_parallel(row))
        return
    row = ledger(config, context=args.context)
    print(json.dumps(row) if args.json else format_table(row))


if __name__ == "__main__":
    main()
