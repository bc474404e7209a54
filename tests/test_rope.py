"""Rotary embeddings built from the config: linear and dynamic NTK scaling as transformers computes them, and a rope
type the model does not implement raises where the model is built, also when the config was edited afterwards."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import hf_v3_model, max_diff, random_ids, save_and_load_ours, tiny_config, tiny_model
from modeling_deepseek import DeepseekForCausalLM, DeepseekModel
from modeling_deepseek.rope import DeepseekRotaryEmbedding


def test_dynamic_ntk_matches_transformers_and_changes_only_long_inputs(tmp_path):
    rope = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}
    hf = hf_v3_model(rope_parameters=rope, max_position_embeddings=16)
    ours = save_and_load_ours(hf, tmp_path)
    plain = tiny_model(max_position_embeddings=16)
    plain.load_state_dict(ours.state_dict())
    for T in (10, 40, 12):  # short, long (frequencies rescaled), short again (the trained frequencies come back)
        ids = random_ids(1, T)
        with torch.no_grad():
            got, unscaled = ours(ids).logits, plain(ids).logits
            assert max_diff(got, hf(ids).logits) < 1e-4, T
        if T <= 16:
            assert max_diff(got, unscaled) < 1e-5, T
        else:
            assert max_diff(got, unscaled) > 1e-3, T


def test_rope_frequencies_linear_and_dynamic():
    """transformers' frequency properties, on our rotary embedding: linear scaling maps position x to x / factor;
    dynamic NTK leaves inputs within max_position_embeddings alone and lowers the frequencies beyond."""
    config = tiny_config()
    x = torch.zeros(1)
    short, long = torch.arange(10)[None], torch.arange(int(config.max_position_embeddings * 1.5))[None]

    def rope(**params):
        c = copy.deepcopy(config)
        c.rope_parameters = {"rope_theta": 10000.0, **params}
        return DeepseekRotaryEmbedding(c)

    default = rope(rope_type="default")
    cos_long, sin_long = default(x, long)
    linear_cos, linear_sin = rope(rope_type="linear", factor=10.0)(x, long)
    for p in range(0, long.shape[1], 10):
        torch.testing.assert_close(linear_cos[:, p], cos_long[:, p // 10])
        torch.testing.assert_close(linear_sin[:, p], sin_long[:, p // 10])
    ntk = rope(rope_type="dynamic", factor=10.0)
    for a, b in zip(ntk(x, short), default(x, short)):
        torch.testing.assert_close(a, b)
    ntk_cos_long, _ = ntk(x, long)
    assert max_diff(ntk_cos_long, cos_long) > 1e-3
    assert (ntk.inv_freq <= default.inv_freq * (1 + torch.finfo(torch.float32).eps)).all()
    assert (ntk.inv_freq < default.inv_freq).any()


def test_linear_rope_scaling_is_applied():
    ids = random_ids(1, 10)
    plain = tiny_model()
    scaled = tiny_model(rope_scaling={"rope_type": "linear", "factor": 4.0})
    with torch.no_grad():
        assert max_diff(plain(ids).logits, scaled(ids).logits) > 1e-3


@pytest.mark.parametrize("rope_type", ["longrope", "ntk-by-parts"])
def test_unsupported_rope_type_raises_where_the_model_is_built(rope_type):
    with pytest.raises(ValueError, match=f"`rope_scaling` type '{rope_type}' is not supported"):
        tiny_config(rope_scaling={"rope_type": rope_type, "factor": 2.0})
    config = tiny_config()
    config.rope_parameters = {"rope_type": rope_type, "factor": 2.0, "rope_theta": 10000.0}  # edited afterwards
    for build_it in (DeepseekRotaryEmbedding, DeepseekModel, DeepseekForCausalLM):
        with pytest.raises(ValueError, match=f"rope_type.*{rope_type}"):
            build_it(config)
