"""The training objective (modeling_deepseek/objective.py): its parts, gradient accumulation, the scheduled MTP weight
and the routing statistics, against the model's outputs and against each other."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import random_ids, tiny_model
from modeling_deepseek.objective import (max_violation, relative_load, routing_statistics, shifted_labels,
                                         step_fraction, training_objective)


def test_objective_parts_are_the_model_outputs():
    """Called on the backbone's output, the function gives what the model's forward reports, and the loss is
    CE + w * MTP + balance (MTP module's balance term included)."""
    model = tiny_model(train=True, mtp_loss_weight=0.3)
    ids = random_ids(2, 12)
    labels = ids.clone()
    labels[1, :4] = -100
    out = model(ids, labels=labels)

    embeds_BTD = model.model.embed_tokens(ids)
    hidden_BTD = model.model(inputs_embeds=embeds_BTD).last_hidden_state
    targets_BT = shifted_labels(labels)
    parts = training_objective(model, hidden_BTD, embeds_BTD, targets_BT, logits_BTV=model.lm_head(hidden_BTD),
                               mtp_loss_weight=0.3)
    for name in ("loss", "main_loss", "mtp_loss", "balance_loss"):
        assert torch.allclose(getattr(parts, name), getattr(out, name), atol=1e-6), name
    assert torch.allclose(parts.mtp_logits[0], out.mtp_logits[0])

    balance_terms = [moe.last_balance_loss for moe in model.moe_layers()]
    assert len(balance_terms) == 3 and all(t is not None for t in balance_terms)  # 2 main layers, 1 MTP module
    expected = out.main_loss + 0.3 * out.mtp_loss + torch.stack(balance_terms).sum()
    assert torch.allclose(out.loss, expected, atol=1e-6)


def test_loss_shares_add_up_to_the_whole_batch():
    """What data-parallel ranks and gradient-accumulation micro-batches rely on: with Trainer's num_items_in_batch (the
    step's token count), the losses of the parts of a batch sum to the loss of the whole batch, main CE, MTP and the
    sequence-wise balance loss alike (the balance loss once counted in full per part: 2 parts gave it twice)."""
    model = tiny_model(seed=0, train=True, seq_balance_alpha=0.01)
    ids = random_ids(4, 16, seed=3)
    whole = model(ids, labels=ids)
    assert whole.balance_loss is not None and whole.balance_loss > 0
    n = torch.tensor(float(4 * 15))  # labels shifted inside: 15 scored tokens per sequence
    parts = [model(ids[i:i + 2], labels=ids[i:i + 2], num_items_in_batch=n).loss for i in (0, 2)]
    assert torch.allclose(sum(parts), whole.loss, atol=1e-6), (sum(parts).item(), whole.loss.item())


def test_uneven_micro_batches_share_the_main_loss_by_tokens_and_report_own_means():
    """Micro-batches that score different numbers of tokens: their main CE shares still sum to the whole batch's mean
    CE (each is its token sum over the step's count), while every reported part is the micro-batch's own mean: the
    MTP loss and the balance loss as output, the main CE once scaled back by step_fraction (as the callback logs it)."""
    model = tiny_model(seed=0, train=True)
    ids = random_ids(4, 16, seed=3)
    labels = ids.clone()
    labels[0, :9] = -100  # the first micro-batch scores 22 tokens, the second 30
    n = (shifted_labels(labels) != -100).sum()
    shares = []
    for rows in (slice(0, 2), slice(2, 4)):
        alone = model(ids[rows], labels=labels[rows])
        share = model(ids[rows], labels=labels[rows], num_items_in_batch=n)
        fraction = step_fraction(shifted_labels(labels[rows]), n)
        assert 0 < fraction < 1
        assert torch.allclose(share.main_loss / fraction, alone.main_loss, atol=1e-6)
        assert torch.allclose(share.mtp_loss, alone.mtp_loss, atol=1e-6)
        assert torch.allclose(share.balance_loss, alone.balance_loss, atol=1e-6)
        assert torch.allclose(share.loss, fraction * alone.loss, atol=1e-6)
        shares.append(share.main_loss)
    assert torch.allclose(sum(shares), model(ids, labels=labels).main_loss, atol=1e-6)


def test_the_objective_uses_the_scheduled_mtp_weight():
    """model.scheduled_mtp_loss_weight (set by a training schedule) replaces config.mtp_loss_weight in the loss,
    without touching the config; None goes back to the config's weight."""
    model = tiny_model(train=True, mtp_loss_weight=0.3)
    ids = random_ids(2, 12)
    model.scheduled_mtp_loss_weight = 0.0
    out = model(ids, labels=ids)
    assert torch.allclose(out.loss, out.main_loss + out.balance_loss, atol=1e-6)
    model.scheduled_mtp_loss_weight = 0.7
    out = model(ids, labels=ids)
    assert torch.allclose(out.loss, out.main_loss + 0.7 * out.mtp_loss + out.balance_loss, atol=1e-6)
    assert model.config.mtp_loss_weight == 0.3
    model.scheduled_mtp_loss_weight = None
    out = model(ids, labels=ids)
    assert torch.allclose(out.loss, out.main_loss + 0.3 * out.mtp_loss + out.balance_loss, atol=1e-6)


def test_a_depth_without_targets_adds_nothing():
    """Sequences of 2 tokens: next-token CE scores position 0, MTP depth 1 has no target at all. Its CE is 0, not
    the NaN of a mean over nothing, with or without num_items_in_batch."""
    model = tiny_model(train=True)
    ids = random_ids(2, 2)
    for num_items in (None, 4):
        out = model(ids, labels=ids, num_items_in_batch=num_items)
        assert out.mtp_loss.item() == 0.0 and math.isfinite(out.loss.item())
    assert torch.allclose(model(ids, labels=ids).main_loss,
                          F.cross_entropy(model(ids).logits[:, 0], ids[:, 1]), atol=1e-6)


def test_routing_statistics():
    """Expert loads of every MoE layer that routed (main model first, then the MTP module) and MaxVio of the main
    model's layers: max load / mean load - 1; relative_load's minimum is the least used expert's share."""
    model = tiny_model(train=True)
    ids = random_ids(2, 12)
    out = model(ids, labels=ids)
    stats = routing_statistics(model)
    assert stats.main_layers == 2 and stats.expert_load_LE.shape[0] == 3
    assert torch.equal(stats.expert_load_LE, out.expert_load)
    main_LE = out.expert_load[:2]
    by_hand_L = torch.stack([row.max() / row.mean() - 1 for row in main_LE])
    assert torch.allclose(stats.max_violation_L, by_hand_L) and torch.allclose(out.max_violation, by_hand_L.mean())
    assert torch.allclose(relative_load(main_LE).amin(-1), torch.stack([row.min() / row.mean() for row in main_LE]))
    assert max_violation(torch.full((1, 8), 4.0)).item() == 0.0

    model.eval()
    with torch.no_grad():
        assert model(ids).expert_load is None  # an eval forward without labels reports no routing
    assert routing_statistics(tiny_model(first_k_dense_replace=3, num_nextn_predict_layers=0)) is None


@pytest.mark.parametrize("labels, expected", [
    (torch.tensor([[5, 6, 7]]), [[6, 7, -100]]),
    (None, None),
])
def test_shifted_labels(labels, expected):
    got = shifted_labels(labels)
    assert (got is None and expected is None) or got.tolist() == expected
    given = torch.tensor([[1, 2, 3]])
    assert shifted_labels(labels, given) is not None and shifted_labels(labels, given).tolist() == [[1, 2, 3]]
