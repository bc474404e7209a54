"""The conventions transformers' own DeepseekV3 honours, checked on ours case by case (the cases of transformers'
common model tests that failed or were skipped for our classes, written here as behaviour):

- output capturing: `_can_record_outputs` declares hidden states, attentions and router logits; transformers'
  capture_outputs records them (specific hidden-state layers too), the config's flags count, and the MTP modules add
  nothing;
- RoPE built from the config: dynamic NTK scaling as transformers computes it, and a rope type the model does not
  implement raises where the model is built, also when the config was edited after construction;
- the loader: every weight missing on purpose, a new task head and tied weights load as transformers loads them; a
  checkpoint holding only part of the weights raises;
- a caller's 4-D attention mask (sequences packed in one row, a shared prefix) in every attention path, against each
  sequence run alone;
- DeepseekForSequenceClassification / DeepseekForTokenClassification, registered with the Auto classes; a reward model
  trained with TRL's RewardTrainer and used as a GRPO reward.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoModelForTokenClassification, PreTrainedModel)
from transformers.modeling_layers import GenericForSequenceClassification, GenericForTokenClassification

from conftest import TINY, hf_v3_model, max_diff, random_ids, save_and_load_ours, set_mla_impl, tiny_config, tiny_model
from modeling_deepseek import (DeepseekConfig, DeepseekForCausalLM, DeepseekForSequenceClassification,
                               DeepseekForTokenClassification, DeepseekModel)
from modeling_deepseek.cache import DeepseekLatentCache
from modeling_deepseek.compat import OutputRecorder
from modeling_deepseek.rope import DeepseekRotaryEmbedding

ALL_CLASSES = (DeepseekModel, DeepseekForCausalLM, DeepseekForSequenceClassification, DeepseekForTokenClassification)
N_LAYERS, N_MOE = TINY["num_hidden_layers"], TINY["num_hidden_layers"] - TINY["first_k_dense_replace"]


def build(model_class, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return model_class(tiny_config(pad_token_id=0, **overrides)).eval()


# ---------------------------------------------------------------------------------------------------------------------
# Output capturing


@pytest.mark.parametrize("model_class", ALL_CLASSES)
def test_every_class_declares_what_output_capturing_records(model_class):
    model = build(model_class)
    declared = model._can_record_outputs
    assert set(declared) == {"hidden_states", "attentions", "router_logits"}
    assert all(isinstance(v, (type, OutputRecorder)) for v in declared.values())
    ids = random_ids(2, 6)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, output_attentions=True, output_router_logits=True)
    assert len(out.hidden_states) == N_LAYERS + 1 and len(out.attentions) == N_LAYERS
    if "router_logits" in out:  # the base model and the causal LM carry them (MoE outputs)
        assert len(out.router_logits) == N_MOE
        assert all(r.shape == (2 * 6, TINY["n_routed_experts"]) for r in out.router_logits)


def test_mtp_modules_add_nothing_to_the_captured_outputs():
    """With labels the MTP module (a decoder block at model.layers.N) runs after the main stack; the outputs are those
    of the main stack alone, equal to what the base model records."""
    model = tiny_model()
    ids = random_ids(2, 8)
    flags = dict(output_hidden_states=True, output_attentions=True, output_router_logits=True)
    with torch.no_grad():
        with_mtp = model(ids, labels=ids, **flags)
        base = model.model(ids, **flags)
    assert with_mtp.mtp_loss is not None
    for name, n in (("hidden_states", N_LAYERS + 1), ("attentions", N_LAYERS), ("router_logits", N_MOE)):
        got, expected = getattr(with_mtp, name), getattr(base, name)
        assert len(got) == len(expected) == n, name
        assert all(torch.equal(g, e) for g, e in zip(got, expected)), name
    # the last hidden state is the one after model.norm, as transformers ties it
    assert torch.equal(base.hidden_states[-1], base.last_hidden_state)


def test_router_logits_keep_their_graph_in_training_with_gradient_checkpointing():
    model = tiny_model(train=True)
    # transformers 5.25 renamed gradient_checkpointing_enable (deprecated there) to activation_checkpointing_enable
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    ids = random_ids(2, 8)
    out = model(ids, labels=ids, output_router_logits=True, output_hidden_states=True)
    assert len(out.router_logits) == N_MOE and all(r.requires_grad for r in out.router_logits)
    assert len(out.hidden_states) == N_LAYERS + 1
    sum(r.sum() for r in out.router_logits).backward()
    assert model.model.layers[1].mlp.gate.weight.grad is not None


@pytest.mark.parametrize("model_class", ALL_CLASSES)
def test_specific_hidden_state_layers_are_captured_alone(model_class):
    model = build(model_class)
    ids = random_ids(2, 6)
    with torch.no_grad():
        every = model(ids, output_hidden_states=True).hidden_states
        some = model(ids, output_hidden_states=[0, 2, -1]).hidden_states
    assert len(some) == len(every) == N_LAYERS + 1
    for i, (s, e) in enumerate(zip(some, every)):
        if i in (0, 2, N_LAYERS):
            assert torch.equal(s, e), i
        else:
            assert s is None, i


@pytest.mark.parametrize("model_class", (DeepseekModel, DeepseekForCausalLM))
def test_output_flags_from_config_and_an_explicit_false_wins(model_class):
    model = build(model_class)
    ids = random_ids(1, 6)
    with torch.no_grad():
        assert not model(ids).router_logits
        model.config.output_router_logits = True
        model.config.output_hidden_states = True
        out = model(ids)
        assert len(out.router_logits) == N_MOE and len(out.hidden_states) == N_LAYERS + 1
        assert not model(ids, output_router_logits=False).router_logits


def test_return_dict_false_on_every_class():
    """As an argument on every class, and from the config on the base model and the causal LM (transformers' generic
    heads read their backbone's output as a dict, so with config.return_dict=False they fail as transformers' own
    DeepseekV3 heads do)."""
    ids = random_ids(2, 6)
    for model_class in ALL_CLASSES:
        model = build(model_class)
        with torch.no_grad():
            as_dict = model(ids)
            first = as_dict.last_hidden_state if model_class is DeepseekModel else as_dict.logits
            as_tuple = model(ids, return_dict=False)
            assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], first), model_class.__name__
            if model_class in (DeepseekModel, DeepseekForCausalLM):
                model.config.return_dict = False
                as_tuple = model(ids)
                assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], first), model_class.__name__


# ---------------------------------------------------------------------------------------------------------------------
# RoPE from the config


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


@pytest.mark.parametrize("rope_type", ["longrope", "ntk-by-parts"])
def test_unsupported_rope_type_raises_where_the_model_is_built(rope_type):
    with pytest.raises(ValueError, match=rope_type):
        tiny_config(rope_scaling={"rope_type": rope_type, "factor": 2.0})
    config = tiny_config()
    config.rope_parameters = {"rope_type": rope_type, "factor": 2.0, "rope_theta": 10000.0}  # edited afterwards
    for build_it in (DeepseekRotaryEmbedding, DeepseekModel, DeepseekForCausalLM):
        with pytest.raises(ValueError, match=f"rope_type.*{rope_type}"):
            build_it(config)


# ---------------------------------------------------------------------------------------------------------------------
# The loader


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


@pytest.mark.parametrize("head_class", (DeepseekForSequenceClassification, DeepseekForTokenClassification))
def test_a_causal_lm_checkpoint_into_a_new_head_warns_naming_it(tmp_path, head_class):
    lm = tiny_model()
    lm.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"DeepseekForCausalLM.*score\.weight"):
        head = head_class.from_pretrained(tmp_path, num_labels=2, pad_token_id=0)
    assert torch.equal(head.model.layers[1].self_attn.kv_b_proj.weight, lm.model.layers[1].self_attn.kv_b_proj.weight)


def test_a_checkpoint_holding_part_of_the_weights_still_raises(tmp_path):
    head = build(DeepseekForSequenceClassification, num_labels=1)
    head.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["score.weight"]  # saved from this very class: the head is truncated, not new
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(OSError, match="score.weight"):
        DeepseekForSequenceClassification.from_pretrained(tmp_path)
    del weights["model.layers.1.self_attn.kv_b_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(OSError, match="kv_b_proj"):
        DeepseekForSequenceClassification.from_pretrained(tmp_path)


def test_a_checkpoint_of_the_same_task_must_bring_its_head(tmp_path):
    """transformers' DeepseekV3ForCausalLM saved without lm_head is a truncated causal LM for ours, not a new head."""
    hf_v3_model().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(OSError, match="lm_head.weight"):
        DeepseekForCausalLM.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# A caller's 4-D attention mask


