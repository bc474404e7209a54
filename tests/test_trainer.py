"""Training through transformers' Trainer and TRL's SFTTrainer: logging, balancing, MTP schedule, resume, checkpoints.

Everything runs on CPU with the tiny config of conftest.py (layer 0 dense, layers 1-2 MoE, MTP module with its own MoE
at model.layers.3), so every router below is one of three: two in the main model, one in the MTP module.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors import safe_open
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from modeling_deepseek import balancing
from trainers import DeepseekTrainer
from trainers.callbacks import DeepseekTrainerCallback
from trainers.sft import DeepseekSFTTrainer
from trainers.checkpointing import (
    AtomicCheckpointMixin,
    make_checkpoints_atomic,
    stale_staging_dirs,
    staging_dir,
)

from conftest import VOCAB, random_ids, routers, tiny_model

SEQ = 16
TOP_K = 2  # num_experts_per_tok of the tiny config
CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json")


# ----------------------------------------------------------------------------------------------------------------------
# helpers


def lm_dataset(n: int, seed: int = 1, labels: bool = True) -> Dataset:
    ids = random_ids(n, SEQ, seed=seed).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids} if labels else {"input_ids": ids})


def train_args(out, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(out),
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


class BiasUpdateCounter:
    """Wraps balancing.update_balancing_bias (the optimizer pre-hook looks it up at call time) and records, for every
    call, the tokens each router had counted since the previous update."""

    def __init__(self, monkeypatch):
        self.calls: list[list[float]] = []
        original = balancing.update_balancing_bias

        def counting(model):
            self.calls.append([float(r.pending_load.sum()) for r in balancing.balancing_routers(model)])
            return original(model)

        monkeypatch.setattr(balancing, "update_balancing_bias", counting)


class StepProbe(TrainerCallback):
    """At the end of every optimizer step (and at every save): the biases, and whether the routers' pending counts
    are empty -- they must be, since the update ran in the optimizer-step pre-hook."""

    def __init__(self, stop_at: int | None = None):
        self.stop_at = stop_at
        self.biases: list[list[torch.Tensor]] = []
        self.pending_empty: list[bool] = []
        self.pending_empty_at_save: list[bool] = []

    @staticmethod
    def _empty(model) -> bool:
        return all(not r.has_pending_load and float(r.pending_load.abs().sum()) == 0.0 for r in routers(model))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.biases.append([r.e_score_correction_bias.detach().clone() for r in routers(model)])
        self.pending_empty.append(self._empty(model))
        if self.stop_at is not None and state.global_step >= self.stop_at:
            control.should_training_stop = True  # "the job dies" right after this step's checkpoint

    def on_save(self, args, state, control, model=None, **kwargs):
        self.pending_empty_at_save.append(self._empty(model))


def train_logs(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h]


# ----------------------------------------------------------------------------------------------------------------------
# plain Trainer: metrics, one bias update per optimizer step, gradient checkpointing, bf16


def has_deepseek_callback(trainer) -> bool:
    return any(isinstance(cb, DeepseekTrainerCallback) for cb in trainer.callback_handler.callbacks)


def test_integration_is_explicit_and_inert_for_other_models(tmp_path):
    """Nothing is installed by default: a plain Trainer has no DeepSeek callback; DeepseekTrainer / DeepseekSFTTrainer
    add it. Given to a Trainer of another model, the callback changes nothing in its logs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    assert not has_deepseek_callback(Trainer(model=tiny_model(train=True), args=train_args(tmp_path)))
    assert has_deepseek_callback(DeepseekTrainer(model=tiny_model(train=True), args=train_args(tmp_path)))

    def llama_logs(callbacks):
        torch.manual_seed(0)
        llama = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
        trainer = Trainer(model=llama, args=train_args(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=2),
                          train_dataset=lm_dataset(4), eval_dataset=lm_dataset(2, seed=5), callbacks=callbacks)
        trainer.train()
        return [{k: v for k, v in h.items() if "runtime" not in k and "per_second" not in k}
                for h in trainer.state.log_history]

    assert llama_logs([DeepseekTrainerCallback()]) == llama_logs([])


