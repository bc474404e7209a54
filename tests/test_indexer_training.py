"""The lightning indexer's training (DeepSeek-V3.2 DSA): the loss pieces of modeling_deepseek/indexer_loss.py against
a reference written here from the V3.2 report's formulas, query by query with explicit loops, then the two stages
on the tiny model with Trainer (trainers/indexer_training.py).

Reference (V3.2 report, section 2.1): p[t] = L1-normalise(sum_h softmax_h(main attention scores of t)),
L_I = sum_t KL(p[t, X_t] || softmax(I[t, X_t])) with X_t every key t may attend (dense warm-up) or the indexer's
top-k S_t (sparse stage; the main attention then attends S_t only). Ours is a mean over the scored queries.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modeling_deepseek.indexer import IndexerRecord, head_summed_distribution
from modeling_deepseek.indexer_loss import check_stage, indexer_kl, layer_indexer_loss

B, T, H, C, HI, DI = 2, 7, 3, 5, 2, 4  # batch, tokens, main heads, main key width, indexer heads, indexer width


def _toy_inputs(seed: int = 0):
    """A main attention (MQA, one key per token as absorbed MLA) and an indexer's query / weights / key, random."""
    g = torch.Generator().manual_seed(seed)
    main_q = torch.randn(B, H, T, C, generator=g)
    main_k = torch.randn(B, T, C, generator=g)
    iq = torch.randn(B, T, HI, DI, generator=g, requires_grad=True)
    iw = torch.randn(B, T, HI, generator=g, requires_grad=True)
    ik = torch.randn(B, T, DI, generator=g, requires_grad=True)
    # Sequence 1 is left-padded by 2 tokens: they are neither scored nor attended.
    real_BT = torch.ones(B, T, dtype=torch.bool)
    real_BT[1, :2] = False
    allowed_BTS = torch.ones(T, T, dtype=torch.bool).tril() & real_BT[:, None, :]
    return main_q, main_k, iq, iw, ik, real_BT, allowed_BTS


def _index_scores(iq, iw, ik, allowed_BTS):
    """I[b, t, s] = sum_h w[b, t, h] relu(q[b, t, h] . k[b, s]), -inf where t may not attend s (as the indexer)."""
    scores_BTS = torch.einsum("bth,bths->bts", iw, torch.einsum("bthd,bsd->bths", iq, ik).relu())
    return scores_BTS.masked_fill(~allowed_BTS, float("-inf"))


def _reference_loss(main_q, main_k, iq, iw, ik, real_BT, allowed_BTS, topk: int | None):
    """Query by query: the keys X_t, the main attention over them (dense: all allowed keys; sparse: only the
    indexer's top-k among every key, as the sparse main attention attends), the KL of F.kl_div."""
    scale = C ** -0.5
    terms = []
    for b in range(B):
        for t in range(T):
            if not real_BT[b, t]:
                continue
            scores_s = torch.stack([(iw[b, t, h] * (iq[b, t, h] @ ik[b].T).relu()) for h in range(HI)]).sum(0)
            keys = allowed_BTS[b, t].nonzero().squeeze(-1)
            if topk is not None:  # the top-k over every key, with the keys t may not attend scored -inf
                masked = scores_s.detach().masked_fill(~allowed_BTS[b, t], float("-inf"))
                selected = masked.topk(min(topk, T)).indices
                keys = selected[allowed_BTS[b, t, selected]]
            if len(keys) == 0:
                continue
            p = torch.zeros(len(keys))
            for h in range(H):
                p += torch.softmax((main_q[b, h, t] @ main_k[b, keys].T) * scale, dim=-1)
            p = p / p.sum()
            log_q = torch.log_softmax(scores_s[keys], dim=-1)
            terms.append(F.kl_div(log_q, p, reduction="sum"))
    return torch.stack(terms).mean()