def packed_row(lengths=(5, 4, 3)):
    """Sequences packed in one row: ids [1, L], the block-diagonal causal mask [1, 1, L, L] (bool, True may attend),
    position ids restarting at every sequence, and the sequences themselves."""
    seqs = [random_ids(1, n, seed=3 + i) for i, n in enumerate(lengths)]
    L = sum(lengths)
    allowed = torch.zeros(L, L, dtype=torch.bool)
    start = 0
    for n in lengths:
        allowed[start : start + n, start : start + n] = torch.ones(n, n, dtype=torch.bool).tril()
        start += n
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return torch.cat(seqs, dim=1), allowed[None, None], positions, seqs


def as_kind(allowed, kind):
    if kind == "bool":
        return allowed
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mla", ["expanded", "absorbed"])
def test_packed_sequences_match_each_sequence_alone(mla, attn, kind):
    model = tiny_model()
    model.set_attn_implementation(attn)
    set_mla_impl(model, mla)
    ids, allowed, positions, seqs = packed_row()
    mask = as_kind(allowed, kind)
    with torch.no_grad():
        alone = torch.cat([model(s).logits for s in seqs], dim=1)
        packed = model(ids, attention_mask=mask, position_ids=positions).logits
        assert max_diff(packed, alone) < 1e-4
        # chunked prefill over the latent cache: each chunk brings its rows of the mask
        cache, c = DeepseekLatentCache(), 7
        first = model(ids[:, :c], attention_mask=mask[:, :, :c, :c], position_ids=positions[:, :c], cache=cache,
                      use_cache=True).logits
        rest = model(ids[:, c:], attention_mask=mask[:, :, c:, :], position_ids=positions[:, c:], cache=cache,
                     use_cache=True).logits
    assert max_diff(torch.cat([first, rest], dim=1), alone) < 1e-4


