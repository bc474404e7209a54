"""FP8 training (quant/fp8_training.py, quant/fp8_training_modules.py, quant/adamw_bf16_moments.py; the tile math in
modeling_deepseek/fp8_format.py, the GEMM backends in modeling_deepseek/fp8_gemm.py).

Operands get per-row and per-column magnitudes spread over four decades, so that a scale taken over the wrong tile
(a 128 x 1 tile where 1 x 128 belongs, or the other way round) crushes the small entries and the signal-to-noise
threshold fails; `test_snr_threshold_catches_a_wrong_tile_orientation` shows it does. Dimensions are ragged
(not multiples of 128) throughout. CUDA tests skip cleanly without a GPU.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import random_ids, tiny_model
from modeling_deepseek import DeepseekForCausalLM
from modeling_deepseek.configuration import MEMORY_OPTIONS
from modeling_deepseek.fp8 import DeepseekFP8Linear
from modeling_deepseek.fp8_format import (E5M6_MAX, FP8_DTYPE, dequantize_blockwise, dequantize_e5m6,
                                          quantize_blockwise, quantize_e5m6, quantize_token_tiles)
from modeling_deepseek.fp8_gemm import scaled_mm_available
from quant.adamw_bf16_moments import AdamWBF16Moments
from quant.fp8_training import FP8TrainingConfig, convert_to_fp8_training
from quant.fp8_training_modules import Float8TrainingExperts, Float8TrainingLinear, fp8_linear

REF = FP8TrainingConfig(backend="reference")
needs_hopper = pytest.mark.skipif(not scaled_mm_available(), reason="the scaled_mm FP8 backend needs a Hopper GPU")


def snr_db(approx: torch.Tensor, exact: torch.Tensor) -> float:
    exact = exact.double()
    return (10 * torch.log10(exact.pow(2).sum() / (approx.double() - exact).pow(2).sum())).item()


def worst_row_snr_db(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """The smallest per-row SNR: rows of small magnitude count as much as large ones."""
    exact = exact.double()
    return (10 * torch.log10(exact.pow(2).sum(-1) / (approx.double() - exact).pow(2).sum(-1))).min().item()


def spread(rows: int, cols: int, seed: int, row_decades: float = 4.0, col_decades: float = 1.0) -> torch.Tensor:
    """Gaussian entries with row and column magnitudes spread over +-decades (independently shuffled). 4 decades
    either way exceed what one e4m3 tile holds (448 / 2^-9, 5.4 decades), so a tile across them loses the small."""
    g = torch.Generator().manual_seed(seed)
    r = torch.logspace(-row_decades, row_decades, rows)[torch.randperm(rows, generator=g)]
    c = torch.logspace(-col_decades, col_decades, cols)[torch.randperm(cols, generator=g)]
    return torch.randn(rows, cols, generator=g) * r[:, None] * c[None, :]


# ====================================================================================================================
# Tiles


@pytest.mark.parametrize("block", [(1, 128), (128, 128), (128, 1)])
@pytest.mark.parametrize("pow2", [False, True])
def test_round_trip_within_the_e4m3_bound_per_tile(block, pow2):
    x = spread(300, 200, seed=0, row_decades=2.0)  # within one tile's range
    q, scale = quantize_blockwise(x, block, pow2_scale=pow2)
    br, bc = block
    assert q.dtype == FP8_DTYPE and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (-(-300 // br), -(-200 // bc))
    s = scale.repeat_interleave(br, 0)[:300].repeat_interleave(bc, 1)[:, :200]
    err = (dequantize_blockwise(q, scale, block) - x).abs()
    # relative 2^-4 in e4m3's normal range, half a subnormal step (2^-10 in scaled units) below it
    assert (err <= x.abs() * 2.0**-4 + s * 2.0**-10).all()
    assert ((x.abs() / s) <= 448 * (1 + 2**-20)).all()  # up to the rounding of amax / (amax / 448)
    if pow2:
        assert torch.equal(scale, torch.exp2(torch.log2(scale).round()))
        assert ((x.abs() / s).amax() > 224)  # rounding up to a power of two loses at most one binade
    else:  # amax / 448 exactly: every tile's largest entry lands on 448
        tiles = F.pad(x.abs(), (0, -200 % bc, 0, -300 % br)).unflatten(1, (-1, bc)).unflatten(0, (-1, br))
        torch.testing.assert_close(scale, tiles.amax(dim=(1, 3)) / 448, rtol=0, atol=0)


def test_tile_scales_shapes_and_orientation():
    x = torch.randn(5, 3, 300)
    q, s = quantize_blockwise(x)  # (1, 128): one scale per row per 128 channels
    assert s.shape == (5, 3, 3)
    v = torch.randn(300)
    q1, s1 = quantize_blockwise(v)
    assert s1.shape == (3,) and torch.equal(dequantize_blockwise(q1, s1), dequantize_blockwise(q1[None], s1[None])[0])
    w = torch.zeros(200, 300)
    w[130, 260] = 448.0 * 8  # one outlier: only the tile holding it gets scale 8
    for block, where in (((1, 128), (130, 2)), ((128, 128), (1, 2)), ((128, 1), (1, 260))):
        _, sc = quantize_blockwise(w, block)
        assert sc[where].item() == 8.0 and (sc == 8.0).sum() == 1, block
        assert (sc[sc != 8.0] == 1.0).all()  # all-zero tiles: scale 1
    with pytest.raises(ValueError, match="floating"):
        quantize_blockwise(torch.ones(4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="weight_scale_inv has shape"):
        dequantize_blockwise(q, s[..., :2])


def test_token_tiles_start_at_every_group():
    x = spread(300, 40, seed=1, row_decades=2.0)
    offsets = torch.tensor([130, 130, 300], dtype=torch.int32)  # groups of 130, 0 and 170 rows
    q, scale, tile = quantize_token_tiles(x, offsets)
    assert tile.tolist() == [0] * 128 + [1] * 2 + [2] * 128 + [3] * 42
    for t, rows in ((0, slice(0, 128)), (1, slice(128, 130)), (2, slice(130, 258)), (3, slice(258, 300))):
        torch.testing.assert_close(scale[t], x[rows].abs().amax(0) / 448, rtol=0, atol=0)
    assert (dequantize_blockwise(q, scale[tile], (1, 1)) - x).abs().le(x.abs() / 16 + scale[tile] / 1024).all()


# ====================================================================================================================
# One FP8 Linear: Fprop, Dgrad, Wgrad


def _linear_case(seed=0, M=300, K=200, N=136, spread_over="tokens"):
    """x [M, K], w [N, K], dy [M, N]; magnitudes spread over the tokens (what 1 x 128 tiles must absorb: Fprop,
    Dgrad) or over the channels (what Wgrad's 128 x 1 tiles must absorb)."""
    rows, cols = (4.0, 1.0) if spread_over == "tokens" else (1.0, 4.0)
    x = spread(M, K, seed, rows, cols).requires_grad_()
    w = (torch.randn(N, K, generator=torch.Generator().manual_seed(seed + 1)) * 0.05).requires_grad_()
    dy = spread(M, N, seed + 2, rows, cols)
    return x, w, dy


def _grads(fn, x, w, dy):
    x.grad = w.grad = None
    y = fn(x, w)
    y.backward(dy)
    return y.detach(), x.grad.clone(), w.grad.clone()


def _deq(t, block):
    return dequantize_blockwise(*quantize_blockwise(t.detach(), block), block)


@pytest.mark.parametrize("spread_over", ["tokens", "channels"])
def test_fp8_linear_matches_high_precision_in_forward_and_both_gradients(spread_over):
    x, w, dy = _linear_case(spread_over=spread_over)
    y8, dx8, dw8 = _grads(lambda a, b: fp8_linear(a, b, None, REF), x, w, dy)
    y, dx, dw = _grads(lambda a, b: a @ b.t(), x, w, dy)
    # e4m3 on both operands: ~24-29 dB in the worst row, ~29 dB overall
    if spread_over == "tokens":
        assert worst_row_snr_db(y8, y) > 22 and worst_row_snr_db(dx8, dx) > 22
    else:
        assert worst_row_snr_db(dw8, dw) > 22
    assert min(snr_db(y8, y), snr_db(dx8, dx), snr_db(dw8, dw)) > 25

    # ... and each GEMM is exactly the product of its tiles, dequantized, in the orientation V3 prescribes
    with torch.no_grad():
        torch.testing.assert_close(y8, _deq(x, (1, 128)) @ _deq(w, (128, 128)).t(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx8, _deq(dy, (1, 128)) @ _deq(w, (128, 128)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dw8, _deq(dy, (128, 1)).t() @ _deq(x, (128, 1)), rtol=1e-5, atol=1e-5)


def test_snr_threshold_catches_a_wrong_tile_orientation_or_scale():
    with torch.no_grad():
        x, w, dy = _linear_case(spread_over="tokens")
        w_deq = _deq(w, (128, 128))
        for exact, a, rhs, right, wrong in (
            (x @ w.t(), x, w_deq.t(), (1, 128), (128, 1)),  # Fprop: x tiled along tokens instead of channels
            (dy @ w, dy, w_deq, (1, 128), (128, 1)),  # Dgrad: dy likewise
            (x @ w.t(), x, w_deq.t(), (1, 128), tuple(x.shape)),  # one scale for the whole tensor
        ):
            good, bad = _deq(a, right) @ rhs, _deq(a, wrong) @ rhs
            assert worst_row_snr_db(good, exact) > 22 > worst_row_snr_db(bad, exact) + 10
        x, w, dy = _linear_case(spread_over="channels")
        exact = dy.t() @ x  # Wgrad: dy and x tiled along channels instead of tokens
        assert worst_row_snr_db(_deq(dy, (128, 1)).t() @ _deq(x, (128, 1)), exact) > 22
        assert worst_row_snr_db(_deq(dy, (1, 128)).t() @ _deq(x, (1, 128)), exact) < 12


def test_fp8_activation_cache_is_smaller_and_gives_identical_gradients():
    x, w, dy = _linear_case()
    saved = {}
    results = {}
    for cache in (True, False):
        cfg = FP8TrainingConfig(backend="reference", cache_fp8_activations=cache)
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            y = fp8_linear(x, w, None, cfg)
        x.grad = w.grad = None
        y.backward(dy)
        saved[cache], results[cache] = sum(sizes), (y.detach(), x.grad.clone(), w.grad.clone())
    for a, b in zip(results[True], results[False]):
        assert torch.equal(a, b)
    act_fp32 = x.numel() * 4
    # cached: x in e4m3 (1 byte) + its scales, next to the e4m3 weight both variants keep
    assert saved[False] - saved[True] > 0.7 * act_fp32


def test_fp8_linear_under_autocast_and_with_bias():
    torch.manual_seed(0)
    lin = nn.Linear(200, 136, bias=True)
    fp8 = Float8TrainingLinear.from_linear(copy.deepcopy(lin), REF)
    x = torch.randn(4, 9, 200)
    assert snr_db(fp8(x), lin(x)) > 25
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8(x)
    assert y.dtype == torch.bfloat16 and snr_db(y.float(), lin(x)) > 20
    y.float().sum().backward()
    assert fp8.weight.grad.dtype == torch.float32 and fp8.bias.grad is not None


# ====================================================================================================================
# Routed experts: the grouped path


def _experts(config_model):
    layer = next(layer for layer in config_model.model.layers if hasattr(layer.mlp, "experts"))
    return layer.mlp.experts


def test_fp8_grouped_experts_match_high_precision_and_the_per_expert_loop():
    model = tiny_model(moe_intermediate_size=72)  # D 64, I 72: ragged in every GEMM
    experts = _experts(model)
    fp8 = Float8TrainingExperts.from_experts(copy.deepcopy(experts), REF)
    assert fp8.gate_up_proj.shape == experts.gate_up_proj.shape
    g = torch.Generator().manual_seed(3)
    T = 300
    x = spread(T, 64, seed=4, row_decades=1.5).requires_grad_()
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(T)])
    ids[:200, 0] = 5  # one expert gets more than 128 tokens: several Wgrad tiles in one group
    weights = torch.rand(T, 2, generator=g)
    dy = spread(T, 64, seed=5)

    def run(module, loop=False):
        x.grad = None
        module.zero_grad(set_to_none=True)
        y = module.forward_loop(x, ids, weights) if loop else module(x, ids, weights)
        y.backward(dy)
        return y.detach(), x.grad.clone(), module.gate_up_proj.grad.clone(), module.down_proj.grad.clone()

    def run_hp():  # high precision: the eager per-expert reference of the unconverted experts
        x.grad = None
        experts.zero_grad(set_to_none=True)

        def expert(e, x_ND):
            gate, up = F.linear(x_ND, experts.gate_up_proj[e]).chunk(2, dim=-1)
            return F.linear(experts.act_fn(gate) * up, experts.down_proj[e])

        from modeling_deepseek.experts import run_experts_loop

        y = run_experts_loop(x, ids, weights, expert)
        y.backward(dy)
        return y.detach(), x.grad.clone(), experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()

    grouped, loop, exact = run(fp8), run(fp8, loop=True), run_hp()
    for name, a, b, c in zip(("out", "dx", "dW gate_up", "dW down"), grouped, loop, exact):
        assert snr_db(a, c) > 22, name  # FP8 in two chained GEMMs
        # the grouped path tiles exactly as one FP8 Linear per expert does (Wgrad tiles start at each expert)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item(), msg=name)


def test_fp8_grouped_experts_need_no_host_sync():
    model = tiny_model()
    fp8 = Float8TrainingExperts.from_experts(_experts(model), REF)
    x = torch.randn(40, 64, requires_grad=True)
    ids = torch.randint(0, 8, (40, 2))
    w = torch.rand(40, 2)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fp8(x, ids, w).sum().backward()

    def inside_grouped_mm(event):  # torch's CPU grouped_mm reads its offsets on the host; on CUDA it does not
        while event is not None:
            if event.name == "aten::_grouped_mm":
                return True
            event = event.cpu_parent
        return False

    syncs = {"aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::unique", "aten::_unique2"}
    events = prof.events()
    assert any(e.name == "aten::_grouped_mm" for e in events)
    assert [e.name for e in events if e.name in syncs and not inside_grouped_mm(e)] == []


# ====================================================================================================================
# Converting a model


def test_convert_keeps_the_islands_high_precision_and_the_parameters():
    model = tiny_model()
    before = dict(model.named_parameters())
    keys = list(model.state_dict())
    convert_to_fp8_training(model)
    report = model.fp8_training_report
    assert dict(model.named_parameters()).keys() == before.keys()
    assert all(p is before[n] for n, p in model.named_parameters())  # optimizers built earlier keep working
    assert list(model.state_dict()) == keys

    layers = model.model.layers
    for layer in layers:
        attn = layer.self_attn
        for proj in (attn.q_a_proj, attn.q_b_proj, attn.kv_a_proj_with_mqa, attn.kv_b_proj, attn.o_proj):
            assert isinstance(proj, Float8TrainingLinear)
    assert all(isinstance(m, Float8TrainingLinear) for m in (layers[0].mlp.gate_proj, layers[0].mlp.down_proj))
    for layer in layers[1:]:
        assert isinstance(layer.mlp.experts, Float8TrainingExperts)
        assert isinstance(layer.mlp.shared_experts.up_proj, Float8TrainingLinear)
        assert type(layer.mlp.gate).__name__ == "DeepseekTopkRouter"
    mtp = layers[3]
    assert type(model.lm_head) is nn.Linear and type(mtp.eh_proj) is nn.Linear
    assert type(model.model.embed_tokens) is nn.Embedding
    assert report.kept["lm_head"] == "output head"
    assert report.kept["model.layers.3.eh_proj"] == "MTP input projection eh_proj"
    assert report.kept["model.embed_tokens"] == "embedding"
    assert report.kept["model.layers.1.mlp.gate"].startswith("MoE router")
    assert report.kept["model.norm"] == "norm" and report.kept["model.layers.3.shared_head.norm"] == "norm"
    assert "attention core" in report.kept["model.layers.0.self_attn"]
    assert len(report.converted) == 4 * 5 + 3 + 3 * (1 + 3)
    assert "routed experts" in str(report) and "kept in high precision" in str(report)

    state = copy.deepcopy(model.state_dict())
    again = convert_to_fp8_training(model)  # twice: nothing changes
    assert again is model and all(p is before[n] for n, p in model.named_parameters())
    assert all("already converted" in v for v in model.fp8_training_report.converted.values())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_module_filter_fn_and_experts_option():
    model = convert_to_fp8_training(tiny_model(), FP8TrainingConfig(convert_experts=False),
                                    module_filter_fn=lambda module, fqn: "o_proj" not in fqn)
    assert type(model.model.layers[0].self_attn.o_proj) is nn.Linear
    assert type(model.model.layers[1].mlp.experts) is not Float8TrainingExperts
    assert model.fp8_training_report.kept["model.layers.0.self_attn.o_proj"] == "module_filter_fn"


def test_bad_input_gets_a_clear_error_naming_the_module():
    model = tiny_model()
    model.model.layers[0].self_attn.o_proj = DeepseekFP8Linear.from_linear(model.model.layers[0].self_attn.o_proj)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.o_proj.*FP8 inference"):
        convert_to_fp8_training(model)
    model = tiny_model()
    model.model.layers[0].mlp.up_proj.weight = nn.Parameter(torch.zeros(96, 64, dtype=torch.int8),
                                                            requires_grad=False)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight is torch\.int8"):
        convert_to_fp8_training(model)
    with pytest.raises(ValueError, match="unknown recipe"):
        FP8TrainingConfig(recipe="mxfp8")
    with pytest.raises(ValueError, match="unknown FP8 GEMM backend 'triton'"):
        FP8TrainingConfig(backend="triton")
    with pytest.raises(ValueError, match="FP8TrainingConfig: unknown FP8 GEMM backend 'cuda'"):
        FP8TrainingConfig(backend="cuda")
    if not scaled_mm_available():
        with pytest.raises(RuntimeError, match="backend='scaled_mm' needs a Hopper GPU"):
            convert_to_fp8_training(tiny_model(), FP8TrainingConfig(backend="scaled_mm"))
    bnb = pytest.importorskip("bitsandbytes")
    model = tiny_model()
    model.model.layers[0].mlp.down_proj = bnb.nn.Linear8bitLt(96, 64, bias=False, has_fp16_weights=False)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj.*bitsandbytes"):
        convert_to_fp8_training(model)


# ====================================================================================================================
# Training


def fresh(model):
    """The same weights in a newly built model (construction registers it for the balancing bias update, which a
    copy.deepcopy would not), with a config of its own: convert_to_fp8_training sets the memory options on it."""
    new = DeepseekForCausalLM(copy.deepcopy(model.config)).train(model.training)
    new.load_state_dict(model.state_dict())
    return new


def _train(model, batches, steps, accum=1, lr=3e-3, sgd=False):
    opt = torch.optim.SGD(model.parameters(), lr=lr) if sgd else torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        for micro in range(accum):
            ids = batches[step * accum + micro]
            loss = model(input_ids=ids, labels=ids).loss
            (loss / accum).backward()
        losses.append(loss.item())
        opt.step()
        opt.zero_grad()
    return losses


def test_short_training_tracks_high_precision_with_balancing_and_mtp():
    base = tiny_model(train=True)
    batches = [random_ids(4, 32, seed=s) for s in range(12)]
    hp = fresh(base)
    fp8 = convert_to_fp8_training(fresh(base), REF)
    bias0 = fp8.model.layers[1].mlp.gate.e_score_correction_bias.clone()
    loss_hp, loss_fp8 = _train(hp, batches, 12), _train(fp8, batches, 12)
    assert loss_fp8[-1] < loss_fp8[0] - 0.2 and loss_hp[-1] < loss_hp[0] - 0.2
    gaps = [abs(a - b) / b for a, b in zip(loss_fp8, loss_hp)]
    assert max(gaps) < 0.04 and sum(gaps) / len(gaps) < 0.015, gaps  # random N(0, 0.1) weights: noisy FP8
    # aux-loss-free balancing ran once per optimizer step, as in high precision: every bias entry moved by
    # exactly gamma * sign(...) per step
    moved = fp8.model.layers[1].mlp.gate.e_score_correction_bias - bias0
    gamma = fp8.config.bias_update_speed
    assert moved.abs().max() <= 12 * gamma + 1e-7 and moved.abs().max() > 0
    assert fp8(batches[0], labels=batches[0]).mtp_loss is not None


def test_gradient_checkpointing_and_accumulation_behave_as_in_high_precision():
    base = tiny_model(train=True)
    ids = random_ids(4, 32, seed=7)
    grads = {}
    for ckpt in (False, True):
        model = convert_to_fp8_training(fresh(base), REF)
        if ckpt:
            model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        model(input_ids=ids, labels=ids).loss.backward()
        grads[ckpt] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    for n in grads[False]:  # recomputation re-quantizes the same tensors: identical gradients
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=0, atol=0, msg=n)

    # Accumulating 2 micro-batches gives the gradient of the whole batch (up to Wgrad's 128-token tiles, which now
    # hold other tokens), and the bias update runs once per optimizer step, not per micro-batch.
    m1, m2 = (convert_to_fp8_training(fresh(base), REF) for _ in range(2))
    m1(input_ids=ids, labels=ids).loss.backward()
    for half in ids.chunk(2):
        (m2(input_ids=half, labels=half).loss / 2).backward()
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        if p1.grad is not None and p1.grad.abs().max() > 0:
            assert snr_db(p2.grad, p1.grad) > 20, n
    b0 = [r.mlp.gate.e_score_correction_bias.clone() for r in base.model.layers[1:]]
    for m in (m1, m2):
        torch.optim.SGD(m.parameters(), lr=0.1).step()
        gamma = m.config.bias_update_speed
        for r, b in zip(m.model.layers[1:], b0):
            moved = (r.mlp.gate.e_score_correction_bias - b).abs()
            assert moved.max() > 0 and torch.isclose(moved, torch.tensor(gamma)).logical_or(moved == 0).all()


