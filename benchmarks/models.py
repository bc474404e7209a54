"""The models the benchmarks compare: the reference shape, one random checkpoint, and the loaders of both models.

The peer is transformers' own `DeepseekV3ForCausalLM`. Both models read the very same weights: the peer is built from
a `DeepseekV3Config` with a fixed seed, its random initialisation saved with `save_pretrained` to a folder, and that
folder is loaded by `DeepseekV3ForCausalLM.from_pretrained` (peer) and `DeepseekForCausalLM.from_pretrained` (ours).
"""

from __future__ import annotations

import os

from benchmarks.harness import quiet

import torch

# The reference shape ("a 3-layer 512-wide model"), V3-style routing (sigmoid, noaux_tc, group-limited).
REFERENCE_SHAPE = dict(
    vocab_size=4096,
    hidden_size=512,
    num_hidden_layers=3,
    num_attention_heads=8,
    q_lora_rank=192,
    kv_lora_rank=128,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
    intermediate_size=1024,
    moe_intermediate_size=256,
    n_routed_experts=16,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
    max_position_embeddings=8192,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def peer_config(**overrides):
    from transformers import DeepseekV3Config

    kwargs = dict(REFERENCE_SHAPE, num_mtp_layers=0)
    kwargs.update(overrides)
    return DeepseekV3Config(**kwargs)


def make_checkpoint(path: str | os.PathLike, seed: int = 0, **config_overrides) -> dict:
    """Random weights in transformers' DeepseekV3 format, saved to `path`. Returns the config as a dict.

    Weights come from the peer's own initialisation (normal(0, initializer_range) for linear and expert weights);
    the routers' `e_score_correction_bias` gets small random values so that loading it is exercised too.
    """
    from transformers import DeepseekV3ForCausalLM

    quiet()
    torch.manual_seed(seed)
    config = peer_config(**config_overrides)
    model = DeepseekV3ForCausalLM(config)
    randomize_routing_bias_(model)
    model.save_pretrained(str(path))
    return config.to_dict()


@torch.no_grad()
def randomize_routing_bias_(model) -> None:
    """Small random values in the routers' `e_score_correction_bias` (zeros at init), so that loading it counts."""
    for module in model.modules():
        bias = getattr(module, "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor):
            bias.uniform_(-0.02, 0.02)


def load_peer(path, dtype: torch.dtype, device: str, **kwargs):
    from transformers import DeepseekV3ForCausalLM

    quiet()
    model = DeepseekV3ForCausalLM.from_pretrained(str(path), dtype=dtype, **kwargs)
    return model.to(device).eval()


def load_ours(path, dtype: torch.dtype, device: str, **config_overrides):
    from modeling_deepseek import DeepseekForCausalLM

    quiet()
    config_overrides.setdefault("num_nextn_predict_layers", 0)
    allow_missing = config_overrides.pop("allow_missing_weights", False)
    model = DeepseekForCausalLM.from_pretrained(
        str(path), dtype=dtype, allow_missing_weights=allow_missing, **config_overrides
    )
    return model.to(device).eval()