def test_packed_training_forward_and_gradients_match_separate_sequences():
    model = tiny_model(train=True, seq_balance_alpha=0.0)
    ids, allowed, positions, seqs = packed_row()
    packed = model(ids, attention_mask=allowed, position_ids=positions).logits
    alone = torch.cat([model(s).logits for s in seqs], dim=1)
    assert max_diff(packed, alone) < 1e-4
    weight = model.model.layers[0].self_attn.kv_b_proj.weight
    (g_packed,) = torch.autograd.grad(packed.square().sum(), weight)
    (g_alone,) = torch.autograd.grad(alone.square().sum(), weight)
    assert max_diff(g_packed, g_alone) < 1e-3 * g_alone.abs().max().item()


def test_packed_labels_give_the_losses_of_the_separate_sequences():
    """Labels packed as transformers' DataCollatorWithFlattening packs them (-100 at each sequence's first token): the
    next-token and MTP losses are the token-weighted means of the separate sequences' losses. The MTP module is not
    scored where its shifted token belongs to the next sequence (position ids tell where a sequence starts)."""
    model = tiny_model(seq_balance_alpha=0.0)
    lengths = (5, 4, 6)
    ids, allowed, positions, seqs = packed_row(lengths)
    labels = ids.clone()
    labels[0, [sum(lengths[:j]) for j in range(1, len(lengths))]] = -100
    with torch.no_grad():
        packed = model(ids, attention_mask=allowed, position_ids=positions, labels=labels)
        alone = [model(s, labels=s) for s in seqs]
    main_counts = torch.tensor([n - 1 for n in lengths], dtype=torch.float32)
    mtp_counts = torch.tensor([n - 2 for n in lengths], dtype=torch.float32)  # one MTP depth: t_{i+2}
    expected_main = (torch.stack([a.main_loss for a in alone]) * main_counts).sum() / main_counts.sum()
    expected_mtp = (torch.stack([a.mtp_loss for a in alone]) * mtp_counts).sum() / mtp_counts.sum()
    assert torch.allclose(packed.main_loss, expected_main, atol=1e-5)
    assert torch.allclose(packed.mtp_loss, expected_mtp, atol=1e-5)


