"""Routed experts (transformers' grouped_mm kernel vs our eager per-expert loop, chosen through the experts
interface) and the routers (V3 sigmoid group-limited, V2 softmax)."""

from __future__ import annotations

import pytest
import torch

from conftest import max_diff, random_ids, tiny_config, tiny_model
from modeling_deepseek import experts as experts_module
from modeling_deepseek.experts import DeepseekExperts, tokens_per_expert
from modeling_deepseek.routing import DeepseekTopkRouter


# ----------------------------------------------------------------------------------------------------------------
# Experts
def make_experts(dtype=torch.float32, seed=0, **overrides) -> DeepseekExperts:
    experts = DeepseekExperts(tiny_config(**overrides))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=g) * 0.1)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=g) * 0.1)
    return experts.to(dtype)


def routing_inputs(T, E, K, dtype=torch.float32, seed=0, only_experts=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, 64, generator=g).to(dtype)
    pool = torch.arange(E) if only_experts is None else torch.tensor(only_experts)
    # K distinct experts per token, drawn from `pool`
    ids = torch.stack([pool[torch.randperm(len(pool), generator=g)[:K]] for _ in range(T)])
    weights = torch.rand(T, K, generator=g).to(dtype) + 0.1
    return x, ids, weights


def implementation(experts, name):
    """experts' forward, dispatched to `name` ("eager": our loop; "grouped_mm": transformers' grouped GEMMs)."""

    def run(*args):
        experts.config._experts_implementation = name
        return experts(*args)

    return run


def forbid_loop(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("grouped_mm fell back to the eager loop")

    monkeypatch.setattr(experts_module, "run_experts_loop", fail)


def run_with_grads(fn, experts, x, ids, w):
    experts.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    out = fn(x, ids, w)
    # a non-uniform upstream gradient
    upstream = torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype)
    (out * upstream).sum().backward()
    return out.detach(), x.grad, experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone(), w.grad


@pytest.mark.parametrize(
    "T, only_experts",
    [(20, None), (1, None), (7, [1, 5, 6]), (33, [0, 7])],  # incl. experts without tokens (empty groups)
    ids=["20-tokens", "1-token", "3-experts-used", "2-experts-used"],
)
def test_grouped_matches_loop_fp32_forward_and_backward(T, only_experts, monkeypatch):
    experts = make_experts()
    x, ids, w = routing_inputs(T, 8, 2, only_experts=only_experts)
    ref = run_with_grads(implementation(experts, "eager"), experts, x, ids, w)
    forbid_loop(monkeypatch)
    got = run_with_grads(implementation(experts, "grouped_mm"), experts, x, ids, w)
    for name, a, b in zip(["out", "x.grad", "gate_up_proj.grad", "down_proj.grad", "weights.grad"], got, ref):
        assert a.shape == b.shape, name
        assert max_diff(a, b) < 1e-5, name
    assert ref[0].abs().max() > 0 and ref[2].abs().max() > 0


