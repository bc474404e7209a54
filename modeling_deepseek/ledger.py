"""The cost ledger: what a config costs, computed on the meta device (no memory, any size).

    python -m modeling_deepseek.ledger hub_configs/deepseek-v3 [--json] [--context 4096]

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a folder with config.json, or a config.json file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--context", type=int, default=4096, help="context length for the attention FLOPs")
    args = parser.parse_args(argv)
    row = ledger(load_config(args.config), context=args.context)
    print(json.dumps(row) if args.json else format_table(row))


if __name__ == "__main__":
    main()
