"""GRPO for DeepSeek models: `trl.GRPOTrainer` with the DeepSeek training signal kept alive during RL.

A TRL GRPO script switches by changing its import: same constructor, reward convention, loss types, options and
logged metrics, because this is TRL's trainer and TRL's loop. For a DeepSeek model (modeling_deepseek) it changes
what happens around that loop:

- Rollouts. TRL's generation step (`rollout` here; the narrowest point) is replaced for DeepSeek models:
  prompts left-padded into one batch, the model's own generate (absorbed MLA over the latent cache), routing in
  eval mode (rollouts never count towards the balancing loads) and the model put back in training mode for the
  loss. The rollout returns the sampled tokens' log-probabilities, log_softmax(logits / temperature) as TRL's
  loss forward computes them, so TRL carries them as `sampling_per_token_logps` and this trainer logs how far the
  training forward's are from them (`sampling/sampling_logp_difference/{mean,max}`, the names TRL uses for vLLM).
  With `use_mtp=True` the rollouts are MTP self-speculative (same distribution, exactly: speculative sampling),
  with `mtp/acceptance_rate` logged; those rollouts carry no log-probabilities.
- Balancing. The aux-loss-free bias needs no help: it moves from a global optimizer-step hook
  (modeling_deepseek/balancing.py) with the loads of the training forwards, i.e. the loss forwards here; rollouts,
  old-policy and reference forwards run without gradients or in eval mode and count nothing. Per-layer MaxVio of
  the loss forwards is logged (`moe/maxvio`, `moe/maxvio/layer_<l>`, `moe/min_load/layer_<l>`).
- Losses. TRL scores the policy with a fused LM head over the backbone (trl.trainer.utils.add_fused_lm_head),
  which bypasses DeepseekForCausalLM.forward, so this trainer adds what that forward would have added, with the
  same function (modeling_deepseek/objective.py), from the backbone output it captures (a forward hook on our own
  DeepseekModel):
    * the sequence-wise balance loss. TRL's MoE option `router_aux_loss_coef` is mapped onto it (TRL's own path
      would compute Mixtral's loss from the router logits): unset, the model's `seq_balance_alpha` applies as in
      pre-training; set, it replaces alpha (0 turns it off). Logged as `aux_loss` (unweighted), like TRL.
    * optionally (`mtp_loss_weight` > 0; off by default) the MTP loss on the completion tokens, so that the MTP
      module keeps up with the policy and speculative rollouts keep their acceptance rate (the MTP module's own
      balance loss with it). Logged as `mtp_loss`.
  The model's memory options (configuration.py) apply to these forwards as to any: the recomputation inside the
  layers, and `chunked_cross_entropy` for the MTP loss. The policy's own log-probabilities already come from TRL's
  chunked fused head (trl.kernels.chunked_logprob), which keeps no [tokens, vocab] logits either.

Dynamic sampling (`dynamic_sampling=True`, DAPO's; TRL has none). A group whose completions all got the same reward
(a prompt the policy always or never solves: pass rate 1 or 0) has zero advantage and teaches nothing, yet its
tokens take compute and, with DAPO's token-level normalisation, dilute the others'. With the option, such groups
are dropped from the batch after scoring and before the loss: the loss is over prompts at the edge of competence,
normalised by their tokens. The groups are those TRL counts in `frac_reward_zero_std` (logged as ever, before the
drop); the share kept is logged as `dynamic_sampling/kept_groups`. DAPO also re-samples until the batch is full
again; here the batch shrinks instead (on CPU the point is to skip the dead work). A batch with no informative group
is empty: its step is skipped (no loss forward, no gradient, so the optimizer and the routers' bias leave the model
as it was), which is what a policy that never or always solves its prompts, R1-Zero from a base model that never
writes the format, costs: the rollouts alone. One process, steps_per_generation 1 (TRL splits a batch into equal
parts, one per step).

Reward functions that raise are reported with their name, the sample index and the exception.

TRL internals touched: the private methods `_generate_single_turn` and `_compute_loss`, overridden through
trainers.compat.GRPOTrainerHooks as `rollout` (same arguments and return) and `grpo_loss` (TRL's loss, then the
additions), which tests/test_compat.py checks against TRL's signatures; the attributes
`generation_config`, `use_vllm`, `use_transformers_continuous_batching`, `temperature`, `reward_funcs` and
`reward_func_names` read after TRL's __init__; the batch keys `completion_ids`, `completion_mask`, `tool_mask`,
`sampling_per_token_logps` and `old_per_token_logps`; for dynamic sampling the private `_calculate_rewards` and
`_generate_and_score_completions` (as `score_completions` / `make_training_batch`, through the same mixin), the
attributes `reward_weights` and `num_generations`, and the batch key `num_items_in_batch`; and the behaviour that
the fused LM head calls the backbone module (so that a forward hook on DeepseekModel sees the loss forward) and that
TRL's aux-loss path is off when `router_aux_loss_coef` is 0.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import trl
from torch import nn
from transformers import GenerationConfig

from modeling_deepseek import DeepseekForCausalLM
from modeling_deepseek.chunked_ce import token_logprobs
from modeling_deepseek.objective import (IGNORE_INDEX, relative_load, routing_statistics, shifted_labels,
                                         training_objective)

from .callbacks import DeepseekTrainerCallback
from .compat import GRPOTrainerHooks
from .rewards import code_reward
from .sandbox import require_sandbox


@dataclass
class GRPOConfig(trl.GRPOConfig):
    """trl.GRPOConfig plus the DeepSeek options (ignored for other models)."""

    use_mtp: bool = field(default=False, metadata={
        "help": "Rollouts by MTP self-speculative decoding (the model needs num_nextn_predict_layers >= 1)."})
    mtp_draft_tokens: int | None = field(default=None, metadata={
        "help": "Tokens drafted per speculative step (default: num_nextn_predict_layers)."})
    mtp_loss_weight: float = field(default=0.0, metadata={
        "help": "Weight of the MTP loss on completion tokens added to the GRPO loss (0: off)."})
    deepseek_rollouts: bool = field(default=True, metadata={
        "help": "Use the package's own rollout path for DeepSeek models (False: TRL's generic generate step)."})
    dynamic_sampling: bool = field(default=False, metadata={
        "help": "DAPO's dynamic sampling: drop the groups whose rewards are all equal (pass rate 0 or 1) before the "
                "loss. One process, steps_per_generation 1."})
    # TRL's configs default to checkpointing on, spelled `gradient_checkpointing=True`: the name transformers
    # deprecates, so every config would warn. Unset here; __post_init__ gives the same default under the current name.
    gradient_checkpointing: bool | None = field(default=None, metadata={
        "help": "Deprecated alias of `activation_checkpointing`.", "nargs": "?", "const": True})

    def __post_init__(self):
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True  # TRL's default
        super().__post_init__()
        if self.mtp_loss_weight < 0:
            raise ValueError(f"mtp_loss_weight must be >= 0, got {self.mtp_loss_weight}")
        if self.mtp_draft_tokens is not None and self.mtp_draft_tokens < 1:
            raise ValueError(f"mtp_draft_tokens must be a positive integer, got {self.mtp_draft_tokens}")


class RewardFunctionError(RuntimeError):
    """A reward function raised; the message names the function, the sample and the exception."""


class _ReportingReward:
    """Calls a reward function; when it raises, finds the first sample that raises on its own and says which."""

    def __init__(self, fn, name: str):
        self.fn, self.name = fn, name
        functools.update_wrapper(self, fn)

    def __call__(self, **kwargs):
        try:
            return self.fn(**kwargs)
        except Exception as batch_error:  # noqa: BLE001  (re-raised with context below)
            n = len(kwargs.get("prompts") or kwargs.get("completions") or [])
            for i in range(n):
                one = {k: [v[i]] if isinstance(v, list) and len(v) == n else v for k, v in kwargs.items()}
                try:
                    self.fn(**one)
                except Exception as e:  # noqa: BLE001
                    raise RewardFunctionError(
                        f"reward function {self.name!r} raised on sample {i} of {n} "
                        f"(completion {str(kwargs['completions'][i])[:200]!r}): {type(e).__name__}: {e}") from e
            raise RewardFunctionError(
                f"reward function {self.name!r} raised on a batch of {n} samples (no single sample reproduces it): "
                f"{type(batch_error).__name__}: {batch_error}") from batch_error


def deepseek_lm(model) -> DeepseekForCausalLM | None:
    """The DeepseekForCausalLM inside `model` (plain, PEFT-wrapped or DDP-wrapped), or None for other models."""
    model = getattr(model, "module", model)  # DDP
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model if isinstance(model, DeepseekForCausalLM) else None


def left_pad(rows: list[list[int]], pad_id: int, multiple_of: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (ids [B, P], attention mask [B, P]), padded on the left (generation appends on the right)."""
    P = max(len(r) for r in rows)
    if multiple_of:
        P = -(-P // multiple_of) * multiple_of
    ids = torch.full((len(rows), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), P), dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            ids[b, P - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[b, P - len(r):] = 1
    return ids, mask


def cut_at_eos(new_BN: torch.Tensor, eos_ids: list[int], logprobs_BN: torch.Tensor | None = None):
    """Per row, the generated tokens up to and including the first EOS (all of them if none), with their logprobs."""
    is_eos = torch.isin(new_BN, torch.tensor(eos_ids, device=new_BN.device))
    N = new_BN.shape[1]
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], N, dtype=torch.long))
    lengths = (first + 1).clamp(max=N).tolist()
    ids = [row[:n].tolist() for row, n in zip(new_BN, lengths)]
    lps = None if logprobs_BN is None else [row[:n].tolist() for row, n in zip(logprobs_BN, lengths)]
    return ids, lps


