"""Auxiliary-loss-free balancing (bias update once per optimizer step), the sequence-wise balance loss, routing stats."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from conftest import random_ids, routers, tiny_model
from modeling_deepseek import max_violation, update_balancing_bias
from modeling_deepseek.routing import sequence_balance_loss

GAMMA = 0.001


def biases(model):
    return [r.e_score_correction_bias.detach().clone() for r in routers(model)]


def pendings(model):
    return [r.pending_load.detach().clone() for r in routers(model)]


def expected_after_update(bias_list, load_list, gamma=GAMMA):
    return [b + gamma * torch.sign(l.mean() - l) for b, l in zip(bias_list, load_list)]


def assert_lists_close(a, b, atol=1e-8):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(x, y, atol=atol, rtol=0, msg=f"router {i}")


def train_step(model, ids, labels=None):
    out = model(ids, labels=ids if labels is None else labels)
    out.loss.backward()
    return out


# ----------------------------------------------------------------------------------------------------------------
def test_direction_of_update_by_hand():
    model = tiny_model(train=True)
    r = routers(model)[0]
    load = torch.tensor([5.0, 1.0, 3.0, 3.0, 6.0, 0.0, 3.0, 3.0])  # mean 3
    before = r.e_score_correction_bias.clone()
    with torch.no_grad():
        r.pending_load.copy_(load)
    r.has_pending_load = True
    update_balancing_bias(model)
    delta = (r.e_score_correction_bias - before) / GAMMA
    assert torch.allclose(delta, torch.tensor([-1.0, 1.0, 0.0, 0.0, -1.0, 1.0, 0.0, 0.0]), atol=1e-3)
    assert torch.equal(r.pending_load, torch.zeros(8))


def test_update_once_per_optimizer_step_plain_loop():
    model = tiny_model(train=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    n_routers = len(routers(model))
    assert n_routers == 3  # layers 1, 2 and the MTP block
    for step in range(3):
        ids = random_ids(2, 12, seed=10 + step)
        out = train_step(model, ids)
        loads = pendings(model)
        # the pending counts are exactly this forward's expert loads (main layers, then MTP)
        assert_lists_close(loads, list(out.expert_load))
        assert all(l.sum().item() == 2 * 12 * 2 for l in loads)
        expected = expected_after_update(biases(model), loads)
        assert any((l != l.mean()).any() for l in loads)
        opt.step()
        opt.zero_grad()
        assert_lists_close(biases(model), expected)
        assert all(torch.equal(p, torch.zeros(8)) for p in pendings(model))
        # a second step with no training forward in between leaves the bias alone
        opt.step()
        assert_lists_close(biases(model), expected)


def test_gradient_accumulation_sums_counts_over_micro_batches():
    model = tiny_model(train=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    bias0 = biases(model)
    out1 = train_step(model, random_ids(2, 12, seed=21))
    out2 = train_step(model, random_ids(2, 12, seed=22))
    summed = [a + b for a, b in zip(out1.expert_load, out2.expert_load)]
    assert_lists_close(pendings(model), summed)
    assert_lists_close(biases(model), bias0)  # nothing moves before the step
    opt.step()
    assert_lists_close(biases(model), expected_after_update(bias0, summed))


def test_eval_and_no_grad_forwards_do_not_count():
    model = tiny_model(train=False)
    ids = random_ids(2, 12)
    model(ids, labels=ids)  # eval mode, grad enabled
    assert all(torch.equal(p, torch.zeros(8)) for p in pendings(model))
    model.train()
    with torch.no_grad():
        model(ids, labels=ids)
        model(ids)
    assert all(torch.equal(p, torch.zeros(8)) for p in pendings(model))
    bias0 = biases(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    opt.step()
    assert_lists_close(biases(model), bias0)


def test_generate_does_not_count():
    model = tiny_model(train=True)
    model.generate(random_ids(1, 6), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert all(torch.equal(p, torch.zeros(8)) for p in pendings(model))


def test_gradient_checkpointing_counts_once():
    plain = tiny_model(train=True)
    ckpt = copy.deepcopy(plain)
    ckpt.activation_checkpointing_enable()
    assert ckpt.model.layers[1].gradient_checkpointing
    ids = random_ids(2, 12)
    out_p, out_c = train_step(plain, ids), train_step(ckpt, ids)
    assert abs(out_p.loss.item() - out_c.loss.item()) < 1e-6
    assert out_c.balance_loss is not None
    assert_lists_close(pendings(ckpt), pendings(plain))
    assert all(p.sum().item() == 2 * 12 * 2 for p in pendings(ckpt))
    gp = dict(plain.named_parameters())
    for name, p in ckpt.named_parameters():
        if gp[name].grad is not None:
            assert (p.grad - gp[name].grad).abs().max() < 1e-5, name


def test_gradient_checkpointing_keeps_balance_loss_and_reentrant_warns():
    plain = tiny_model(train=True)
    ckpt, reentrant = copy.deepcopy(plain), copy.deepcopy(plain)
    ckpt.activation_checkpointing_enable()  # transformers' default: non-reentrant
    reentrant.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    ids = random_ids(2, 12)
    out_p, out_c = train_step(plain, ids), train_step(ckpt, ids)
    assert_lists_close(pendings(ckpt), pendings(plain))  # the counts are right either way
    assert out_c.balance_loss is not None
    assert abs(out_p.loss.item() - out_c.loss.item()) < 1e-6
    # reentrant checkpointing runs the layers without gradients: the balance loss cannot train, and the model says so
    with pytest.warns(UserWarning, match="use_reentrant=False"):
        out_r = train_step(reentrant, ids)
    assert out_r.balance_loss is None
    assert_lists_close(pendings(reentrant), pendings(plain))


@pytest.mark.parametrize("overrides", [dict(use_bias_update=False), dict(bias_update_speed=0.0)],
                         ids=["use_bias_update=False", "bias_update_speed=0"])
def test_bias_update_can_be_turned_off(overrides):
    model = tiny_model(train=True, **overrides)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    bias0 = biases(model)
    assert any(b.abs().sum() > 0 for b in bias0)
    for step in range(2):
        train_step(model, random_ids(2, 12, seed=step))
        opt.step()
        opt.zero_grad()
    assert_lists_close(biases(model), bias0, atol=0)


def test_optimizer_of_another_model_does_not_update_this_bias():
    model, other = tiny_model(train=True), tiny_model(seed=1, train=True)
    opt_other = torch.optim.AdamW(other.parameters(), lr=1e-3)
    bias0 = biases(model)
    train_step(model, random_ids(2, 12))
    pending0 = pendings(model)
    opt_other.step()
    assert_lists_close(biases(model), bias0, atol=0)
    assert_lists_close(pendings(model), pending0, atol=0)  # still waiting for its own optimizer
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.step()
    assert_lists_close(biases(model), expected_after_update(bias0, pending0))


def test_optimizer_over_a_subset_of_decoder_parameters_still_updates():
    model = tiny_model(train=True)
    opt = torch.optim.SGD([model.model.layers[1].mlp.gate.weight], lr=0.0)
    bias0 = biases(model)
    train_step(model, random_ids(2, 12))
    loads = pendings(model)
    opt.step()
    assert_lists_close(biases(model), expected_after_update(bias0, loads))


# ----------------------------------------------------------------------------------------------------------------
# Sequence-wise balance loss
def test_sequence_balance_loss_formula_by_hand():
    g = torch.Generator().manual_seed(0)
    B, T, E, K = 2, 5, 4, 2
    scores = torch.rand(B, T, E, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(B * T)]).view(B, T, K)
    alpha = 0.01
    got = sequence_balance_loss(scores, ids, alpha)
    total = 0.0
    for b in range(B):
        seq = 0.0
        for i in range(E):
            f = E / (K * T) * sum(int(i in ids[b, t].tolist()) for t in range(T))
            P = sum((scores[b, t, i] / scores[b, t].sum()).item() for t in range(T)) / T
            seq += f * P
        total += alpha * seq
    assert abs(got.item() - total / B) < 1e-7


def test_balance_loss_positive_linear_in_alpha_and_absent_at_zero():
    ids = random_ids(2, 12)
    losses = {}
    for alpha in (1e-4, 2e-4, 0.0):
        model = tiny_model(train=True, seq_balance_alpha=alpha)
        losses[alpha] = model(ids, labels=ids)
    b1, b2 = losses[1e-4].balance_loss, losses[2e-4].balance_loss
    assert b1 is not None and b1.item() > 0
    assert abs(b2.item() / b1.item() - 2.0) < 1e-5
    assert losses[0.0].balance_loss is None
    out = losses[0.0]
    assert abs(out.loss.item() - (out.main_loss + 0.3 * out.mtp_loss).item()) < 1e-6
    # the balance loss sums one term per MoE layer (main + MTP); each term is at least alpha (f.P >= 1 overall)
    assert b1.item() >= 3 * 1e-4 * 0.99
    # same weights, so only the balance term differs between alpha 1e-4 and 0
    assert abs((losses[1e-4].loss - losses[0.0].loss).item() - b1.item()) < 1e-6


def test_balance_loss_only_in_training():
    model = tiny_model(train=False)
    ids = random_ids(2, 12)
    assert model(ids, labels=ids).balance_loss is None


def test_balance_loss_has_gradient_to_router():
    model = tiny_model(train=True, seq_balance_alpha=1.0)
    ids = random_ids(2, 12)
    out = model(ids, labels=ids)
    out.balance_loss.backward()
    assert model.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------
# Routing statistics on the output
def test_expert_load_and_max_violation():
    model = tiny_model(train=True)
    ids = random_ids(3, 10)
    out = model(ids, labels=ids)
    assert out.expert_load.shape == (3, 8)  # 2 main MoE layers + 1 MTP
    assert torch.equal(out.expert_load.sum(-1), torch.full((3,), 3 * 10 * 2.0))
    main = out.expert_load[:2]
    by_hand = torch.stack([row.max() / row.mean() - 1 for row in main]).mean()
    assert abs(out.max_violation.item() - by_hand.item()) < 1e-6
    assert torch.allclose(max_violation(main), torch.stack([row.max() / row.mean() - 1 for row in main]))
    assert max_violation(torch.full((1, 8), 4.0)).item() == 0.0


def test_expert_load_without_labels_in_training_covers_main_layers():
    model = tiny_model(train=True)
    out = model(random_ids(2, 10))
    assert out.expert_load.shape == (2, 8)  # MTP does not run without labels
    assert torch.equal(out.expert_load.sum(-1), torch.full((2,), 2 * 10 * 2.0))


# ----------------------------------------------------------------------------------------------------------------
# dtype
def test_bias_stays_fp32_after_model_to_bf16():
    model = tiny_model(train=True).to(torch.bfloat16)
    r = routers(model)[0]
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert r.e_score_correction_bias.dtype == torch.float32
    assert r.pending_load.dtype == torch.float32


def test_bias_update_effective_in_bf16_model_loaded_with_dtype(tmp_path):
    from modeling_deepseek import DeepseekForCausalLM

    tiny_model().save_pretrained(tmp_path)
    model = DeepseekForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).train()
    for r in routers(model):  # work around the uninitialised pending_load after from_pretrained (tested below)
        r.pending_load.zero_()
    r = routers(model)[0]
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert r.e_score_correction_bias.dtype == torch.float32
    bias0 = biases(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    train_step(model, random_ids(2, 12))
    loads = pendings(model)
    assert all(l.sum().item() == 48 for l in loads)
    opt.step()
    after = biases(model)
    assert_lists_close(after, expected_after_update(bias0, loads))


def test_pending_load_is_zero_after_from_pretrained(tmp_path):
    from modeling_deepseek import DeepseekForCausalLM

    tiny_model().save_pretrained(tmp_path)
    dirt = [torch.full((8,), 3.0) for _ in range(2000)]  # make freed allocator chunks non-zero
    del dirt
    model = DeepseekForCausalLM.from_pretrained(tmp_path).train()
    assert all(torch.equal(p, torch.zeros(8)) for p in pendings(model))
    out = train_step(model, random_ids(2, 12))
    assert_lists_close(pendings(model), list(out.expert_load))


# ----------------------------------------------------------------------------------------------------------------
class _TinyLM(torch.utils.data.Dataset):
    def __init__(self, n=8, length=12):
        self.ids = random_ids(n, length, seed=99)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_with_gradient_accumulation_updates_once_per_step(tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = tiny_model(train=True)
    bias0 = biases(model)
    snapshots = []

    class Snap(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            snapshots.append(biases(model))

    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=2, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=1e-3, save_strategy="no", logging_strategy="no",
        dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_TinyLM(), callbacks=[Snap()])
    trainer.train()
    assert trainer.state.global_step == 2
    assert len(snapshots) == 2
    prev = bias0
    for snap in snapshots:  # each optimizer step moves each bias element by exactly -gamma, 0 or +gamma
        for before, after in zip(prev, snap):
            units = (after - before) / GAMMA
            assert torch.allclose(units, units.round(), atol=1e-3)
            assert units.abs().max() <= 1 + 1e-3
            assert units.abs().max() > 0.5
        prev = snap
    for before, after in zip(bias0, biases(model)):
        units = (after - before) / GAMMA
        assert torch.allclose(units, units.round(), atol=1e-3)
        assert units.abs().max() <= 2 + 1e-3
    assert any(((a - b).abs() > 0.5 * GAMMA).any() for a, b in zip(biases(model), bias0))
    assert all(torch.equal(p, torch.zeros(8)) for p in pendings(model))


def test_a_deep_copy_keeps_updating_its_own_bias():
    original = tiny_model(train=True)
    model = copy.deepcopy(original)  # never ran DeepseekModel.__init__, which registers models for the update
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    before, untouched = biases(model), biases(original)
    train_step(model, random_ids(2, 12))
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(biases(model), before))
    assert_lists_close(biases(original), untouched, atol=0)


def test_padding_counts_nowhere_in_expert_statistics():
    model = tiny_model(train=True, seq_balance_alpha=0.01)
    ids = random_ids(2, 10)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    out = model(ids, attention_mask=mask, labels=ids)
    K = model.config.num_experts_per_tok
    real = int(mask.sum())
    main = out.expert_load[: 2]
    assert torch.equal(main.sum(-1), torch.full((2,), float(real * K)))
    # the padded row's statistics equal those of the same row without its padding
    row = model(ids[:1, 4:], labels=ids[:1, 4:])
    solo = model(ids[1:], labels=ids[1:])
    assert torch.allclose(main, row.expert_load[:2] + solo.expert_load[:2])
    # the sequence-wise loss averages per sequence: the mean of the two rows' own losses
    assert torch.allclose(out.balance_loss, (row.balance_loss + solo.balance_loss) / 2, atol=1e-7)


def test_stale_balancing_bias_warns(monkeypatch):
    from modeling_deepseek import balancing, update_balancing_bias

    monkeypatch.setattr(balancing, "STALE_FORWARDS", 3)
    model = tiny_model(train=True)
    ids = random_ids(1, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            model(ids)
        update_balancing_bias(model)  # an update resets the count
        for _ in range(2):
            model(ids)
    assert not any("has not moved" in str(w.message) for w in caught)
    with pytest.warns(UserWarning, match="has not moved for 3 training forwards"):
        model(ids)
