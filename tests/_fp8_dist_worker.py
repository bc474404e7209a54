"""Worker for tests/test_fp8_training.py: 3 SGD steps of the tiny model converted to FP8 training, in plain torch.

    python tests/_fp8_dist_worker.py --out DIR --mode single
    ACCELERATE_USE_CPU=yes torchrun --nproc_per_node 2 tests/_fp8_dist_worker.py --out DIR --mode ddp,fsdp2,accelerate

ddp: DistributedDataParallel; fsdp2: fully_shard per block and on the model; accelerate: Accelerator(cpu=True)
.prepare (DDP underneath), the model converted before prepare. Several modes run one after the other in
one process group (one launch: starting processes is most of the cost), each on a freshly built model, into DIR/MODE.

SGD (lr 0.01: its update is linear in the gradient), gloo on CPU. The global batch (4 sequences) is split evenly
over the ranks. Every rank writes DIR/rank{r}.json
(per-step losses, the balancing biases after each step); rank 0 also writes DIR/update.pt, the change of every
parameter in the first step (gathered in full under FSDP2). With an error, DIR/rank{r}.error.txt holds the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

GLOBAL_BATCH, SEQ = 4, 16


def run(mode: str, steps: int, lr: float, out: Path) -> None:
    from conftest import random_ids, tiny_model
    from modeling_deepseek.balancing import balancing_routers
    from quant.fp8_training import FP8TrainingConfig, convert_to_fp8_training
    from quant.fp8_training_modules import Float8TrainingLinear

    out.mkdir(parents=True, exist_ok=True)
    rank, world = (dist.get_rank(), dist.get_world_size()) if mode != "single" else (0, 1)
    model = convert_to_fp8_training(tiny_model(seed=0, train=True), FP8TrainingConfig(backend="reference"))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    routers = balancing_routers(model)
    if mode == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    elif mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
    else:
        wrapped = model
    opt = torch.optim.SGD(wrapped.parameters(), lr=lr)
    backward = torch.Tensor.backward
    if mode == "accelerate":  # what `accelerate launch` runs: prepare() wraps in DDP, mixed_precision "no"
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        wrapped, opt = accelerator.prepare(model, opt)
        backward = accelerator.backward
    assert isinstance(model.model.layers[0].self_attn.q_a_proj, Float8TrainingLinear)
    ids = random_ids(steps * GLOBAL_BATCH, SEQ, seed=1)
    per_rank = GLOBAL_BATCH // world
    record = {"rank": rank, "world": world, "losses": [], "biases": [], "wrapped": type(wrapped).__name__}
    for step in range(steps):
        batch = ids[step * GLOBAL_BATCH + rank * per_rank:][:per_rank]
        loss = wrapped(input_ids=batch, labels=batch).loss
        backward(loss)
        opt.step()
        opt.zero_grad()
        record["losses"].append(loss.item())
        record["biases"].append([r.e_score_correction_bias.tolist() for r in routers])
        if step == 0:  # the first update: later ones also carry routing decisions flipped by earlier FP8 noise
            update = {}
            for name, p in model.named_parameters():
                full = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2: all ranks gather, in order
                update[name] = (full.detach() - start[name]).clone()
            if rank == 0:
                torch.save(update, out / "update.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(record))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--mode", required=True, help="single, or a comma-separated list of ddp / fsdp2 / accelerate")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.01)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    modes = args.mode.split(",")
    if not set(modes) <= {"single", "ddp", "fsdp2", "accelerate"} or ("single" in modes and len(modes) > 1):
        raise SystemExit(f"--mode: single, or ddp / fsdp2 (comma-separated), got {args.mode!r}")
    try:
        if modes != ["single"]:
            dist.init_process_group("gloo")
        for mode in modes:
            run(mode, args.steps, args.lr, out / mode)
        if modes != ["single"]:
            dist.destroy_process_group()
    except Exception:
        (out / f"rank{os.environ.get('RANK', 0)}.error.txt").write_text(traceback.format_exc())
        raise


if __name__ == "__main__":
    main()
    # Every result is written. With accelerate 1.16 a rank has been seen to abort in C++ teardown at interpreter exit
    # ("terminate called without an active exception", under a loaded full-suite run only): leave without it.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)