def test_bf16_moments_optimizer_tracks_adamw():
    torch.manual_seed(0)
    params = [torch.randn(64, 48), torch.randn(48)]
    ours = [nn.Parameter(p.clone()) for p in params]
    ref = [nn.Parameter(p.clone()) for p in params]
    opt = AdamWBF16Moments(ours, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    opt_ref = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for step in range(20):
        g = [torch.randn_like(p) for p in params]
        for group, grads in ((ours, g), (ref, g)):
            for p, gi in zip(group, grads):
                p.grad = gi.clone()
        opt.step()
        opt_ref.step()
    assert all(opt.state[p]["exp_avg"].dtype == torch.bfloat16 == opt.state[p]["exp_avg_sq"].dtype for p in ours)
    assert all(p.dtype == torch.float32 for p in ours)
    start = torch.cat([p.flatten() for p in params])
    moved = torch.cat([p.detach().flatten() for p in ours]) - start
    want = torch.cat([p.detach().flatten() for p in ref]) - start
    assert snr_db(moved, want) > 30  # bf16 keeps 8 bits of the moments: the updates agree to ~1e-3
    restored = AdamWBF16Moments(ours, lr=1e-2)
    restored.load_state_dict(opt.state_dict())
    assert restored.state[ours[0]]["exp_avg"].dtype == torch.bfloat16


def test_trained_fp8_model_saves_standard_checkpoints(tmp_path):
    from transformers import DeepseekV3ForCausalLM

    from modeling_deepseek.export import export_official

    model = convert_to_fp8_training(tiny_model(train=True), REF)
    _train(model, [random_ids(2, 16, seed=s) for s in range(2)], 2)
    model.eval()
    model.save_pretrained(tmp_path / "hf")
    ids = random_ids(2, 16, seed=9)
    with torch.no_grad():
        plain = tiny_model()  # the same weights in an unconverted model: the reference in high precision
        plain.load_state_dict(model.state_dict())
        want = plain(ids).logits
        ours = DeepseekForCausalLM.from_pretrained(tmp_path / "hf").eval()
        assert type(ours.model.layers[0].self_attn.q_a_proj) is nn.Linear
        torch.testing.assert_close(ours(ids).logits, want)
        hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf").eval()
        torch.testing.assert_close(hf(ids).logits, want, rtol=1e-4, atol=1e-4)
    out = export_official(model, tmp_path / "fp8", fp8=True)
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert f.get_tensor("model.layers.1.mlp.experts.3.up_proj.weight").dtype == FP8_DTYPE
        assert f.get_tensor("lm_head.weight").dtype == torch.float32


def test_trainer_trains_a_converted_model(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = convert_to_fp8_training(tiny_model(train=True), REF)
    ids = torch.cat([random_ids(1, 32, seed=s) for s in range(16)])
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=3e-3,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             gradient_accumulation_steps=2, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert isinstance(trainer.model.model.layers[0].self_attn.q_a_proj, Float8TrainingLinear)


def test_pretrain_example_fp8_switch(tmp_path):
    import importlib.util

    repo = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("pretrain_example_fp8", repo / "examples" / "pretrain.py")
    pretrain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pretrain)
    out = tmp_path / "run"
    metrics = pretrain.main([
        "--config", str(repo / "hub_configs" / "tiny"), "--output", str(out), "--fp8", "--max-steps", "4",
        "--max-files", "10", "--block-size", "32", "--batch-size", "2", "--vocab-size", "300", "--eval-blocks", "4",
        "--max-new-tokens", "2", "--save-steps", "0", "--logging-steps", "2", "--lr", "3e-3"])
    assert metrics["after"]["loss"] < metrics["before"]["loss"]
    final = DeepseekForCausalLM.from_pretrained(out / "final")  # an ordinary high-precision checkpoint
    assert type(final.model.layers[0].self_attn.o_proj) is nn.Linear
    assert final.model.layers[0].self_attn.o_proj.weight.dtype == torch.float32


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_accelerate_prepare_keeps_our_recipe(mixed_precision):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # one Accelerator per test process otherwise
    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision)
    model = convert_to_fp8_training(tiny_model(train=True), REF)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = accelerator.prepare(model, opt)
    ids = random_ids(2, 16)
    with accelerator.autocast():
        loss = model(input_ids=ids, labels=ids).loss
    accelerator.backward(loss)
    opt.step()
    inner = accelerator.unwrap_model(model)
    assert isinstance(inner.model.layers[0].self_attn.q_a_proj, Float8TrainingLinear)
    assert isinstance(inner.model.layers[1].mlp.experts, Float8TrainingExperts)
    assert torch.isfinite(loss)


