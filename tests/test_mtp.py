"""Multi-token prediction: loss composition, label / input alignment, weight layout and gradient flow."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import max_diff, random_ids, tiny_model
from modeling_deepseek.mtp import DeepseekMTPLayer, mtp_inputs, mtp_labels

V = 128


def ce(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def test_mtp_loss_and_logits_shapes():
    model = tiny_model()
    ids = random_ids(2, 10)
    out = model(ids, labels=ids)
    assert out.mtp_loss is not None and out.mtp_loss.ndim == 0 and out.mtp_loss.item() > 0
    assert isinstance(out.mtp_logits, tuple) and len(out.mtp_logits) == 1
    assert out.mtp_logits[0].shape == (2, 10, V)
    no_labels = model(ids)
    assert no_labels.mtp_loss is None and no_labels.mtp_logits is None and no_labels.loss is None


def test_no_mtp_layers_means_no_mtp_loss():
    model = tiny_model(num_nextn_predict_layers=0)
    ids = random_ids(2, 10)
    out = model(ids, labels=ids)
    assert out.mtp_loss is None and out.mtp_logits is None
    assert len(model.model.layers) == 3


@pytest.mark.parametrize("train", [True, False])
def test_total_loss_composition(train):
    model = tiny_model(train=train, mtp_loss_weight=0.3)
    ids = random_ids(2, 12)
    out = model(ids, labels=ids)
    balance = out.balance_loss if out.balance_loss is not None else torch.tensor(0.0)
    if train:
        assert out.balance_loss is not None and out.balance_loss.item() > 0
    expected = out.main_loss + 0.3 * out.mtp_loss + balance
    assert abs(out.loss.item() - expected.item()) < 1e-6
    assert out.aux_loss is out.balance_loss


def test_main_and_mtp_losses_by_hand():
    """Depth 1 at position i predicts token i+2: CE(mtp_logits[:, :T-2], labels[:, 2:])."""
    model = tiny_model()
    ids = random_ids(2, 12)
    labels = ids.clone()
    labels[1, 7] = -100
    out = model(ids, labels=labels)
    assert abs(out.main_loss.item() - ce(out.logits[:, :-1], labels[:, 1:]).item()) < 1e-6
    assert abs(out.mtp_loss.item() - ce(out.mtp_logits[0][:, :-2], labels[:, 2:]).item()) < 1e-6


def test_two_depths_mtp_loss_is_mean_of_depths():
    model = tiny_model(num_nextn_predict_layers=2)
    assert [type(layer) for layer in model.model.layers[3:]] == [DeepseekMTPLayer, DeepseekMTPLayer]
    ids = random_ids(2, 12)
    out = model(ids, labels=ids)
    assert len(out.mtp_logits) == 2
    ce1 = ce(out.mtp_logits[0][:, :-2], ids[:, 2:])
    ce2 = ce(out.mtp_logits[1][:, :-3], ids[:, 3:])
    assert abs(out.mtp_loss.item() - ((ce1 + ce2) / 2).item()) < 1e-6
    assert abs(out.loss.item() - (out.main_loss + 0.3 * out.mtp_loss).item()) < 1e-6  # eval: no balance loss
    assert not torch.allclose(out.mtp_logits[0], out.mtp_logits[1])


def test_mtp_labels_helper():
    labels = torch.tensor([[10, 11, 12, 13, 14], [20, 21, -100, 23, 24]])
    assert mtp_labels(labels, 1).tolist() == [[11, 12, 13, 14, -100], [21, -100, 23, 24, -100]]
    assert mtp_labels(labels, 2).tolist() == [[12, 13, 14, -100, -100], [-100, 23, 24, -100, -100]]
    assert mtp_labels(labels, 1, ignore_index=-1).tolist()[0] == [11, 12, 13, 14, -1]
    assert labels.tolist()[0] == [10, 11, 12, 13, 14]  # input untouched


def test_mtp_inputs_helper():
    h = torch.randn(2, 5, 3)
    emb = torch.arange(2 * 5 * 3, dtype=torch.float).view(2, 5, 3)
    h_out, shifted = mtp_inputs(h, emb, 1)
    assert h_out is h or torch.equal(h_out, h)  # h^{k-1}_i stays at position i
    assert torch.equal(shifted[:, :4], emb[:, 1:])  # paired with Emb(t_{i+1})
    assert torch.equal(shifted[:, 4], torch.zeros(2, 3))
    _, shifted2 = mtp_inputs(h, emb, 2)
    assert torch.equal(shifted2[:, :3], emb[:, 2:]) and torch.equal(shifted2[:, 3:], torch.zeros(2, 2, 3))


def test_mtp_token_dependencies_are_causal():
    """Depth-1 prediction at position i sees tokens <= i+1 only; main logits at i see tokens <= i."""
    model = tiny_model()
    ids = random_ids(1, 12)
    j = 7
    changed = ids.clone()
    changed[0, j] = (ids[0, j] + 5) % V
    a, b = model(ids, labels=ids), model(changed, labels=changed)
    assert max_diff(a.logits[:, :j], b.logits[:, :j]) < 1e-5
    assert max_diff(a.logits[:, j], b.logits[:, j]) > 1e-4
    assert max_diff(a.mtp_logits[0][:, : j - 1], b.mtp_logits[0][:, : j - 1]) < 1e-5
    assert max_diff(a.mtp_logits[0][:, j - 1], b.mtp_logits[0][:, j - 1]) > 1e-4


def test_embedding_comes_first_in_the_concatenation():
    """h' = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h)]): zero the hidden half of eh_proj and h stops mattering."""
    model = tiny_model()
    layer = model.model.layers[3]
    D = 64
    with torch.no_grad():
        layer.eh_proj.weight[:, D:] = 0
    x = torch.randn(1, 6, D)
    pos = torch.arange(6)[None]
    pe = model.model.rotary_emb(x, pos)
    emb = torch.randn(1, 6, D)
    with torch.no_grad():
        out1 = layer(torch.randn(1, 6, D), emb, position_embeddings=pe, position_ids=pos)[0]
        out2 = layer(torch.randn(1, 6, D), emb, position_embeddings=pe, position_ids=pos)[0]
        out3 = layer(torch.randn(1, 6, D), torch.randn(1, 6, D), position_embeddings=pe, position_ids=pos)[0]
    assert max_diff(out1, out2) < 1e-6
    assert max_diff(out1, out3) > 1e-3