def test_shared_prefix_tree_mask_matches_each_branch():
    """transformers' custom-4D-mask case: three sequences that share their first three tokens, written as the prefix
    once plus the three last tokens, none of which sees the others."""
    model = tiny_model()
    branches = torch.tensor([[10, 11, 12, 13], [10, 11, 12, 14], [10, 11, 12, 15]])
    tree = torch.cat([branches[0, :3], branches[:, 3]])[None]
    allowed = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0],
                            [1, 1, 1, 0, 1, 0], [1, 1, 1, 0, 0, 1]], dtype=torch.bool)[None, None]
    positions = torch.tensor([[0, 1, 2, 3, 3, 3]])
    with torch.no_grad():
        separate = model(branches).logits[:, -1]
        for kind in ("bool", "float"):
            shared = model(tree, attention_mask=as_kind(allowed, kind), position_ids=positions).logits[0, -3:]
            assert max_diff(shared, separate) < 1e-4, kind


def test_a_mask_of_another_shape_raises_naming_it():
    model = tiny_model()
    ids = random_ids(2, 6)
    for bad in (torch.ones(2, 6, 6, dtype=torch.bool), torch.ones(2, 1, 5, 6, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"attention_mask of shape"):
            model(ids, attention_mask=bad)
    with pytest.raises(ValueError, match="attention_mask"):  # generate() takes padding masks only (transformers')
        model.generate(ids, attention_mask=torch.ones(2, 1, 6, 6, dtype=torch.bool), max_new_tokens=2)


# ---------------------------------------------------------------------------------------------------------------------
# Task heads


def test_heads_are_ours_generic_and_registered_with_the_auto_classes(tmp_path):
    import transformers

    for ours, generic, auto in ((DeepseekForSequenceClassification, GenericForSequenceClassification,
                                 AutoModelForSequenceClassification),
                                (DeepseekForTokenClassification, GenericForTokenClassification,
                                 AutoModelForTokenClassification)):
        assert issubclass(ours, generic) and not hasattr(transformers, ours.__name__)
        config = tiny_config(pad_token_id=0, num_labels=3)
        model = auto.from_config(config)
        assert type(model) is ours and type(model.model) is DeepseekModel
        assert len(model.model.layers) == N_LAYERS and model.config.num_nextn_predict_layers == 0  # no MTP module
        # transformers allows the switch only where the class's own module (heads.py) names the experts decorator
        for kernel in ("grouped_mm", "eager"):
            model.set_experts_implementation(kernel)
            assert model.config._experts_implementation == kernel
        model.save_pretrained(tmp_path / ours.__name__)
        again = auto.from_pretrained(tmp_path / ours.__name__)
        assert type(again) is ours and torch.equal(again.score.weight, model.score.weight)
    assert type(AutoModel.from_config(tiny_config())) is DeepseekModel
    assert type(AutoModelForCausalLM.from_config(tiny_config())) is DeepseekForCausalLM


def test_sequence_classification_scores_the_last_real_token_of_each_row():
    model = build(DeepseekForSequenceClassification, num_labels=3)
    rows = [random_ids(1, 7, seed=1), random_ids(1, 4, seed=2)]
    padded = torch.zeros(2, 7, dtype=torch.long)  # pad_token_id 0, right padding
    padded[0], padded[1, :4] = rows[0][0], rows[1][0]
    with torch.no_grad():
        batch = model(padded, attention_mask=(padded != 0).long()).logits
        single = torch.cat([model(r).logits for r in rows])
    assert batch.shape == (2, 3) and max_diff(batch, single) < 1e-4
    labels = torch.tensor([0, 2])
    loss = model(padded, attention_mask=(padded != 0).long(), labels=labels).loss
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(batch, labels), atol=1e-5)