def test_accelerate_fp8_mixed_precision_never_silently_swaps_our_modules():
    pytest.importorskip("torchao.float8")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import AORecipeKwargs

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True, mixed_precision="fp8", kwargs_handlers=[AORecipeKwargs()])
    model = convert_to_fp8_training(tiny_model(train=True), REF)
    model = accelerator.prepare(model)
    inner = accelerator.unwrap_model(model)
    swapped = [n for n, m in inner.named_modules() if type(m).__name__ == "Float8Linear"]
    ids = random_ids(2, 16)
    if swapped:
        with pytest.raises(RuntimeError, match="mixed_precision='bf16' or 'no'"):
            model(input_ids=ids, labels=ids)
    else:
        assert isinstance(inner.model.layers[0].self_attn.q_a_proj, Float8TrainingLinear)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_torchao_recipes_for_comparison(recipe):
    pytest.importorskip("torchao.float8")
    model = convert_to_fp8_training(tiny_model(train=True), FP8TrainingConfig(recipe=recipe, backend="reference"))
    report = model.fp8_training_report
    assert report.kept["lm_head"] == "output head" and type(model.lm_head) is nn.Linear
    assert any("torchao" in v for v in report.converted.values())
    ids = random_ids(2, 16)
    model(input_ids=ids, labels=ids).loss.backward()


