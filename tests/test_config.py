"""DeepseekConfig: validation errors name the field, serialisation round trips, V3 defaults of the training knobs."""

from __future__ import annotations

import pytest

from conftest import YARN, tiny_config, tiny_kwargs
from modeling_deepseek import DeepseekConfig


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(n_routed_experts=9, n_group=2), "n_routed_experts"),  # 9 experts cannot split in 2 groups
        (dict(n_group=2, topk_group=3), "topk_group"),
        # 8 experts in 4 groups of 2, only 1 group kept: 2 reachable experts, 3 asked for.
        (dict(n_group=4, topk_group=1, num_experts_per_tok=3), "num_experts_per_tok"),
        pytest.param(
            dict(qk_rope_head_dim=7), "qk_rope_head_dim"
        ),
        (dict(kv_lora_rank=0), "kv_lora_rank"),
        (dict(kv_lora_rank=-4), "kv_lora_rank"),
        (dict(scoring_func="tanh"), "scoring_func"),
        (dict(topk_method="best_of_n"), "topk_method"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(hidden_size=-64), "hidden_size"),
        (dict(num_attention_heads=0), "num_attention_heads"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(mla_impl="fused"), "mla_impl"),
        (dict(latent_cache_dtype="int8"), "latent_cache_dtype"),
        (dict(prefill_chunk_tokens=0), "prefill_chunk_tokens"),
        (dict(prefill_chunk_tokens=512.0), "prefill_chunk_tokens"),
    ],
    ids=lambda x: x if isinstance(x, str) else "-".join(f"{k}={v}" for k, v in x.items()),
)
def test_invalid_config_raises_naming_the_field(overrides, field):
    with pytest.raises(ValueError) as excinfo:
        tiny_config(**overrides)
    assert field in str(excinfo.value)


# A dense config: no MoE layer (first_k_dense_replace covers every layer) and no MTP module.
DENSE = dict(first_k_dense_replace=3, num_nextn_predict_layers=0)
DENSE_INVALID = [
    (dict(mla_impl="fused"), "mla_impl"),
    (dict(latent_cache_dtype="int8"), "latent_cache_dtype"),
    (dict(prefill_chunk_tokens=0), "prefill_chunk_tokens"),
    (dict(prefill_chunk_tokens=512.0), "prefill_chunk_tokens"),
    (dict(bias_update_speed=-0.1), "bias_update_speed"),
    (dict(seq_balance_alpha=-0.1), "seq_balance_alpha"),
    (dict(mtp_loss_weight=-0.1), "mtp_loss_weight"),
    (dict(mtp_loss_weight_late=-0.1), "mtp_loss_weight_late"),
    (dict(mtp_late_fraction=1.5), "mtp_late_fraction"),
    (dict(n_routed_experts=9, n_group=2), "n_routed_experts"),
    (dict(topk_method="best_of_n"), "topk_method"),
    (dict(moe_intermediate_size=0), "moe_intermediate_size"),
    (dict(hidden_act="swishy"), "hidden_act"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
    (dict(routed_scaling_factor=-1.0), "routed_scaling_factor"),
    (dict(attention_dropout=1.0), "attention_dropout"),
]


def test_dense_tiny_config_builds():
    cfg = tiny_config(**DENSE)
    assert not any(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))


@pytest.mark.parametrize("overrides, field", DENSE_INVALID,
                         ids=lambda x: x if isinstance(x, str) else "-".join(f"{k}={v}" for k, v in x.items()))
def test_invalid_field_on_a_dense_config_raises_naming_it(overrides, field):
    """Every field is validated on a dense config too, where no routing code would ever read it."""
    with pytest.raises(ValueError, match=f"`{field}`"):
        tiny_config(**DENSE, **overrides)


@pytest.mark.parametrize("overrides, field", [(dict(mla_impl="fast"), "mla_impl"),
                                             (dict(latent_cache_dtype="int4"), "latent_cache_dtype"),
                                             (dict(n_group=3), "n_group")])
def test_from_pretrained_overrides_are_validated(tmp_path, overrides, field):
    """Keyword overrides of from_pretrained / AutoConfig are set after __init__ has validated the file: they are
    checked like a value in config.json."""
    from transformers import AutoConfig

    import modeling_deepseek  # noqa: F401  (registers the config with AutoConfig)

    tiny_config(**DENSE).save_pretrained(tmp_path)
    for loader in (DeepseekConfig, AutoConfig):
        with pytest.raises(ValueError, match=f"`{field}`"):
            loader.from_pretrained(tmp_path, **overrides)
    assert DeepseekConfig.from_pretrained(tmp_path, mla_impl="absorbed").mla_impl == "absorbed"


