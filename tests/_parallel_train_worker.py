"""Worker for tests/test_parallel_training.py: Trainer (ours or transformers' plain one) on the tiny model loaded through
transformers' distributed engine, on 2 CPU ranks; one torchrun launch runs every layout named.

    torchrun --nproc_per_node 2 tests/_parallel_train_worker.py OUT CKPT LAYOUT [LAYOUT ...]
    python tests/_parallel_train_worker.py OUT CKPT single           (the one-process reference)

A layout is `{trainer}-{parallelism}` with trainer `deepseek` (DeepseekTrainer) or `plain` (transformers' Trainer) and
parallelism tp / ep / tp_ep / fsdp / fsdp_ep (DistributedConfig as in tests/_parallel_worker.py), optionally with
`+fp8` (FP8 block-wise training, quant/, converted after the engine sharded the model; the loop records the first
step's gradients in full to OUT/{layout}/first_grads.pt and counts the FP8 GEMMs that ran) and `+dispatch`
(ep_implementation=quant.fp8_dispatch.FP8_DISPATCH). Layout `fp8-shards` checks a colwise + rowwise pair of FP8
Linears sharded with torch's own tensor-parallel styles against one process (`fp8_linear_shards`). Kind `loop` is a plain PyTorch loop (AdamW); `loop-...+resume` saves the model
(the engine's distributed checkpoint) and the optimizer state at STEPS / 2, then resumes a freshly loaded model and
optimizer from them. (transformers' Trainer refuses to checkpoint optimizer state for a model sharded at load, and
accelerate takes no CPU ranks for tensor parallelism: both are recorded as refusals.) Every layout trains STEPS optimizer steps at a global batch of GLOBAL_BATCH
sequences and writes, per rank, OUT/{layout}/rank{r}.json: the logged loss per step, the balancing biases after
training, the token counts each bias update saw before and after its all-reduce, and the logits of a fixed batch after
training; rank 0 saves the trained model to OUT/{layout}/final for a one-process load.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # conftest's helpers; the repository root

import torch  # noqa: E402

STEPS, GLOBAL_BATCH, SEQ, LR = 20, 4, 16, 1e-3


def distributed_config(parallelism: str, ep_implementation: str = "auto"):
    from transformers.distributed import DistributedConfig

    return {
        "tp": DistributedConfig(tp_size=2),
        "ep": DistributedConfig(tp_size=2, tp_plan={}, ep_size=2, ep_implementation=ep_implementation),
        "tp_ep": DistributedConfig(tp_size=2, ep_size=2, ep_implementation=ep_implementation),
        "fsdp": DistributedConfig(fsdp_size=2),
        "fsdp_ep": DistributedConfig(fsdp_size=2, ep_size=2, ep_implementation=ep_implementation),
    }[parallelism]


def dataset():
    from datasets import Dataset

    from conftest import random_ids

    ids = random_ids(STEPS * GLOBAL_BATCH, SEQ, seed=11).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def make_trainer(kind: str, model, out_dir: Path, dp_size: int, fp8: bool):
    from transformers import Trainer, TrainingArguments

    from trainers import DeepseekTrainer

    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=STEPS, per_device_train_batch_size=GLOBAL_BATCH // dp_size,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, seed=0, data_seed=0, dataloader_num_workers=0, dataloader_drop_last=True,
    )
    cls = DeepseekTrainer if kind == "deepseek" else Trainer
    trainer = cls(model=model, args=args, train_dataset=dataset())
    if fp8:
        from quant.fp8_training import convert_to_fp8_training

        convert_to_fp8_training(model)
    return trainer


def fp8_gemm_sites(model) -> dict:
    """How many FP8 Linears the engine's tensor-parallel plan sharded (a wrapper around forward and a DTensor weight;
    FSDP2's DTensors are gathered before the forward), and how many routed-experts modules there are."""
    from modeling_deepseek.parallel import is_sharded
    from quant.fp8_training_modules import Float8TrainingExperts, Float8TrainingLinear

    modules = list(model.modules())
    return {"sharded_fp8_linears": sum(isinstance(m, Float8TrainingLinear) and "forward" in vars(m)
                                       and is_sharded(m.weight) for m in modules),
            "fp8_experts": sum(isinstance(m, Float8TrainingExperts) for m in modules)}


_UNPATCHED = {}