def test_trainer_accumulation_checkpointing_bf16(tmp_path, monkeypatch):
    """GA=2, activation checkpointing and bf16 autocast: metrics logged, one bias update per optimizer step that counts
    each micro-batch once (the checkpointed layers run twice), and the bias stays fp32. A plain Trainer given the
    callback."""
    counter = BiasUpdateCounter(monkeypatch)
    model = tiny_model(train=True)
    gamma = model.config.bias_update_speed
    bias0 = [r.e_score_correction_bias.clone() for r in routers(model)]
    probe = StepProbe()
    args = train_args(tmp_path, max_steps=4, gradient_accumulation_steps=2, activation_checkpointing=True, bf16=True)
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset(32), callbacks=[probe, DeepseekTrainerCallback()])

    router_calls, head_dtypes = [], []
    router = model.model.layers[1].moe.gate  # (the MoE module's own hook may not fire on the recompute: torch stops
    handles = [  # a non-reentrant recomputation as soon as it has rebuilt the saved tensors, before the module returns)
        router.register_forward_hook(lambda *a: router_calls.append(1)),
        model.lm_head.register_forward_hook(lambda m, i, o: head_dtypes.append(o.dtype)),
    ]
    try:
        trainer.train()
    finally:
        for h in handles:
            h.remove()

    # Mixed precision really was on, and gradient checkpointing really re-ran the layers in backward.
    assert trainer.accelerator.mixed_precision == "bf16"
    assert set(head_dtypes) == {torch.bfloat16}
    assert model.is_activation_checkpointing
    micro_batches = 4 * 2
    assert len(router_calls) == 2 * micro_batches, "expected one forward plus one recomputation per micro-batch"

    # Logs: the usual loss plus the DeepSeek training signal, at every logging step.
    logs = train_logs(trainer)
    assert [h["step"] for h in logs] == [1, 2, 3, 4]
    for h in logs:
        for key in ("loss", "lm_loss", "mtp_loss", "maxvio", "balance_loss"):
            assert key in h and isinstance(h[key], float) and h[key] == h[key], (key, h)
        assert h["maxvio"] >= 0 and h["balance_loss"] > 0 and h["mtp_loss"] > 0 and h["lm_loss"] > 0

    # One update per optimizer step, each seeing both micro-batches exactly once: B * T * K tokens per micro-batch.
    assert len(counter.calls) == 4
    per_step = 2 * 2 * SEQ * TOP_K
    assert counter.calls == [[float(per_step)] * 3] * 4
    assert probe.pending_empty == [True] * 4

    # Each step moves every bias entry by exactly gamma (the sign rule) -- never by 2 gamma.
    previous = bias0
    for step_biases in probe.biases:
        for before, after in zip(previous, step_biases):
            delta = (after - before).abs()
            assert torch.all(((delta - gamma).abs() < 1e-6) | (delta == 0)), delta
        previous = step_biases
    assert any(not torch.equal(a, b) for a, b in zip(bias0, probe.biases[-1]))
    for r in routers(model):
        assert r.e_score_correction_bias.dtype == torch.float32
        assert r.pending_load.dtype == torch.float32


