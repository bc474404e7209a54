"""The memory options of the model config (recompute norms / MLA up-projections / SwiGLU, chunked linear
cross-entropy: modeling_deepseek/recompute.py, chunked_ce.py): each gives the plain path's loss and every gradient
(fp32, 1e-5), keeps fewer bytes for backward, and reaches Trainer, DeepseekTrainer and the GRPO trainer.

Every comparison also checks that the option ran (a counter on the function it goes through): an option that
silently did nothing would otherwise pass as "equal to the plain path"."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modeling_deepseek.attention as attention_mod
import modeling_deepseek.chunked_ce as chunked_ce
import modeling_deepseek.experts as experts_mod
import modeling_deepseek.layers as layers_mod
from conftest import VOCAB, random_ids, tiny_config, tiny_model
from modeling_deepseek import DeepseekConfig
from modeling_deepseek.chunked_ce import linear_cross_entropy_sum, token_logprobs
from modeling_deepseek.configuration import MEMORY_OPTIONS

ALL_ON = {name: True for name in MEMORY_OPTIONS}


@pytest.fixture
def calls(monkeypatch):
    """How often each option's mechanism ran: recompute() per module kind, the chunked cross-entropy."""
    counts = Counter()

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    for mod, name in ((layers_mod, "layers"), (attention_mod, "attention"), (experts_mod, "experts")):
        monkeypatch.setattr(mod, "recompute", counting(name, mod.recompute))
    monkeypatch.setattr(chunked_ce._LinearCrossEntropy, "apply",
                        counting("chunked_ce", chunked_ce._LinearCrossEntropy.apply))
    return counts


