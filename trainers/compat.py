"""Every private internal of transformers' Trainer, trl and accelerate that trainers/ touches, in one place.

The model side has its own (modeling_deepseek/compat.py, copied into every remote-code checkpoint); what only the
training stack needs lives here, so that a saved model folder carries none of it. Each touch is named for what it
does, and tests/test_compat.py checks each one against the installed releases: when a library changes the internal,
that test fails with a message naming it, instead of training going silently wrong.

Private methods we override are overridden here only, by mixins placed before the library's class, which hand the
call to a public-named method of ours (`around_checkpoint_save`, `rollout`, `grpo_loss`) and give that method a way
to run the library's own (`save`, `trl_rollout`, `trl_grpo_loss`). tests/test_compat.py checks every private method a
mixin here defines against the class it is written for, signature included.
"""

from __future__ import annotations

import sys
from pathlib import Path

# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint saves (transformers' Trainer)
#
# Atomic checkpoints (trainers/checkpointing.py) need to run code around each checkpoint save and to choose the
# directory it is written to. transformers' Trainer has no public hook for either: the training loop calls the private
# Trainer._save_checkpoint(model, trial), which writes os.path.join(self._get_output_dir(trial), "checkpoint-N")
# (every release from 5.23 on). Callbacks (on_save) run only after the directory is complete.


class CheckpointSaveHook:
    """Mixin, placed before a Trainer class, that runs every checkpoint save through `self.around_checkpoint_save`.

    Overrides the private Trainer._save_checkpoint(model, trial); `around_checkpoint_save(save, trial)` gets a
    no-argument `save` that runs the Trainer's own _save_checkpoint and must call it once.
    """

    def _save_checkpoint(self, model, trial):
        self.around_checkpoint_save(lambda: super(CheckpointSaveHook, self)._save_checkpoint(model, trial), trial)

    def around_checkpoint_save(self, save, trial) -> None:
        save()


def checkpoint_run_dir(trainer, trial=None) -> str:
    """The directory Trainer._save_checkpoint puts `checkpoint-N` in: the private Trainer._get_output_dir(trial)
    (args.output_dir, or a per-trial sub-directory during a hyper-parameter search)."""
    return trainer._get_output_dir(trial=trial)


class redirect_checkpoint_run_dir:
    """`with redirect_checkpoint_run_dir(trainer, path):` makes Trainer._save_checkpoint write `checkpoint-N` under
    `path`, by shadowing the private Trainer._get_output_dir on the instance for the duration."""

    def __init__(self, trainer, run_dir):
        self.trainer, self.run_dir = trainer, str(run_dir)

    def __enter__(self):
        self.trainer._get_output_dir = lambda trial=None: self.run_dir
        return self.run_dir

    def __exit__(self, *exc):
        del self.trainer._get_output_dir


# ---------------------------------------------------------------------------------------------------------------------
# trl's fused LM head (SFTTrainer)
#
# trl's SFTTrainer (trl 1.x) calls trl.trainer.utils.add_fused_lm_head(model), which replaces the model instance's
# forward (`model.forward = types.MethodType(_fused_forward, model)`) by a function that, called with
# fused_lm_head=True, runs the backbone and scores the labels itself, skipping DeepseekForCausalLM.forward and with it
# the MTP and sequence-balance losses. trl offers no switch to turn it off, and no flag that marks a patched model.


def forward_replaced_by_trl(model) -> bool:
    """Whether trl replaced this instance's forward: an instance attribute `forward` whose code lives in trl.
    Wrappers (accelerate's mixed-precision forward) keep the replaced one in `__wrapped__` / `_original_forward`."""
    trl = sys.modules.get("trl")
    if trl is None:  # trl never imported: nothing can have patched the model
        return False
    trl_dir = Path(trl.__file__).parent
    for fn in (vars(model).get("forward"), vars(model).get("_original_forward")):
        for _ in range(8):  # follow the wrapper chain
            fn = getattr(fn, "__func__", fn)
            code = getattr(fn, "__code__", None)
            if code is not None and Path(code.co_filename).is_relative_to(trl_dir):
                return True
            if fn is None:
                break
            fn = getattr(fn, "__wrapped__", None)
    return False