# ====================================================================================================================
# V3's memory recipe: E5M6 for the linear after attention, FP8-cached SwiGLU inputs, the memory options on


def test_e5m6_round_trip_pow2_scales_and_bytes():
    x = spread(70, 301, seed=3, row_decades=2.0)  # odd width: the last code pair is padded
    packed, scale = quantize_e5m6(x)
    assert packed.dtype == torch.uint8 and packed.shape == (70, 3 * 151)  # 1.5 bytes per entry
    assert scale.shape == (70, 3) and torch.equal(scale, torch.exp2(torch.log2(scale).round()))
    y = dequantize_e5m6(packed, scale, 301)
    s = scale.repeat_interleave(128, 1)[:, :301]
    # 7 significant bits: relative 2^-7 in the normal range, half a subnormal step (2^-21 in scaled units) below
    assert ((y - x).abs() <= x.abs() * 2.0**-7 + s * 2.0**-21).all()
    assert torch.equal(quantize_e5m6(y)[0], packed)  # values on the grid are kept exactly
    # every finite 12-bit code is a float16 whose 4 low mantissa bits are zero, and decodes to itself
    codes = torch.arange(4096, dtype=torch.int32)
    values = (codes << 4).to(torch.int16).view(torch.float16).float()
    finite = values[values.isfinite()]
    assert finite.abs().max() == E5M6_MAX and finite.numel() == 4096 - 2 * 64  # exponent 31: inf / NaN codes unused
    grid = finite[None, : finite.numel() // 2 * 2]
    q, sc = quantize_e5m6(grid, (1, grid.shape[1]))
    assert torch.equal(dequantize_e5m6(q, sc, grid.shape[1], (1, grid.shape[1])), grid)
    # finer than e4m3 where it matters: a 1 x 128 tile round trip
    assert snr_db(y, x) > snr_db(_deq(x, (1, 128)), x) + 15  # 3 more mantissa bits: ~18 dB


def test_e5m6_cache_of_the_linear_after_attention():
    """x cached in E5M6 (1 x 128) and re-tiled to e4m3 128 x 1 for Wgrad: the same Fprop and Dgrad, a Wgrad next to
    the one from a high-precision x, for 1.5 bytes per entry."""
    x, w, dy = _linear_case(spread_over="channels")
    results, saved = {}, {}
    for fmt, cache in (("e5m6", True), ("e4m3", True), ("high", False)):
        cfg = FP8TrainingConfig(backend="reference", cache_fp8_activations=cache)
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            y = fp8_linear(x, w, None, cfg, "high" if fmt == "high" else fmt)
        x.grad = w.grad = None
        y.backward(dy)
        results[fmt], saved[fmt] = (y.detach(), x.grad.clone(), w.grad.clone()), sum(sizes)
    for a, b in zip(results["e5m6"][:2], results["high"][:2]):
        assert torch.equal(a, b)
    assert snr_db(results["e5m6"][2], results["high"][2]) > 35
    weight_bytes = saved["high"] - x.numel() * 4
    assert saved["e5m6"] - weight_bytes == pytest.approx(x.numel() * 1.5 + 4 * x.shape[0] * 2, abs=8)


def test_fp8_recipe_turns_the_memory_options_on_each_switchable_off():
    model = convert_to_fp8_training(tiny_model(train=True), REF)
    assert all(getattr(model.config, name) for name in MEMORY_OPTIONS)
    report = str(model.fp8_training_report)
    for name in MEMORY_OPTIONS:
        assert f"memory option {name}: on" in report
    o_projs = [m for n, m in model.named_modules() if n.endswith("self_attn.o_proj")]
    assert o_projs and all(m.cache_format == "e5m6" for m in o_projs) and "E5M6" in report
    assert {m.cache_format for n, m in model.named_modules()
            if isinstance(m, Float8TrainingLinear) and not n.endswith("o_proj")} == {"e4m3"}
    off = convert_to_fp8_training(tiny_model(train=True), FP8TrainingConfig(
        backend="reference", recompute_swiglu=False, chunked_cross_entropy=False, cache_o_proj_input_e5m6=False))
    assert not off.config.recompute_swiglu and not off.config.chunked_cross_entropy and off.config.recompute_norms
    assert "memory option recompute_swiglu: off" in str(off.fp8_training_report)
    assert all(m.cache_format == "e4m3" for m in off.modules() if isinstance(m, Float8TrainingLinear))


def _fp8_grads(model, ids):
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


NONE_ON = dict(recompute_norms=False, recompute_mla_up_proj=False, recompute_swiglu=False,
               chunked_cross_entropy=False, cache_o_proj_input_e5m6=False)


@pytest.mark.parametrize("experts", ["grouped_mm", "eager"])
def test_fp8_with_the_recipe_saves_memory_and_keeps_the_gradients(experts):
    """Recomputing norms and MLA up-projections re-quantizes the same tensors: identical gradients. Caching the
    SwiGLU inputs in e4m3 recomputes its output from them (V3), and E5M6 feeds o_proj's Wgrad: gradients within FP8's
    own error of the plain FP8 path, and much less kept for backward."""
    base = tiny_model(train=True, experts_implementation=experts)
    ids = random_ids(2, 32)
    plain = convert_to_fp8_training(fresh(base), FP8TrainingConfig(backend="reference", **NONE_ON))
    exact = convert_to_fp8_training(fresh(base), FP8TrainingConfig(
        backend="reference", **dict(NONE_ON, recompute_norms=True, recompute_mla_up_proj=True)))
    full = convert_to_fp8_training(fresh(base), REF)
    g_plain, g_exact, g_full = (_fp8_grads(m, ids) for m in (plain, exact, full))
    assert g_plain.keys() == g_exact.keys() == g_full.keys()
    for n in g_plain:
        torch.testing.assert_close(g_exact[n], g_plain[n], rtol=0, atol=0, msg=n)
        if g_plain[n].abs().max() > 0:
            assert snr_db(g_full[n], g_plain[n]) > 15, n
    kept = {}
    for name, model in (("plain", plain), ("full", full)):
        sizes = {}
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: sizes.__setitem__(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) or t,
                lambda t: t):
            model(input_ids=ids, labels=ids)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        kept[name] = sum(v for k, v in sizes.items() if k not in params)
    assert kept["full"] < 0.6 * kept["plain"], kept