def test_trainer_on_bf16_model_keeps_fp32_bias(tmp_path):
    """The other bf16 route: the whole model cast to bf16 (no autocast). The routers keep their balancing state in fp32,
    so every update moves the bias by exactly gamma -- in bf16, a 1e-3 step would vanish next to a bias near 1."""
    model = tiny_model(train=True).to(torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        for r in routers(model):
            r.e_score_correction_bias.add_(1.0)
    gamma = model.config.bias_update_speed
    probe = StepProbe()
    bias0 = [r.e_score_correction_bias.clone() for r in routers(model)]
    trainer = Trainer(model=model, args=train_args(tmp_path, max_steps=2), train_dataset=lm_dataset(8), callbacks=[probe])
    trainer.train()
    previous = bias0
    for step_biases in probe.biases:
        for before, after in zip(previous, step_biases):
            assert after.dtype == torch.float32
            delta = (after - before).abs()
            assert torch.all(((delta - gamma).abs() < 1e-6) | (delta == 0)), delta
            assert (delta > 0).any()
        previous = step_biases
    assert all(r.pending_load.dtype == torch.float32 for r in routers(model))


@pytest.mark.parametrize("early", [0.3, 0.0])
def test_mtp_weight_schedule(tmp_path, early):
    """V3's schedule: the early weight until mtp_late_fraction of the steps, then the late one, as state on the model:
    the loss trains with it, and a checkpoint saved after the switch still holds the user's weights in config.json.
    An early weight of 0.0 switches like any other."""
    model = tiny_model(train=True, mtp_loss_weight=early, mtp_loss_weight_late=0.1, mtp_late_fraction=0.5)
    args = train_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=4)
    trainer = DeepseekTrainer(model=model, args=args, train_dataset=lm_dataset(16))
    trainer.train()
    logs = train_logs(trainer)
    # Steps 1-2 start at global_step 0-1 (< 0.5 * 4): early weight; steps 3-4: late weight.
    assert [h["mtp_loss_weight"] for h in logs] == pytest.approx([early, early, 0.1, 0.1])
    for h in logs:  # one optimizer step per log, no accumulation: the parts add up to the loss with that weight
        assert h["loss"] == pytest.approx(h["lm_loss"] + h["mtp_loss_weight"] * h["mtp_loss"] + h["balance_loss"],
                                          abs=1e-4), h
    assert model.config.mtp_loss_weight == early and model.scheduled_mtp_loss_weight == pytest.approx(0.1)
    saved = json.loads((tmp_path / "checkpoint-4" / "config.json").read_text())
    assert (saved["mtp_loss_weight"], saved["mtp_loss_weight_late"]) == (early, 0.1)


def _by_hand(model, ds, batch: int) -> tuple[float, float]:
    """Mean main CE and mean MTP CE of eval-mode forwards over `ds` in batches of `batch` (Trainer's eval order)."""
    model.eval()
    lm, mtp = [], []
    with torch.no_grad():
        for i in range(0, len(ds), batch):
            ids = torch.tensor(ds["input_ids"][i:i + batch])
            out = model(ids, labels=ids)
            lm.append(out.main_loss.item())
            mtp.append(out.mtp_loss.item())
    return sum(lm) / len(lm), sum(mtp) / len(mtp)


def test_eval_logs_lm_loss_and_perplexity(tmp_path):
    """eval_loss is the total objective (CE + mtp_loss_weight * MTP). The callback adds eval_lm_loss (the next-token
    CE alone, what compares with other causal LMs), eval_mtp_loss and eval_perplexity = exp(eval_lm_loss) to the
    metrics evaluate() returns and to log_history, at every evaluation in training and standalone; the train logs
    carry lm_loss next to the total loss."""
    model = tiny_model(train=True)
    w = model.config.mtp_loss_weight
    eval_ds = lm_dataset(4, seed=7)
    # label_names given: the model-side finding of label names is tested on its own below
    args = train_args(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=2,
                      label_names=["labels"])
    trainer = DeepseekTrainer(model=model, args=args, train_dataset=lm_dataset(8), eval_dataset=eval_ds)
    _by_hand(model, lm_dataset(2, seed=9), 2)  # eval forwards of our own, seen by the trainer's hook, ...
    model.train()
    with torch.no_grad():  # ... and a training-mode one: none may leak into the first evaluation or train log
        ids = random_ids(2, SEQ, seed=9)
        model(ids, labels=ids)
    trainer.train()

    for h in train_logs(trainer):  # one optimizer step per log, no accumulation: the parts add up to the loss
        assert h["loss"] == pytest.approx(h["lm_loss"] + w * h["mtp_loss"] + h["balance_loss"], abs=1e-4), h
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [1, 2]
    for h in evals:
        assert h["eval_perplexity"] == pytest.approx(math.exp(h["eval_lm_loss"]), rel=1e-12), h
        assert h["eval_loss"] == pytest.approx(h["eval_lm_loss"] + w * h["eval_mtp_loss"], abs=1e-5), h
        assert h["eval_loss"] > h["eval_lm_loss"]

    metrics = trainer.evaluate()  # standalone, after training: the model as trained
    lm, mtp = _by_hand(model, eval_ds, 2)
    assert metrics["eval_lm_loss"] == pytest.approx(lm, abs=1e-5)
    assert metrics["eval_mtp_loss"] == pytest.approx(mtp, abs=1e-5)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(lm), rel=1e-5)
    assert evals[-1]["eval_lm_loss"] == pytest.approx(lm, abs=1e-5)  # step 2's evaluation saw the same model
    logged = trainer.state.log_history[-1]
    assert {k: logged[k] for k in ("eval_lm_loss", "eval_mtp_loss", "eval_perplexity")} == {
        k: metrics[k] for k in ("eval_lm_loss", "eval_mtp_loss", "eval_perplexity")}

    # Several eval sets: each evaluation's numbers under its own prefix, from its own forwards only (not from our
    # own forwards, nor from a predict(), which logs nothing).
    other = lm_dataset(2, seed=11)
    other_lm = _by_hand(model, other, 2)[0]
    trainer.predict(lm_dataset(2, seed=13))
    per_set = trainer.evaluate(eval_dataset={"a": eval_ds, "b": other})
    assert per_set["eval_a_lm_loss"] == pytest.approx(lm, abs=1e-5)
    assert per_set["eval_b_lm_loss"] == pytest.approx(other_lm, abs=1e-5)
    assert per_set["eval_b_perplexity"] == pytest.approx(math.exp(per_set["eval_b_lm_loss"]), rel=1e-12)


