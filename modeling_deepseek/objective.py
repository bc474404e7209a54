"""The training objective of DeepseekForCausalLM, and the routing statistics reported next to it.

One forward's objective is

    loss = f * (CE_main + mtp_loss_weight * mean_k CE_k + balance + indexer)

- CE_main: next-token cross-entropy, position i scored on `shift_labels[i]` (-100: not scored);
- CE_k: the cross-entropy of MTP depth k (mtp.py), position i scored on `shift_labels[i + k]`;
- balance: the sequence-wise balance loss (DeepSeek-V3 eq. 17, already weighted by alpha) that each MoE layer left
  on itself (moe.py), summed over the layers, MTP modules included;
- indexer: DeepSeek-V3.2's lightning-indexer loss (indexer_loss.py), summed over the attention layers whose indexer
  recorded this forward: only while an indexer training stage is set (trainers/indexer_training.py);
- f: this forward's share of the optimizer step. Without gradient accumulation f = 1 and the loss is a mean. Under
  Trainer's accumulation `num_items_in_batch` counts the scored tokens of the whole step (every micro-batch, every
  data-parallel rank) and f = this forward's scored tokens / num_items_in_batch: the micro-batches' losses, which
  Trainer sums, then add up to the loss of the whole batch, for all three terms alike (a balance loss left at its
  own mean would count once per micro-batch and per rank). TRL's GRPO divides its extra terms by the accumulation
  steps instead: f = 1 / steps.

The MTP and balance losses are reported as this forward's own means, whatever f is: that is what compares across
runs and what the trainers log. `main_loss` is f * CE_main, transformers' `loss` convention; divided by
`step_fraction` it is the forward's own mean CE again (the `lm_loss` that trainers.callbacks logs).

The routing statistics are the tokens each expert received in this forward (`expert_load`) and MaxVio, the most
loaded expert's excess over the mean (0: perfect balance), averaged over the main model's MoE layers.

DeepseekForCausalLM.forward and trainers.GRPOTrainer (whose fused LM head bypasses that forward) both call
`training_objective` and `routing_statistics`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .chunked_ce import IGNORE_INDEX, linear_cross_entropy_sum
from .indexer_loss import recorded_indexer_losses
from .masks import padding_free_tokens
from .mtp import mtp_labels


def shifted_labels(labels_BT: torch.Tensor | None, shift_labels_BT: torch.Tensor | None = None) -> torch.Tensor | None:
    """The targets of every position: `shift_labels` as given, else `labels` shifted left by one (as transformers
    does inside its causal LMs; the last position has no target). None when neither is given."""
    if shift_labels_BT is None and labels_BT is not None:
        shift_labels_BT = F.pad(labels_BT, (0, 1), value=IGNORE_INDEX)[:, 1:]
    return None if shift_labels_BT is None else shift_labels_BT.contiguous()


def scored_tokens(targets_BT: torch.Tensor) -> torch.Tensor:
    """How many positions have a target (at least 1, so that it can divide)."""
    return (targets_BT != IGNORE_INDEX).sum().clamp_min(1)


def step_fraction(shift_labels_BT: torch.Tensor, num_items_in_batch: int | torch.Tensor | None):
    """f, this forward's share of the optimizer step under Trainer's convention (see the module docstring)."""
    if num_items_in_batch is None:
        return 1.0
    return scored_tokens(shift_labels_BT) / num_items_in_batch


def mean_cross_entropy(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the scored positions, in fp32. 0 when none is scored (the last positions of a
    short sequence have no target at the deeper MTP depths), where a plain mean would be NaN."""
    targets_N = targets_BT.reshape(-1).to(logits_BTV.device)
    total = F.cross_entropy(logits_BTV.reshape(-1, logits_BTV.shape[-1]).float(), targets_N,
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total / scored_tokens(targets_N)


def head_cross_entropy(lm, h_BTD: torch.Tensor, targets_BT: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(logits, mean CE) of `lm`'s head over `h_BTD`. With the memory option `chunked_cross_entropy` while autograd
    records, the chunked linear cross-entropy (chunked_ce.py) gives the same loss without materialising the logits
    (None is returned for them)."""
    if lm.config.chunked_cross_entropy and torch.is_grad_enabled():
        total = linear_cross_entropy_sum(h_BTD, lm.lm_head, targets_BT, lm.config.cross_entropy_chunk_tokens)
        return None, total / scored_tokens(targets_BT.to(total.device))
    logits_BTV = lm.lm_head(h_BTD)
    return logits_BTV, mean_cross_entropy(logits_BTV, targets_BT)


@dataclass
class Objective:
    """One forward's objective and its parts (None: that part was not computed; all None: no labels)."""

    loss: torch.Tensor | None = None  # f * (CE_main + mtp_loss_weight * mtp_loss + balance_loss): what backward runs on
    main_loss: torch.Tensor | None = None  # f * the mean next-token CE
    mtp_loss: torch.Tensor | None = None  # mean over depths of the MTP CE (unweighted)
    balance_loss: torch.Tensor | None = None  # sequence-wise balance loss, summed over the MoE layers
    mtp_logits: tuple[torch.Tensor, ...] | None = None  # [B, T, V] per depth (None under chunked_cross_entropy)
    indexer_loss: torch.Tensor | None = None  # the lightning indexers' KL, summed over the layers (indexer_loss.py)


def training_objective(
    lm,
    hidden_BTD: torch.Tensor,
    inputs_embeds_BTD: torch.Tensor | None,
    shift_labels_BT: torch.Tensor,
    *,
    mtp_loss_weight: float,
    logits_BTV: torch.Tensor | None = None,
    main_ce: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    fraction: float | torch.Tensor = 1.0,
    with_mtp: bool = True,
) -> Objective:
    """The objective of the forward that just ran through `lm` (a DeepseekForCausalLM) and left `hidden_BTD`, the
    main model's final hidden state, with its MoE layers' balance losses.

    `logits_BTV` (the LM head over hidden_BTD) give CE_main; or `main_ce`, CE_main already computed (the chunked
    cross-entropy, `head_cross_entropy`); neither leaves it to the caller (GRPO scores the policy itself).
    `with_mtp` runs the MTP modules, if the model has any, over `hidden_BTD` and `inputs_embeds_BTD` (the input
    embeddings, needed only then); their heads go through `head_cross_entropy` too.
    `position_ids` are the caller's: where they restart (sequences packed in one row) an MTP target that belongs to
    the next sequence is not scored. `fraction` is f (`step_fraction`)."""
    cfg = lm.config
    parts_to_add = []
    main_loss = mtp_loss = balance_loss = mtp_logits = indexer_loss = None
    if logits_BTV is not None or main_ce is not None:
        lm_loss = mean_cross_entropy(logits_BTV, shift_labels_BT) if main_ce is None else main_ce
        main_loss = fraction * lm_loss
        parts_to_add.append(lm_loss)
    if with_mtp and cfg.num_nextn_predict_layers > 0:
        rope_positions = position_ids
        if rope_positions is None:
            rope_positions = torch.arange(shift_labels_BT.shape[1], device=hidden_BTD.device).unsqueeze(0)
        h_normed = lm.model.run_mtp(hidden_BTD, inputs_embeds_BTD, rope_positions, attention_mask)
        heads = [head_cross_entropy(lm, h_BTD, mtp_labels(shift_labels_BT, k, position_ids=position_ids))
                 for k, h_BTD in enumerate(h_normed, start=1)]
        mtp_logits = None if heads[0][0] is None else tuple(logits_k_BTV for logits_k_BTV, _ in heads)
        mtp_loss = torch.stack([ce for _, ce in heads]).mean()
        parts_to_add.append(mtp_loss_weight * mtp_loss)
    moe_layers = lm.moe_layers()
    balance_terms = [moe.last_balance_loss for moe in moe_layers if moe.last_balance_loss is not None]
    if balance_terms:
        balance_loss = torch.stack(balance_terms).sum()
        parts_to_add.append(balance_loss)
    elif lm.training and torch.is_grad_enabled() and cfg.seq_balance_alpha > 0 and moe_layers:
        warnings.warn(
            "seq_balance_alpha > 0 but no MoE layer produced the sequence-wise balance loss: reentrant "
            "gradient checkpointing (use_reentrant=True) runs the layers without gradients. Use "
            "use_reentrant=False (transformers' default) to train it.", stacklevel=3)
    indexer_terms = recorded_indexer_losses(lm, padding_free_tokens(attention_mask, shift_labels_BT.shape[1]))
    if indexer_terms:
        indexer_loss = torch.stack(indexer_terms).sum()
        parts_to_add.append(indexer_loss)
    loss = fraction * sum(parts_to_add) if parts_to_add else None
    return Objective(loss, main_loss, mtp_loss, balance_loss, mtp_logits, indexer_loss)


def max_violation(load_LE: torch.Tensor) -> torch.Tensor:
    """MaxVio per layer: max_i load_i / mean load - 1 (0 is perfect balance)."""
    return relative_load(load_LE).amax(dim=-1) - 1


def relative_load(load_LE: torch.Tensor) -> torch.Tensor:
    """Each expert's load over its layer's mean load (1 everywhere is perfect balance)."""
    return load_LE / load_LE.mean(dim=-1, keepdim=True).clamp_min(1e-9)


@dataclass
class RoutingStatistics:
    expert_load_LE: torch.Tensor  # tokens per expert, one row per MoE layer that routed: main model first, then MTP
    main_layers: int  # how many of those rows are the main model's
    max_violation_L: torch.Tensor  # MaxVio of each of the main model's MoE layers

    @property
    def max_violation(self) -> torch.Tensor | None:
        """MaxVio averaged over the main model's MoE layers (None: only MTP modules routed)."""
        return self.max_violation_L.mean() if self.main_layers else None


def routing_statistics(lm) -> RoutingStatistics | None:
    """The routing of the forward that just ran through `lm`, from the counts its MoE layers left on themselves;
    None when no MoE layer routed (a dense model, or nothing ran)."""
    loads = [moe.last_load_E for moe in lm.moe_layers() if moe.last_load_E is not None]
    if not loads:
        return None
    load_LE = torch.stack(loads)
    main_layers = min(len(lm.moe_layers(include_mtp=False)), len(loads))
    return RoutingStatistics(load_LE, main_layers, max_violation(load_LE[:main_layers]))
