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

from modeling_deepseek.indexer_loss import (attention_target, check_stage, dense_indexer_loss, head_summed_attention,
                                            indexer_kl, select_keys, sparse_indexer_loss)

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


def _index_scores(iq, iw, ik):
    """I[b, t, s] = sum_h w[b, t, h] relu(q[b, t, h] . k[b, s]): the lightning indexer's score."""
    return torch.einsum("bth,bths->bts", iw, torch.einsum("bthd,bsd->bths", iq, ik).relu())


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
    main_q, main_k, iq, iw, ik, real_BT, allowed_BTS = _toy_inputs()
    ref = _reference_loss(main_q, main_k, iq, iw, ik, real_BT, allowed_BTS, topk=None)
    index_scores_BTS = _index_scores(iq, iw, ik)
    ours = dense_indexer_loss(index_scores_BTS, _main_probs(main_q, main_k, allowed_BTS), allowed_BTS, real_BT)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for g_ours, g_ref in zip(_grads(ours, iq, iw, ik), _grads(ref, iq, iw, ik)):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-6)
    # The head-summed target computed head-chunk by head-chunk without [B, H, T, S] gives the same loss.
    summed_BTS = head_summed_attention(main_q, main_k, C ** -0.5, allowed_BTS, head_chunk=2)
    torch.testing.assert_close(dense_indexer_loss(index_scores_BTS, summed_BTS, allowed_BTS, real_BT), ours)


@pytest.mark.parametrize("topk", [3, T + 2])  # fewer keys than the context; more (k > context is fine)
def test_sparse_loss_and_indexer_gradients_match_reference(topk):
    main_q, main_k, iq, iw, ik, real_BT, allowed_BTS = _toy_inputs(seed=1)
    ref = _reference_loss(main_q, main_k, iq, iw, ik, real_BT, allowed_BTS, topk=topk)
    index_scores_BTS = _index_scores(iq, iw, ik)
    masked = index_scores_BTS.detach().masked_fill(~allowed_BTS, float("-inf"))
    topk_BTK = masked.topk(min(topk, T), dim=-1).indices
    # The sparse main attention: each query attends its selected keys only (dense-masked, then taken at them).
    selected_BTS = torch.zeros(B, T, T, dtype=torch.bool).scatter(-1, topk_BTK, True) & allowed_BTS
    probs_BHTK = select_keys(_main_probs(main_q, main_k, selected_BTS), topk_BTK)
    ours = sparse_indexer_loss(index_scores_BTS, topk_BTK, probs_BHTK, allowed_BTS, real_BT)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for g_ours, g_ref in zip(_grads(ours, iq, iw, ik), _grads(ref, iq, iw, ik)):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-6)
    if topk > T:  # S_t is every key t may attend: the sparse loss is the dense one
        dense = dense_indexer_loss(index_scores_BTS, _main_probs(main_q, main_k, allowed_BTS), allowed_BTS, real_BT)
        torch.testing.assert_close(ours, dense)


def test_kl_gradient_is_softmax_minus_target_and_target_is_detached():
    """d L_I / d I[t, x] = (softmax(I[t])[x] - p[t, x]) / scored queries, 0 at keys outside X_t; no gradient
    reaches the main attention's probabilities."""
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(B, T, T, generator=g, requires_grad=True)
    probs = torch.rand(B, H, T, T, generator=g, requires_grad=True)
    allowed = torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T)
    p = attention_target(probs, allowed)
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
