"""GRPO rollouts through transformers' continuous batching (`use_transformers_continuous_batching=True`, TRL's
generate_batch branch) on our model: the same greedy completions as the default rollouts, for trl.GRPOTrainer and
trainers.GRPOTrainer, and training runs on them. Below transformers 5.25 the option raises naming the version."""

from __future__ import annotations

import pytest
import torch
import trl

from modeling_deepseek.compat import MLA_PAGED_CACHE, PAGED_CACHE_MIN_VERSION
from test_grpo import TOK, config, dataset, tiny_lm
from trainers.grpo import GRPOTrainer

needs_mla_paged_cache = pytest.mark.skipif(
    not MLA_PAGED_CACHE, reason=f"continuous batching of MLA needs transformers >= {PAGED_CACHE_MIN_VERSION}")


def recording_reward(seen: list):
    def reward(completions, completion_ids, **kwargs):
        seen.append([list(ids) for ids in completion_ids])
        return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]

    return reward


def run(trainer_class, tmp_path, continuous_batching: bool, model=None, **overrides):
    seen = []
    trainer = trainer_class(model or tiny_lm(), reward_funcs=[recording_reward(seen)], train_dataset=dataset(),
                            processing_class=TOK, args=config(tmp_path, use_transformers_continuous_batching=
                                                              continuous_batching, **overrides))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    return seen, trainer, changed


@needs_mla_paged_cache
@pytest.mark.parametrize("trainer_class", [trl.GRPOTrainer, GRPOTrainer], ids=["trl", "ours"])
def test_continuous_batching_rollouts_equal_the_default_ones_when_greedy(trainer_class, tmp_path):
    greedy = dict(max_steps=2, generation_kwargs={"do_sample": False})
    default, _, _ = run(trainer_class, tmp_path / "default", False, **greedy)
    batched, trainer, _ = run(trainer_class, tmp_path / "cb", True, **greedy)
    assert len(default) == len(batched) == 2
    assert batched == default
    assert all(len(ids) > 0 for step in batched for ids in step)
    assert [h["loss"] for h in trainer.state.log_history if "loss" in h]


@needs_mla_paged_cache
@pytest.mark.parametrize("trainer_class", [trl.GRPOTrainer, GRPOTrainer], ids=["trl", "ours"])
def test_training_on_continuous_batching_rollouts(trainer_class, tmp_path):
    seen, trainer, changed = run(trainer_class, tmp_path, True, max_steps=2)
    assert changed, "no parameter moved in two GRPO steps"
    assert len({tuple(map(tuple, step)) for step in seen}) == 2  # sampled: the two steps' rollouts differ
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    assert len(rewards) == 2 and all(r == r for r in rewards)


@needs_mla_paged_cache
def test_fp8_latent_rollouts_through_continuous_batching(tmp_path, monkeypatch):
    """config.latent_cache_dtype = "fp8" reaches TRL's continuous-batching rollouts: they read the e4m3 paged rows."""
    from modeling_deepseek.paged_fp8 import FP8LatentAllocator

    reads, update = [], FP8LatentAllocator.update
    monkeypatch.setattr(FP8LatentAllocator, "update", lambda self, *a: reads.append(a[-2].numel()) or update(self, *a))
    model = tiny_lm()
    model.config.latent_cache_dtype = "fp8"
    seen, trainer, changed = run(GRPOTrainer, tmp_path, True, model=model, max_steps=2)
    assert changed and len(seen) == 2 and all(len(ids) > 0 for step in seen for ids in step)
    assert sum(reads) > 0, "no rollout step read the FP8 paged cache"


@pytest.mark.skipif(MLA_PAGED_CACHE, reason="checks the error of a transformers without the MLA paged cache")
@pytest.mark.parametrize("trainer_class", [trl.GRPOTrainer, GRPOTrainer], ids=["trl", "ours"])
def test_old_transformers_raises_naming_the_version(trainer_class, tmp_path):
    with pytest.raises(RuntimeError, match=f"needs transformers >= {PAGED_CACHE_MIN_VERSION}"):
        run(trainer_class, tmp_path, True, max_steps=1)