def test_latent_cache_dtype_argument_follows_the_config_rule():
    """generate()'s latent_cache_dtype, as an argument or on a generation config, is checked by the config's rule."""
    from transformers import GenerationConfig

    from conftest import random_ids, tiny_model

    model, ids = tiny_model(seed=0).eval(), random_ids(1, 4)
    with pytest.raises(ValueError, match="`latent_cache_dtype` must be None or 'fp8', got 'int4'"):
        model.generate(ids, max_new_tokens=1, latent_cache_dtype="int4")
    gc = GenerationConfig(max_new_tokens=1, do_sample=False)
    gc.latent_cache_dtype = "int4"
    with pytest.raises(ValueError, match="`latent_cache_dtype` must be None or 'fp8', got 'int4'"):
        model.generate(ids, generation_config=gc)


def test_num_experts_per_tok_limit_is_exact():
    # 8 experts, 4 groups of 2, keep 2 groups -> exactly 4 experts reachable: 4 is fine, 5 is not.
    tiny_config(n_group=4, topk_group=2, num_experts_per_tok=4)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        tiny_config(n_group=4, topk_group=2, num_experts_per_tok=5)


def test_valid_tiny_config_builds():
    cfg = tiny_config()
    assert cfg.model_type == "deepseek"
    assert cfg.scoring_func == "sigmoid"  # implied by noaux_tc
    assert cfg.qk_head_dim == 24 and cfg.head_dim == 8
    assert cfg.latent_cache_dim == 32 + 8
    assert [cfg.is_moe_layer(i) for i in range(4)] == [False, True, True, True]


def test_v2_topk_method_implies_softmax():
    cfg = tiny_config(topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0)
    assert cfg.scoring_func == "softmax"


def test_to_dict_from_dict_round_trip():
    cfg = tiny_config(rope_scaling=YARN, q_lora_rank=None, seq_balance_alpha=0.5, bias_update_speed=0.01,
                      mtp_loss_weight=0.1, num_nextn_predict_layers=2, rope_interleave=False)
    d = cfg.to_dict()
    assert d["model_type"] == "deepseek"
    again = DeepseekConfig.from_dict(d)
    for key in list(tiny_kwargs()) + ["seq_balance_alpha", "bias_update_speed", "mtp_loss_weight", "rope_interleave",
                                      "topk_method", "scoring_func", "routed_scaling_factor", "norm_topk_prob",
                                      "use_bias_update"]:
        assert getattr(again, key) == getattr(cfg, key), key
    assert again.rope_parameters["rope_type"] == "yarn"
    assert again.rope_parameters["factor"] == 4.0
    assert again.rope_parameters == cfg.rope_parameters
    assert again.to_dict() == d


def test_json_round_trip(tmp_path):
    cfg = tiny_config(rope_scaling=YARN)
    cfg.save_pretrained(tmp_path)
    again = DeepseekConfig.from_pretrained(tmp_path)
    assert again.to_dict() == cfg.to_dict()


def test_legacy_rope_scaling_type_key_is_normalised():
    cfg = tiny_config(rope_scaling={k if k != "rope_type" else "type": v for k, v in YARN.items()})
    assert cfg.rope_parameters["rope_type"] == "yarn"
    assert "type" not in cfg.rope_parameters


def test_v3_training_knob_defaults():
    cfg = DeepseekConfig()
    assert cfg.bias_update_speed == 0.001
    assert cfg.seq_balance_alpha == 0.0001
    assert cfg.mtp_loss_weight == 0.3
    assert cfg.use_bias_update is True
    # the V3 architecture defaults they go with
    assert cfg.topk_method == "noaux_tc" and cfg.scoring_func == "sigmoid"
    assert cfg.n_routed_experts == 256 and cfg.num_experts_per_tok == 8
    assert cfg.n_group == 8 and cfg.topk_group == 4
    assert cfg.routed_scaling_factor == 2.5 and cfg.norm_topk_prob is True
    assert cfg.num_nextn_predict_layers == 1
    assert cfg.kv_lora_rank == 512 and cfg.qk_rope_head_dim == 64


@pytest.mark.parametrize("name", ["bias_update_speed", "seq_balance_alpha", "mtp_loss_weight"])
def test_negative_training_knobs_rejected(name):
    with pytest.raises(ValueError, match=name):
        tiny_config(**{name: -0.1})


def test_attribute_map_aliases():
    cfg = tiny_config()
    assert cfg.num_local_experts == cfg.n_routed_experts == 8
    assert cfg.num_mtp_layers == cfg.num_nextn_predict_layers == 1
