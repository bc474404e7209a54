"""trainers.GRPOTrainer: a drop-in trl.GRPOTrainer that keeps the DeepSeek training signal alive during RL.

Tiny models (conftest sizes), a character-level tokenizer, a handful of GRPO steps of 8-token completions."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import trl
from datasets import Dataset

from conftest import TINY, routers
from trainers.grpo import GRPOConfig, GRPOTrainer, RewardFunctionError, cut_at_eos, left_pad
from trainers.prompts import R1_SYSTEM_PROMPT, make_r1_prompts, r1_prompt
from trainers.rewards import format_reward

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("grpo_arithmetic", REPO / "examples" / "grpo_arithmetic.py")
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)

TOK = example.build_tokenizer()
SIZES = {k: v for k, v in TINY.items() if k != "vocab_size"}


def tiny_lm(seed: int = 0, **overrides):
    return example.build_model(TOK, seed=seed, **{**SIZES, **overrides})


def digit_reward(completions, **kwargs):
    """Dense and varied: the share of digits in the completion."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def dataset(n: int = 8) -> Dataset:
    rows = [{"question": f"{i}+{i + 1}", "answer": str(2 * i + 1)} for i in range(n)]
    return make_r1_prompts(Dataset.from_list(rows), system_prompt="", template=example.TEMPLATE)


def config(tmp_path, **overrides) -> GRPOConfig:
    base = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, num_generations=4,
                max_completion_length=8, learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[],
                bf16=False, activation_checkpointing=False, use_cpu=True, seed=0, disable_tqdm=True,
                dataloader_num_workers=0)
    return GRPOConfig(**{**base, **overrides})


def trainer_for(tmp_path, model=None, rewards=(digit_reward,), **overrides) -> GRPOTrainer:
    return GRPOTrainer(model if model is not None else tiny_lm(), reward_funcs=list(rewards),
                       args=config(tmp_path, **overrides), train_dataset=dataset(), processing_class=TOK)


def train_logs(trainer) -> list[dict]:
    trainer.train()
    return [h for h in trainer.state.log_history if "reward" in h]


# ---------------------------------------------------------------------------------------------------------------------
def test_drop_in_for_trl():
    assert issubclass(GRPOTrainer, trl.GRPOTrainer) and issubclass(GRPOConfig, trl.GRPOConfig)
    ours, theirs = inspect.signature(GRPOTrainer.__init__), inspect.signature(trl.GRPOTrainer.__init__)
    assert list(ours.parameters)[:3] == list(theirs.parameters)[:3] == ["self", "model", "reward_funcs"]
    # every keyword TRL takes is accepted (through *pos / **kwargs beyond args)
    bound = ours.bind(None, "m", [], None, None, None, None, None, None, (None, None), None, None, None, None, None)
    assert len(bound.arguments["pos"]) == len(theirs.parameters) - 4
    with pytest.raises(ValueError, match="mtp_loss_weight"):
        GRPOConfig(output_dir="x", mtp_loss_weight=-1.0, use_cpu=True, bf16=False)