@contextlib.contextmanager
def eval_routing(model: nn.Module):
    """Generation in eval mode (no dropout, no load counting); the previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class GRPOTrainer(GRPOTrainerHooks, trl.GRPOTrainer):
    """trl.GRPOTrainer, DeepSeek-aware (see the module docstring). Same constructor and options as TRL's."""

    def __init__(self, model, reward_funcs=None, args: trl.GRPOConfig | None = None, *pos, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = GRPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-GRPO")
        lm = deepseek_lm(model) if not isinstance(model, str) else None
        funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if any(f is code_reward for f in funcs):
            require_sandbox()  # no sandbox on this machine: say why now, not at the first reward call
        # TRL's MoE aux-loss path computes Mixtral's load-balancing loss from the router logits; for DeepSeek the
        # option maps onto the model's sequence-wise balance loss instead, so TRL's own path stays off.
        coef = args.router_aux_loss_coef
        if lm is not None:
            args.router_aux_loss_coef = 0.0
        try:
            super().__init__(model, reward_funcs, args, *pos, **kwargs)
        finally:
            args.router_aux_loss_coef = coef
        self.deepseek = deepseek_lm(self.model)
        self.use_mtp = bool(getattr(args, "use_mtp", False))
        self.mtp_draft_tokens = getattr(args, "mtp_draft_tokens", None)
        self.mtp_loss_weight = float(getattr(args, "mtp_loss_weight", 0.0))
        self.deepseek_rollouts = bool(getattr(args, "deepseek_rollouts", True))
        self.dynamic_sampling = bool(getattr(args, "dynamic_sampling", False))
        if self.dynamic_sampling:
            if self.accelerator.num_processes > 1:
                raise ValueError(f"dynamic_sampling runs in one process; this run has "
                                 f"{self.accelerator.num_processes}")
            if self.args.steps_per_generation != 1:  # TRL splits the batch in equal parts, one per step
                raise ValueError(f"dynamic_sampling needs one optimizer step per generated batch "
                                 f"(steps_per_generation 1); got {self.args.steps_per_generation}")
        self._rewards_per_func = None
        self._empty_batch = False
        if self.deepseek is None:
            for option in ("use_mtp", "mtp_loss_weight"):
                if getattr(self, option):
                    raise ValueError(f"`{option}` needs a DeepSeek model (modeling_deepseek); got "
                                     f"{type(self.model).__name__}")
        else:
            cfg = self.deepseek.config
            if (self.use_mtp or self.mtp_loss_weight > 0) and cfg.num_nextn_predict_layers < 1:
                raise ValueError("`use_mtp` / `mtp_loss_weight` need an MTP module: the model's "
                                 "num_nextn_predict_layers is 0")
            # alpha of the sequence-wise balance loss: TRL's option when set (it becomes the model's alpha, so that
            # a layer re-run by gradient checkpointing computes the same graph), else the model's own
            if coef is not None:
                if coef < 0:
                    raise ValueError(f"router_aux_loss_coef must be >= 0, got {coef}")
                cfg.seq_balance_alpha = float(coef)
            self.balance_alpha = cfg.seq_balance_alpha
            self._ds_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
            # Its warning that a replaced forward skips the MTP and balance losses does not apply here (they are
            # added back below) and its metrics come from the model's own forward, which GRPO's fused head bypasses.
            self.remove_callback(DeepseekTrainerCallback)
        # Reward functions (not reward models, not coroutines) report which sample broke them.
        self.reward_funcs = [
            f if isinstance(f, nn.Module) or inspect.iscoroutinefunction(f) or isinstance(f, _ReportingReward)
            else _ReportingReward(f, name)
            for f, name in zip(self.reward_funcs, self.reward_func_names)
        ]

    # -----------------------------------------------------------------------------------------------------------------
    # Rollouts
    def rollout(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if (self.deepseek is None or not self.deepseek_rollouts or self.use_vllm
                or self.use_transformers_continuous_batching or images is not None or multimodal_fields
                or self.is_deepspeed_enabled or self.is_fsdp_enabled):
            return self.trl_rollout(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        return self.deepseek_rollout(prompt_ids)

    @torch.no_grad()
    def deepseek_rollout(self, prompt_ids: list[list[int]]) -> tuple[list[list[int]], list[list[float]] | None]:
        """One batched generate over the (already repeated) prompts: completion ids cut after the first EOS, and the
        sampled tokens' log-probabilities under logits / temperature (None for MTP rollouts)."""
        # TRL's generation config, asking for the raw logits too (transformers deprecates passing both a config
        # and generation arguments)
        gc = copy.deepcopy(self.generation_config)
        gc.return_dict_in_generate = True
        gc.output_logits = not self.use_mtp
        if self.use_mtp:  # TRL spells out no-op options that the speculative loop refuses unless left unset
            defaults = GenerationConfig()
            for name, no_op in (("repetition_penalty", 1.0), ("top_k", 0), ("top_p", 1.0), ("min_p", 0.0),
                                ("disable_compile", True)):  # the speculative loop compiles nothing
                if getattr(gc, name, None) in (no_op, None):
                    setattr(gc, name, getattr(defaults, name, None))
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        ids_BP, mask_BP = left_pad(prompt_ids, tokenizer.pad_token_id, self.args.pad_to_multiple_of)
        device = self.accelerator.device
        ids_BP, mask_BP = ids_BP.to(device), mask_BP.to(device)
        eos = gc.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        mode = "train" if self.model.training else "eval"
        with (trl.models.unwrap_model_for_generation(
                self.model_wrapped, self.accelerator,
                gradient_checkpointing_kwargs=self.args.activation_checkpointing_kwargs) as unwrapped,
              eval_routing(unwrapped)):
            if self.use_mtp:
                out = unwrapped.generate(input_ids=ids_BP, attention_mask=mask_BP, generation_config=gc,
                                         use_mtp=True, mtp_draft_tokens=self.mtp_draft_tokens)
                self._ds_metrics[mode]["mtp/acceptance_rate"].append(out.mtp_acceptance_rate)
                completion_ids, _ = cut_at_eos(out.sequences[:, ids_BP.shape[1]:], eos_ids)
                return completion_ids, None
            out = unwrapped.generate(input_ids=ids_BP, attention_mask=mask_BP, generation_config=gc)
        new_BN = out.sequences[:, ids_BP.shape[1]:]
        logits_BNV = torch.stack(out.logits, dim=1).float() / self.temperature
        logprobs_BN = logits_BNV.log_softmax(-1).gather(-1, new_BN[..., None]).squeeze(-1)
        return cut_at_eos(new_BN, eos_ids, logprobs_BN)

    # -----------------------------------------------------------------------------------------------------------------
    # Dynamic sampling
    def score_completions(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = self.trl_score_completions(inputs, prompts, completions, completion_ids_list)
        self._rewards_per_func = rewards_per_func  # [completions, reward functions], gathered: read below
        return rewards_per_func

    def informative_groups(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        """[groups] bool: the groups whose weighted reward has a spread (the complement of TRL's zero-std groups)."""
        from trl.trainer.utils import nanstd

        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)[None]).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan  # unscorable: left out, as TRL does
        std_G = nanstd(rewards.view(-1, self.num_generations), dim=1)
        return ~torch.isclose(std_G, torch.zeros_like(std_G)) & ~torch.isnan(std_G)

    def make_training_batch(self, inputs):
        self._rewards_per_func = None
        self._empty_batch = False
        batch = self.trl_make_training_batch(inputs)
        if not (self.dynamic_sampling and self.model.training) or self._rewards_per_func is None:
            return batch
        keep_G = self.informative_groups(self._rewards_per_func)
        self._metrics["train"]["dynamic_sampling/kept_groups"].append(keep_G.float().mean().item())
        self._empty_batch = not keep_G.any()  # grpo_loss skips the step (one batch per step: checked in __init__)
        if not keep_G.any() or keep_G.all():
            return batch
        rows = batch["completion_ids"].shape[0]
        keep_B = keep_G.repeat_interleave(self.num_generations)[:rows].to(batch["completion_ids"].device)
        kept = {k: (v[keep_B] if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == rows
                    else [x for x, k_ in zip(v, keep_B.tolist()) if k_] if isinstance(v, list) and len(v) == rows
                    else v)
                for k, v in batch.items()}
        loss_mask = kept["completion_mask"] if kept.get("tool_mask") is None else \
            kept["completion_mask"] * kept["tool_mask"]
        kept["num_items_in_batch"] = loss_mask.sum()  # TRL's normaliser (dapo loss), over the kept tokens
        return kept

    # -----------------------------------------------------------------------------------------------------------------
    # Loss
    def grpo_loss(self, model, inputs):
        if self._empty_batch and self.model.training:
            # dynamic sampling left nothing to learn from: a zero that reaches no parameter, so the step is a no-op
            return torch.zeros((), device=inputs["completion_ids"].device, requires_grad=True)
        if self.deepseek is None:
            return self.trl_grpo_loss(model, inputs)
        mode = "train" if self.model.training else "eval"
        with self._captured_backbone() as calls:
            loss = self.trl_grpo_loss(model, inputs)
        if not calls:
            return loss
        kwargs, out = calls[-1]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        K = completion_ids.shape[1]
        mask_BK = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        metrics = self._ds_metrics[mode]

        # Read before the MTP modules run: the main model's routing in the loss forward.
        routing = routing_statistics(self.deepseek)
        if routing is not None:
            metrics["moe/maxvio"].append(routing.max_violation.item())
            main_load_LE = routing.expert_load_LE[: routing.main_layers]
            for layer, (vio, min_load) in enumerate(zip(routing.max_violation_L.tolist(),
                                                        relative_load(main_load_LE).amin(dim=-1).tolist())):
                metrics[f"moe/maxvio/layer_{layer}"].append(vio)
                metrics[f"moe/min_load/layer_{layer}"].append(min_load)

        # TRL's loss is the policy's; the DeepSeek terms come from the model's objective, on the completion tokens,
        # each divided by the accumulation steps as TRL divides its own.
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        with_mtp = self.mtp_loss_weight > 0 and self.model.training
        input_ids = kwargs["input_ids"]
        targets_BT = torch.full_like(input_ids, IGNORE_INDEX)
        targets_BT[:, input_ids.shape[1] - K:] = completion_ids.masked_fill(mask_BK == 0, IGNORE_INDEX)
        extra = training_objective(
            self.deepseek, out.last_hidden_state, self.deepseek.model.embed_tokens(input_ids) if with_mtp else None,
            shifted_labels(targets_BT), mtp_loss_weight=self.mtp_loss_weight,
            attention_mask=kwargs.get("attention_mask"), fraction=1.0 / accumulation, with_mtp=with_mtp)
        if extra.loss is not None:
            loss = loss + extra.loss
        if extra.balance_loss is not None:
            metrics["aux_loss"].append(extra.balance_loss.item() / self.balance_alpha)
        if extra.mtp_loss is not None:
            metrics["mtp_loss"].append(extra.mtp_loss.item())

        # How far the rollout's log-probabilities are from the training forward's (TRL logs this for vLLM).
        sampled = inputs.get("sampling_per_token_logps")
        if sampled is not None:
            reference = inputs.get("old_per_token_logps")
            if reference is None:
                # In chunks of positions (chunked_ce.py): the [B, K, vocab] logits never exist at once.
                reference = token_logprobs(out.last_hidden_state[:, -K - 1:-1], self.deepseek.lm_head,
                                           completion_ids, self.temperature,
                                           self.deepseek.config.cross_entropy_chunk_tokens)
            delta = (reference - sampled).abs()[mask_BK.bool()]
            if delta.numel():
                metrics["sampling/sampling_logp_difference/mean"].append(delta.mean().item())
                metrics["sampling/sampling_logp_difference/max"].append(delta.max().item())
        return loss

    @contextlib.contextmanager
    def _captured_backbone(self):
        """(kwargs, output) of every call of our DeepseekModel inside the block (the fused head calls it directly)."""
        calls = []
        handle = self.deepseek.model.register_forward_hook(
            lambda module, args, kwargs, output: calls.append((kwargs, output)), with_kwargs=True)
        try:
            yield calls
        finally:
            handle.remove()

    # -----------------------------------------------------------------------------------------------------------------
    # Logging: the DeepSeek metrics next to TRL's, averaged over the steps since the last log
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.deepseek is not None:
            mode = "train" if self.model.training else "eval"
            prefix = "eval_" if mode == "eval" else ""
            for name, values in self._ds_metrics[mode].items():
                if values:
                    logs[prefix + name] = sum(values) / len(values)
            self._ds_metrics[mode].clear()
        super().log(logs, start_time)
