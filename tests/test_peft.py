"""PEFT on DeepseekForCausalLM: LoRA on the MLA projections, the fused routed experts (peft's target_parameters) and
the shared experts; merge_and_unload; QLoRA on a 4-bit (bitsandbytes, CPU) load; the absorbed-MLA fallback.

About `e_score_correction_bias`: it is a buffer, not a parameter, so no optimizer ever touches it. With auxiliary-
loss-free balancing on (the default for V3 routing), the model's own optimizer step pre-hook (balancing.py) moves it
by +-bias_update_speed per step from the training forwards' expert loads, also while only LoRA weights train. That
is intended: it is the router state of the base model adapting to the fine-tuning data. Set
`config.use_bias_update=False` (or bias_update_speed=0) to freeze it; both cases are tested below.
"""

from __future__ import annotations

import re

import pytest
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from torch import nn

from conftest import max_diff, random_ids, routers, tiny_model
from modeling_deepseek import DeepseekForCausalLM
from modeling_deepseek.attention import DeepseekAttention

MLA_Q_LORA = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
MLA_FULL_Q = ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
SHARED = ["shared_experts.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj"]
EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def lora_config(targets, experts: bool = True, **kwargs) -> LoraConfig:
    return LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0,  # target_parameters (ParamWrapper) requires lora_dropout == 0
        target_modules=targets, target_parameters=EXPERT_PARAMS if experts else None, **kwargs,
    )


def base_name(peft_name: str) -> str:
    """base_model.model.X.base_layer.base_layer.weight -> X.weight (the name in the unwrapped model)."""
    return re.sub(r"(base_layer\.)+", "", peft_name.removeprefix("base_model.model."))


def train_steps(model: nn.Module, steps: int, lr: float = 1e-2) -> list[float]:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = random_ids(2, 16, seed=7)
    losses = []
    for _ in range(steps):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    return losses


# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, mla_targets",
    [({}, MLA_Q_LORA), ({"q_lora_rank": None}, MLA_FULL_Q)],
    ids=["q_lora_rank", "q_proj"],
)
def test_lora_trains_only_adapters(overrides, mla_targets):
    model = tiny_model(**overrides)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_peft_model(model, lora_config(mla_targets + SHARED))

    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # Every targeted projection of every block (MTP included), and both fused expert tensors, got an adapter.
    n_blocks, n_moe = 4, 3  # 3 decoder layers + 1 MTP block; layers 1, 2 and MTP are MoE
    for name in mla_targets:
        assert sum(f".self_attn.{name}.lora_A." in n for n in trainable) == n_blocks, name
    for name in SHARED:
        assert sum(f".{name}.lora_A." in n for n in trainable) == n_moe, name
    assert sum(n.endswith("experts.lora_A.default.weight") for n in trainable) == n_moe
    assert sum(n.endswith("experts.base_layer.lora_A.default.weight") for n in trainable) == n_moe
    assert not any(".layers.0.mlp." in n for n in trainable)  # "shared_experts.*" does not hit the dense FFN

    before = {n: p.detach().clone() for n, p in trainable.items()}
    losses = train_steps(peft_model, 3)
    assert all(torch.isfinite(torch.tensor(losses)))

    unchanged = [n for n, p in trainable.items() if torch.equal(p, before[n])]
    assert not unchanged, f"adapter weights that did not train: {unchanged}"
    after = {base_name(n): p for n, p in peft_model.named_parameters() if "lora_" not in n}
    assert after.keys() == base.keys()
    changed = [n for n in base if not torch.equal(after[n], base[n])]
    assert not changed, f"base weights changed: {changed}"


@pytest.mark.parametrize("use_bias_update", [True, False])
def test_routing_bias_under_lora(use_bias_update):
    """The balancing bias is a buffer: the optimizer never sees it; balancing moves it only when it is on."""
    model = tiny_model(use_bias_update=use_bias_update)
    bias = [r.e_score_correction_bias.clone() for r in routers(model)]
    peft_model = get_peft_model(model, lora_config(MLA_Q_LORA))
    assert not any("e_score_correction_bias" in n for n, _ in peft_model.named_parameters())
    train_steps(peft_model, 2)
    moved = [not torch.equal(b, r.e_score_correction_bias) for b, r in zip(bias, routers(model))]
    if use_bias_update:
        assert all(moved)
        gamma = model.config.bias_update_speed
        for b, r in zip(bias, routers(model)):  # two sign updates of size gamma each
            assert max_diff(b, r.e_score_correction_bias) <= 2 * gamma + 1e-7
    else:
        assert not any(moved)