def test_config_checkpoints_by_default_under_the_current_name():
    """TRL's default (checkpointing on), without transformers' FutureWarning for `gradient_checkpointing`; the
    deprecated name, when given, still decides."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        default = GRPOConfig(output_dir="x", use_cpu=True, bf16=False)
    assert default.activation_checkpointing is True and default.gradient_checkpointing is True
    with pytest.warns(FutureWarning, match="gradient_checkpointing"):
        deprecated = GRPOConfig(output_dir="x", use_cpu=True, bf16=False, gradient_checkpointing=False)
    assert deprecated.activation_checkpointing is False


def test_padding_helpers():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    rows, lps = cut_at_eos(torch.tensor([[4, 2, 9], [4, 4, 4]]), [2], torch.tensor([[-1.0, -2.0, -3.0]] * 2))
    assert rows == [[4, 2], [4, 4, 4]] and lps == [[-1.0, -2.0], [-1.0, -2.0, -3.0]]


def test_rollout_logprobs_match_the_training_forward(tmp_path):
    trainer = trainer_for(tmp_path, max_completion_length=12, temperature=0.7)
    model = trainer.model
    model.train()
    prompts = [TOK(r1_prompt(q, system_prompt="", template=example.TEMPLATE))["input_ids"] for q in ("1+2", "13+4")]
    prompts = [p for p in prompts for _ in range(3)]
    pending_before = [r.pending_load.clone() for r in routers(model)]
    completions, logprobs = trainer.deepseek_rollout(prompts)
    assert model.training, "the rollout must hand the model back in training mode"
    assert all(torch.equal(a, r.pending_load) for a, r in zip(pending_before, routers(model))), \
        "rollouts must not count towards the balancing loads"
    assert len(completions) == 6 and all(len(c) == len(lp) for c, lp in zip(completions, logprobs))
    # the training forward (train mode, full sequence, logits / temperature) scores the same tokens alike
    worst = 0.0
    with torch.no_grad():
        for p, c, lp in zip(prompts, completions, logprobs):
            ids = torch.tensor([p + c])
            logits = model(input_ids=ids).logits[0, len(p) - 1:-1].float() / 0.7
            ref = logits.log_softmax(-1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
            worst = max(worst, (ref - torch.tensor(lp)).abs().max().item())
    assert worst < 1e-4, worst


def test_grpo_trains_logs_trl_and_deepseek_metrics(tmp_path):
    # from a path, as TRL scripts do (TRL loads the KL reference model from the same path)
    tiny_lm().save_pretrained(tmp_path / "policy")
    trainer = trainer_for(tmp_path, model=str(tmp_path / "policy"), rewards=(digit_reward, format_reward), beta=0.04)
    model = trainer.model
    gamma = model.config.bias_update_speed
    bias_before = [r.e_score_correction_bias.clone() for r in routers(model)]
    logs = train_logs(trainer)
    assert len(logs) == 2
    for key in ("reward", "reward_std", "rewards/digit_reward/mean", "rewards/format_reward/mean",
                "completions/mean_length", "kl", "entropy", "clip_ratio/region_mean", "moe/maxvio",
                "moe/maxvio/layer_0", "moe/maxvio/layer_1", "moe/min_load/layer_1", "aux_loss",
                "sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max"):
        assert all(key in h for h in logs), key
    assert max(h["sampling/sampling_logp_difference/max"] for h in logs) < 1e-3
    # the aux-loss-free bias moved by +-gamma on each of the 2 optimizer steps (0 where the signs cancelled)
    deltas = torch.cat([(r.e_score_correction_bias - b).flatten() for r, b in zip(routers(model), bias_before)])
    assert deltas.abs().max() > 0
    steps = (deltas / gamma).round()
    assert torch.allclose(deltas, steps * gamma, atol=1e-6) and steps.abs().max() <= 2
    assert torch.all(torch.stack([r.pending_load for r in routers(model)]) == 0)


# dapo (the default) runs in every other test; these cover TRL's other loss families (clipped ratio, clipped
# weights, soft gate, gamma weights) and GSPO (sequence-level ratios)
@pytest.mark.parametrize("loss_type, extra", [
    ("grpo", {}), ("dr_grpo", {}), ("bnpo", {}), ("luspo", {}), ("cispo", {"epsilon_high": 5.0}), ("sapo", {}),
    ("vespo", {}), ("dapo", {"importance_sampling_level": "sequence"}),
])
def test_every_trl_loss_type(tmp_path, loss_type, extra):
    logs = train_logs(trainer_for(tmp_path, loss_type=loss_type, max_steps=1, **extra))
    assert logs and torch.isfinite(torch.tensor(logs[-1]["entropy"]))


def test_router_aux_loss_coef_maps_onto_the_sequence_balance_loss(tmp_path):
    model = tiny_lm()
    trainer = trainer_for(tmp_path, model=model, router_aux_loss_coef=0.01, max_steps=1)
    assert trainer.args.router_aux_loss_coef == 0.01 and model.config.seq_balance_alpha == 0.01
    logs = train_logs(trainer)
    assert logs[-1]["aux_loss"] > 0
    # TRL's own path on the same model would compute Mixtral's loss from config.num_experts, which we lack
    assert not hasattr(model.config, "num_experts")
    off = trainer_for(tmp_path, model=tiny_lm(), router_aux_loss_coef=0.0, max_steps=1)
    assert "aux_loss" not in train_logs(off)[-1]


def test_mtp_rollouts_and_mtp_loss(tmp_path, monkeypatch):
    """The MTP loss trains the MTP module; it and MaxVio are the model's own objective and routing statistics
    (modeling_deepseek/objective.py, as in DeepseekForCausalLM.forward), logged as their means over the step."""
    import trainers.grpo as grpo

    seen = {"mtp_loss": [], "moe/maxvio": []}
    objective, statistics = grpo.training_objective, grpo.routing_statistics

    def recording_objective(*args, **kwargs):
        parts = objective(*args, **kwargs)
        seen["mtp_loss"].append(parts.mtp_loss.item())
        return parts

    def recording_statistics(lm):
        routing = statistics(lm)
        seen["moe/maxvio"].append(routing.max_violation.item())
        return routing

    monkeypatch.setattr(grpo, "training_objective", recording_objective)
    monkeypatch.setattr(grpo, "routing_statistics", recording_statistics)
    model = tiny_lm()
    mtp_before = {n: p.clone() for n, p in model.named_parameters() if ".layers.3." in n}
    trainer = trainer_for(tmp_path, model=model, use_mtp=True, mtp_loss_weight=0.3, max_steps=1)
    logs = train_logs(trainer)
    assert 0.0 <= logs[-1]["mtp/acceptance_rate"] <= 1.0 and logs[-1]["mtp_loss"] > 0
    for name, values in seen.items():
        assert values and logs[-1][name] == pytest.approx(sum(values) / len(values)), name
    assert "sampling/sampling_logp_difference/mean" not in logs[-1]  # speculative rollouts carry no logprobs
    changed = [n for n, p in model.named_parameters() if n in mtp_before and not torch.equal(p, mtp_before[n])]
    assert changed, "the MTP loss must train the MTP module"
    with pytest.raises(ValueError, match="MTP module"):
        trainer_for(tmp_path, model=tiny_lm(num_nextn_predict_layers=0), use_mtp=True)


def test_a_raising_reward_is_named_with_its_sample(tmp_path):
    batches = []

    def picky_reward(completions, **kwargs):
        batches.append(list(completions))
        return [1.0 / sum(ch.isdigit() for ch in c) for c in completions]  # no digit: division by zero

    trainer = trainer_for(tmp_path, rewards=(digit_reward, picky_reward), max_steps=1)
    with pytest.raises(RewardFunctionError) as info:
        trainer.train()
    culprit = next(i for i, c in enumerate(batches[0]) if not any(ch.isdigit() for ch in c))
    assert f"'picky_reward' raised on sample {culprit} of 8" in str(info.value)
    assert "ZeroDivisionError" in str(info.value) and repr(batches[0][culprit])[:20] in str(info.value)


def test_code_reward_without_a_sandbox_fails_when_the_trainer_is_built(tmp_path, monkeypatch):
    """The plain code_reward checks for a sandbox at its first call; given to the trainer, the check runs when the
    trainer is built, before any rollout."""
    import trainers.grpo
    from trainers.rewards import code_reward
    from trainers.sandbox import SandboxUnavailableError

    def no_sandbox(backend="auto"):
        raise SandboxUnavailableError("the code sandbox cannot run on this machine: user namespaces are off")

    monkeypatch.setattr(trainers.grpo, "require_sandbox", no_sandbox)
    with pytest.raises(SandboxUnavailableError, match="user namespaces are off"):
        trainer_for(tmp_path, rewards=(digit_reward, code_reward))
    trainer_for(tmp_path, rewards=(digit_reward,))  # no code reward: no sandbox needed


def test_lora_on_mla_and_fused_experts(tmp_path):
    from peft import LoraConfig

    peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_a_proj", "kv_b_proj", "o_proj"],
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    model = tiny_lm()
    trainer = GRPOTrainer(model, reward_funcs=digit_reward, args=config(tmp_path, max_steps=1),
                          train_dataset=dataset(), processing_class=TOK, peft_config=peft_config)
    lora = {n: p.clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    assert any("experts" in n for n in lora)
    bias_before = [r.e_score_correction_bias.clone() for r in routers(trainer.model)]
    logs = train_logs(trainer)
    assert "moe/maxvio" in logs[-1] and "sampling/sampling_logp_difference/mean" in logs[-1]
    moved = [n for n, p in trainer.model.named_parameters() if n in lora and not torch.equal(p, lora[n])]
    assert any("experts" in n for n in moved) and any("q_a_proj" in n for n in moved)
    assert any(not torch.equal(r.e_score_correction_bias, b) for r, b in zip(routers(trainer.model), bias_before))


def test_r1_prompts_plain_and_conversational():
    rows = make_r1_prompts([{"question": "1+1", "answer": 2, "id": 7}])
    assert rows[0]["prompt"].startswith(R1_SYSTEM_PROMPT) and rows[0]["prompt"].endswith("User: 1+1 Assistant:")
    assert rows[0]["solution"] == "2" and rows[0]["id"] == 7
    conv = make_r1_prompts(Dataset.from_list([{"q": "2+2", "a": "4"}]), "q", "a", conversational=True)
    assert conv[0]["prompt"] == [{"role": "system", "content": R1_SYSTEM_PROMPT}, {"role": "user", "content": "2+2"}]
    with pytest.raises(KeyError, match="'question'"):
        make_r1_prompts([{"q": "x", "answer": "1"}])


# ---------------------------------------------------------------------------------------------------------------------
# Two CPU ranks (torchrun + gloo): rewards gathered, biases identical on both ranks

WORKER = '''
import json, sys, torch
sys.path.insert(0, {tests!r})
import test_grpo as t
from trainers.grpo import GRPOTrainer
trainer = t.trainer_for({out!r}, max_steps=2, per_device_train_batch_size=4)
trainer.train()
rank = trainer.accelerator.process_index
logs = [h for h in trainer.state.log_history if "reward" in h]
json.dump({{"rank": rank, "world": trainer.accelerator.num_processes,
           "biases": [r.e_score_correction_bias.tolist() for r in t.routers(trainer.model)],
           "rewards": [h["reward"] for h in logs]}}, open({out!r} + f"/rank{{rank}}.json", "w"))
'''


@pytest.mark.skipif(not Path(sys.executable).with_name("torchrun").exists(), reason="needs torchrun")
def test_two_cpu_ranks_agree(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(REPO / "tests"), out=str(tmp_path)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(ACCELERATE_USE_CPU="yes", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(script)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, log[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["biases"] == ranks[1]["biases"]  # all-reduced loads: the same update on both ranks
    assert ranks[0]["rewards"] == ranks[1]["rewards"]  # rewards gathered over both ranks before logging


def parity_reward(completions, prompts, **kwargs):
    """Flat (0.5 for every completion) on prompts whose question starts with an even digit, varied on the others."""
    return [0.5 if int(p.split("User: ")[1][0]) % 2 == 0 else sum(ch.isdigit() for ch in c) / max(len(c), 1)
            for c, p in zip(completions, prompts)]


def test_dynamic_sampling_keeps_only_groups_with_a_reward_spread(tmp_path):
    """DAPO's dynamic sampling: the loss sees only the groups whose rewards differ (here: the odd questions), with
    TRL's normaliser recounted over their tokens; the kept share is 1 - TRL's frac_reward_zero_std at every step."""
    seen = {}
    for dynamic in (False, True):
        trainer = trainer_for(tmp_path / str(dynamic), rewards=(parity_reward,), dynamic_sampling=dynamic,
                              max_steps=6)
        batches = []
        trl_loss = trainer.grpo_loss

        def recording_loss(model, inputs, trl_loss=trl_loss, batches=batches):
            batches.append({k: inputs[k].clone() for k in ("prompt_ids", "completion_mask", "advantages",
                                                            "num_items_in_batch")})
            return trl_loss(model, inputs)

        trainer.grpo_loss = recording_loss
        logs = train_logs(trainer)
        assert len(logs) == len(batches) == 6
        seen[dynamic] = (logs, batches)
    for logs, batches in (seen[False],):  # without the option: every row reaches the loss
        assert all(b["prompt_ids"].shape[0] == 8 for b in batches)
        assert all("dynamic_sampling/kept_groups" not in h for h in logs)
    logs, batches = seen[True]
    mixed = 0
    for h, b in zip(logs, batches):
        kept = h["dynamic_sampling/kept_groups"]
        assert kept == pytest.approx(1.0 - h["frac_reward_zero_std"])
        questions = [TOK.decode(row, skip_special_tokens=True).split("User: ")[1] for row in b["prompt_ids"]]
        odd = [int(q[0]) % 2 == 1 for q in questions]
        if 0 < kept < 1:  # one flat group of 4 dropped, the varied one kept
            mixed += 1
            assert len(questions) == 4 and all(odd)
            assert b["advantages"].abs().max() > 0
        else:  # nothing to drop, or nothing informative: the batch whole (and its step skipped)
            assert len(questions) == 8 and all(odd) == (kept == 1)
        assert b["num_items_in_batch"].item() == b["completion_mask"].sum().item()
    assert mixed >= 1, "no step drew one even and one odd question; change the seed"


def flat_reward(completions, **kwargs):
    return [0.0] * len(completions)


def test_dynamic_sampling_skips_a_step_with_nothing_to_learn(tmp_path):
    """Every group flat (R1-Zero from a base that never writes the format): with dynamic sampling the steps are
    skipped, no parameter and no routing bias moves; without it the balance loss and the bias update move them."""
    for dynamic in (True, False):
        model = tiny_lm()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        logs = train_logs(trainer_for(tmp_path / str(dynamic), model=model, rewards=(flat_reward,),
                                      dynamic_sampling=dynamic, max_steps=2))
        assert len(logs) == 2 and all(h["frac_reward_zero_std"] == 1.0 for h in logs)
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        if dynamic:
            assert changed == [] and all(h["dynamic_sampling/kept_groups"] == 0.0 for h in logs)
        else:
            assert any("e_score_correction_bias" in k for k in changed) and any("weight" in k for k in changed)


def test_dynamic_sampling_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(ValueError, match="steps_per_generation"):
        trainer_for(tmp_path, dynamic_sampling=True, steps_per_generation=2)