def restore_class_forward(model) -> None:
    """Undo add_fused_lm_head: drop the instance's `forward` attribute, so that the class's forward runs again."""
    vars(model).pop("forward", None)


# ---------------------------------------------------------------------------------------------------------------------
# trl's GRPOTrainer
#
# TRL's GRPO loop has no public hook for either of the two steps a DeepSeek model changes: it generates the
# completions of a batch in the private GRPOTrainer._generate_single_turn(prompt_ids, images, multimodal_fields,
# num_generations, has_tool_images) -> (completion ids, sampled log-probabilities or None), and scores them in the
# private GRPOTrainer._compute_loss(model, inputs) -> loss (compute_loss, the public one, only dispatches to it).
# DAPO's dynamic sampling (GRPOConfig.dynamic_sampling) needs the rewards of a batch and the batch the loss steps
# consume, which TRL builds in the private _calculate_rewards(inputs, prompts, completions, completion_ids_list) ->
# [completions, reward functions] and _generate_and_score_completions(inputs) -> dict of tensors (rows first).


class GRPOTrainerHooks:
    """Mixin, placed before trl.GRPOTrainer, that runs TRL's rollout and loss steps through public-named methods.

    `rollout(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)` replaces
    _generate_single_turn, `grpo_loss(model, inputs)` replaces _compute_loss, `score_completions(inputs, prompts,
    completions, completion_ids_list)` replaces _calculate_rewards (the rewards of every completion, gathered over
    processes: [completions, reward functions]) and `make_training_batch(inputs)` replaces
    _generate_and_score_completions (the batch of rollouts, advantages and masks that the loss steps consume); each
    defaults to TRL's own, which `trl_rollout` / `trl_grpo_loss` / `trl_score_completions` /
    `trl_make_training_batch` run (same arguments and returns).
    """

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        return self.rollout(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)

    def _compute_loss(self, model, inputs):
        return self.grpo_loss(model, inputs)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        return self.score_completions(inputs, prompts, completions, completion_ids_list)

    def _generate_and_score_completions(self, inputs):
        return self.make_training_batch(inputs)

    def rollout(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        return self.trl_rollout(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)

    def grpo_loss(self, model, inputs):
        return self.trl_grpo_loss(model, inputs)

    def score_completions(self, inputs, prompts, completions, completion_ids_list):
        return self.trl_score_completions(inputs, prompts, completions, completion_ids_list)

    def make_training_batch(self, inputs):
        return self.trl_make_training_batch(inputs)

    def trl_rollout(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)

    def trl_grpo_loss(self, model, inputs):
        return super()._compute_loss(model, inputs)

    def trl_score_completions(self, inputs, prompts, completions, completion_ids_list):
        return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

    def trl_make_training_batch(self, inputs):
        return super()._generate_and_score_completions(inputs)


# ---------------------------------------------------------------------------------------------------------------------
# Compiled modules (torch)
#
# torch's zero-bubble schedules (ZBV, DualPipeV) split a backward into input and weight gradients by walking the
# autograd graph, which a compiled region hides. torch has no public "is this module compiled" test: torch.compile(m)
# wraps m in torch._dynamo's OptimizedModule, and m.compile() compiles in place, setting nn.Module's private
# `_compiled_call_impl` (torch's own check in the schedules sees only the first).


def is_compiled_module(module) -> bool:
    """Whether `module` or one of its submodules runs through torch.compile (either way of compiling it)."""
    from torch._dynamo.eval_frame import OptimizedModule

    return any(isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None
               for m in module.modules())


# ---------------------------------------------------------------------------------------------------------------------
# The forward and full-backward actions of torch's action-list schedules (torch.distributed.pipelining)
#
# ScheduleDualPipeV marks its overlapped forward-backward pairs as OVERLAP_F_B actions and runs them as F then B unless
# a function is registered for them (the public `register_custom_function(OVERLAP_F_B, fn)`, called as fn(action,
# ctx)). A registered function must run the two sub-actions itself, and torch's own way of running one is a function
# nested inside _PipelineScheduleRuntime._step_microbatches, out of reach. These two mirror it (torch 2.13), reading the
# schedule's private state: the private _Action's sub_actions / stage_index / microbatch_index, _PipelineContext's
# arg_mbs / kwarg_mbs / target_mbs, the schedule's fwd_recv_ops / bwd_recv_ops (pending receives by (stage, micro-
# batch)), backward_counter, _n_microbatches, _stages, _maybe_compute_loss / _maybe_get_loss (the last stage's loss
# per micro-batch) and the module function _wait_batch_p2p. FSDP-wrapped stages (the schedule's _assert_unsharded) are
# not handled: the pipeline runner never wraps stages in FSDP.


def overlapped_sub_actions(action) -> tuple:
    """The (forward, full backward) sub-actions of an OVERLAP_F_B action, in the schedule's order."""
    from torch.distributed.pipelining.schedules import FORWARD, FULL_BACKWARD

    kinds = tuple(a.computation_type for a in action.sub_actions or ())
    if kinds != (FORWARD, FULL_BACKWARD):
        raise ValueError(f"an OVERLAP_F_B action of {kinds} sub-actions: expected a forward and a full backward")
    return tuple(action.sub_actions)


def _local_stages(schedule) -> dict:
    return {stage.stage_index: stage for stage in schedule._stages}


def run_forward_action(ctx, action) -> None:
    """What torch's schedule does for a FORWARD action: wait for the received input, forward one micro-batch (outputs
    not kept: the runner steps with return_outputs=False), the last stage's loss, and the output handed to the next
    stage when that stage is on this rank (V placement's turn)."""
    from torch.distributed.pipelining.schedules import _wait_batch_p2p

    schedule, stages = ctx.schedule_ref, _local_stages(ctx.schedule_ref)
    s, mb = action.stage_index, action.microbatch_index
    stage = stages[s]
    if not stage.is_first and s - 1 not in stages:
        _wait_batch_p2p(schedule.fwd_recv_ops.pop((s, mb)))
    output = stage.forward_one_chunk(mb, ctx.arg_mbs[mb], ctx.kwarg_mbs[mb], save_forward_output=False)
    schedule._maybe_compute_loss(stage, output, ctx.target_mbs, mb)
    if s + 1 in stages:
        stages[s + 1].set_local_fwd_input(output, mb)


def run_full_backward_action(ctx, action) -> None:
    """What torch's schedule does for a FULL_BACKWARD action: wait for the received output gradient, backward one
    micro-batch (the last one of the step flagged so that the stage finishes its gradients), and the input gradient
    handed to the previous stage when that stage is on this rank."""
    from torch.distributed.pipelining.schedules import _wait_batch_p2p

    schedule, stages = ctx.schedule_ref, _local_stages(ctx.schedule_ref)
    s, mb = action.stage_index, action.microbatch_index
    stage = stages[s]
    if not stage.is_last and s + 1 not in stages:
        _wait_batch_p2p(schedule.bwd_recv_ops.pop((s, mb)))
    loss = schedule._maybe_get_loss(stage, mb)
    schedule.backward_counter[s] += 1
    last_backward = schedule.backward_counter[s] == schedule._n_microbatches
    stage.backward_one_chunk(mb, loss=loss, full_backward=True, last_backward=last_backward)
    if s - 1 in stages:
        stages[s - 1].set_local_bwd_input(stage.get_local_bwd_output(mb), mb)


# ---------------------------------------------------------------------------------------------------------------------
# ZeRO-1 optimizer shards (torch.distributed.optim.ZeroRedundancyOptimizer)
#
# Per-rank checkpoints of a ZeRO-1 run (trainers/pipeline_zero.py) save each rank's own shard of the optimizer state.
# ZeroRedundancyOptimizer's public state_dict() needs consolidate_state_dict() first, which gathers every rank's shard
# onto one rank; the shard itself is the state of the local optimizer it steps, held in the attribute `optim` (its
# _init_local_optimizer: "The local optimizer is saved in self.optim"; torch 2.13).


def zero_local_optimizer(zero):
    """The optimizer a ZeroRedundancyOptimizer steps for this rank's shard of the parameters (`zero.optim`)."""
    return zero.optim