def test_target_parameters_need_zero_dropout():
    with pytest.raises(ValueError, match="lora_dropout"):
        get_peft_model(tiny_model(), LoraConfig(r=2, lora_dropout=0.1, target_modules=[], target_parameters=EXPERT_PARAMS))


def _trained_adapter_model(**overrides):
    torch.manual_seed(0)
    # Random (not zero) B matrices: the adapter changes the function before any training.
    peft_model = get_peft_model(tiny_model(**overrides), lora_config(MLA_Q_LORA + SHARED, init_lora_weights=False))
    train_steps(peft_model, 1, lr=1e-3)
    return peft_model.eval()


def test_merge_and_unload_matches_adapter_model():
    peft_model = _trained_adapter_model(use_bias_update=False)
    ids = random_ids(2, 16)
    base_logits = None
    with torch.no_grad():
        with peft_model.disable_adapter():
            base_logits = peft_model(input_ids=ids).logits
        adapter = peft_model(input_ids=ids, labels=ids)
    assert max_diff(adapter.logits, base_logits) > 1e-2  # the adapter matters
    wrapped = peft_model.base_model.model.model.layers[1].mlp.experts
    base_experts = wrapped.get_base_layer().gate_up_proj.detach().clone()
    merged = peft_model.merge_and_unload()
    assert not torch.equal(merged.model.layers[1].mlp.experts.gate_up_proj, base_experts)  # expert LoRA merged in
    assert isinstance(merged, DeepseekForCausalLM)
    assert not any("lora" in n or "base_layer" in n for n, _ in merged.named_parameters())
    assert all(type(m.kv_b_proj) is nn.Linear for m in merged.modules() if isinstance(m, DeepseekAttention))
    assert isinstance(merged.model.layers[1].mlp.experts.gate_up_proj, nn.Parameter)
    with torch.no_grad():
        out = merged(input_ids=ids, labels=ids)
    assert max_diff(out.logits, adapter.logits) < 1e-5
    assert max_diff(out.mtp_logits[0], adapter.mtp_logits[0]) < 1e-5


def test_lora_on_kv_b_falls_back_to_expanded_decode_and_generates_like_merged(monkeypatch):
    peft_model = _trained_adapter_model(use_bias_update=False)
    attn = [m for m in peft_model.modules() if isinstance(m, DeepseekAttention)]
    assert attn and all(not m.absorbable() for m in attn)
    assert not any(m.use_absorbed(1, 32) for m in attn)  # a decode step would otherwise be absorbed

    calls = {"absorbed": 0, "expanded": 0}
    for path in calls:
        original = getattr(DeepseekAttention, f"{path}_attention")

        def counted(self, *args, _original=original, _path=path, **kwargs):
            calls[_path] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(DeepseekAttention, f"{path}_attention", counted)

    prompt = random_ids(1, 8, seed=5)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        lora_tokens = peft_model.generate(input_ids=prompt, **gen)
    assert calls["absorbed"] == 0 and calls["expanded"] > 0

    merged = peft_model.merge_and_unload().eval()
    assert all(m.absorbable() for m in merged.modules() if isinstance(m, DeepseekAttention))
    calls.update(absorbed=0, expanded=0)
    with torch.no_grad():
        merged_tokens = merged.generate(input_ids=prompt, **gen)
    assert calls["absorbed"] > 0  # the merged model decodes through the absorbed path
    assert lora_tokens.shape == (1, 14)
    assert torch.equal(lora_tokens, merged_tokens)


def test_qlora_4bit_cpu(tmp_path):
    from transformers import BitsAndBytesConfig

    tiny_model().save_pretrained(tmp_path / "base")
    model = DeepseekForCausalLM.from_pretrained(
        tmp_path / "base",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
    )
    import bitsandbytes as bnb

    kv_b = model.model.layers[1].self_attn.kv_b_proj
    assert isinstance(kv_b, bnb.nn.Linear4bit)
    model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = get_peft_model(model, lora_config(MLA_Q_LORA, experts=False))
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert not any(m.absorbable() for m in peft_model.modules() if isinstance(m, DeepseekAttention))
    before = {n: p.detach().clone() for n, p in trainable.items()}
    packed = kv_b.weight.detach().clone()

    losses = train_steps(peft_model, 2)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(not torch.equal(p, before[n]) for n, p in trainable.items())
    assert torch.equal(peft_model.base_model.model.model.layers[1].self_attn.kv_b_proj.base_layer.weight, packed)