def test_gradients_reach_mtp_parameters():
    model = tiny_model(train=True)
    ids = random_ids(2, 12)
    out = model(ids, labels=ids)
    out.mtp_loss.backward()
    layer = model.model.layers[3]
    for name, p in [("eh_proj", layer.eh_proj.weight), ("enorm", layer.enorm.weight), ("hnorm", layer.hnorm.weight),
                    ("shared_head.norm", layer.shared_head.norm.weight),
                    ("self_attn.kv_b_proj", layer.self_attn.kv_b_proj.weight),
                    ("mlp.experts", layer.mlp.experts.gate_up_proj),
                    ("embed_tokens", model.model.embed_tokens.weight), ("lm_head", model.lm_head.weight),
                    # through h^0 the MTP loss also trains the main model
                    ("layer 2 attention", model.model.layers[2].self_attn.o_proj.weight)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_main_loss_gradient_does_not_touch_mtp():
    model = tiny_model(train=True)
    ids = random_ids(2, 12)
    model(ids, labels=ids).main_loss.backward()
    layer = model.model.layers[3]
    assert layer.eh_proj.weight.grad is None or layer.eh_proj.weight.grad.abs().sum() == 0


@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_weight_layout(depth):
    model = tiny_model(num_nextn_predict_layers=depth)
    keys = set(model.state_dict())
    N = 3
    for k in range(depth):
        prefix = f"model.layers.{N + k}."
        for name in ["enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                     "self_attn.kv_b_proj.weight", "input_layernorm.weight", "mlp.gate.weight",
                     "mlp.gate.e_score_correction_bias"]:
            assert prefix + name in keys, prefix + name
        assert model.model.layers[N + k].eh_proj.weight.shape == (64, 128)
        # the embedding and the head are shared: no copies inside the MTP block
        assert not any(key.startswith(prefix) and ("embed_tokens" in key or "shared_head.head" in key) for key in keys)
    assert f"model.layers.{N + depth}.enorm.weight" not in keys
    vocab_sized = [n for n, p in model.named_parameters() if tuple(p.shape) == (V, 64)]
    assert sorted(vocab_sized) == ["lm_head.weight", "model.embed_tokens.weight"]


def test_mtp_loss_weight_scales_contribution():
    ids = random_ids(2, 12)
    out_a = tiny_model(mtp_loss_weight=0.3)(ids, labels=ids)
    out_b = tiny_model(mtp_loss_weight=0.1)(ids, labels=ids)
    assert abs(out_a.mtp_loss.item() - out_b.mtp_loss.item()) < 1e-6
    assert abs((out_a.loss - out_b.loss).item() - 0.2 * out_a.mtp_loss.item()) < 1e-5


@pytest.mark.parametrize("as_tensor", [False, True])
def test_loss_with_num_items_in_batch(as_tensor):
    """Trainer's gradient-accumulation convention: CE summed over the micro-batch / the step's label count."""
    model = tiny_model(train=True, seq_balance_alpha=0.0)
    ids = random_ids(2, 12)
    labels = ids.clone()
    labels[0, :3] = -100
    plain = model(ids, labels=labels)
    valid = int((labels[:, 1:] != -100).sum())
    wrap = (lambda n: torch.tensor(n)) if as_tensor else (lambda n: n)
    same = model(ids, labels=labels, num_items_in_batch=wrap(valid))  # one micro-batch per step
    assert abs(same.loss.item() - plain.loss.item()) < 1e-5
    assert abs(same.mtp_loss.item() - plain.mtp_loss.item()) < 1e-5
    half = model(ids, labels=labels, num_items_in_batch=wrap(2 * valid))  # one of two equal micro-batches
    assert abs(half.loss.item() - plain.loss.item() / 2) < 1e-5
    assert abs(half.mtp_loss.item() - plain.mtp_loss.item()) < 1e-5  # the reported MTP loss stays a mean
