"""Pipeline-parallel training of DeepseekForCausalLM through torch.distributed.pipelining's own schedules.

    runner = PipelineRunner(model, "dualpipev", n_microbatches=8, mesh=pipeline_mesh(pp_size=2))
    optimizer = torch.optim.AdamW(runner.parameters())         # or ZeRO-1: trainers.pipeline_zero.pipeline_optimizer
    parts = runner.train_step(input_ids, labels=input_ids)      # loss, main_loss, mtp_loss, balance_loss (global)
    optimizer.step(); optimizer.zero_grad()                      # the balancing bias moves here (balancing.py)

What is ours and what is torch's. torch schedules the micro-batches (GPipe, 1F1B, Interleaved 1F1B, ZBV zero-bubble,
DualPipeV), sends activations by isend / irecv and splits the backward into input (I) and weight (W) gradients by
walking the autograd graph; we build the stages (modeling_deepseek/pipeline_stages.py), place them on the ranks (loop:
rank r holds stages r, r + P, ...; V: r and 2P-1-r), and give the last stage its loss: the model's own objective
(objective.training_objective: CE, MTP CE), run on the last stage's micro-batch.

Loss scaling. Every micro-batch's loss is its share of the whole step, so the schedule's sum over micro-batches (and
the sum over data-parallel replicas) is the loss of the global batch and `scale_grads=False`: CE and MTP CE are
weighted by the micro-batch's share of the scored tokens (objective.step_fraction's convention), the sequence-wise
balance loss by its share of the sequences (the loss is a per-sequence mean). Each stage attaches its own layers'
balance loss to the hidden state it sends on (pipeline_stages.attach_loss); the MTP modules' is added to the loss.

Aux-loss-free balancing. Each rank's model keeps only its stages' routers (pipeline_stages.prune_to_stages). Their
counts sum over all micro-batches of the step on that rank (every micro-batch passes through every layer), are
all-reduced over the data-parallel replicas of the same stages (the mesh's "dp" dimension) and applied at the optimizer
step by balancing.py's hook, so replicas stay identical.

Data parallel. The mesh is (dp, pp); after the schedule each parameter's gradient is summed over "dp" (the losses are
already shares of the global batch, so a sum, not a mean).

Expert parallel. With a mesh from `pipeline_mesh(pp, expert_parallel=True)` the data-parallel dimension is "ep": its
replicas also split the routed experts of their stages (trainers/pipeline_experts.py); the expert gradients, which
the all_to_all's backward already summed over the replicas' tokens, are left out of the sum over "ep".
`pipeline_mesh(pp, expert_parallel=True, ep_size=E)` with E below the world / pp replicas is V3's EP64 inside DP128:
a (dp_replicate, ep, pp, tp) mesh, all dp_replicate x ep ranks of a pipeline rank data-parallel replicas (the sums
over "dp" above run over all of them), each expert shard held by the dp / E ranks of its "dp_replicate" group, over
which its gradient is summed.
`overlap_f_b=True` (DualPipeV under expert parallelism) runs each OVERLAP_F_B action's forward and backward side by
side, one's all_to_all under the other's compute (trainers/pipeline_overlap.py); `all_to_all_seconds()` says how much
of the step's exchange time was left exposed.

Refused with a named error: micro-batches below what the schedule needs, a batch that does not split into them, a
compiled module under a schedule that splits I / W (ZBV, DualPipeV), a pipeline with more stages than layers, tied
embeddings under loop placement (the head would sit on another rank than the embedding), overlap_f_b under a
schedule without OVERLAP_F_B actions or without expert parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleDualPipeV, ScheduleGPipe,
                                          ScheduleInterleaved1F1B, ScheduleZBVZeroBubble)
from torch.distributed.pipelining.schedules import OVERLAP_F_B

from modeling_deepseek.balancing import set_balancing_group
from modeling_deepseek.objective import IGNORE_INDEX, head_cross_entropy, shifted_labels, training_objective
from modeling_deepseek.pipeline_stages import DeepseekPipelineStage, prune_to_stages, stage_layer_ranges

from .compat import is_compiled_module
from .pipeline_experts import expert_grad_sq_norm, shard_experts
from .pipeline_overlap import Baton, OverlapFB, stage_ep_meshes


@dataclass(frozen=True)
class ScheduleSpec:
    cls: type
    placement: str  # "loop" or "v"
    stages_per_rank: int
    min_microbatches_per_stage: int  # the schedule needs n_microbatches >= this * number of stages (0: >= 1)
    splits_weight_grad: bool  # runs I and W separately (no compiled module then)
    overlaps_f_b: bool = False  # has OVERLAP_F_B actions (a forward and another micro-batch's backward, paired)


SCHEDULES = {
    "gpipe": ScheduleSpec(ScheduleGPipe, "loop", 1, 0, False),
    "1f1b": ScheduleSpec(Schedule1F1B, "loop", 1, 1, False),
    "interleaved1f1b": ScheduleSpec(ScheduleInterleaved1F1B, "loop", 2, 1, False),
    "zbv": ScheduleSpec(ScheduleZBVZeroBubble, "v", 2, 1, True),
    "dualpipev": ScheduleSpec(ScheduleDualPipeV, "v", 2, 1, True, overlaps_f_b=True),
}


def pipeline_mesh(pp_size: int, device_type: str = "cpu", expert_parallel: bool = False,
                  ep_size: int | None = None) -> DeviceMesh:
    """A (dp, pp) mesh over the whole world: consecutive ranks form one pipeline, world / pp_size replicas of it.
    `expert_parallel`: the replicas also split the routed experts (trainers/pipeline_experts.py); the mesh is then
    (ep, pp, tp) with a size-1 "tp" dimension, the group of ranks holding one batch that the EP implementation takes.
    `ep_size` below the replica count (V3's EP64 inside DP128): (dp_replicate, ep, pp, tp), each expert shard on
    dp / ep_size replicas; the data-parallel replicas are then the dp_replicate x ep ranks of a pipeline rank."""
    world = dist.get_world_size()
    if world % pp_size:
        raise ValueError(f"pp size {pp_size} does not divide the world size {world}")
    dp = world // pp_size
    if ep_size is not None and not expert_parallel:
        raise ValueError("ep_size is the expert-parallel width: pass expert_parallel=True with it")
    if expert_parallel and ep_size not in (None, dp):
        if ep_size < 1 or dp % ep_size:
            raise ValueError(f"ep size {ep_size} does not divide the {dp} data-parallel replicas of a pipeline rank "
                             f"(world {world} / pp {pp_size})")
        return init_device_mesh(device_type, (dp // ep_size, ep_size, pp_size, 1),
                                mesh_dim_names=("dp_replicate", "ep", "pp", "tp"))
    if expert_parallel:
        return init_device_mesh(device_type, (dp, pp_size, 1), mesh_dim_names=("ep", "pp", "tp"))
    return init_device_mesh(device_type, (world // pp_size, pp_size), mesh_dim_names=("dp", "pp"))


def stage_indices(rank: int, pp_size: int, spec: ScheduleSpec) -> list[int]:
    """The stages rank `rank` holds: loop placement r, r + P, ...; V placement r and 2P - 1 - r."""
    if spec.placement == "v":
        return [rank, 2 * pp_size - 1 - rank]
    return [rank + k * pp_size for k in range(spec.stages_per_rank)]


def check_microbatches(schedule: str, n_microbatches: int, num_stages: int, batch_size: int | None = None) -> None:
    spec = SCHEDULES[schedule]
    need = max(1, spec.min_microbatches_per_stage * num_stages)
    if n_microbatches < need:
        raise ValueError(f"schedule {schedule!r} with {num_stages} stages needs at least {need} micro-batches, got "
                         f"{n_microbatches}")
    if batch_size is not None and batch_size % n_microbatches:
        raise ValueError(f"a batch of {batch_size} sequences does not split into {n_microbatches} micro-batches of "
                         "equal size: use a per-rank batch that is a multiple of the micro-batch count")


def _replica_group(mesh: DeviceMesh):
    """The process group of all data-parallel replicas of this rank's pipeline rank on a (dp_replicate, ep, pp, tp)
    mesh: the dp_replicate x ep ranks with its "pp" coordinate, in rank order (replica r * ep + e). Every rank creates
    every such group (torch's new_subgroups_by_enumeration is collective over the world)."""
    pp = mesh.mesh_dim_names.index("pp")
    ranks = mesh.mesh.movedim(pp, 0).reshape(mesh.size(pp), -1).tolist()
    group, _ = dist.new_subgroups_by_enumeration(ranks)
    return group


class _HeadView:
    """What training_objective reads of a DeepseekForCausalLM, for the last stage: the model's own config, MTP modules
    and head; no MoE layers to collect balance losses from (the stages attach their own, see the module docstring)."""

    def __init__(self, lm):
        self.lm, self.config, self.model = lm, lm.config, lm.model

    @property
    def lm_head(self):
        return self.lm.lm_head

    @property
    def training(self):
        return self.lm.training

    def moe_layers(self):
        return []


class PipelineRunner:
    """Trains `lm` (a DeepseekForCausalLM, the same weights on every rank) split over the mesh's "pp" dimension."""

    def __init__(self, lm, schedule: str, n_microbatches: int, mesh: DeviceMesh, ep_implementation: str = "all_to_all",
                 overlap_f_b: bool = False):
        """A mesh from `pipeline_mesh(pp, expert_parallel=True)` (an "ep" dimension) also shards the routed experts of
        the local stages over "ep", dispatched by the registered EP implementation `ep_implementation`.
        `overlap_f_b`: run the schedule's OVERLAP_F_B actions with one micro-batch's expert all_to_alls under the
        other's compute (trainers/pipeline_overlap.py); needs a schedule that has them (dualpipev), expert parallelism
        and CPU ranks."""
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown pipeline schedule {schedule!r}; choose one of {sorted(SCHEDULES)}")
        spec = self.spec = SCHEDULES[schedule]
        self.lm, self.schedule_name, self.n_microbatches = lm, schedule, n_microbatches
        dims = mesh.mesh_dim_names
        dp_dim = "ep" if "ep" in dims else "dp"  # expert parallel: the ep ranks are (among) the data-parallel replicas
        if overlap_f_b and not spec.overlaps_f_b:
            raise ValueError(f"overlap_f_b: schedule {schedule!r} has no OVERLAP_F_B actions to overlap; "
                             f"{sorted(n for n, s in SCHEDULES.items() if s.overlaps_f_b)} has them")
        self.device = next(lm.parameters()).device
        if overlap_f_b and self.device.type != "cpu":
            raise ValueError("overlap_f_b runs on CPU ranks (blocking gloo exchanges handed over between two "
                             f"threads); the model is on {self.device.type}, where autograd runs the backward on its "
                             "device thread, outside the baton's hand-over")
        if overlap_f_b and dp_dim != "ep":
            raise ValueError("overlap_f_b overlaps one micro-batch's expert all_to_all with another's compute: it "
                             "needs expert parallelism (a mesh from pipeline_mesh(pp, expert_parallel=True))")
        self.pp_group, self.dp_group = mesh.get_group("pp"), mesh.get_group(dp_dim)
        self.pp_size, self.dp_size = mesh.size(dims.index("pp")), mesh.size(dims.index(dp_dim))
        self.ep_group = self.dp_group if dp_dim == "ep" else None
        self.ep_rank = dist.get_rank(self.ep_group) if self.ep_group is not None else 0
        # The ranks holding the same expert shard (dp_replicate), whose expert gradients are summed over them; None
        # where each shard has one holder.
        self.expert_replica_group = None
        if "dp_replicate" in dims:
            self.expert_replica_group = mesh.get_group("dp_replicate")
            self.dp_group, self.dp_size = _replica_group(mesh), self.dp_size * mesh.size(dims.index("dp_replicate"))
        pp_rank = dist.get_rank(self.pp_group)
        num_stages = self.pp_size * spec.stages_per_rank
        check_microbatches(schedule, n_microbatches, num_stages)
        if spec.splits_weight_grad and is_compiled_module(lm):
            raise ValueError(f"schedule {schedule!r} splits the backward into input and weight gradients, which torch "
                             "cannot do through a compiled module: run the model eagerly under it")
        carry = spec.placement != "v"
        if carry and lm.config.tie_word_embeddings:
            raise ValueError(f"tie_word_embeddings under {schedule!r}: loop placement puts lm_head on rank "
                             f"{self.pp_size - 1} and the embedding on rank 0; use a V schedule (zbv, dualpipev)")
        ranges = stage_layer_ranges(lm.config.num_hidden_layers, num_stages)
        self.stages = [DeepseekPipelineStage(lm, s, num_stages, ranges[s], carry)
                       for s in stage_indices(pp_rank, self.pp_size, spec)]
        prune_to_stages(lm, self.stages)
        self.expert_params, self.baton, self._overlap = [], None, None
        if dp_dim == "ep":  # each stage's exchanges on a group of its own when they overlap (pipeline_overlap.py)
            self.baton = Baton()
            meshes = stage_ep_meshes(mesh, len(self.stages)) if overlap_f_b else [mesh["ep"]] * len(self.stages)
            for stage, ep_mesh in zip(self.stages, meshes):
                self.expert_params += shard_experts([stage], ep_mesh, mesh["tp"], ep_implementation, self.baton)
            self._overlap = OverlapFB(self.baton) if overlap_f_b else None
        for tracked in (lm, lm.model):  # the optimizer hook follows the DeepseekModel (balancing.track)
            set_balancing_group(tracked, self.dp_group)
        self._schedules = {}  # micro-batch shape (b, T) -> the schedule over stages declared for that shape
        self.has_first = any(m.is_first for m in self.stages)
        self.last = next((m for m in self.stages if m.is_last), None)
        self._scored_total = 1.0
        self._main, self._mtp, self._mtp_balance = [], [], []

    def schedule(self, micro_batch: int, seq_len: int):
        """torch's schedule over this rank's stages, for micro-batches of `micro_batch` x `seq_len` tokens. The stages
        declare their input and output shapes (torch's static mode): left to infer them, torch would run an extra
        forward and backward on the first micro-batch, which would count in the balancing statistics."""
        key = (micro_batch, seq_len)
        if key not in self._schedules:
            hidden = torch.empty(micro_batch, seq_len, self.lm.config.hidden_size, device="meta", requires_grad=True)
            ids = torch.empty(micro_batch, seq_len, dtype=torch.long, device="meta")

            def io(stage):
                inputs = (ids,) if stage.is_first else (hidden, hidden) if stage.carry_embeddings else (hidden,)
                outputs = (hidden, hidden) if stage.carry_embeddings else (hidden,)
                return inputs, outputs

            torch_stages = [PipelineStage(m, m.index, m.num_stages, self.device, *io(m), group=self.pp_group)
                            for m in self.stages]
            schedule = self.spec.cls(torch_stages if len(torch_stages) > 1 else torch_stages[0], self.n_microbatches,
                                     loss_fn=self._micro_batch_loss, scale_grads=False)
            if self._overlap is not None:
                schedule.register_custom_function(OVERLAP_F_B, self._overlap)
            self._schedules[key] = schedule
        return self._schedules[key]

    def parameters(self) -> list[torch.nn.Parameter]:
        """This rank's parameters, each once (under V placement the embedding belongs to two stages)."""
        return list(self.lm.parameters())

    def _micro_batch_loss(self, output, target_B2T):
        input_ids_BT, labels_BT = target_B2T.unbind(1)
        last, lm = self.last, self.lm
        # Copies, not the stage's outputs themselves: torch detaches those in place once the input gradients are out,
        # while a recomputed region here (the MTP modules' norms under recompute_norms) still needs them for the
        # weight gradients that ZBV / DualPipeV run later.
        h_BTD, embeds_BTD = (t.clone() if t is not None else None
                             for t in (output if isinstance(output, tuple) else (output, None)))
        if embeds_BTD is None and lm.config.num_nextn_predict_layers:
            embeds_BTD = last.embed_tokens(input_ids_BT)
        fraction = (labels_BT != IGNORE_INDEX).sum() / self._scored_total
        weight = lm.current_mtp_loss_weight
        head = _HeadView(lm)
        _, main_ce = head_cross_entropy(head, h_BTD, labels_BT)  # chunked when the memory option says so
        objective = training_objective(head, h_BTD, embeds_BTD, labels_BT, mtp_loss_weight=weight, main_ce=main_ce,
                                       fraction=fraction)
        loss = objective.loss
        self._main.append(objective.main_loss.detach())
        if objective.mtp_loss is not None:
            self._mtp.append(fraction * objective.mtp_loss.detach())
        terms = [layer.moe.last_balance_loss for layer in last.mtp_layers
                 if layer.moe is not None and layer.moe.last_balance_loss is not None]
        if terms and lm.training and torch.is_grad_enabled():
            balance = last.balance_share(h_BTD.shape[0]) * torch.stack(terms).sum()
            self._mtp_balance.append(balance.detach())
            loss = loss + balance
        return loss

    def train_step(self, input_ids_BT, labels_BT=None, shift_labels_BT=None) -> dict[str, torch.Tensor]:
        """Forward and backward of this rank's share of the global batch; the gradients are left in the parameters
        (summed over dp). Returns the global batch's loss and its parts, identical on every rank."""
        shift_BT = shifted_labels(labels_BT, shift_labels_BT)
        if shift_BT is None:
            raise ValueError("train_step needs labels or shift_labels")
        check_microbatches(self.schedule_name, self.n_microbatches, self.stages[0].num_stages, input_ids_BT.shape[0])
        scored = (shift_BT != IGNORE_INDEX).sum().float()
        sequences = torch.tensor(float(input_ids_BT.shape[0]), device=scored.device)
        counts = torch.stack((scored, sequences))
        if self.dp_size > 1:
            dist.all_reduce(counts, group=self.dp_group)
        self._scored_total = counts[0].clamp_min(1)
        for stage in self.stages:
            stage.balance_share = lambda b, n=counts[1]: b / n
            stage.balance_log.clear()
        self._main, self._mtp, self._mtp_balance = [], [], []
        if self.baton is not None:
            self.baton.reset_clocks()
        args = (input_ids_BT,) if self.has_first else ()
        target = torch.stack((input_ids_BT, shift_BT), dim=1) if self.last is not None else None
        schedule = self.schedule(input_ids_BT.shape[0] // self.n_microbatches, input_ids_BT.shape[1])
        schedule.step(*args, target=target, return_outputs=False)
        if self.dp_size > 1:
            local = {id(p) for p in self.expert_params}  # their gradients already hold every ep rank's tokens
            for p in self.parameters():
                if p.grad is None:
                    continue
                if id(p) not in local:
                    dist.all_reduce(p.grad, group=self.dp_group)
                elif self.expert_replica_group is not None:  # and the other replicas of the shard hold theirs
                    dist.all_reduce(p.grad, group=self.expert_replica_group)
        return self._parts([b for stage in self.stages for b in stage.balance_log])

    @property
    def overlapped_actions(self) -> int:
        """How many OVERLAP_F_B actions ran overlapped (0 without overlap_f_b)."""
        return self._overlap.calls if self._overlap is not None else 0

    def all_to_all_seconds(self) -> dict[str, float]:
        """This rank's expert all_to_all time in the last train_step: `comm_s`, wall time with at least one exchange
        in flight, and `exposed_s`, the part of it no compute ran under (all of it when nothing overlaps)."""
        if self.baton is None:
            raise ValueError("all_to_all_seconds: no expert parallelism, so no all_to_all to time")
        return {"comm_s": self.baton.comm_s, "exposed_s": self.baton.exposed_s}

    def _parts(self, stage_balance: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The step's loss parts summed over micro-batches, pipeline ranks and replicas: the same on every rank."""
        zero = torch.zeros((), device=self.device)
        balance = stage_balance + self._mtp_balance
        parts = torch.stack([sum(self._main, zero), sum(self._mtp, zero), sum(balance, zero)]).float()
        dist.all_reduce(parts, group=self.pp_group)
        if self.dp_size > 1:
            dist.all_reduce(parts, group=self.dp_group)
        main, mtp, bal = parts.unbind()
        weight = self.lm.current_mtp_loss_weight
        mtp_term = weight * mtp if self.lm.config.num_nextn_predict_layers else 0.0
        return {"loss": main + mtp_term + bal, "main_loss": main, "mtp_loss": mtp, "balance_loss": bal}

    @torch.no_grad()
    def eval_step(self, input_ids_BT, labels_BT=None, shift_labels_BT=None) -> dict[str, torch.Tensor]:
        """The loss parts of a batch, forward only, model in eval mode (no balancing statistics). The stages run
        one after the other over the whole batch, activations passed by send / recv
        (torch's action-list schedules, DualPipeV among them, have no forward-only mode)."""
        shift_BT = shifted_labels(labels_BT, shift_labels_BT)
        scored = (shift_BT != IGNORE_INDEX).sum().float()
        if self.dp_size > 1:
            dist.all_reduce(scored, group=self.dp_group)
        self._scored_total = scored.clamp_min(1)
        self._main, self._mtp, self._mtp_balance = [], [], []
        was_training = self.lm.training
        self.lm.eval()
        try:
            by_index = {m.index: m for m in self.stages}
            num_stages = self.stages[0].num_stages
            ranks = {}
            for r in range(self.pp_size):
                for s in stage_indices(r, self.pp_size, self.spec):
                    ranks[s] = dist.get_global_rank(self.pp_group, r)
            B, T = input_ids_BT.shape
            x = None
            for s in range(num_stages):
                stage = by_index.get(s)
                if stage is None:
                    continue
                if s == 0:
                    x = (input_ids_BT,)
                elif ranks[s - 1] != dist.get_rank():  # else x is the previous local stage's output
                    n = 2 if stage.carry_embeddings else 1
                    x = tuple(torch.empty(B, T, self.lm.config.hidden_size, device=self.device) for _ in range(n))
                    for t in x:
                        dist.recv(t, src=ranks[s - 1])
                out = stage(*x)
                x = out if isinstance(out, tuple) else (out,)
                if stage.is_last:
                    self._micro_batch_loss(out, torch.stack((input_ids_BT, shift_BT), dim=1))
                elif ranks[s + 1] != dist.get_rank():
                    for t in x:
                        dist.send(t.contiguous(), dst=ranks[s + 1])
        finally:
            self.lm.train(was_training)
        return self._parts([])

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip by the norm over the whole model: each pipeline rank holds different parameters, so the squared
        norms add over "pp" (replicas over "dp" hold the same, already summed, gradients; so do an expert shard's
        replicas over "dp_replicate", while the ep ranks' shards add over "ep")."""
        local = {id(p) for p in self.expert_params}
        grads = [p.grad for p in self.parameters() if p.grad is not None and id(p) not in local]
        sq = (torch.stack([g.float().pow(2).sum() for g in grads]).sum() if grads
              else torch.zeros((), device=self.device))
        if self.expert_params:  # each ep rank holds other experts: their squares add over "ep" too
            sq = sq + expert_grad_sq_norm(self.expert_params, self.ep_group)
        dist.all_reduce(sq, group=self.pp_group)
        norm = sq.sqrt()
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads + [p.grad for p in self.expert_params if p.grad is not None]:  # the experts' clip alike
            g.mul_(scale.to(g.dtype))
        return norm


__all__ = ["PipelineRunner", "SCHEDULES", "ScheduleSpec", "check_microbatches", "pipeline_mesh", "stage_indices"]
