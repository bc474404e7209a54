"""Quantization: DeepSeek's FP8 block format (modeling_deepseek/fp8_format.py, the checkpoint writer in quant/fp8.py),
the FP8 inference modules and their GEMM backends (fp8.py, fp8_gemm.py), and bitsandbytes 4-bit / 8-bit loading with
the fused routed experts quantized too (modeling_deepseek/quantized.py, bnb_experts.py).

Tiny models throughout. The FP8 checkpoint model has hidden 160 and moe_intermediate 96, so that many weights have
ragged 128 x 128 edge blocks (160 = 128 + 32, 96 < 128, q_b_proj 192 = 128 + 64, eh_proj 160 x 320).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import random_ids
from modeling_deepseek import DeepseekConfig, DeepseekForCausalLM, DeepseekModel
from modeling_deepseek.experts import DeepseekExperts
from modeling_deepseek.routing import DeepseekTopkRouter
from quant import memory_report
from quant.fp8 import quantization_error_bound, quantize_checkpoint
from modeling_deepseek.bnb_experts import DeepseekBnbExperts
from modeling_deepseek.fp8 import DeepseekFP8Experts, DeepseekFP8Linear, fp8_block_linear
from modeling_deepseek.fp8_format import (
    FP8_QUANTIZATION_CONFIG,
    dequantize_weight_blockwise,
    quantize_weight_blockwise,
    should_quantize,
)
from modeling_deepseek.fp8_gemm import scaled_mm_available

try:
    import bitsandbytes as bnb
except ImportError:  # the FP8 tests need no bitsandbytes
    bnb = None
needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not installed")
warnings.filterwarnings("ignore", message="MatMul8bitLt")

VOCAB = 256


def small_config(hidden: int = 128, moe_intermediate: int = 64, **overrides) -> DeepseekConfig:
    kwargs = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=256, moe_intermediate_size=moe_intermediate,
                  num_hidden_layers=2, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32,
                  qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                  topk_group=1, first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=256)
    return DeepseekConfig(**{**kwargs, **overrides})


def small_model(seed: int = 0, **config) -> DeepseekForCausalLM:
    torch.manual_seed(seed)
    model = DeepseekForCausalLM(small_config(**config)).eval()  # initializer_range 0.02, as a real init
    with torch.no_grad():  # a non-zero balancing bias, so that dropping or mangling it would show
        for m in model.modules():
            if isinstance(m, DeepseekTopkRouter) and m.e_score_correction_bias is not None:
                m.e_score_correction_bias.normal_(0, 0.01)
    return model


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ====================================================================================================================
# FP8: the block format


@pytest.mark.parametrize("shape", [(160, 96), (300, 257), (128, 128), (16, 40), (3, 200, 130)])
def test_fp8_roundtrip_is_within_the_e4m3_bound(shape):
    torch.manual_seed(0)
    w = torch.randn(*shape) * 0.02
    w[..., 0, :7] = 0.0
    q, s = quantize_weight_blockwise(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    rows, cols = shape[-2:]
    assert s.dtype == torch.float32 and s.shape == (*shape[:-2], -(-rows // 128), -(-cols // 128))
    d = dequantize_weight_blockwise(q, s, dtype=torch.float32)
    err = (d - w).abs()
    # elementwise: half an e4m3 ulp (2^-4 relative) plus the subnormal floor (2^-10 in scaled units)
    assert (err <= quantization_error_bound(w, s) + 1e-12).all()
    # per block: scale_inv is exactly the block amax / 448, and no error exceeds amax / 16
    for bi in range(s.shape[-2]):
        for bj in range(s.shape[-1]):
            blk = (..., slice(128 * bi, 128 * bi + 128), slice(128 * bj, 128 * bj + 128))
            amax = w[blk].abs().amax(dim=(-2, -1))
            torch.testing.assert_close(s[..., bi, bj], amax / 448, rtol=1e-6, atol=0)
            assert (err[blk].amax(dim=(-2, -1)) <= amax / 16).all()
    assert rel_rms(d, w) < 0.04  # 3 mantissa bits: about 2.6% rms for Gaussian weights
    assert (d[..., 0, :7] == 0).all()


def test_fp8_ragged_edge_blocks_are_anchored_at_zero_and_zero_padded():
    # 160 rows = a full block [0, 128) of large values and an edge block [128, 160) of small ones. The edge block's
    # scale must come from its own 32 rows (padding counts as zeros), not from "2 blocks of 80 rows".
    w = torch.cat([torch.full((128, 96), 1.0), torch.full((32, 96), 1e-3)])
    w[5, 3] = -2.0
    q, s = quantize_weight_blockwise(w)
    assert s.shape == (2, 1)
    assert s[0, 0].item() == pytest.approx(2.0 / 448) and s[1, 0].item() == pytest.approx(1e-3 / 448)
    d = dequantize_weight_blockwise(q, s)
    assert torch.allclose(d[128:], w[128:], rtol=2**-4) and torch.allclose(d[:128], w[:128], rtol=2**-4)
    # What a loader that infers the block from the scale grid (160 // 2 = 80 rows) would get: rows 80..127 scaled
    # by the edge block's scale, off by a factor of 2000.
    wrong = q.float() * s.repeat_interleave(80, dim=0)
    assert (wrong[80:128] - w[80:128]).abs().max() > 0.9


def test_fp8_all_zero_block_and_scale_shape_check():
    w = torch.zeros(130, 140)
    w[:128, :128] = torch.randn(128, 128)
    q, s = quantize_weight_blockwise(w)
    assert s[1, 1].item() == 1.0 and s[0, 1].item() == 1.0
    assert (dequantize_weight_blockwise(q, s)[:, 128:] == 0).all()
    with pytest.raises(ValueError, match="weight_scale_inv has shape"):
        dequantize_weight_blockwise(q, s[:1])


def test_fp8_linear_cpu_fallback_and_reference_gemm():
    torch.manual_seed(0)
    lin = nn.Linear(300, 200, bias=True)
    fp8 = DeepseekFP8Linear.from_linear(lin)
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.weight_scale_inv.shape == (2, 3)
    x = torch.randn(4, 7, 300)
    with torch.no_grad():
        y = fp8(x)
        # the CPU path is dequantize-and-matmul
        torch.testing.assert_close(y, F.linear(x, fp8.dequantized_weight(), lin.bias))
        assert rel_rms(y, lin(x)) < 0.04
        # what a block-scaled FP8 GEMM computes (1 x 128 activation groups too) stays within FP8 error of it
        ref = fp8_block_linear(x, fp8.weight, fp8.weight_scale_inv, lin.bias, backend="reference")
        assert rel_rms(ref, y) < 0.05
        fp8.backend = "reference"
        torch.testing.assert_close(fp8(x), ref)
    for dtype in (torch.bfloat16, torch.float16):
        assert fp8(x.to(dtype)).dtype == dtype
    assert not scaled_mm_available(x.device)
    fp8.backend = "scaled_mm"
    with pytest.raises(RuntimeError, match="'scaled_mm' needs tensors on a Hopper GPU"):
        fp8(x)
    with pytest.raises(ValueError, match="DeepseekFP8Linear: unknown FP8 GEMM backend 'cuda'"):
        DeepseekFP8Linear.from_linear(lin, backend="cuda")


def test_should_quantize_mirrors_deepseek_choice():
    w = torch.zeros(64, 64)
    for key in ("model.layers.0.self_attn.q_a_proj.weight", "model.layers.1.mlp.experts.3.up_proj.weight",
                "model.layers.1.mlp.shared_experts.down_proj.weight", "model.layers.0.mlp.gate_proj.weight"):
        assert should_quantize(key, w), key
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.2.shared_head.head.weight",
                "model.layers.2.embed_tokens.weight", "model.layers.1.mlp.gate.weight",
                "model.layers.0.self_attn.kv_a_layernorm.weight", "model.layers.1.self_attn.o_proj.bias",
                "model.layers.2.eh_proj.weight"):
        assert not should_quantize(key, w), key
    assert not should_quantize("model.layers.1.mlp.gate.e_score_correction_bias", torch.zeros(8))


# ====================================================================================================================
# FP8: checkpoints


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    """(original model, its bf16/fp32 folder, the FP8 folder, quantize_checkpoint's stats); ragged dims."""
    model = small_model(hidden=160, moe_intermediate=96)
    src = tmp_path_factory.mktemp("fp32")
    dst = tmp_path_factory.mktemp("fp8")
    model.save_pretrained(src)
    stats = quantize_checkpoint(src, dst)
    return model, src, dst, stats


def test_quantize_checkpoint_writes_deepseek_format(fp8_checkpoint):
    model, src, dst, stats = fp8_checkpoint
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization_config"] == FP8_QUANTIZATION_CONFIG == {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    original = load_file(src / "model.safetensors")
    tensors = load_file(dst / "model.safetensors")
    quantized = [k for k, v in tensors.items() if v.dtype == torch.float8_e4m3fn]
    assert stats["quantized"] == len(quantized) > 0
    for key in quantized:
        scale = tensors[key.removesuffix("weight") + "weight_scale_inv"]
        rows, cols = tensors[key].shape
        assert scale.dtype == torch.float32 and scale.shape == (-(-rows // 128), -(-cols // 128))
        d = dequantize_weight_blockwise(tensors[key], scale)
        assert (d - original[key]).abs().le(quantization_error_bound(original[key], scale) + 1e-12).all(), key
    # per-expert keys (DeepSeek layout), every projection of every expert of every MoE layer (MTP's included)
    for layer in (1, 2):
        for j in range(8):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert tensors[f"model.layers.{layer}.mlp.experts.{j}.{proj}.weight"].dtype == torch.float8_e4m3fn
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                "model.layers.1.mlp.gate.e_score_correction_bias", "model.norm.weight",
                "model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.kv_a_layernorm.weight"):
        assert tensors[key].dtype == original[key].dtype == torch.float32, key
        assert torch.equal(tensors[key], original[key]), key
    for key in ("model.layers.0.self_attn.q_b_proj.weight",
                "model.layers.1.mlp.shared_experts.gate_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        assert key in quantized, key
    assert stats["bytes_after"] < 0.45 * stats["bytes_before"]


def test_fp8_checkpoint_loads_dequantized_on_cpu(fp8_checkpoint):
    model, _, dst, _ = fp8_checkpoint
    loaded, info = DeepseekForCausalLM.from_pretrained(dst, output_loading_info=True)
    loaded.eval()
    assert not info["unexpected_keys"] and not info["missing_keys"]
    assert type(loaded.model.layers[0].self_attn.q_b_proj) is nn.Linear
    assert loaded.model.layers[0].self_attn.q_b_proj.weight.dtype == torch.float32
    assert getattr(loaded.config, "quantization_config", None) is None  # a plain float model now

    # every weight equals the file's dequantization on the fixed 128 x 128 grid, fused experts included
    files = load_file(dst / "model.safetensors")
    params = dict(loaded.named_parameters())
    experts = loaded.model.layers[1].mlp.experts
    for key, w in files.items():
        if w.dtype != torch.float8_e4m3fn:
            continue
        expected = dequantize_weight_blockwise(w, files[key.removesuffix("weight") + "weight_scale_inv"])
        if ".mlp.experts." in key and key.startswith("model.layers.1."):
            j, proj = int(key.split(".")[5]), key.split(".")[6]
            got = {"gate_proj": experts.gate_up_proj[j, :96], "up_proj": experts.gate_up_proj[j, 96:],
                   "down_proj": experts.down_proj[j]}[proj]
        elif ".mlp.experts." in key:
            continue
        else:
            got = params[key]
        assert torch.equal(got.detach(), expected), key
    # unquantized tensors come through untouched
    assert torch.equal(loaded.model.layers[1].mlp.gate.e_score_correction_bias,
                       model.model.layers[1].mlp.gate.e_score_correction_bias)

    ids = random_ids(2, 24, vocab=VOCAB)
    with torch.no_grad():
        # exactly the original model with round-tripped weights ...
        roundtrip = small_model(hidden=160, moe_intermediate=96)
        roundtrip.load_state_dict(loaded.state_dict())
        torch.testing.assert_close(loaded(ids).logits, roundtrip(ids).logits, rtol=0, atol=1e-6)
        # ... and within FP8 error of the original
        got, want = loaded(ids).logits, model(ids).logits
    err, rel = max_abs(got, want), rel_rms(got, want)
    print(f"\nFP8 checkpoint logits vs original: max abs {err:.4g}, max |logit| {want.abs().max():.4g}, "
          f"relative rms {rel:.4g}")
    # Round-tripping the weights is a 2.6% rms relative perturbation; this small random model amplifies that about
    # 3.5x (Gaussian 2.6% weight noise does the same), so the logits move by ~10%.
    assert rel < 0.15
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.8
    out = loaded.generate(ids[:1, :6], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 10)


def test_fp8_checkpoint_loads_into_the_base_model_and_resaves(fp8_checkpoint, tmp_path):
    _, _, dst, _ = fp8_checkpoint
    lm = DeepseekForCausalLM.from_pretrained(dst).eval()
    base = DeepseekModel.from_pretrained(dst)
    assert torch.equal(base.layers[1].mlp.experts.down_proj, lm.model.layers[1].mlp.experts.down_proj)
    assert torch.equal(base.layers[0].self_attn.kv_b_proj.weight, lm.model.layers[0].self_attn.kv_b_proj.weight)
    lm.save_pretrained(tmp_path)  # a plain float checkpoint now
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    again = DeepseekForCausalLM.from_pretrained(tmp_path).eval()
    ids = random_ids(1, 8, vocab=VOCAB)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, lm(ids).logits, rtol=0, atol=0)


def test_fp8_checkpoint_loads_in_bf16(fp8_checkpoint):
    model, _, dst, _ = fp8_checkpoint
    loaded = DeepseekForCausalLM.from_pretrained(dst, dtype=torch.bfloat16).eval()
    assert loaded.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert loaded.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    ids = random_ids(1, 16, vocab=VOCAB)
    with torch.no_grad():
        assert rel_rms(loaded(ids).logits, model(ids).logits) < 0.15


def test_fp8_checkpoint_kept_quantized_on_cpu_matches_dequantized(fp8_checkpoint):
    _, _, dst, _ = fp8_checkpoint
    dense = DeepseekForCausalLM.from_pretrained(dst).eval()
    kept = DeepseekForCausalLM.from_pretrained(dst, fp8_keep_quantized=True).eval()
    assert isinstance(kept.model.layers[0].self_attn.q_b_proj, DeepseekFP8Linear)
    assert isinstance(kept.model.layers[1].mlp.experts, DeepseekFP8Experts)
    assert isinstance(kept.model.layers[1].mlp.shared_experts.up_proj, DeepseekFP8Linear)
    assert type(kept.lm_head) is nn.Linear and kept.lm_head.weight.dtype == torch.float32
    assert isinstance(kept.model.layers[1].mlp.gate, DeepseekTopkRouter)
    assert kept.fp8_load_stats["fp8_experts"] == 2
    assert memory_report(kept)["experts"] < 0.3 * memory_report(dense)["experts"]
    ids = random_ids(2, 16, vocab=VOCAB)
    with torch.no_grad():
        torch.testing.assert_close(kept(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
    # the load option chooses every FP8 module's GEMM backend; the fp32 simulation stays within FP8 error
    simulated = DeepseekForCausalLM.from_pretrained(dst, fp8_keep_quantized=True, fp8_gemm_backend="reference").eval()
    backends = {m.backend for m in simulated.modules() if isinstance(m, (DeepseekFP8Linear, DeepseekFP8Experts))}
    assert backends == {"reference"}
    with torch.no_grad():
        assert rel_rms(simulated(ids).logits, dense(ids).logits) < 0.1
    with pytest.raises(ValueError, match=r"fp8_gemm_backend=.*unknown FP8 GEMM backend 'triton'"):
        DeepseekForCausalLM.from_pretrained(dst, fp8_gemm_backend="triton")


def test_save_pretrained_refuses_weights_kept_in_fp8(fp8_checkpoint, tmp_path):
    """No loader reads what save_pretrained would write from FP8 inference modules: it raises, naming the way out."""
    _, _, dst, _ = fp8_checkpoint
    kept = DeepseekForCausalLM.from_pretrained(dst, fp8_keep_quantized=True)
    with pytest.raises(ValueError, match="FP8 inference weights.*fp8_keep_quantized=False"):
        kept.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())


def test_fp8_checkpoint_missing_scale_raises_naming_the_key(fp8_checkpoint, tmp_path):
    _, _, dst, _ = fp8_checkpoint
    for f in dst.iterdir():
        if f.name != "model.safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(dst / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.5.down_proj.weight_scale_inv"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.experts\.5\.down_proj\.weight"):
        DeepseekForCausalLM.from_pretrained(tmp_path)
    # a failed load leaves no trace: a normal checkpoint still reports unexpected keys normally afterwards
    assert r"\.weight_scale_inv$" not in (DeepseekForCausalLM._keys_to_ignore_on_load_unexpected or [])


def test_fp8_experts_module_matches_dequantized_experts():
    torch.manual_seed(0)
    experts = DeepseekExperts(small_config(hidden=160, moe_intermediate=96))
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.05)
        experts.down_proj.normal_(0, 0.05)
    fp8 = DeepseekFP8Experts.from_experts(experts)
    assert fp8.gate_proj.shape == (8, 96, 160) and fp8.gate_proj_scale_inv.shape == (8, 1, 2)
    dense = DeepseekExperts(small_config(hidden=160, moe_intermediate=96))
    with torch.no_grad():
        dense.gate_up_proj.copy_(torch.cat([dequantize_weight_blockwise(fp8.gate_proj, fp8.gate_proj_scale_inv),
                                            dequantize_weight_blockwise(fp8.up_proj, fp8.up_proj_scale_inv)], 1))
        dense.down_proj.copy_(dequantize_weight_blockwise(fp8.down_proj, fp8.down_proj_scale_inv))
    x = torch.randn(32, 160)
    ids = torch.randint(0, 8, (32, 2))
    w = torch.rand(32, 2)
    with torch.no_grad():
        torch.testing.assert_close(fp8(x, ids, w), dense(x, ids, w), rtol=1e-5, atol=1e-6)
        assert rel_rms(fp8(x, ids, w), experts(x, ids, w)) < 0.08


# ====================================================================================================================
# bitsandbytes


def _experts_module(config):
    torch.manual_seed(0)
    experts = DeepseekExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.02)
        experts.down_proj.normal_(0, 0.02)
    return experts


@needs_bnb
@pytest.mark.parametrize("options", [dict(bits=4, quant_type="nf4"), dict(bits=4, quant_type="fp4"),
                                     dict(bits=4, quant_type="nf4", double_quant=True), dict(bits=8)],
                         ids=["nf4", "fp4", "nf4-double-quant", "int8"])
@pytest.mark.parametrize("dims", [(128, 64), (160, 96)], ids=["aligned", "ragged"])
def test_bnb_experts_module(options, dims):
    config = small_config(hidden=dims[0], moe_intermediate=dims[1])
    experts = _experts_module(config)
    q = DeepseekBnbExperts(experts, compute_dtype=torch.float32, **options)
    assert q.gate_up_proj.dtype == (torch.int8 if options["bits"] == 8 else torch.uint8)
    assert not q.gate_up_proj.requires_grad
    gate_up, down = q.dequantize(torch.float32)
    assert gate_up.shape == experts.gate_up_proj.shape and down.shape == experts.down_proj.shape
    if options["bits"] == 4:
        assert rel_rms(gate_up, experts.gate_up_proj) < 0.13  # 4-bit: ~9% (NF4) to ~12% (FP4)
        # exactly what bitsandbytes gives for that expert on its own
        bnbF = bnb.functional
        w3 = experts.gate_up_proj[3].detach().reshape(-1)
        packed, state = bnbF.quantize_4bit(w3, blocksize=64, quant_type=options["quant_type"],
                                           compress_statistics=options.get("double_quant", False))
        torch.testing.assert_close(gate_up[3].reshape(-1), bnbF.dequantize_4bit(packed, state).reshape(-1), rtol=0, atol=0)
    else:
        # vector-wise int8: error at most half a step of the row's absmax / 127
        row_amax = experts.gate_up_proj.detach().abs().amax(-1, keepdim=True)
        assert ((gate_up - experts.gate_up_proj).abs() <= row_amax / 127 * 0.5 + 1e-4).all()
    x = torch.randn(40, dims[0])
    ids = torch.randint(0, 8, (40, 2))
    ids[0] = torch.tensor([0, 7])
    w = torch.rand(40, 2)
    reference = DeepseekExperts(config)
    with torch.no_grad():
        reference.gate_up_proj.copy_(gate_up)
        reference.down_proj.copy_(down)
        y = q(x, ids, w)
        torch.testing.assert_close(y, reference(x, ids, w), rtol=1e-5, atol=1e-6)
        assert rel_rms(y, experts(x, ids, w)) < (0.3 if options["bits"] == 4 else 0.03)
        assert q(x.bfloat16(), ids, w).dtype == torch.bfloat16


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    model = small_model()
    path = tmp_path_factory.mktemp("float")
    model.save_pretrained(path)
    return model, path


def _float_reference(quantized: nn.Module, path) -> DeepseekForCausalLM:
    """The float model carrying exactly the weights the quantized one dequantizes to (read before any forward, since
    bitsandbytes repacks CPU 4-bit weights on the first call)."""
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight

    reference = DeepseekForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                reference.get_submodule(name).weight.copy_(dequantize_bnb_weight(module.weight))
            elif isinstance(module, DeepseekBnbExperts):
                gate_up, down = module.dequantize(torch.float32)
                reference.get_submodule(name).gate_up_proj.copy_(gate_up)
                reference.get_submodule(name).down_proj.copy_(down)
    return reference


@needs_bnb
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bnb_4bit_from_pretrained_quantizes_experts(float_checkpoint, quant_type):
    from transformers import BitsAndBytesConfig

    model, path = float_checkpoint
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=torch.float32)
    q = DeepseekForCausalLM.from_pretrained(path, quantization_config=config).eval()
    assert q.is_loaded_in_4bit
    for layer in (1, 2):  # main MoE layer and the MTP block
        moe = q.model.layers[layer].mlp
        assert isinstance(moe.experts, DeepseekBnbExperts) and moe.experts.quant_type == quant_type
        assert isinstance(moe.shared_experts.gate_proj, bnb.nn.Linear4bit)  # transformers' nn.Linear replacement
        assert type(moe.gate) is DeepseekTopkRouter and moe.gate.weight.dtype == torch.float32  # router untouched
        assert moe.gate.e_score_correction_bias.dtype == torch.float32
    assert isinstance(q.model.layers[0].self_attn.kv_b_proj, bnb.nn.Linear4bit)
    assert type(q.lm_head) is nn.Linear and q.lm_head.weight.dtype == torch.float32
    assert q.model.embed_tokens.weight.dtype == torch.float32

    reference = _float_reference(q, path)
    ids = random_ids(2, 24, vocab=VOCAB)
    with torch.no_grad():
        got = q(ids).logits
        # Exact with bitsandbytes' generic CPU kernels; its AVX512-BF16 kernels (used where the CPU has them)
        # compute the 4-bit Linears in bf16, about 0.5% off.
        assert rel_rms(got, reference(ids).logits) < 0.02
        want = model(ids).logits
    print(f"\nbnb {quant_type}: logits max abs err {max_abs(got, want):.4g} (max |logit| {want.abs().max():.4g}), "
          f"relative rms {rel_rms(got, want):.4g}; footprint {model.get_memory_footprint()} -> "
          f"{q.get_memory_footprint()} bytes; memory_report {memory_report(model)} -> {memory_report(q)}")
    assert rel_rms(got, want) < 0.5
    out = q.generate(ids[:1, :6], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 11)

    before, after = memory_report(model), memory_report(q)
    assert after["experts"] < 0.2 * before["experts"]  # 4 bits + one fp32 absmax per 64 weights
    assert after["embeddings"] == before["embeddings"]
    assert q.get_memory_footprint() < 0.35 * model.get_memory_footprint()