# ====================================================================================================================
# Two CPU ranks (gloo, torchrun): DDP and FSDP2

TORCHRUN = Path(sys.executable).with_name("torchrun")
DIST_WORKER = Path(__file__).resolve().parent / "_fp8_dist_worker.py"
needs_torchrun = pytest.mark.skipif(
    not (TORCHRUN.exists() and torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torchrun next to the interpreter and torch.distributed with gloo")


def _torchrun_fp8_worker(out: Path, modes: str) -> None:
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="yes")
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
           str(DIST_WORKER), "--out", str(out), "--mode", modes]
    proc = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
    errors = "\n".join(p.read_text() for p in out.glob("rank*.error.txt"))
    assert proc.returncode == 0, errors or proc.stdout[-3000:] + proc.stderr[-3000:]


@needs_torchrun
def test_ddp_fsdp2_and_accelerate_on_two_cpu_ranks_train_in_fp8_like_one_process(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("fp8_dist_worker", DIST_WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    worker.run("single", 3, 0.01, tmp_path / "single")  # the one-process reference, in this process
    single = json.loads((tmp_path / "single" / "rank0.json").read_text())
    ref_update = torch.load(tmp_path / "single" / "update.pt")
    _torchrun_fp8_worker(tmp_path, "ddp,fsdp2,accelerate")
    for mode, wrapper in (("ddp", "DistributedDataParallel"), ("fsdp2", "FSDPDeepseekForCausalLM"),
                          ("accelerate", "DistributedDataParallel")):
        ranks = [json.loads((tmp_path / mode / f"rank{r}.json").read_text()) for r in range(2)]
        assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["wrapped"] == wrapper, ranks[0]["wrapped"]
        assert ranks[0]["biases"] == ranks[1]["biases"]  # all-reduced counts: bitwise identical on both ranks
        assert ranks[0]["biases"][-1] != single["biases"][0]  # ... and they moved
        # equal micro-batches: the mean of the ranks' losses is the global one; exactly so at the first step (Fprop
        # tiles are per token), within FP8 noise after it. That noise includes routing decisions of the tiny model
        # flipped by it, which move the loss in steps: 0.74% at step 2 on one Intel Xeon, under 0.5% on AMD EPYC.
        # The first update's SNR below is the sharp check of the gradient synchronisation.
        losses = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
        assert abs(losses[0] - single["losses"][0]) < 1e-5 * single["losses"][0], mode
        assert all(abs(a - b) < 2e-2 * b for a, b in zip(losses, single["losses"])), (mode, losses, single["losses"])
        # Wgrad's 128-token tiles hold other tokens per rank, so the first update agrees within FP8 noise
        update = torch.load(tmp_path / mode / "update.pt")
        assert update.keys() == ref_update.keys()
        moved = {k: v for k, v in ref_update.items() if v.abs().max() > 0}
        got = torch.cat([update[k].flatten() for k in moved])
        assert snr_db(got, torch.cat([v.flatten() for v in moved.values()])) > 20, mode


# ====================================================================================================================
# CUDA (Hopper): the same quantization, the block-scaled GEMMs


@needs_hopper
def test_cuda_backend_quantizes_identically_and_matches_the_reference():
    x, w, dy = _linear_case(M=300, K=384, N=256)
    for t, block in ((x, (1, 128)), (w, (128, 128)), (dy.t(), (1, 128))):
        q_cpu, s_cpu = quantize_blockwise(t.detach(), block)
        q_gpu, s_gpu = quantize_blockwise(t.detach().cuda(), block)
        assert torch.equal(q_gpu.cpu().view(torch.uint8), q_cpu.view(torch.uint8)) and torch.equal(s_gpu.cpu(), s_cpu)
    cuda = FP8TrainingConfig(backend="scaled_mm")
    for M, K, N in ((300, 384, 256), (77, 200, 136)):  # aligned and ragged
        x, w, dy = _linear_case(M=M, K=K, N=N)
        ref = _grads(lambda a, b: fp8_linear(a, b, None, REF), x, w, dy)
        xc, wc = x.detach().cuda().requires_grad_(), w.detach().cuda().requires_grad_()
        got = _grads(lambda a, b: fp8_linear(a, b, None, cuda), xc, wc, dy.cuda())
        for name, a, b in zip(("y", "dx", "dw"), got, ref):
            assert snr_db(a.cpu().float(), b) > 40, name  # the same arithmetic, up to bf16 output rounding


@needs_hopper
def test_cuda_training_step_of_a_converted_model():
    model = convert_to_fp8_training(tiny_model(train=True, hidden_size=256, intermediate_size=384,
                                               moe_intermediate_size=128).cuda())
    ids = random_ids(2, 64).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and model.model.layers[0].self_attn.q_a_proj.weight.grad is not None