def test_token_classification_gives_per_token_logits_and_loss():
    model = build(DeepseekForTokenClassification, num_labels=4)
    ids = random_ids(2, 6)
    labels = torch.randint(0, 4, (2, 6))
    out = model(ids, labels=labels)
    assert out.logits.shape == (2, 6, 4)
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(out.logits.view(-1, 4), labels.view(-1)))


def _arithmetic_example():
    path = Path(__file__).resolve().parent.parent / "examples" / "grpo_arithmetic.py"
    spec = importlib.util.spec_from_file_location("grpo_arithmetic", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reward_model_trains_with_trl_and_scores_grpo_completions(tmp_path):
    """R1's second RL stage: a DeepSeek reward model trained on preference pairs with TRL's RewardTrainer, then used
    as the reward of a GRPO step (TRL scores prompt + completion with it)."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from trainers.grpo import GRPOConfig, GRPOTrainer

    example = _arithmetic_example()
    tok = example.build_tokenizer()
    sizes = {k: v for k, v in TINY.items() if k not in ("vocab_size", "num_nextn_predict_layers")}
    torch.manual_seed(0)
    reward_model = DeepseekForSequenceClassification(DeepseekConfig(
        **sizes, vocab_size=len(tok), num_labels=1, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, num_nextn_predict_layers=0))
    pairs = Dataset.from_dict({
        "chosen": [f"{a}+{b}={a + b}" for a in range(1, 5) for b in range(1, 5)],
        "rejected": [f"{a}+{b}=x" for a in range(1, 5) for b in range(1, 5)],
    })

    def margin() -> float:
        with torch.no_grad():
            reward_model.eval()
            scores = [reward_model(**tok(texts, return_tensors="pt", padding=True)).logits[:, 0]
                      for texts in (list(pairs["chosen"]), list(pairs["rejected"]))]
        return (scores[0] - scores[1]).mean().item()

    before = margin()
    args = RewardConfig(output_dir=str(tmp_path / "rm"), max_steps=12, per_device_train_batch_size=8,
                        learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                        bf16=False, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    trainer = RewardTrainer(model=reward_model, args=args, train_dataset=pairs, processing_class=tok)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert margin() > before + 1.0  # chosen answers now score above the rejected ones

    reward_model.eval()
    policy = example.build_model(tok, seed=1, **{k: v for k, v in sizes.items()})
    prompts = Dataset.from_dict({"prompt": [f"{a}+{a}=" for a in range(1, 5)]})
    grpo_args = GRPOConfig(output_dir=str(tmp_path / "grpo"), max_steps=1, per_device_train_batch_size=4,
                           num_generations=4, max_completion_length=4, learning_rate=1e-3, logging_steps=1,
                           save_strategy="no", report_to=[], bf16=False, use_cpu=True, seed=0, disable_tqdm=True,
                           dataloader_num_workers=0)
    grpo = GRPOTrainer(policy, reward_funcs=[reward_model], args=grpo_args, train_dataset=prompts,
                       processing_class=tok, reward_processing_classes=[tok])
    grpo.train()
    logged = grpo._logs
    (name,) = logged["rewards"]
    texts = [p + c for p, c in zip(logged["prompt"], logged["completion"])]
    assert len(texts) == 4
    with torch.no_grad():
        enc = tok(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
        expected = reward_model(**enc).logits[:, 0]
    assert torch.allclose(torch.tensor(list(logged["rewards"][name])), expected, atol=1e-4)