def count_fp8_calls(model=None, stop: bool = False) -> Counter:
    """Count the FP8 GEMMs that run on local shards (`sharded_linear`) and the experts' grouped FP8 GEMMs, to
    check that the engine's wrappers reach the FP8 forwards (a wrapper calling the old forward would skip them).
    Only the calls of the model's forward count: the memory options run some of them again in backward."""
    from quant import fp8_training_modules as mod

    if stop:
        for hook in _UNPATCHED.pop("hooks", ()):
            hook.remove()
        for name, value in _UNPATCHED.items():
            setattr(mod, name, value)
        return Counter()
    calls, in_forward = Counter(), [False]
    _UNPATCHED["hooks"] = (model.register_forward_pre_hook(lambda *_: in_forward.__setitem__(0, True)),
                           model.register_forward_hook(lambda *_: in_forward.__setitem__(0, False)))
    _UNPATCHED.update(sharded_linear=mod.sharded_linear, _FP8GroupedMM=mod._FP8GroupedMM)
    sharded, grouped = mod.sharded_linear, mod._FP8GroupedMM

    def counted_sharded(*args, **kwargs):
        calls["sharded_linear"] += in_forward[0]
        return sharded(*args, **kwargs)

    class CountedGrouped(grouped):
        @classmethod
        def apply(cls, *args, **kwargs):
            calls["grouped"] += in_forward[0]
            return grouped.apply(*args, **kwargs)

    mod.sharded_linear, mod._FP8GroupedMM = counted_sharded, CountedGrouped
    return calls


SEEN = {"local": [], "reduced": []}  # filled by conftest.record_bias_updates, emptied per layout


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train_loop(model, optimizer, dp_rank: int, dp_size: int, steps: range, save_at: int | None = None,
               save_dir: Path | None = None, grads_file: Path | None = None) -> list[float]:
    """A plain PyTorch loop over the global batches `steps`, each data-parallel rank its contiguous share; the logged
    loss is the mean over the ranks. With `save_at`, after that many steps the model (sharded, the engine's
    distributed checkpoint) and the optimizer state (torch.distributed.checkpoint) go to `save_dir`."""
    from transformers.distributed import save_optimizer_distributed

    from conftest import random_ids

    ids = random_ids(STEPS * GLOBAL_BATCH, SEQ, seed=11)
    per_rank, out = GLOBAL_BATCH // dp_size, []
    model.train()
    for step in steps:
        batch = ids[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH][dp_rank * per_rank:(dp_rank + 1) * per_rank]
        loss = model(batch, labels=batch).loss
        loss.backward()
        if grads_file is not None and step == steps[0]:  # the first step's gradients, in full (rank 0 writes)
            grads = {n: full(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None}
            if dp_rank == 0 and int(os.environ.get("RANK", 0)) == 0:
                torch.save(grads, grads_file)
        optimizer.step()
        optimizer.zero_grad()
        logged = loss.detach().clone()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(logged)
            logged /= torch.distributed.get_world_size()
        out.append(logged.item())
        if save_at is not None and step + 1 == save_at:
            model.save_pretrained(str(save_dir), distributed_checkpoint=True)
            save_optimizer_distributed(model, optimizer, str(save_dir / "optimizer"))
    return out


def adamw(model):
    # per-parameter (foreach=False): DTensor and plain parameters mix under tensor parallelism
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, foreach=False)