@needs_bnb
def test_bnb_4bit_double_quant_bf16_compute(float_checkpoint):
    from transformers import BitsAndBytesConfig

    model, path = float_checkpoint
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    q = DeepseekForCausalLM.from_pretrained(path, quantization_config=config).eval()
    experts = q.model.layers[1].mlp.experts
    assert experts.double_quant and experts.compute_dtype == torch.bfloat16
    assert experts.gate_up_proj_absmax.dtype == torch.uint8
    ids = random_ids(1, 16, vocab=VOCAB)
    with torch.no_grad():
        assert rel_rms(q(ids).logits, model(ids).logits) < 0.5


@needs_bnb
def test_bnb_8bit_from_pretrained_quantizes_experts(float_checkpoint):
    from transformers import BitsAndBytesConfig

    model, path = float_checkpoint
    q = DeepseekForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_8bit=True)).eval()
    assert q.is_loaded_in_8bit
    moe = q.model.layers[1].mlp
    assert isinstance(moe.experts, DeepseekBnbExperts) and moe.experts.gate_up_proj.dtype == torch.int8
    assert isinstance(moe.shared_experts.down_proj, bnb.nn.Linear8bitLt)
    assert type(moe.gate) is DeepseekTopkRouter and type(q.lm_head) is nn.Linear
    ids = random_ids(2, 24, vocab=VOCAB)
    with torch.no_grad():
        got, want = q(ids).logits, model(ids).logits
    print(f"\nbnb int8: logits max abs err {max_abs(got, want):.4g}, relative rms {rel_rms(got, want):.4g}; "
          f"footprint {model.get_memory_footprint()} -> {q.get_memory_footprint()} bytes")
    assert rel_rms(got, want) < 0.1
    before, after = memory_report(model), memory_report(q)
    assert after["experts"] < 0.3 * before["experts"]
    assert q.generate(ids[:1, :6], max_new_tokens=3, do_sample=False).shape == (1, 9)


