"""MTP self-speculative decoding: exact greedy equivalence, distribution-preserving sampling, ragged batches."""

import pytest
import torch

from modeling_deepseek import DeepseekConfig, DeepseekForCausalLM


def _config(**overrides):
    fields = dict(
        vocab_size=32, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
        num_nextn_predict_layers=1, max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
        pad_token_id=0,
    )
    fields.update(overrides)
    return DeepseekConfig(**fields)


@pytest.fixture(scope="module")
def cyclic_model():
    """A model trained on a cyclic token stream: main and MTP both learn it, so most drafts are accepted."""
    torch.manual_seed(0)
    model = DeepseekForCausalLM(_config())
    cycle = torch.tensor([3, 7, 5, 11, 2, 9, 4, 13, 6, 8])
    data = torch.stack([cycle.roll(-s).repeat(4)[:32] for s in range(10)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(120):
        loss = model(data, labels=data).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), cycle


def test_greedy_identical_with_high_acceptance(cyclic_model):
    model, cycle = cyclic_model
    prompt = cycle[:5].unsqueeze(0)
    plain = model.generate(prompt, max_new_tokens=20, do_sample=False)
    spec = model.generate(prompt, max_new_tokens=20, do_sample=False, use_mtp=True)
    assert torch.equal(plain, spec)
    assert model.last_mtp_stats.acceptance_rate > 0.8


def test_greedy_identical_ragged_batch_left_padding(cyclic_model):
    model, cycle = cyclic_model
    # Row 0 is left padded and off-cycle at the start, so rows accept different numbers of drafts per step.
    ids = torch.stack([torch.cat([torch.zeros(3, dtype=torch.long), cycle[2:6]]), torch.tensor([1, 20, 7, 5, 11, 2, 9])])
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    spec = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, use_mtp=True)
    assert torch.equal(plain, spec)
    for row in range(2):  # and each row equals its own unpadded batch-1 generation
        alone = model.generate(ids[row : row + 1, mask[row].bool()], max_new_tokens=16, do_sample=False)
        assert torch.equal(alone[0], spec[row, (~mask[row].bool()).sum() :])


def test_greedy_identical_random_model_all_rejections():
    torch.manual_seed(1)
    model = DeepseekForCausalLM(_config(vocab_size=64)).eval()
    ids = torch.randint(1, 64, (3, 6))
    plain = model.generate(ids, max_new_tokens=10, do_sample=False)
    out = model.generate(ids, max_new_tokens=10, do_sample=False, use_mtp=True, return_dict_in_generate=True)
    assert torch.equal(plain, out.sequences)
    assert out.mtp_drafted > 0 and 0.0 <= out.mtp_acceptance_rate <= 1.0


def test_eos_stops_each_row(cyclic_model):
    model, cycle = cyclic_model
    eos = int(cycle[8])
    prompt = cycle[:4].unsqueeze(0)
    plain = model.generate(prompt, max_new_tokens=30, do_sample=False, eos_token_id=eos, pad_token_id=0)
    spec = model.generate(prompt, max_new_tokens=30, do_sample=False, eos_token_id=eos, pad_token_id=0, use_mtp=True)
    assert torch.equal(plain, spec)
    assert spec[0, -1] == eos


def test_sampling_keeps_the_target_distribution():
    """Two sampled tokens per row: their joint law must be the main model's p(t1) p(t2 | t1), whatever q drafts."""
    torch.manual_seed(2)
    V = 6
    model = DeepseekForCausalLM(_config(vocab_size=V, pad_token_id=None)).eval()
    with torch.no_grad():  # make both distributions peaked enough to be interesting, and different from each other
        model.lm_head.weight.mul_(8)
    prompt = torch.tensor([[1, 4, 2]])
    with torch.no_grad():
        p1 = model(prompt).logits[0, -1].softmax(-1)
        exact = torch.stack(
            [p1[a] * model(torch.cat([prompt, torch.tensor([[a]])], 1)).logits[0, -1].softmax(-1) for a in range(V)]
        )
    N = 6000
    torch.manual_seed(3)
    out = model.generate(prompt.expand(N, -1), max_new_tokens=2, do_sample=True, top_k=0, use_mtp=True)
    stats = model.last_mtp_stats
    counts = torch.zeros(V, V)
    counts.index_put_((out[:, 3], out[:, 4]), torch.ones(N), accumulate=True)
    tv = 0.5 * (counts / N - exact).abs().sum()
    assert 0.05 < stats.acceptance_rate < 0.95, "both the accept and the resample branch must be exercised"
    assert tv < 0.04, f"total variation {tv:.3f} between speculative samples and the model's distribution"


def test_unsupported_option_is_named():
    model = DeepseekForCausalLM(_config()).eval()
    with pytest.raises(ValueError, match="repetition_penalty"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=2, use_mtp=True, repetition_penalty=1.2)
    no_mtp = DeepseekForCausalLM(_config(num_nextn_predict_layers=0)).eval()
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        no_mtp.generate(torch.tensor([[1, 2]]), max_new_tokens=2, use_mtp=True)


@pytest.mark.parametrize("k", [2, 3])
def test_chained_drafts_greedy_identical(cyclic_model, k):
    model, cycle = cyclic_model
    ids = torch.stack([torch.cat([torch.zeros(2, dtype=torch.long), cycle[1:6]]), torch.tensor([1, 20, 7, 5, 11, 2, 9])])
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=17, do_sample=False)
    spec = model.generate(ids, attention_mask=mask, max_new_tokens=17, do_sample=False, use_mtp=True,
                          mtp_draft_tokens=k)
    assert torch.equal(plain, spec)
    stats = model.last_mtp_stats
    assert stats.drafted > 0 and stats.accepted / stats.steps > 1.0  # more than one draft accepted per step


def test_chained_drafts_sampling_keeps_the_target_distribution():
    """Three sampled tokens with two drafts per step: the joint law is p(t1) p(t2|t1) p(t3|t1,t2)."""
    torch.manual_seed(4)
    V = 4
    model = DeepseekForCausalLM(_config(vocab_size=V, pad_token_id=None)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    prompt = torch.tensor([[1, 3, 2]])

    def next_probs(ids):
        with torch.no_grad():
            return model(ids).logits[0, -1].softmax(-1)

    exact = torch.zeros(V, V, V)
    p1 = next_probs(prompt)
    for a in range(V):
        p2 = next_probs(torch.cat([prompt, torch.tensor([[a]])], 1))
        for b in range(V):
            exact[a, b] = p1[a] * p2[b] * next_probs(torch.cat([prompt, torch.tensor([[a, b]])], 1))
    N = 12000
    torch.manual_seed(5)
    out = model.generate(prompt.expand(N, -1), max_new_tokens=3, do_sample=True, top_k=0, use_mtp=True,
                         mtp_draft_tokens=2)
    stats = model.last_mtp_stats
    counts = torch.zeros(V, V, V)
    counts.index_put_((out[:, 3], out[:, 4], out[:, 5]), torch.ones(N), accumulate=True)
    tv = 0.5 * (counts / N - exact).abs().sum()
    assert 0.1 < stats.acceptance_rate < 0.9
    assert tv < 0.05, f"total variation {tv:.3f}"