def test_loop_reference_matches_dense_formula():
    experts = make_experts()
    x, ids, w = routing_inputs(6, 8, 2)
    out = implementation(experts, "eager")(x, ids, w)
    expected = torch.zeros_like(x)
    I = experts.intermediate_dim
    for t in range(6):
        for k in range(2):
            e = ids[t, k]
            gate = experts.gate_up_proj[e, :I] @ x[t]
            up = experts.gate_up_proj[e, I:] @ x[t]
            expected[t] += w[t, k] * (experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
    assert max_diff(out, expected) < 1e-5


def test_grouped_matches_loop_bf16(monkeypatch):
    # shapes multiple of 8 so that grouped_mm's 16-byte alignment holds in bf16
    experts = make_experts(dtype=torch.bfloat16)
    x, ids, w = routing_inputs(24, 8, 2, dtype=torch.bfloat16)
    ref = run_with_grads(implementation(experts, "eager"), experts, x, ids, w)
    forbid_loop(monkeypatch)
    got = run_with_grads(implementation(experts, "grouped_mm"), experts, x, ids, w)
    assert got[0].dtype == torch.bfloat16
    for name, a, b in zip(["out", "x.grad", "gate_up_proj.grad", "down_proj.grad", "weights.grad"], got, ref):
        scale = b.float().abs().max().item()
        assert scale > 0, name
        assert max_diff(a, b) <= 3e-2 * scale + 1e-3, name


@pytest.mark.parametrize("inter", [12, 36, 6])
def test_misaligned_expert_width_uses_eager_experts(inter):
    # transformers' grouped_mm kernel raises on rows that are not 16-byte aligned
    ids = random_ids(1, 8)
    model = tiny_model(moe_intermediate_size=inter)
    assert model.config._experts_implementation == "eager"
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    with pytest.raises(ValueError, match="multiples of 8"):
        tiny_model(moe_intermediate_size=inter, experts_implementation="grouped_mm")


def test_tokens_per_expert_counts():
    ids = torch.tensor([[0, 3], [3, 7], [0, 3]])
    assert tokens_per_expert(ids, 8).tolist() == [2, 0, 0, 3, 0, 0, 0, 1]
    real = torch.tensor([[1.0], [0.0], [1.0]])  # the middle token is padding
    assert tokens_per_expert(ids, 8, real).tolist() == [2, 0, 0, 2, 0, 0, 0, 0]


def test_model_eager_experts_give_same_logits():
    model = tiny_model()
    assert model.config._experts_implementation == "grouped_mm"
    ids = random_ids(2, 16)
    with torch.no_grad():
        grouped = model(ids).logits
        assert len([m for m in model.modules() if isinstance(m, DeepseekExperts)]) == 3  # layers 1, 2 and MTP
        model.set_experts_implementation("eager")
        loop = model(ids).logits
    assert max_diff(grouped, loop) < 1e-5


def test_model_eager_experts_give_same_loss_and_grads():
    a = tiny_model(train=True)
    b = tiny_model(train=True, experts_implementation="eager")
    ids = random_ids(2, 12)
    la, lb = a(ids, labels=ids).loss, b(ids, labels=ids).loss
    assert abs(la.item() - lb.item()) < 1e-5
    la.backward()
    lb.backward()
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    for name in ["model.layers.1.mlp.experts.gate_up_proj", "model.layers.2.mlp.experts.down_proj",
                 "model.layers.1.mlp.gate.weight", "model.layers.3.mlp.experts.gate_up_proj"]:
        assert max_diff(pa[name].grad, pb[name].grad) < 1e-5, name


# ----------------------------------------------------------------------------------------------------------------
# Routers
def make_router(seed=0, **overrides) -> DeepseekTopkRouter:
    router = DeepseekTopkRouter(tiny_config(**overrides))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=g) * 0.3)
    return router


V3_GROUPED = dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)


