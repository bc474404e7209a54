"""Loading policy: strict from_pretrained (a missing weight raises naming it, unless allow_missing_weights), the weights
that may be missing on purpose (a new task head, the MTP module transformers drops, a checkpoint holding none, tied
weights) initialised as transformers initialises them, and the refusal to save weights kept in FP8."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from conftest import hf_v3_model, tiny_config, tiny_model
from modeling_deepseek import (DeepseekForCausalLM, DeepseekForSequenceClassification, DeepseekForTokenClassification,
                               DeepseekModel)
from modeling_deepseek.fp8 import DeepseekFP8Linear
from test_checkpoint import saved_keys
from test_conventions import ALL_CLASSES, build


# ---------------------------------------------------------------------------------------------------------------------
# A weight the checkpoint should hold and does not


def test_missing_weight_raises(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    key = "model.layers.0.self_attn.kv_b_proj.weight"
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd[key]
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(OSError, match=key.replace(".", r"\.")):
        DeepseekForCausalLM.from_pretrained(tmp_path)
    # explicit opt-out
    loaded = DeepseekForCausalLM.from_pretrained(tmp_path, allow_missing_weights=True)
    assert loaded.model.layers[0].self_attn.kv_b_proj.weight.shape == (4 * 32, 32)


def test_missing_bias_raises(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    key = "model.layers.2.mlp.gate.e_score_correction_bias"
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd[key]
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(OSError, match="e_score_correction_bias"):
        DeepseekForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("model_class, head_key", [(DeepseekForSequenceClassification, "score.weight"),
                                                   (DeepseekForCausalLM, "lm_head.weight")])
def test_a_checkpoint_holding_part_of_the_weights_still_raises(tmp_path, model_class, head_key):
    model = build(model_class, num_labels=1)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights[head_key]  # saved from this very class: the head is truncated, not new
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(OSError, match=re.escape(head_key)):
        model_class.from_pretrained(tmp_path)
    del weights["model.layers.1.self_attn.kv_b_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(OSError, match="kv_b_proj"):
        model_class.from_pretrained(tmp_path)


def test_a_checkpoint_of_the_same_task_must_bring_its_head(tmp_path):
    """transformers' DeepseekV3ForCausalLM saved without lm_head is a truncated causal LM for ours, not a new head."""
    hf_v3_model().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(OSError, match="lm_head.weight"):
        DeepseekForCausalLM.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# Weights missing on purpose


def test_missing_mtp_weights_are_optional(tmp_path):
    """transformers' DeepseekV3 drops MTP weights on save: such checkpoints load, with a fresh MTP module."""
    hf = hf_v3_model()
    hf.save_pretrained(tmp_path)
    assert not any(k.startswith("model.layers.3.") for k in saved_keys(tmp_path))
    loaded = DeepseekForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.num_nextn_predict_layers == 1 and len(loaded.model.layers) == 4


@pytest.mark.parametrize("saved_class, loaded_class, new_key", [
    (DeepseekModel, DeepseekForCausalLM, "lm_head.weight"),
    (DeepseekForCausalLM, DeepseekForSequenceClassification, "score.weight"),
    (DeepseekForCausalLM, DeepseekForTokenClassification, "score.weight"),
])
def test_a_checkpoint_into_a_new_head_warns_naming_it(tmp_path, saved_class, loaded_class, new_key):
    """A checkpoint of another class (a base model, a causal LM) brings no head: the new one is initialised, with a
    warning naming the class it was saved from and the head's weight; the shared backbone loads as saved."""
    saved = build(saved_class)
    saved.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=rf"{saved_class.__name__}.*{re.escape(new_key)}"):
        loaded = loaded_class.from_pretrained(tmp_path, num_labels=2, pad_token_id=0)
    backbone = saved if saved_class is DeepseekModel else saved.model
    assert torch.equal(loaded.model.layers[1].self_attn.kv_b_proj.weight, backbone.layers[1].self_attn.kv_b_proj.weight)


@pytest.fixture
def seeded_init(monkeypatch):
    """Every weight initialisation starts from one seed (transformers' own test does the same), so that a model built
    by __init__ and one whose weights are all initialised by from_pretrained can be compared exactly."""
    original = PreTrainedModel._initialize_weights

    def seeded(*args, **kwargs):
        torch.manual_seed(42)
        return original(*args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "_initialize_weights", seeded)


@pytest.mark.parametrize("model_class", ALL_CLASSES)
def test_every_weight_missing_on_purpose_is_initialised(seeded_init, model_class):
    config = tiny_config(pad_token_id=0)
    from_init = model_class(copy.deepcopy(config))
    with pytest.warns(UserWarning, match="holds none of the model's weights"):
        loaded = model_class.from_pretrained(None, config=copy.deepcopy(config), state_dict={})
    on_meta = [n for n, t in [*loaded.named_parameters(), *loaded.named_buffers()] if t.device.type == "meta"]
    assert on_meta == []
    expected, got = from_init.state_dict(), loaded.state_dict()
    assert sorted(expected) == sorted(got)
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []


@pytest.mark.parametrize("model_class", ALL_CLASSES)
@pytest.mark.parametrize("tied", [False, True])
def test_a_checkpoint_without_any_weight_reports_every_one_missing(tmp_path, model_class, tied):
    model = build(model_class, tie_word_embeddings=tied)
    model.save_pretrained(tmp_path)
    save_file({"tensor": torch.tensor([1, 2])}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="holds none"):
        reloaded, info = model_class.from_pretrained(tmp_path, output_loading_info=True)
    params = {n for n, _ in reloaded.named_parameters()} | set(reloaded.state_dict())
    missing = set(info["missing_keys"])
    assert missing <= params
    assert params - missing <= ({"lm_head.weight"} if tied else set())  # a tied head follows the embedding


# ---------------------------------------------------------------------------------------------------------------------
# Saving


def test_fp8_kept_model_refuses_to_save(model, tmp_path):
    layer = model.model.layers[0].self_attn
    layer.o_proj = DeepseekFP8Linear.from_linear(layer.o_proj)
    with pytest.raises(ValueError, match="FP8.*o_proj"):
        model.save_pretrained(tmp_path)