def _main_probs(main_q, main_k, allowed_BTS):
    scores = torch.einsum("bhtc,bsc->bhts", main_q, main_k) * C ** -0.5
    return scores.masked_fill(~allowed_BTS[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)


def _grads(loss, *leaves):
    return torch.autograd.grad(loss, leaves)


def test_dense_loss_and_indexer_gradients_match_reference():
    """The dense warm-up's record: scores over every key, nothing selected, the dense head-summed distribution."""
    main_q, main_k, iq, iw, ik, real_BT, allowed_BTS = _toy_inputs()
    ref = _reference_loss(main_q, main_k, iq, iw, ik, real_BT, allowed_BTS, topk=None)
    scores_BTS = _index_scores(iq, iw, ik, allowed_BTS)
    target_BTS = head_summed_distribution(_main_probs(main_q, main_k, allowed_BTS))
    ours = layer_indexer_loss(IndexerRecord(scores_BTS, None, None, target_BTS), real_BT)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for g_ours, g_ref in zip(_grads(ours, iq, iw, ik), _grads(ref, iq, iw, ik)):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("topk", [3, T + 2])  # fewer keys than the context; more (k > context is fine)
def test_sparse_loss_and_indexer_gradients_match_reference(topk):
    """The sparse stage's record: the top-k of every query, which of them it may attend, and the sparse main
    attention's head-summed distribution over them."""
    main_q, main_k, iq, iw, ik, real_BT, allowed_BTS = _toy_inputs(seed=1)
    ref = _reference_loss(main_q, main_k, iq, iw, ik, real_BT, allowed_BTS, topk=topk)
    scores_BTS = _index_scores(iq, iw, ik, allowed_BTS)
    topk_BTK = scores_BTS.detach().topk(min(topk, T), dim=-1).indices
    valid_BTK = allowed_BTS.gather(-1, topk_BTK)
    # The sparse main attention: each query attends its selected keys only (dense-masked, then taken at them).
    selected_BTS = torch.zeros(B, T, T, dtype=torch.bool).scatter(-1, topk_BTK, True) & allowed_BTS
    probs_BHTK = _main_probs(main_q, main_k, selected_BTS).gather(-1, topk_BTK.unsqueeze(1).expand(-1, H, -1, -1))
    record = IndexerRecord(scores_BTS, topk_BTK, valid_BTK, head_summed_distribution(probs_BHTK))
    ours = layer_indexer_loss(record, real_BT)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for g_ours, g_ref in zip(_grads(ours, iq, iw, ik), _grads(ref, iq, iw, ik)):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-6)
    if topk > T:  # S_t is every key t may attend: the sparse loss is the dense one
        dense = IndexerRecord(scores_BTS, None, None, head_summed_distribution(_main_probs(main_q, main_k, allowed_BTS)))
        torch.testing.assert_close(ours, layer_indexer_loss(dense, real_BT))


def test_kl_gradient_is_softmax_minus_target_and_target_is_detached():
    """d L_I / d I[t, x] = (softmax(I[t])[x] - p[t, x]) / scored queries, 0 at keys outside X_t; no gradient
    reaches the main attention's probabilities."""
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(B, T, T, generator=g, requires_grad=True)
    probs = torch.rand(B, H, T, T, generator=g, requires_grad=True)
    allowed = torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T)
    p = head_summed_distribution(probs.masked_fill(~allowed[:, None], 0.0))
    assert not p.requires_grad
    torch.testing.assert_close(p.sum(-1), torch.ones(B, T))
    loss = indexer_kl(scores, p, allowed)
    loss.backward()
    expected = (scores.detach().masked_fill(~allowed, float("-inf")).softmax(-1) - p) / (B * T)
    torch.testing.assert_close(scores.grad, expected)
    assert probs.grad is None
    assert indexer_kl(scores, p, torch.zeros_like(allowed)).item() == 0.0  # nothing scored: 0, not NaN


def test_stage_names_are_checked():
    assert check_stage("dense") == "dense" and check_stage(None) is None
    with pytest.raises(ValueError, match="'warmup'"):
        check_stage("warmup")


# ---------------------------------------------------------------------------------------------------------------------
# The two stages in the tiny DeepSeek-V3.2 model: the model's indexer_loss and gradients against the reference above,
# fed with what the model's layers saw (their inputs, caught by hooks) and attended (output_attentions).

V32 = dict(index_topk=4, index_n_heads=2, index_head_dim=16)  # k = 4 of up to 10 keys: the sparse path gathers
SEQ = 10


def _v32_model(seed: int = 0, **overrides):
    from conftest import tiny_model

    return tiny_model(seed=seed, train=True, **{**V32, **overrides})