def saved_bytes(fn) -> int:
    """Bytes of the unique non-parameter storages autograd saves while fn() runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), isinstance(t, nn.Parameter))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(n for n, is_param in storages.values() if not is_param)


def loss_and_grads(model, ids, labels, num_items=None):
    model.zero_grad(set_to_none=True)
    kwargs = {} if num_items is None else {"num_items_in_batch": num_items}
    out = model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(plain, other, atol=1e-5):
    (l0, g0), (l1, g1) = plain, other
    torch.testing.assert_close(l1, l0, atol=atol, rtol=0)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=atol, rtol=1e-4, msg=name)


def labels_with_ignored(ids):
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt that is not scored
    labels[1, -3:] = -100
    return labels


# ====================================================================================================================
# Configuration


def test_options_are_off_by_default_and_validated():
    config = DeepseekConfig()
    assert not any(getattr(config, name) for name in MEMORY_OPTIONS)
    for name in MEMORY_OPTIONS:
        with pytest.raises(ValueError, match=name):
            tiny_config(**{name: 1})
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="cross_entropy_chunk_tokens"):
            tiny_config(cross_entropy_chunk_tokens=bad)
    loaded = DeepseekConfig.from_dict(tiny_config(**ALL_ON).to_dict())
    assert all(getattr(loaded, name) for name in MEMORY_OPTIONS)


# ====================================================================================================================
# Each option against the plain path, on the same weights

EXPECTED_CALLS = {
    "recompute_norms": "layers",
    "recompute_mla_up_proj": "attention",
    "recompute_swiglu": "experts",
    "chunked_cross_entropy": "chunked_ce",
}


@pytest.mark.parametrize("experts", ["eager", "grouped_mm"])
@pytest.mark.parametrize("option", [*MEMORY_OPTIONS, "all"])
def test_option_equals_the_plain_path_and_saves_memory(option, experts, calls):
    ids = random_ids(2, 24)
    labels = labels_with_ignored(ids)
    plain = tiny_model(train=True, experts_implementation=experts)
    options = ALL_ON if option == "all" else {option: True}
    model = tiny_model(train=True, experts_implementation=experts, **options, cross_entropy_chunk_tokens=7)

    assert_same(loss_and_grads(plain, ids, labels), loss_and_grads(model, ids, labels))
    for name in options:
        assert calls[EXPECTED_CALLS[name]] > 0, f"{name} did not run"
    before = saved_bytes(lambda: plain(input_ids=ids, labels=labels).loss)
    after = saved_bytes(lambda: model(input_ids=ids, labels=labels).loss)
    assert after < before, (option, after, before)


def test_all_options_under_gradient_accumulation(calls):
    """Two micro-batches scaled by Trainer's num_items_in_batch: the same accumulated gradients as the plain path."""
    plain, model = tiny_model(train=True), tiny_model(train=True, **ALL_ON, cross_entropy_chunk_tokens=5)
    batches = [random_ids(2, 16, seed=s) for s in (1, 2)]
    labels = [labels_with_ignored(ids) for ids in batches]
    total = sum(int((lab[:, 1:] != -100).sum()) for lab in labels)

    def accumulate(m):
        m.zero_grad(set_to_none=True)
        losses = []
        for ids, lab in zip(batches, labels):
            loss = m(input_ids=ids, labels=lab, num_items_in_batch=total).loss
            loss.backward()
            losses.append(loss.detach())
        return torch.stack(losses).sum(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    assert_same(accumulate(plain), accumulate(model))
    assert calls["chunked_ce"] >= 4  # main head and MTP head, per micro-batch


def test_chunked_forward_returns_no_logits_only_while_training():
    model = tiny_model(train=True, chunked_cross_entropy=True)
    ids = random_ids(2, 12)
    out = model(input_ids=ids, labels=ids)
    assert out.logits is None and out.mtp_logits is None and out.loss is not None
    with torch.no_grad():  # evaluation: the plain path, logits included
        evaluated, plain = model(input_ids=ids, labels=ids), tiny_model(train=True)(input_ids=ids, labels=ids)
    assert evaluated.logits.shape == (2, 12, VOCAB)
    torch.testing.assert_close(evaluated.logits, plain.logits, atol=0, rtol=0)
    torch.testing.assert_close(evaluated.loss, plain.loss, atol=0, rtol=0)
    assert model(input_ids=ids).logits.shape == (2, 12, VOCAB)  # no labels: logits as always


def test_gradient_checkpointing_with_the_options():
    """transformers' layer checkpointing around layers that recompute inside: nested, still the plain gradients."""
    ids = random_ids(2, 16)
    plain = tiny_model(train=True)
    model = tiny_model(train=True, **ALL_ON)
    model.activation_checkpointing_enable()  # transformers' default: non-reentrant
    assert_same(loss_and_grads(plain, ids, ids), loss_and_grads(model, ids, ids))


# ====================================================================================================================
# The chunked linear cross-entropy itself


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_cross_entropy_matches_f_cross_entropy(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 37, 24, generator=g, requires_grad=True)
    head = nn.Linear(24, 101, bias=False)
    targets = torch.randint(0, 101, (2, 37), generator=g)
    targets[0, :9] = -100
    ref = F.cross_entropy(head(h).reshape(-1, 101), targets.reshape(-1), ignore_index=-100, reduction="sum")
    dh_ref, dw_ref = torch.autograd.grad(ref * 0.3, (h, head.weight))
    out = linear_cross_entropy_sum(h, head, targets, chunk)
    dh, dw = torch.autograd.grad(out * 0.3, (h, head.weight))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(dh, dh_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dw, dw_ref, atol=1e-6, rtol=1e-5)
    # nothing [tokens, vocab]-sized is kept for backward: h, the weight, the targets and one lse per token
    kept = saved_bytes(lambda: linear_cross_entropy_sum(h, head, targets, chunk))
    assert kept <= h.numel() * 4 + targets.numel() * 8 + targets.numel() * 4


def test_chunked_cross_entropy_under_bf16_autocast():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(50, 32, generator=g, requires_grad=True)
    head = nn.Linear(32, 200, bias=False)
    targets = torch.randint(0, 200, (50,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(head(h).float(), targets, reduction="sum")
        out = linear_cross_entropy_sum(h, head, targets, 16)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=0)
    torch.testing.assert_close(torch.autograd.grad(out, h)[0], torch.autograd.grad(ref, h)[0], rtol=2e-2, atol=2e-3)


def test_chunked_cross_entropy_of_a_wrapped_head(calls):
    """A head that is not y = h W^T alone (bias, adapter, hooks) is called chunk by chunk under a checkpoint: the
    same loss and gradients, still without the [tokens, vocab] logits kept."""
    class Adapted(nn.Linear):  # e.g. a LoRA layer: its forward adds what the weight alone misses
        def forward(self, x):
            return super().forward(x) * 2

    hooked = nn.Linear(8, 30, bias=False)
    seen = []
    hooked.register_forward_hook(lambda m, a, o: seen.append(o.shape) or o * 1.5)
    g = torch.Generator().manual_seed(3)
    targets = torch.randint(0, 30, (2, 13), generator=g)
    targets[1, :4] = -100
    for head in (nn.Linear(8, 30), Adapted(8, 30, bias=False), hooked):
        h = torch.randn(2, 13, 8, generator=g, requires_grad=True)
        ref = F.cross_entropy(head(h).reshape(-1, 30), targets.reshape(-1), reduction="sum")
        ref_grads = torch.autograd.grad(ref, (h, *head.parameters()))
        calls.clear()
        out = linear_cross_entropy_sum(h, head, targets, 4)
        for a, b in zip(torch.autograd.grad(out, (h, *head.parameters())), ref_grads):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-6)
        assert calls["chunked_ce"] == 0  # not the fused function: it would miss the bias / adapter / hook
        kept = saved_bytes(lambda: linear_cross_entropy_sum(h, head, targets, 4))
        assert kept < 26 * 30 * 4  # less than the logits of all 26 positions
    assert max(shape[0] for shape in seen) == 4  # the hooked head ran chunk by chunk


def test_token_logprobs_in_chunks():
    g = torch.Generator().manual_seed(2)
    h, head = torch.randn(3, 11, 16, generator=g), nn.Linear(16, 50, bias=False)
    targets = torch.randint(0, 50, (3, 11), generator=g)
    ref = (head(h) / 0.7).log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(h, head, targets, 0.7, chunk_tokens=4), ref.detach())