def run_layout(layout: str, ckpt: str, out: Path) -> dict:
    from conftest import random_ids
    from modeling_deepseek import DeepseekForCausalLM, balancing

    base, *flags = layout.split("+")
    kind, _, parallelism = base.partition("-")
    single = not parallelism
    dispatch = "dispatch" in flags  # FP8 dispatch under expert parallelism (quant/fp8_dispatch.py)
    if dispatch:
        from quant.fp8_dispatch import FP8_DISPATCH
    cfg = None if single else distributed_config(parallelism, FP8_DISPATCH if dispatch else "auto")
    dp_size = 1 if single else cfg.dp_size
    out.mkdir(parents=True, exist_ok=True)
    SEEN["local"].clear()
    SEEN["reduced"].clear()

    def load():
        return DeepseekForCausalLM.from_pretrained(ckpt, distributed_config=cfg) if cfg else \
            DeepseekForCausalLM.from_pretrained(ckpt)

    fp8 = "fp8" in flags
    rec = {"layout": layout, "initial_biases": [r.e_score_correction_bias.tolist()
                                                for r in balancing.balancing_routers(load())]}
    if kind == "loop":
        model = load()
        calls = Counter()
        if fp8:
            from quant.fp8_training import convert_to_fp8_training

            convert_to_fp8_training(model)
            rec["fp8_converted"] = len(model.fp8_training_report.converted)
            rec.update(fp8_gemm_sites(model))
            calls = count_fp8_calls(model)
        dp_rank = torch.distributed.get_rank() if dp_size > 1 else 0
        half = STEPS // 2 if "resume" in flags else None
        rec["losses"] = train_loop(model, adamw(model), dp_rank, dp_size, range(STEPS), half, out / "checkpoint",
                                   out / "first_grads.pt" if fp8 else None)
        rec["fp8_calls"] = dict(calls)
        count_fp8_calls(stop=True)
        if dispatch:
            from quant.fp8_dispatch import wire_bytes

            rec["wire_bytes"] = dict(wire_bytes(model))
        if half:
            from transformers.distributed import load_optimizer_distributed

            # a fresh process state: the model from the distributed checkpoint, a new optimizer given the saved state
            uninterrupted = {n: full(p.detach()).clone() for n, p in model.named_parameters()}
            rec["uninterrupted_biases"] = [r.e_score_correction_bias.tolist() for r in balancing.balancing_routers(model)]
            model = DeepseekForCausalLM.from_pretrained(str(out / "checkpoint"), distributed_config=cfg)
            optimizer = adamw(model)
            load_optimizer_distributed(model, optimizer, str(out / "checkpoint" / "optimizer"))
            rec["resumed_losses"] = train_loop(model, optimizer, dp_rank, dp_size, range(half, STEPS))
            rec["resume_param_max_diff"] = max((full(p.detach()) - uninterrupted[n]).abs().max().item()
                                               for n, p in model.named_parameters())
    else:
        try:
            trainer = make_trainer(kind, load(), out / "run", dp_size, fp8)
        except ValueError as err:  # accelerate's ParallelismConfig takes no CPU ranks (tp_size > 1 makes one)
            if "ParallelismConfig is only compatible" not in str(err):
                raise
            return {"layout": layout, "refused": str(err)}
        rec["fp8_converted"] = len(getattr(trainer.model, "fp8_training_report", None).converted) if fp8 else 0
        trainer.train()
        rec["losses"] = losses(trainer)
        model = trainer.model
    rec["biases"] = [r.e_score_correction_bias.tolist() for r in balancing.balancing_routers(model)]
    rec["local_counts"], rec["reduced_counts"] = list(SEEN["local"]), list(SEEN["reduced"])
    model.eval()
    with torch.no_grad():
        rec["final_logits"] = model(random_ids(2, SEQ, seed=12)).logits.tolist()
    model.save_pretrained(str(out / "final"))  # every rank: the engine gathers the shards, rank 0 writes
    return rec


def fp8_linear_shards(width: int) -> dict:
    """A colwise FP8 Linear (width -> 2 width) feeding a rowwise one (2 width -> width), sharded over the ranks with
    torch's own tensor-parallel styles, against the same two FP8 Linears unsharded in this process: the largest
    relative difference of the output, the input gradient and each weight gradient."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from quant.fp8_training import FP8TrainingConfig
    from quant.fp8_training_modules import Float8TrainingLinear

    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    gen = torch.Generator().manual_seed(5)
    w1, w2 = torch.randn(2 * width, width, generator=gen), torch.randn(width, 2 * width, generator=gen) / width
    x = torch.randn(40, width, generator=gen)
    config = FP8TrainingConfig(backend="reference")

    def mlp():
        seq = torch.nn.Sequential(torch.nn.Linear(width, 2 * width, bias=False), torch.nn.Linear(2 * width, width,
                                                                                              bias=False))
        seq[0].weight.data.copy_(w1)
        seq[1].weight.data.copy_(w2)
        return torch.nn.Sequential(*(Float8TrainingLinear.from_linear(layer, config) for layer in seq))

    results = {}
    for name, model in (("one", mlp()), ("sharded", parallelize_module(mlp(), mesh, {"0": ColwiseParallel(),
                                                                                  "1": RowwiseParallel()}))):
        xi = x.clone().requires_grad_()
        y = model(xi)
        y.pow(2).sum().backward()
        results[name] = [y.detach(), xi.grad] + [full(p.grad) for p in model.parameters()]
    return {"width": width, "rel_diff": [((a - b).abs().max() / a.abs().max()).item()
                                         for a, b in zip(results["one"], results["sharded"])],
            "is_dtensor": all(isinstance(p, DTensor) for p in model.parameters())}


def main(out: Path, ckpt: str, layouts: list[str]) -> None:
    import transformers

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    from conftest import record_bias_updates

    rank = int(os.environ.get("RANK", 0))
    record_bias_updates(SEEN["local"], SEEN["reduced"])
    for layout in layouts:
        if layout == "fp8-shards":  # 128-aligned shards (one process' tiles) and 48-wide ones (tiles of their own)
            rec = {"layout": layout, "aligned": fp8_linear_shards(256), "narrow": fp8_linear_shards(96)}
            (out / layout).mkdir(parents=True, exist_ok=True)
        else:
            rec = run_layout(layout, ckpt, out / layout)
        (out / layout / f"rank{rank}.json").write_text(json.dumps(rec))


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        main(out_dir, sys.argv[2], sys.argv[3:])
    except Exception:
        (out_dir / f"rank{os.environ.get('RANK', 0)}.error.txt").write_text(traceback.format_exc())
        raise
