"""The training loop of the pipeline path (examples/pretrain.py --pp): AdamW, cosine schedule, progress, eval,
checkpoints that resume bit-exact, and a final one-process checkpoint.

Why not Trainer: Trainer runs one forward and one backward per micro-batch through the model's own forward; a
pipeline schedule runs every micro-batch of a step at once, on every rank, with the loss on the last stage only
(trainers/pipeline.py). What a step needs is therefore `runner.train_step` on the step's whole batch, then the
optimizer.

Data: the training blocks are visited in a random order drawn from `seed` and the epoch, the same on every rank;
step s takes the next global batch of that order, and data-parallel replica d its d-th slice. The order depends on
nothing but (seed, step), so a resumed run reads exactly the batches the uninterrupted one would have.

Checkpoints: at every `save_steps`, each rank writes its own part (its stages' weights and balancing biases under the
full model's names, its optimizer state (under ZeRO-1 its own shard only, `args.zero1`: trainers/pipeline_zero.py) and
scheduler state, the step) to OUTPUT/.checkpoint-N.tmp/rank{r}.pt; after a
barrier rank 0 publishes the folder as OUTPUT/checkpoint-N with one rename (trainers.checkpointing.publish), so a
killed job never leaves a half checkpoint. The final model is gathered to rank 0 and saved with save_pretrained, an
ordinary checkpoint that loads in one process.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import get_cosine_schedule_with_warmup

from .checkpointing import publish, remove_stale_staging_dirs, staging_dir
from .pipeline import PipelineRunner
from .pipeline_experts import gather_expert_shards
from .pipeline_zero import load_optimizer_shard_state, optimizer_shard_state, pipeline_optimizer

CHECKPOINT = "checkpoint"


@dataclass
class PipelineTrainingArguments:
    output_dir: str
    max_steps: int
    batch_size: int  # sequences per step per data-parallel replica (split into the runner's micro-batches)
    lr: float = 1e-3
    warmup_steps: int = 0
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    eval_steps: int = 0  # 0: no eval during training
    save_steps: int = 0  # 0: no checkpoints
    seed: int = 0
    zero1: bool = False  # shard the optimizer state over the data-parallel replicas (trainers/pipeline_zero.py)


def batch_indices(num_blocks: int, global_batch: int, step: int, seed: int) -> torch.Tensor:
    """The blocks of optimizer step `step` (0-based): the next `global_batch` of a per-epoch random order."""
    per_epoch = num_blocks // global_batch
    if per_epoch == 0:
        raise ValueError(f"{num_blocks} training blocks cannot fill one global batch of {global_batch}")
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order[k * global_batch:(k + 1) * global_batch]


def last_checkpoint(output_dir: str | Path) -> Path | None:
    found = [p for p in Path(output_dir).glob(f"{CHECKPOINT}-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)


class PipelineTrainer:
    """Trains `runner.lm` on `train_ids` ([N, T] token blocks, labels = inputs) with the runner's pipeline."""

    def __init__(self, runner: PipelineRunner, args: PipelineTrainingArguments, train_ids, eval_ids=None, log=print):
        self.runner, self.args, self.train_ids, self.eval_ids = runner, args, train_ids, eval_ids
        self.rank = dist.get_rank()
        self.dp_rank = dist.get_rank(runner.dp_group)
        self.log = log if self.rank == 0 else (lambda *a, **k: None)
        self.optimizer = pipeline_optimizer(runner, args.zero1, torch.optim.AdamW, lr=args.lr, betas=(0.9, 0.95),
                                            weight_decay=args.weight_decay)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, args.warmup_steps, args.max_steps)
        self.step = 0
        self.history: list[dict] = []

    def _local_batch(self, ids, indices) -> torch.Tensor:
        b = self.args.batch_size
        return ids[indices[self.dp_rank * b:(self.dp_rank + 1) * b]]

    def evaluate(self) -> dict[str, float]:
        """The loss parts averaged over the eval blocks (whole global batches of them)."""
        ids, b = self.eval_ids, self.args.batch_size * self.runner.dp_size
        sums, n = {}, 0
        for start in range(0, len(ids) - b + 1, b):
            parts = self.runner.eval_step(self._local_batch(ids, torch.arange(start, start + b)),
                                          labels_BT=self._local_batch(ids, torch.arange(start, start + b)))
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            n += 1
        return {k: v / max(n, 1) for k, v in sums.items()}

    def save_checkpoint(self) -> Path:
        out = Path(self.args.output_dir)
        staged = staging_dir(out, self.step)
        staged.mkdir(parents=True, exist_ok=True)
        torch.save({"model": self.runner.lm.state_dict(), "optimizer": optimizer_shard_state(self.optimizer),
                    "scheduler": self.scheduler.state_dict(), "step": self.step}, staged / f"rank{self.rank}.pt")
        dist.barrier()
        final = out / f"{CHECKPOINT}-{self.step}"
        if self.rank == 0:
            publish(staged, final)
        dist.barrier()
        return final

    def load_checkpoint(self, folder: Path) -> None:
        state = torch.load(Path(folder) / f"rank{self.rank}.pt", weights_only=True)
        self.runner.lm.load_state_dict(state["model"])
        load_optimizer_shard_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]

    def train(self, resume: bool = False, until_step: int | None = None) -> list[dict]:
        """Train to args.max_steps (or stop early at `until_step`, e.g. a time-boxed job that resumes later);
        `resume` continues from the newest checkpoint in args.output_dir."""
        args, runner = self.args, self.runner
        until_step = args.max_steps if until_step is None else min(until_step, args.max_steps)
        if self.rank == 0:
            remove_stale_staging_dirs(args.output_dir)
        dist.barrier()
        if resume and (found := last_checkpoint(args.output_dir)) is not None:
            self.load_checkpoint(found)
            self.log(f"resumed from {found} at step {self.step}", flush=True)
        global_batch = args.batch_size * runner.dp_size
        t0, tokens = time.time(), 0
        while self.step < until_step:
            ids = self._local_batch(self.train_ids, batch_indices(len(self.train_ids), global_batch, self.step,
                                                                 args.seed))
            parts = runner.train_step(ids, labels_BT=ids)
            grad_norm = runner.clip_grad_norm_(args.max_grad_norm) if args.max_grad_norm else None
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            tokens += ids.numel() * runner.dp_size
            record = {"step": self.step, **{k: v.item() for k, v in parts.items()},
                      "lr": self.scheduler.get_last_lr()[0]}
            if grad_norm is not None:
                record["grad_norm"] = grad_norm.item()
            self.history.append(record)
            if self.step % args.logging_steps == 0 or self.step in (1, args.max_steps):
                rate = tokens / max(time.time() - t0, 1e-9)
                self.log(f"step {self.step}/{args.max_steps} | loss {record['loss']:.4f} | LM {record['main_loss']:.4f}"
                         f" | MTP {record['mtp_loss']:.4f} | balance {record['balance_loss']:.5f} | lr "
                         f"{record['lr']:.2e} | {rate:.0f} tokens/s", flush=True)
            if args.eval_steps and self.eval_ids is not None and self.step % args.eval_steps == 0:
                metrics = self.evaluate()
                self.history.append({"step": self.step, **{f"eval_{k}": v for k, v in metrics.items()}})
                self.log(f"[eval step {self.step}] loss {metrics['loss']:.4f} | LM {metrics['main_loss']:.4f} "
                         f"(ppl {math.exp(min(metrics['main_loss'], 50)):.2f}) | MTP {metrics['mtp_loss']:.4f}",
                         flush=True)
            if args.save_steps and self.step % args.save_steps == 0:
                self.log(f"saved {self.save_checkpoint()}", flush=True)
        return self.history

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Every rank's weights gathered on rank 0 (None elsewhere), under the full model's names."""
        lm, experts = self.runner.lm, {id(p) for p in self.runner.expert_params}
        local = {k: v.detach().cpu() for k, v in lm.state_dict().items()}
        names = {n for n, p in lm.named_parameters() if id(p) in experts}  # ep shards: concatenated, not replaced
        gathered = [None] * dist.get_world_size() if self.rank == 0 else None
        dist.gather_object((local, self.runner.ep_rank, names), gathered, dst=0)
        if self.rank != 0:
            return None
        states, ep_ranks, shard_names = zip(*gathered)
        return gather_expert_shards(list(states), list(ep_ranks), set().union(*shard_names))

    def save_final(self, folder: str | Path, model_cls, **save_kwargs) -> None:
        """Rank 0 rebuilds the whole model from every rank's stages and saves it (save_pretrained)."""
        state = self.full_state_dict()
        if self.rank == 0:
            full = model_cls(self.runner.lm.config)
            full.load_state_dict(state, strict=True)
            full.save_pretrained(folder, **save_kwargs)
        dist.barrier()


__all__ = ["PipelineTrainer", "PipelineTrainingArguments", "batch_indices", "last_checkpoint"]