# ====================================================================================================================
# The trainers honour the options (they call the model's forward / objective)


def test_trainer_and_deepseek_trainer_honour_the_options(tmp_path, calls):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from trainers import DeepseekTrainer

    ids = random_ids(4, 16).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-3,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                dataloader_num_workers=0)
    losses = {}
    for name, cls, options in (("plain", Trainer, {}), ("trainer", Trainer, ALL_ON),
                               ("deepseek", DeepseekTrainer, ALL_ON)):
        calls.clear()
        trainer = cls(model=tiny_model(train=True, **options), train_dataset=data,
                      args=TrainingArguments(output_dir=str(tmp_path / name), **args))
        trainer.train()
        losses[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        if options:
            assert all(calls[kind] > 0 for kind in ("layers", "attention", "experts", "chunked_ce")), (name, calls)
    assert losses["trainer"] == pytest.approx(losses["plain"], abs=1e-5)
    assert losses["deepseek"] == pytest.approx(losses["plain"], abs=1e-5)


def test_grpo_trainer_honours_the_options(tmp_path, calls, monkeypatch):
    from test_grpo import train_logs, tiny_lm, trainer_for

    import trainers.grpo as grpo

    logprob_calls = []
    monkeypatch.setattr(grpo, "token_logprobs", lambda *a, **k: logprob_calls.append(1) or token_logprobs(*a, **k))
    trainer = trainer_for(tmp_path, model=tiny_lm(**ALL_ON), mtp_loss_weight=0.3, max_steps=1)
    logs = train_logs(trainer)
    assert logs[-1]["mtp_loss"] > 0
    assert all(calls[kind] > 0 for kind in ("layers", "attention", "experts", "chunked_ce")), calls
    assert logprob_calls, "the rollout check must score in chunks"
