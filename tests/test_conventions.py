"""The conventions transformers' own DeepseekV3 honours, checked on ours case by case (the cases of transformers'
common model tests that failed or were skipped for our classes, written here as behaviour):

- outputs: `_can_record_outputs` declares hidden states, attentions and router logits; transformers' capture_outputs
  records them (specific hidden-state layers too, the same values as transformers' DeepseekV3), the config's flags
  count, the MTP modules add nothing, and return_dict=False gives tuples;
- labels and start-up: `shift_labels` as transformers' loss functions take them, meta-device construction then
  to_empty / init_weights, and the experts interface (set_experts_implementation);
- a caller's 4-D attention mask (sequences packed in one row, a shared prefix) in every attention path, against each
  sequence run alone;
- DeepseekForSequenceClassification / DeepseekForTokenClassification, registered with the Auto classes; a reward model
  trained with TRL's RewardTrainer and used as a GRPO reward.

Loading (missing and new weights): test_loading.py. RoPE from the config: test_rope.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoModelForTokenClassification)
from transformers.modeling_layers import GenericForSequenceClassification, GenericForTokenClassification

from conftest import TINY, hf_v3_model, max_diff, random_ids, save_and_load_ours, set_mla_impl, tiny_config, tiny_model
from modeling_deepseek import (DeepseekConfig, DeepseekForCausalLM, DeepseekForSequenceClassification,
                               DeepseekForTokenClassification, DeepseekModel)
from modeling_deepseek.cache import DeepseekLatentCache
from modeling_deepseek.compat import OutputRecorder
from modeling_deepseek.routing import DeepseekTopkRouter

ALL_CLASSES = (DeepseekModel, DeepseekForCausalLM, DeepseekForSequenceClassification, DeepseekForTokenClassification)
N_LAYERS, N_MOE = TINY["num_hidden_layers"], TINY["num_hidden_layers"] - TINY["first_k_dense_replace"]
TOL = 1e-4  # ours against transformers' DeepseekV3 on the same weights


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
    model.activation_checkpointing_enable({"use_reentrant": False})
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
        off = model(ids)
        assert not off.router_logits and off.hidden_states is None and off.attentions is None
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
            if model_class is not DeepseekModel:  # with labels the loss comes first, then what is set
                labels = {DeepseekForCausalLM: ids, DeepseekForSequenceClassification: torch.zeros(2, dtype=torch.long),
                          DeepseekForTokenClassification: torch.zeros_like(ids)}[model_class]
                with_labels = model(ids, labels=labels)
                as_tuple = model(ids, labels=labels, return_dict=False)
                assert torch.equal(as_tuple[0], with_labels.loss) and torch.equal(as_tuple[1], first)
            if model_class in (DeepseekModel, DeepseekForCausalLM):
                model.config.return_dict = False
                as_tuple = model(ids)
                assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], first), model_class.__name__


@pytest.fixture
def pair(tmp_path):
    hf = hf_v3_model()
    hf.set_attn_implementation("eager")
    ours = save_and_load_ours(hf, tmp_path)
    ours.set_attn_implementation("eager")
    return hf, ours


def test_hidden_states_attentions_and_router_logits_match_transformers(pair):
    hf, ours = pair
    ids = random_ids(2, 12)
    kwargs = dict(output_hidden_states=True, output_attentions=True, output_router_logits=True)
    with torch.no_grad():
        expected = hf(ids, **kwargs)
        got = ours(ids, **kwargs)
    n_layers = ours.config.num_hidden_layers
    assert len(got.hidden_states) == len(expected.hidden_states) == n_layers + 1
    for g, e in zip(got.hidden_states, expected.hidden_states):
        assert max_diff(g, e) < TOL
    assert len(got.attentions) == len(expected.attentions) == n_layers
    for g, e in zip(got.attentions, expected.attentions):
        assert g.shape == e.shape == (2, ours.config.num_attention_heads, 12, 12)
        assert max_diff(g, e) < TOL
    moe_layers = n_layers - ours.config.first_k_dense_replace
    assert len(got.router_logits) == len(expected.router_logits) == moe_layers
    for g, e in zip(got.router_logits, expected.router_logits):
        assert g.shape == (2 * 12, ours.config.n_routed_experts)
        assert max_diff(g, e.view_as(g)) < TOL


def test_router_logits_and_aux_loss_in_training():
    model = tiny_model(train=True, seq_balance_alpha=0.01)
    ids = random_ids(2, 10)
    out = model(ids, labels=ids, output_router_logits=True)
    assert out.aux_loss is not None and out.aux_loss.requires_grad
    assert torch.equal(out.aux_loss, out.balance_loss)
    assert all(r.requires_grad for r in out.router_logits)


# ---------------------------------------------------------------------------------------------------------------------
# Labels, meta-device start-up and the experts interface


def test_shift_labels_give_the_same_losses_as_labels(model):
    ids = random_ids(2, 12)
    labels = ids.clone()
    labels[0, :3] = -100
    shift = F.pad(labels, (0, 1), value=-100)[:, 1:]
    with torch.no_grad():
        by_labels = model(ids, labels=labels)
        by_shift = model(ids, shift_labels=shift)
        # a shifted target that differs from the unshifted labels' must change the loss (it is really read)
        other = model(ids, shift_labels=torch.roll(shift, 1, dims=1))
    for name in ("loss", "main_loss", "mtp_loss"):
        assert torch.allclose(getattr(by_labels, name), getattr(by_shift, name), atol=1e-6), name
    assert not torch.allclose(other.main_loss, by_shift.main_loss)


def test_to_empty_after_meta_init_then_init_weights():
    config = tiny_config()
    with torch.device("meta"):
        model = DeepseekForCausalLM(config)
    model.to_empty(device="cpu")
    routers = [m for m in model.modules() if isinstance(m, DeepseekTopkRouter)]
    assert routers and all(r.e_score_correction_bias.device.type == "cpu" for r in routers)
    assert all(r.e_score_correction_bias.dtype == torch.float32 for r in routers)
    model.init_weights()
    assert all(torch.equal(r.e_score_correction_bias, torch.zeros_like(r.e_score_correction_bias)) for r in routers)
    ids = random_ids(1, 8)
    assert torch.isfinite(model(ids).logits).all()
    model.to(torch.bfloat16)  # the balancing state stays fp32 through a dtype cast
    assert all(r.e_score_correction_bias.dtype == torch.float32 for r in routers)


def test_experts_implementation_eager_and_grouped_mm_agree():
    ids = random_ids(2, 12)
    grouped = tiny_model(experts_implementation="grouped_mm")
    eager = tiny_model(experts_implementation="eager")
    assert grouped.config._experts_implementation == "grouped_mm"
    assert eager.config._experts_implementation == "eager"
    with torch.no_grad():
        assert max_diff(grouped(ids).logits, eager(ids).logits) < 1e-5
    grouped.set_experts_implementation("eager")
    assert grouped.config._experts_implementation == "eager"


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
                        bf16=False, disable_tqdm=True, seed=0, dataloader_num_workers=0, activation_checkpointing=True)
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