def _padded_batch():
    from conftest import random_ids

    ids = random_ids(2, SEQ, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _reference_indexer_loss(model, ids, mask, stage):
    """Sum over the layers of the reference L_I (the per-query loop of _reference_kl), from every attention layer's
    input (a pre-hook) and its attention probabilities (output_attentions), the indexer's scores recomputed with
    the indexer's own scoring function (parity-tested against transformers' DeepseekV32Indexer elsewhere)."""
    from modeling_deepseek.indexer import allowed_keys
    from modeling_deepseek.indexer_loss import indexed_attentions

    inputs = []

    def catch(module, args, kwargs):
        inputs.append((module, args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"],
                       kwargs.get("attention_mask")))

    handles = [attn.register_forward_pre_hook(catch, with_kwargs=True) for attn in indexed_attentions(model)]
    try:
        with torch.no_grad():
            probs_per_layer = model(ids, attention_mask=mask, output_attentions=True).attentions
    finally:
        for handle in handles:
            handle.remove()
    real_BT = mask.bool()
    total = 0.0
    for (attn, x_BTD, (cos, sin), attention_mask), probs_BHTS in zip(inputs, probs_per_layer, strict=True):
        indexer = attn.indexer
        x_BTD = x_BTD.detach()
        Bx, Tx, _ = x_BTD.shape
        allowed_BTS = allowed_keys(attention_mask, Bx, Tx, Tx, x_BTD.device).expand(Bx, -1, -1)
        q_resid = attn.q_a_layernorm(attn.q_a_proj(x_BTD))
        scores_BTS = indexer.scores(x_BTD, q_resid, cos, sin, indexer.keys(x_BTD, cos, sin), allowed_BTS)
        total = total + _reference_kl(scores_BTS, probs_BHTS, allowed_BTS, real_BT,
                                      topk=indexer.topk if stage == "sparse" else None)
    return total


def _reference_kl(scores_BTS, probs_BHTS, allowed_BTS, real_BT, topk):
    terms = []
    for b in range(scores_BTS.shape[0]):
        for t in range(scores_BTS.shape[1]):
            keys = allowed_BTS[b, t].nonzero().squeeze(-1)
            if topk is not None:
                selected = scores_BTS[b, t].detach().topk(min(topk, scores_BTS.shape[-1])).indices
                keys = selected[allowed_BTS[b, t, selected]]
            if not real_BT[b, t] or len(keys) == 0:
                continue
            p = probs_BHTS[b, :, t, keys].sum(0)
            terms.append(F.kl_div(torch.log_softmax(scores_BTS[b, t, keys], -1), p / p.sum(), reduction="sum"))
    return torch.stack(terms).mean()


def _grads_by_name(model):
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def test_dense_warmup_trains_the_indexers_alone_on_the_reference_loss(monkeypatch):
    """The warm-up's target is recomputed head by head beside SDPA (indexer_loss.dense_attention_target: one head
    per block here); the reference takes the eager kernel's probabilities."""
    from modeling_deepseek import indexer_loss
    from trainers.indexer_training import indexer_parameters, prepare_indexer_stage

    monkeypatch.setattr(indexer_loss, "TARGET_BLOCK_BYTES", 1)
    monkeypatch.setattr(indexer_loss, "SCORE_BLOCK_BYTES", 1)  # backward rescoring one query at a time
    model = _v32_model(num_nextn_predict_layers=0)
    prepare_indexer_stage(model, "dense")
    indexer_names = set(indexer_parameters(model))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == indexer_names
    ids, mask, labels = _padded_batch()
    out = model(ids, attention_mask=mask, labels=labels)
    ref = _reference_indexer_loss(model, ids, mask, "dense")
    torch.testing.assert_close(out.indexer_loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, out.main_loss + out.balance_loss + out.indexer_loss)
    out.loss.backward()
    ref_grads = torch.autograd.grad(ref, [p for n, p in model.named_parameters() if n in indexer_names])
    for (name, p), g_ref in zip([(n, p) for n, p in model.named_parameters() if n in indexer_names], ref_grads):
        torch.testing.assert_close(p.grad, g_ref, rtol=1e-4, atol=1e-7, msg=name)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in indexer_names)
    # The warm-up attends densely: its attention probabilities are nonzero beyond the top-k.
    with torch.no_grad():
        probs = model(ids, attention_mask=mask, output_attentions=True).attentions[0]
    assert int((probs[0, 0, -1] > 0).sum()) == SEQ > V32["index_topk"]
    prepare_indexer_stage(model, None)  # leaving the warm-up gives the main model back its gradients
    assert all(p.requires_grad for p in model.parameters())