def test_two_ranks_log_means_over_both(tmp_path):
    """DeepseekTrainer on 2 CPU ranks (torchrun + gloo): each rank sees half of the eval set and of every batch; the
    logged lm_loss / eval_lm_loss / eval_perplexity are the means over both ranks (the same on each), and the
    evaluation matches one process scoring the whole eval set, as Trainer's eval_loss does."""
    import sys

    from benchmarks.harness import free_port
    from test_distributed import TORCHRUN, _run

    if not (TORCHRUN.exists() and torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("needs torchrun next to the interpreter and torch.distributed with gloo")
    worker = Path(__file__).resolve().parent / "_trainer_dist_worker.py"
    _run([str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
          str(worker), str(tmp_path)], tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    histories = [r["log_history"] for r in ranks]

    model = tiny_model(seed=0, train=True)
    sys.path.insert(0, str(worker.parent))
    from _trainer_dist_worker import EVAL_SAMPLES

    lm, mtp = _by_hand(model, lm_dataset(EVAL_SAMPLES, seed=7), 1)
    first_eval = [h for h in histories[0] if "eval_loss" in h][0]
    # (Trainer passes num_items_in_batch counted over both ranks: the model's metrics must be each forward's own mean
    # CE, not its share of the global sum, which is half of it here.)
    assert first_eval["eval_lm_loss"] == pytest.approx(lm, abs=1e-5), (first_eval, lm)
    assert first_eval["eval_mtp_loss"] == pytest.approx(mtp, abs=1e-5)
    assert first_eval["eval_perplexity"] == pytest.approx(math.exp(lm), rel=1e-5)
    w = model.config.mtp_loss_weight
    assert first_eval["eval_loss"] == pytest.approx(lm + w * mtp, abs=1e-5)  # Trainer's own gathered total
    keys = ("lm_loss", "mtp_loss", "balance_loss", "maxvio", "eval_lm_loss", "eval_perplexity")
    same = [[{k: h[k] for k in keys if k in h} for h in history] for history in histories]
    assert same[0] == same[1] and sum("lm_loss" in h for h in same[0]) == 2, same


def test_trainer_evaluates_the_loss_of_batches_with_labels(tmp_path):
    """Trainer scores an eval batch only when it holds every name in its label_names, which it takes from the
    forward's parameters with "label" in their name: `shift_labels` must not be one (transformers' models take it
    through **kwargs), or batches with `labels` get no eval_loss at all."""
    from transformers.utils import find_labels

    from modeling_deepseek import DeepseekForCausalLM

    assert find_labels(DeepseekForCausalLM) == ["labels"], (
        f"Trainer would require {find_labels(DeepseekForCausalLM)} in every eval batch (no eval_loss with labels only)")
    trainer = Trainer(model=tiny_model(), args=train_args(tmp_path), eval_dataset=lm_dataset(2))
    assert "eval_loss" in trainer.evaluate()


# ----------------------------------------------------------------------------------------------------------------------
# TRL


def _word_level_tokenizer():
    """A tokenizer built locally (no hub): one word-level token per id of the tiny vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<eos>": 1, "<pad>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def _sft_trainer(tmp_path, model, trainer_cls=None, steps=3, callbacks=None):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, max_length=SEQ, seed=0,
        dataset_num_proc=None,
        # trl's configs default gradient_checkpointing=True, the name transformers deprecated: say it the new way
        activation_checkpointing=True,
    )
    cls = trainer_cls or SFTTrainer
    return cls(model=model, args=args, train_dataset=lm_dataset(16, labels=False), processing_class=_word_level_tokenizer(),
               callbacks=callbacks)


def test_sft_trainer_updates_bias(tmp_path, monkeypatch):
    counter = BiasUpdateCounter(monkeypatch)
    model = tiny_model(train=True)
    bias0 = [r.e_score_correction_bias.clone() for r in routers(model)]
    trainer = _sft_trainer(tmp_path, model, callbacks=[DeepseekTrainerCallback()])
    with pytest.warns(UserWarning, match="DeepseekSFTTrainer for the full objective"):
        trainer.train()
    assert len(counter.calls) == 3
    # The main model's routers count every token (2 x 16 x top-2) ...
    assert [c[:2] for c in counter.calls] == [[2.0 * SEQ * TOP_K] * 2] * 3
    assert not torch.equal(bias0[0], routers(model)[0].e_score_correction_bias)
    assert all(r.e_score_correction_bias.dtype == torch.float32 for r in routers(model))


def test_sft_trainer_with_model_loss(tmp_path, monkeypatch):
    counter = BiasUpdateCounter(monkeypatch)
    model = tiny_model(train=True)
    bias0 = [r.e_score_correction_bias.clone() for r in routers(model)]
    trainer = _sft_trainer(tmp_path, model, trainer_cls=DeepseekSFTTrainer)
    assert has_deepseek_callback(trainer)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*forward was replaced.*")
        trainer.train()
    logs = train_logs(trainer)
    assert len(logs) == 3
    for h in logs:
        for key in ("loss", "lm_loss", "mtp_loss", "maxvio", "balance_loss"):
            assert key in h, (key, h)
    assert counter.calls == [[2.0 * SEQ * TOP_K] * 3] * 3  # MTP router included
    assert all(not torch.equal(b, r.e_score_correction_bias) for b, r in zip(bias0, routers(model)))


# ----------------------------------------------------------------------------------------------------------------------
# resume


RESUME_STEPS, RESUME_SAVE = 6, 3


def _resume_trainer(out, model, probe, kind: str, save: bool = True):
    args = train_args(
        out, max_steps=RESUME_STEPS, gradient_accumulation_steps=2, learning_rate=2e-3, warmup_steps=1,
        save_strategy="steps" if save else "no", save_steps=RESUME_SAVE,
    )
    # 10 samples at 4 per optimizer step: the run crosses two epoch boundaries (shuffled by data_seed each epoch).
    # "plain": transformers' Trainer with the callback, checkpoints written in place; "atomic": DeepseekTrainer.
    if kind == "atomic":
        return DeepseekTrainer(model=model, args=args, train_dataset=lm_dataset(10, seed=3), callbacks=[probe])
    return Trainer(model=model, args=args, train_dataset=lm_dataset(10, seed=3),
                   callbacks=[probe, DeepseekTrainerCallback()])


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}




@pytest.mark.parametrize(
    "kind", ["plain", "atomic"]
)
def test_resume_matches_uninterrupted(tmp_path, kind):
    """6 steps in one go == 3 steps, checkpoint, a new Trainer resuming for 3 more (GA=2, across epoch ends)."""
    # Uninterrupted reference.
    ref_model = tiny_model(seed=0, train=True)
    ref_probe = StepProbe()
    ref = _resume_trainer(tmp_path / "ref", ref_model, ref_probe, kind)
    ref.train()

    # Interrupted after the step-3 checkpoint ...
    run_dir = tmp_path / "run"
    first_probe = StepProbe(stop_at=RESUME_SAVE)
    first = _resume_trainer(run_dir, tiny_model(seed=0, train=True), first_probe, kind)
    first.train()
    assert first.state.global_step == RESUME_SAVE
    checkpoint = get_last_checkpoint(str(run_dir))
    assert checkpoint is not None and Path(checkpoint).name == f"checkpoint-{RESUME_SAVE}"
    assert all((Path(checkpoint) / f).is_file() for f in CHECKPOINT_FILES)

    # pending_load is empty at every step boundary, in particular when the checkpoint is written, so not saving it
    # (persistent=False) loses nothing; the bias itself is saved, in fp32.
    assert first_probe.pending_empty == [True] * RESUME_SAVE and first_probe.pending_empty_at_save == [True]
    with safe_open(str(Path(checkpoint) / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        bias_keys = [k for k in keys if k.endswith("e_score_correction_bias")]
        assert len(bias_keys) == 3 and not any("pending_load" in k for k in keys)
        assert all(f.get_tensor(k).dtype == torch.float32 for k in bias_keys)

    # ... and resumed by a NEW Trainer around a model with other weights and a zero bias: all state comes from disk.
    fresh = tiny_model(seed=123, train=True)
    with torch.no_grad():
        for r in routers(fresh):
            r.e_score_correction_bias.zero_()
    resumed_probe = StepProbe()
    resumed = _resume_trainer(run_dir, fresh, resumed_probe, kind)
    resumed.train(resume_from_checkpoint=checkpoint)
    assert resumed.state.global_step == RESUME_STEPS

    ref_logs = {h["step"]: h for h in train_logs(ref)}
    got_logs = {h["step"]: h for h in train_logs(resumed)}
    for step in range(RESUME_SAVE + 1, RESUME_STEPS + 1):
        for key in ("loss", "mtp_loss", "maxvio", "balance_loss", "grad_norm", "learning_rate"):
            assert got_logs[step][key] == pytest.approx(ref_logs[step][key], abs=1e-6, rel=0), (step, key)
    # Steps 1-3 of the interrupted run matched too.
    for step in range(1, RESUME_SAVE + 1):
        assert train_logs(first)[step - 1]["loss"] == pytest.approx(ref_logs[step]["loss"], abs=1e-6, rel=0)

    for a, b in zip(routers(ref_model), routers(fresh)):
        assert torch.equal(a.e_score_correction_bias, b.e_score_correction_bias)
        assert b.e_score_correction_bias.dtype == torch.float32
    ref_state, got_state = _state(ref_model), _state(fresh)
    assert ref_state.keys() == got_state.keys()
    worst = max((ref_state[k].float() - got_state[k].float()).abs().max().item() for k in ref_state)
    assert worst <= 1e-6, worst
    assert resumed_probe.pending_empty == [True] * (RESUME_STEPS - RESUME_SAVE)


# ----------------------------------------------------------------------------------------------------------------------
# atomic checkpoints


class _SaveFailure(RuntimeError):
    pass


def _fail_while_saving_optimizer(trainer, monkeypatch, observed: dict | None = None):
    """Make the next checkpoint die half-way: after the weights, while writing the optimizer state."""

    def failing(output_dir):
        if observed is not None:
            observed["dir"] = output_dir
            observed["weights_written"] = os.path.isfile(os.path.join(output_dir, "model.safetensors"))
        raise _SaveFailure("disk full")

    monkeypatch.setattr(trainer, "_save_optimizer_and_scheduler", failing)


def test_deepseek_trainer_checkpoints_are_atomic(tmp_path, monkeypatch):
    """DeepseekTrainer's checkpoints are atomic: a save that dies half-way publishes nothing. A plain Trainer shows
    why: transformers writes checkpoint-N in place, so the same failure leaves a directory that get_last_checkpoint
    (and resume_from_checkpoint=True) takes for the newest."""
    for cls in (DeepseekTrainer, Trainer):
        run_dir = tmp_path / cls.__name__
        trainer = cls(model=tiny_model(train=True), train_dataset=lm_dataset(8),
                      args=train_args(run_dir, max_steps=2, save_strategy="steps", save_steps=2))
        _fail_while_saving_optimizer(trainer, monkeypatch)
        with pytest.raises(_SaveFailure):
            trainer.train()
        partial = get_last_checkpoint(str(run_dir))
        if cls is DeepseekTrainer:
            assert partial is None and stale_staging_dirs(run_dir) == []
        else:
            assert partial is not None and Path(partial).name == "checkpoint-2"
            assert not (Path(partial) / "optimizer.pt").exists()
            assert not (Path(partial) / "trainer_state.json").exists()


def test_atomic_checkpoints_with_push_to_hub_write_in_place(tmp_path, hub_commits):
    """Checkpoint uploads read the checkpoint after the save returns, so with push_to_hub the staging-and-rename is
    off, and the trainer says so when it is built."""
    with pytest.warns(UserWarning, match="with push_to_hub, checkpoints are written in place"):
        trainer = make_checkpoints_atomic(Trainer(model=tiny_model(train=True), args=train_args(
            tmp_path, push_to_hub=True, hub_model_id="someone/some-repo", hub_strategy="end")))
    calls = []
    trainer.around_checkpoint_save(lambda: calls.append("in place"), trial=None)
    assert calls == ["in place"] and not staging_dir(tmp_path, 0).exists()


def test_atomic_checkpoint_is_complete_or_absent(tmp_path, monkeypatch):
    # A save that dies half-way publishes nothing and leaves no staging directory behind.
    trainer = make_checkpoints_atomic(Trainer(
        model=tiny_model(train=True), train_dataset=lm_dataset(8),
        args=train_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
    ))
    observed = {}
    _fail_while_saving_optimizer(trainer, monkeypatch, observed)
    with pytest.raises(_SaveFailure):
        trainer.train()
    assert observed["weights_written"] and Path(observed["dir"]).parent == staging_dir(tmp_path, 2)
    assert get_last_checkpoint(str(tmp_path)) is None
    assert not (tmp_path / "checkpoint-2").exists() and stale_staging_dirs(tmp_path) == []


def test_atomic_checkpoints_publish_rotate_and_clean_up(tmp_path, monkeypatch):
    # A staging directory left by a killed process (SIGKILL skips every cleanup) is ignored and then removed.
    stale = staging_dir(tmp_path, 1)
    (stale / "checkpoint-1").mkdir(parents=True)
    (stale / "checkpoint-1" / "model.safetensors").write_bytes(b"truncated")
    assert get_last_checkpoint(str(tmp_path)) is None

    class AtomicTrainer(AtomicCheckpointMixin, Trainer):
        pass

    args = train_args(tmp_path, max_steps=3, save_strategy="steps", save_steps=1, save_total_limit=2)
    trainer = AtomicTrainer(model=tiny_model(train=True), train_dataset=lm_dataset(12), args=args)

    # While transformers writes the checkpoint, its final name does not exist yet.
    seen = []
    original = trainer._save_rng_state

    def watching(output_dir):
        step = int(Path(output_dir).name.split("-")[-1])
        seen.append((Path(output_dir).parent == staging_dir(tmp_path, step), (tmp_path / f"checkpoint-{step}").exists()))
        return original(output_dir)

    monkeypatch.setattr(trainer, "_save_rng_state", watching)
    trainer.train()

    assert seen == [(True, False)] * 3
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("runs")) == ["checkpoint-2", "checkpoint-3"]
    assert stale_staging_dirs(tmp_path) == []
    last = Path(get_last_checkpoint(str(tmp_path)))
    assert last.name == "checkpoint-3" and all((last / f).is_file() for f in CHECKPOINT_FILES)
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["global_step"] == 3