@needs_bnb
def test_bnb_4bit_save_and_reload(float_checkpoint, tmp_path):
    from transformers import BitsAndBytesConfig

    _, path = float_checkpoint
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    q = DeepseekForCausalLM.from_pretrained(path, quantization_config=config).eval()
    q.save_pretrained(tmp_path)  # Linear4bit in bitsandbytes' format, experts as dequantized float tensors
    saved = load_file(tmp_path / "model.safetensors")
    assert saved["model.layers.1.mlp.experts.0.gate_proj.weight"].dtype == torch.float32
    again = DeepseekForCausalLM.from_pretrained(tmp_path).eval()  # the config says bitsandbytes 4-bit
    assert isinstance(again.model.layers[1].mlp.experts, DeepseekBnbExperts)
    assert torch.equal(again.model.layers[1].mlp.experts.gate_up_proj, q.model.layers[1].mlp.experts.gate_up_proj)
    ids = random_ids(1, 12, vocab=VOCAB)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, q(ids).logits, rtol=0, atol=0)


@needs_bnb
def test_bnb_skip_modules_keeps_experts_full_precision(float_checkpoint):
    from transformers import BitsAndBytesConfig

    _, path = float_checkpoint
    config = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["lm_head", "mlp.experts"])
    q = DeepseekForCausalLM.from_pretrained(path, quantization_config=config).eval()
    assert type(q.model.layers[1].mlp.experts) is DeepseekExperts
    assert isinstance(q.model.layers[1].mlp.shared_experts.gate_proj, bnb.nn.Linear4bit)
    assert type(q.lm_head) is nn.Linear