def test_sparse_stage_splits_the_gradients_between_lm_loss_and_indexer_loss(monkeypatch):
    """The main model's gradients are those of the LM loss alone (the same model with no indexer stage); the
    indexers' are those of the reference L_I over the selected keys (the LM loss reaches them not at all), through
    the scores recomputed in backward three queries at a time."""
    import copy

    from modeling_deepseek import indexer_loss
    from trainers.indexer_training import indexer_parameters, prepare_indexer_stage

    monkeypatch.setattr(indexer_loss, "SCORE_BLOCK_BYTES", 4 * V32["index_n_heads"] * SEQ * 2 * 3)
    rescored = []
    record_loss = indexer_loss.layer_indexer_loss
    monkeypatch.setattr(indexer_loss, "layer_indexer_loss",
                        lambda record, mask=None: rescored.append(record.rescore is not None) or record_loss(record, mask))

    model = _v32_model(num_nextn_predict_layers=0)
    plain = copy.deepcopy(model)
    prepare_indexer_stage(model, "sparse")
    indexer_names = set(indexer_parameters(model))
    ids, mask, labels = _padded_batch()
    out = model(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert rescored == [True] * 3  # every layer's scores kept no graph in forward
    plain_out = plain(ids, attention_mask=mask, labels=labels)
    assert plain_out.indexer_loss is None
    plain_out.loss.backward()
    torch.testing.assert_close(out.main_loss, plain_out.main_loss)
    grads, plain_grads = _grads_by_name(model), _grads_by_name(plain)
    for name in grads:
        if name not in indexer_names:
            torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)
        else:
            assert plain_grads[name] is None or not plain_grads[name].any(), name
    ref = _reference_indexer_loss(model, ids, mask, "sparse")
    torch.testing.assert_close(out.indexer_loss, ref, rtol=1e-5, atol=1e-6)
    names = sorted(indexer_names)
    ref_grads = torch.autograd.grad(ref, [dict(model.named_parameters())[n] for n in names])
    for name, g_ref in zip(names, ref_grads):
        torch.testing.assert_close(grads[name], g_ref, rtol=1e-4, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------------------------------
# Trainer: the warm-up, then the sparse stage, on the tiny V3.2 model with its MTP module (which has an indexer too).


def test_trainer_runs_the_warmup_then_the_sparse_stage(tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    from conftest import random_ids, routers
    from trainers.indexer_training import DeepseekIndexerTrainer, indexer_parameters, prepare_indexer_stage

    model = _v32_model()
    ids = random_ids(2, SEQ, seed=4).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})

    def args(lr, steps):
        return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, learning_rate=lr,
                                 max_steps=steps, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                                 disable_tqdm=True, seed=0, dataloader_num_workers=0)

    def snapshot():
        return ({n: p.detach().clone() for n, p in model.named_parameters()},
                [r.e_score_correction_bias.clone() for r in routers(model)])

    def changed(before):
        params, biases = before
        return ({n for n, p in model.named_parameters() if not torch.equal(p, params[n])},
                any(not torch.equal(b, r.e_score_correction_bias) for b, r in zip(biases, routers(model))))

    indexer_names = set(indexer_parameters(model))
    assert any(".layers.3." in n for n in indexer_names)  # the MTP module's indexer
    before = snapshot()
    warmup = DeepseekIndexerTrainer(model=model, args=args(1e-2, 6), train_dataset=data, indexer_stage="dense")
    warmup.train()
    moved, bias_moved = changed(before)
    assert moved == indexer_names and not bias_moved  # the main model frozen whole, its balancing bias included
    kl = [h["indexer_loss"] for h in warmup.state.log_history if "indexer_loss" in h]
    assert len(kl) == 6 and kl[-1] < kl[0]  # the indexers learn where the (dense) attention looks
    assert all("lm_loss" in h for h in warmup.state.log_history if "indexer_loss" in h)

    before = snapshot()
    sparse = DeepseekIndexerTrainer(model=model, args=args(1e-3, 2), train_dataset=data, indexer_stage="sparse")
    sparse.train()
    moved, bias_moved = changed(before)
    assert indexer_names < moved and bias_moved  # main model (LM loss) and indexers (their KL) both train
    assert len([h for h in sparse.state.log_history if "indexer_loss" in h]) == 2

    # A trainer whose model was moved to another stage before train() refuses, rather than train the wrong set.
    stale = DeepseekIndexerTrainer(model=model, args=args(1e-3, 1), train_dataset=data, indexer_stage="dense")
    prepare_indexer_stage(model, "sparse")
    with pytest.raises(RuntimeError, match="indexer stage 'dense'"):
        stale.train()
    with pytest.raises(ValueError, match="no lightning indexer"):
        prepare_indexer_stage(_v32_model(index_topk=None), "dense")
    with pytest.raises(ValueError, match="indexer_stage='dense' or 'sparse'"):
        DeepseekIndexerTrainer(model=model, args=args(1e-3, 1), train_dataset=data, indexer_stage=None)


@pytest.mark.parametrize("stage", ["dense", "sparse"])
def test_activation_checkpointing_gives_the_same_indexer_loss_and_gradients(stage):
    """Layers re-run in backward (non-reentrant checkpointing; in the warm-up no input of a layer requires grad)."""
    import copy

    from conftest import random_ids
    from trainers.indexer_training import prepare_indexer_stage

    plain = _v32_model(num_nextn_predict_layers=0)
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ids = random_ids(2, SEQ, seed=5)
    results = []
    for model in (plain, checkpointed):
        prepare_indexer_stage(model, stage)
        out = model(ids, labels=ids)
        out.loss.backward()
        results.append((out.indexer_loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads_ckpt.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], msg=name)