def reference_v3_selection(scores, bias, n_group, topk_group, top_k):
    """Token by token, in plain Python: groups by their top-2 biased scores, then top-k inside the kept groups."""
    T, E = scores.shape
    size = E // n_group
    chosen, kept_groups = [], []
    for t in range(T):
        biased = (scores[t] + bias).tolist()
        group_score = [sum(sorted(biased[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(n_group)]
        keep = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        candidates = [e for e in range(E) if e // size in keep]
        chosen.append(set(sorted(candidates, key=lambda e: -biased[e])[:top_k]))
        kept_groups.append(set(keep))
    return chosen, kept_groups


def check_v3_router(router, x, expect_scale):
    logits, weights, ids, scores = router(x)
    T = x.shape[0]
    assert logits.dtype == weights.dtype == scores.dtype == torch.float32
    assert torch.allclose(scores, torch.sigmoid(x.float() @ router.weight.float().T), atol=1e-6)
    chosen, kept = reference_v3_selection(scores.detach(), router.e_score_correction_bias, router.config.n_group,
                                          router.config.topk_group, router.top_k)
    size = router.num_experts // router.config.n_group
    for t in range(T):
        assert set(ids[t].tolist()) == chosen[t], t
        assert len(set(ids[t].tolist())) == router.top_k
        assert {e // size for e in ids[t].tolist()} <= kept[t]  # inside the best topk_group groups
    # weights from the UNBIASED sigmoid scores of the chosen experts, normalised, times the scaling factor
    s = scores.detach().gather(1, ids)
    assert torch.allclose(weights.detach(), s / s.sum(-1, keepdim=True) * expect_scale, atol=1e-6)
    return ids


def test_v3_router_group_limited_selection_and_weights():
    router = make_router(**V3_GROUPED)
    with torch.no_grad():
        router.e_score_correction_bias.normal_(0, 0.05)
    x = torch.randn(32, 64)
    ids = check_v3_router(router, x, expect_scale=2.5)
    # sanity: group limiting is active (some group never appears in a token's picks)
    size = 4
    assert all(len({e // size for e in row}) <= 2 for row in ids.tolist())


def test_v3_router_bias_steers_selection_not_weights():
    router = make_router(**V3_GROUPED)
    x = torch.randn(32, 64)
    _, _, ids_before, _ = router(x)
    target = 13
    assert not (ids_before == target).any(dim=-1).all()
    with torch.no_grad():
        router.e_score_correction_bias[target] = 5.0
    ids = check_v3_router(router, x, expect_scale=2.5)
    assert (ids == target).any(dim=-1).all()  # every token now picks the boosted expert
    # ... and its weight is its unbiased (sigmoid) share, well below what the +5 bias would give
    _, weights, ids, scores = router(x)
    slot = (ids == target).float().argmax(-1)
    w_target = weights.gather(1, slot[:, None]).squeeze(1)
    s = scores.gather(1, ids)
    assert torch.allclose(w_target, scores[:, target] / s.sum(-1) * 2.5, atol=1e-6)


def test_v3_router_masks_with_minus_inf():
    """All biased scores negative: masking the dropped groups with 0 would make their experts win."""
    router = make_router(**V3_GROUPED)
    with torch.no_grad():
        router.e_score_correction_bias.fill_(-5.0)
        router.e_score_correction_bias[:4] = -4.0  # group 0 is best for every token
    x = torch.randn(32, 64)
    ids = check_v3_router(router, x, expect_scale=2.5)
    size = 4
    for row in ids.tolist():
        groups = {e // size for e in row}
        assert 0 in groups and len(groups) <= 2


def test_v3_router_no_normalisation():
    router = make_router(norm_topk_prob=False, routed_scaling_factor=1.0, **V3_GROUPED)
    x = torch.randn(16, 64)
    _, weights, ids, scores = router(x)
    assert torch.allclose(weights, scores.gather(1, ids), atol=1e-6)


def test_v3_router_one_group_is_plain_topk_of_biased_scores():
    router = make_router(n_group=1, topk_group=1)
    with torch.no_grad():
        router.e_score_correction_bias.normal_(0, 0.3)
    x = torch.randn(16, 64)
    _, _, ids, scores = router(x)
    expected = torch.topk(scores + router.e_score_correction_bias, 2, dim=-1).indices
    assert [set(r) for r in ids.tolist()] == [set(r) for r in expected.tolist()]


def test_v3_router_computes_in_fp32_for_bf16_inputs():
    router = make_router(**V3_GROUPED).to(torch.bfloat16)
    router.e_score_correction_bias.data = router.e_score_correction_bias.data.float()
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    logits, weights, ids, scores = router(x)
    assert logits.dtype == torch.float32 and scores.dtype == torch.float32


def test_v3_router_gradient_reaches_router_weight_only_through_weights():
    router = make_router(**V3_GROUPED)
    x = torch.randn(8, 64)
    _, weights, _, _ = router(x)
    weights.sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("scale", [1.0, 16.0])
def test_v2_softmax_greedy(norm, scale):
    router = make_router(topk_method="greedy", norm_topk_prob=norm, routed_scaling_factor=scale)
    assert router.config.scoring_func == "softmax" and router.e_score_correction_bias is None
    x = torch.randn(16, 64)
    _, weights, ids, scores = router(x)
    probs = torch.softmax(x @ router.weight.T, dim=-1)
    assert torch.allclose(scores, probs, atol=1e-6)
    top = torch.topk(probs, 2, dim=-1)
    assert [set(r) for r in ids.tolist()] == [set(r) for r in top.indices.tolist()]
    w = probs.gather(1, ids)
    # the official V2 code normalises the top-k weights or scales them, never both
    expected = w / w.sum(-1, keepdim=True) if norm else w * scale
    assert torch.allclose(weights, expected, atol=1e-6)


def test_v2_group_limited_greedy():
    router = make_router(topk_method="group_limited_greedy", norm_topk_prob=False, routed_scaling_factor=1.0,
                         n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3)
    x = torch.randn(32, 64)
    _, weights, ids, scores = router(x)
    probs = torch.softmax(x @ router.weight.T, dim=-1)
    for t in range(32):
        group_max = probs[t].view(4, 4).amax(-1)
        keep = set(torch.topk(group_max, 2).indices.tolist())
        candidates = [e for e in range(16) if e // 4 in keep]
        expected = set(sorted(candidates, key=lambda e: -probs[t, e].item())[:3])
        assert set(ids[t].tolist()) == expected
    assert torch.allclose(weights, probs.gather(1, ids), atol=1e-6)


@pytest.mark.parametrize("norm", [True, False])
def test_v2_routing_normalises_or_scales(norm):
    config = tiny_config(topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=norm,
                         routed_scaling_factor=16.0)
    router = DeepseekTopkRouter(config)
    torch.nn.init.normal_(router.weight)
    _, weights, ids, scores = router(torch.randn(5, config.hidden_size))
    chosen = scores.gather(1, ids)
    expected = chosen / chosen.sum(-1, keepdim=True) if norm else chosen * 16.0
    assert torch.allclose(weights, expected)