def test_memory_report_categories(float_checkpoint):
    model, _ = float_checkpoint
    report = memory_report(model)
    assert set(report) == {"experts", "attention", "embeddings", "other", "total"}
    assert report["total"] == sum(v for k, v in report.items() if k != "total") == model.get_memory_footprint()
    config = model.config
    routed = 2 * 8 * 3 * config.hidden_size * config.moe_intermediate_size * 4  # 2 MoE blocks (main + MTP), fp32
    shared = 2 * 3 * config.hidden_size * config.moe_intermediate_size * 4
    assert report["experts"] == routed + shared
    assert report["embeddings"] == 2 * VOCAB * config.hidden_size * 4


def test_plain_loading_is_unchanged(float_checkpoint):
    model, path = float_checkpoint
    loaded = DeepseekForCausalLM.from_pretrained(path).eval()
    assert type(loaded.model.layers[1].mlp.experts) is DeepseekExperts
    ids = random_ids(1, 12, vocab=VOCAB)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


# ====================================================================================================================
# GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FP8 GEMMs need a CUDA device")
def test_fp8_linear_block_scaled_gemm_cuda():
    torch.manual_seed(0)
    lin = nn.Linear(512, 384, bias=False, device="cuda", dtype=torch.bfloat16)
    fp8 = DeepseekFP8Linear.from_linear(lin)
    assert fp8.weight.is_cuda
    for tokens in (1, 2, 7, 16, 17, 33, 300):
        x = torch.randn(tokens, 512, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            y = fp8(x)
            ref = fp8_block_linear(x, fp8.weight, fp8.weight_scale_inv, backend="reference")
        assert y.dtype == torch.bfloat16 and y.shape == (tokens, 384)
        assert rel_rms(y, ref) < 0.01  # the GEMM computes what the reference says, up to bf16 output rounding
        assert rel_rms(y, lin(x)) < 0.06
    # ragged shapes take the dequantize-and-matmul fallback
    odd = DeepseekFP8Linear.from_linear(nn.Linear(160, 96, bias=True, device="cuda", dtype=torch.bfloat16))
    x = torch.randn(5, 160, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(odd(x), F.linear(x, odd.dequantized_weight(torch.bfloat16), odd.bias))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp8_checkpoint_on_cuda_keeps_fp8(tmp_path):
    model = small_model(hidden=256, moe_intermediate=128, intermediate_size=256, q_lora_rank=128, kv_lora_rank=112)
    model.save_pretrained(tmp_path / "src")
    quantize_checkpoint(tmp_path / "src", tmp_path / "fp8")
    q = DeepseekForCausalLM.from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16, device_map="cuda").eval()
    q_a_proj = q.model.layers[0].self_attn.q_a_proj
    assert isinstance(q_a_proj, DeepseekFP8Linear) and q_a_proj.weight.is_cuda
    assert isinstance(q.model.layers[1].mlp.experts, DeepseekFP8Experts)
    dense = DeepseekForCausalLM.from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16, device_map="cuda",
                                                fp8_keep_quantized=False).eval()
    assert type(dense.model.layers[0].self_attn.q_a_proj) is nn.Linear
    ids = random_ids(5, 16, vocab=VOCAB).cuda()
    with torch.no_grad():
        out = q(ids, labels=ids)
        got = out.logits.float()
        same_weights = dense(ids).logits.float()  # differs by the 1 x 128 activation quantization and bf16 only
        want = model.cuda()(ids).logits.float()
    # the same FP8 arithmetic, simulated in fp32
    reference = DeepseekForCausalLM.from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16, device_map="cuda",
                                                    fp8_gemm_backend="reference").eval()
    with torch.no_grad():
        simulated_out = reference(ids, labels=ids)
    simulated = simulated_out.logits.float()
    same_routing = torch.equal(out.expert_load, simulated_out.expert_load)
    print(f"\nFP8 on CUDA, logits relative rms: vs fp32 simulation of the same FP8 GEMMs {rel_rms(got, simulated):.4g} "
          f"(same expert loads: {same_routing}), vs dequantized weights in bf16 {rel_rms(got, same_weights):.4g}, "
          f"vs fp32 original {rel_rms(got, want):.4g}")
    # bf16 rounding differences flip a few top-k routing decisions in this small random model, and a flipped token's
    # logits change wholesale: hence loose model-level bounds (the GEMM itself is checked tightly above).
    assert rel_rms(got, simulated) < 0.25 and (got.argmax(-1) == simulated.argmax(-1)).float().mean() > 0.7
    assert rel_rms(got, same_weights) < 0.25
    assert rel_rms(got, want) < 0.3
    for n in (1, 2, 5):
        assert q.generate(ids[:n, :4], max_new_tokens=4, do_sample=False).shape == (n, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp8_experts_cuda_match_simulation():
    config = small_config(hidden=256, moe_intermediate=128)
    experts = _experts_module(config).cuda()
    fp8 = DeepseekFP8Experts.from_experts(experts)
    reference = DeepseekFP8Experts.from_experts(experts, backend="reference")
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 8, (64, 2), device="cuda")
    w = torch.rand(64, 2, device="cuda")
    with torch.no_grad():
        got = fp8(x, ids, w)
        simulated = reference(x, ids, w)
        exact = experts(x.float(), ids, w)
    assert got.dtype == torch.bfloat16
    assert rel_rms(got, simulated) < 0.02
    assert rel_rms(got, exact) < 0.1


def test_fp8_training_api_is_public_on_the_package_and_old_paths_warn():
    """`from quant import FP8TrainingConfig, convert_to_fp8_training, AdamWBF16Moments` is the public path; the names
    quant.fp8 used to hold still import from there, with a DeprecationWarning naming their new module."""
    import quant
    import quant.fp8
    from quant.adamw_bf16_moments import AdamWBF16Moments
    from quant.fp8_training import FP8TrainingConfig, convert_to_fp8_training

    assert (quant.FP8TrainingConfig, quant.convert_to_fp8_training, quant.AdamWBF16Moments) == (
        FP8TrainingConfig, convert_to_fp8_training, AdamWBF16Moments)
    with pytest.warns(DeprecationWarning, match=r"quant\.fp8\.AdamWBF16Moments moved to quant\.adamw_bf16_moments"):
        from quant.fp8 import AdamWBF16Moments as old
    assert old is AdamWBF16Moments
    for name in quant.fp8.MOVED:
        with pytest.warns(DeprecationWarning, match=name):
            assert getattr(quant.fp8, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'fp8_block_matmul_reference'"):
        quant.fp8.fp8_block_matmul_reference
