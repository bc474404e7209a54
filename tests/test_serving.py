"""Serving paths: pipeline() from a saved folder (with and without MTP), the latent cache (bf16 / FP8, cropping,
round trips, chunked prefill) and the absorbed decode inside generate()."""

import json

import pytest
import torch
from transformers import GenerationConfig, pipeline

from modeling_deepseek import DeepseekConfig, DeepseekForCausalLM
from modeling_deepseek.cache import DeepseekLatentCache
from trainers.corpus import stdlib_source_files, train_tokenizer


def _config(**overrides):
    fields = dict(
        vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
        num_nextn_predict_layers=1, max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    fields.update(overrides)
    return DeepseekConfig(**fields)


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    tokenizer = train_tokenizer(stdlib_source_files(limit=20), vocab_size=300)
    torch.manual_seed(0)
    model = DeepseekForCausalLM(_config(vocab_size=len(tokenizer))).eval()
    model.generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=12, bos_token_id=0, eos_token_id=1, pad_token_id=2
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_pipeline_from_folder_with_and_without_mtp(saved_folder):
    assert json.loads((saved_folder / "generation_config.json").read_text())["do_sample"] is False
    pipe = pipeline("text-generation", model=str(saved_folder), device="cpu")
    prompts = ["def add(a, b):", "import os\nclass"]
    plain = pipe(prompts, return_full_text=False)
    spec = pipe(prompts, return_full_text=False, use_mtp=True)
    assert [p[0]["generated_text"] for p in plain] == [s[0]["generated_text"] for s in spec]
    assert all(p[0]["generated_text"] for p in plain)
    assert pipe.model.last_mtp_stats.drafted > 0


def test_generate_uses_latent_cache_and_fp8_halves_it():
    torch.manual_seed(0)
    model = DeepseekForCausalLM(_config()).to(torch.bfloat16).eval()
    ids = torch.randint(3, 300, (1, 40))
    out = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    assert isinstance(cache, DeepseekLatentCache) and not cache.fp8
    layer = cache.layers[0]
    assert layer.keys.shape[1] == 1 and layer.keys.shape[-1] == 32 and layer.values.shape[-1] == 8
    fp8 = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                         latent_cache_dtype="fp8").past_key_values
    assert fp8.fp8
    bf16_bytes, fp8_bytes = cache.nbytes_per_token(), fp8.nbytes_per_token()
    assert bf16_bytes == 2 * (32 + 8) * 2  # 2 layers x 40 values x 2 bytes
    assert fp8_bytes < 0.65 * bf16_bytes  # e4m3 values plus one fp32 scale per token and tensor


def test_fp8_cache_logits_close_to_full_precision():
    torch.manual_seed(0)
    model = DeepseekForCausalLM(_config()).eval()
    ids = torch.randint(3, 300, (2, 24))
    with torch.no_grad():
        ref_cache, fp8_cache = DeepseekLatentCache(), DeepseekLatentCache(fp8=True)
        model(ids[:, :20], past_key_values=ref_cache, use_cache=True)
        model(ids[:, :20], past_key_values=fp8_cache, use_cache=True)
        ref = model(ids[:, 20:], past_key_values=ref_cache, use_cache=True).logits
        got = model(ids[:, 20:], past_key_values=fp8_cache, use_cache=True).logits
    rel = (got - ref).abs().max() / ref.abs().max()
    assert rel < 0.05


def test_cache_crop_and_continue_matches_fresh_forward():
    torch.manual_seed(0)
    model = DeepseekForCausalLM(_config()).eval()
    ids = torch.randint(3, 300, (2, 30))
    with torch.no_grad():
        full = model(ids).logits
        for fp8 in (False, True):
            cache = DeepseekLatentCache(fp8=fp8)
            model(ids[:, :25], past_key_values=cache, use_cache=True)
            cache.crop(-5)  # drop 5 tokens, as speculative decoding does after a rejection
            assert cache.get_seq_length() == 20
            step = model(ids[:, 20:], past_key_values=cache, use_cache=True).logits
            tol = 0.05 * full.abs().max().item() if fp8 else 1e-4
            torch.testing.assert_close(step, full[:, 20:], atol=tol, rtol=1e-4)


def test_past_key_values_round_trip_through_generate():
    torch.manual_seed(0)
    model = DeepseekForCausalLM(_config()).eval()
    ids = torch.randint(3, 300, (1, 10))
    first = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    cont = model.generate(first.sequences, past_key_values=first.past_key_values, max_new_tokens=5, do_sample=False)
    whole = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(cont, whole)


def test_chunked_prefill_equals_one_shot():
    torch.manual_seed(0)
    model = DeepseekForCausalLM(_config()).eval()
    ids = torch.randint(3, 300, (1, 70))
    one = model.generate(ids, max_new_tokens=6, do_sample=False)
    chunked = model.generate(ids, max_new_tokens=6, do_sample=False, prefill_chunk_size=16)
    assert torch.equal(one, chunked)


def _forward_lengths(model):
    """Query lengths of every main-decoder forward, recorded by a pre-hook."""
    lengths = []

    def hook(module, args, kwargs):
        x = kwargs.get("input_ids", args[0] if args else None)
        x = kwargs.get("inputs_embeds") if x is None else x
        lengths.append(x.shape[1])

    return lengths, model.model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("use_mtp", [False, True])
def test_long_prompts_are_prefilled_in_chunks_by_default(use_mtp):
    """Prompts longer than config.prefill_chunk_tokens are prefilled chunk by chunk (bounded activation memory),
    in plain and MTP generate alike, and decode exactly as the one-shot prefill does."""
    torch.manual_seed(0)
    model = DeepseekForCausalLM(_config(prefill_chunk_tokens=16)).eval()
    ids = torch.randint(3, 300, (2, 70))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a left-padded row
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, use_mtp=use_mtp)

    lengths, handle = _forward_lengths(model)
    chunked = model.generate(ids, **kw)
    handle.remove()
    assert lengths[:5] == [16, 16, 16, 16, 6]
    assert all(n <= 16 for n in lengths)

    model.config.prefill_chunk_tokens = None
    lengths, handle = _forward_lengths(model)
    one_shot = model.generate(ids, **kw)
    handle.remove()
    assert lengths[0] == 70
    assert torch.equal(chunked, one_shot)
    if use_mtp:
        model.config.prefill_chunk_tokens = 16
        assert torch.equal(chunked, model.generate(ids, **{**kw, "use_mtp": False}))  # greedy-exact


def test_explicit_prefill_chunk_size_wins_and_short_prompts_are_one_shot():
    torch.manual_seed(0)
    model = DeepseekForCausalLM(_config(prefill_chunk_tokens=16)).eval()
    ids = torch.randint(3, 300, (1, 40))
    lengths, handle = _forward_lengths(model)
    model.generate(ids, max_new_tokens=2, do_sample=False, prefill_chunk_size=32)
    model.generate(ids[:, :16], max_new_tokens=2, do_sample=False)
    model.generate(ids, max_new_tokens=2, do_sample=False, use_cache=False)  # no cache to chunk into
    handle.remove()
    assert lengths == [32, 8, 1, 16, 1, 40, 41]
