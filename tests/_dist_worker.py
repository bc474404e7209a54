"""Worker for tests/test_distributed.py: a few optimizer steps of a tiny DeepSeek model through accelerate.

Run it as one process (the single-process reference at the same global batch):

    python tests/_dist_worker.py --out DIR --mode single

or as several ranks (data-parallel or FSDP, gloo on CPU):

    ACCELERATE_USE_CPU=yes torchrun --nproc_per_node 2 tests/_dist_worker.py --out DIR --mode ddp
    ACCELERATE_USE_CPU=yes torchrun --nproc_per_node 2 tests/_dist_worker.py --out DIR --mode fsdp2 --force-fsdp

(--force-fsdp: accelerate 1.15 ignores an FSDP plugin on CPU and silently runs DDP; the flag makes prepare() shard.
--mode fsdp1 is kept for the record: FSDP1 through accelerate on CPU fails with "Inconsistent compute device and
`device_id` on rank 0: cpu vs cpu:0".)

Every rank writes DIR/rank{r}.json with its per-step losses (the mean over its own micro-batch), the routers'
e_score_correction_bias after every step, how often the balancing update ran, whether `pending_load` was zero after
each optimizer step, and a checksum of the final parameters; rank 0 also writes DIR/params.pt (the full, unsharded
final parameters) for an element-wise comparison. With an error, DIR/rank{r}.error.txt holds the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository root: modeling_deepseek, trainers
sys.path.insert(0, str(HERE))  # conftest: the tiny config and the deterministic randomisation

import torch  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--mode", choices=["single", "ddp", "fsdp1", "fsdp2"], required=True)
    p.add_argument("--force-fsdp", action="store_true",
                   help="override accelerate's CPU fallback: mark the state FSDP so that prepare() really shards")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--global-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--optim", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--lr", type=float, default=None, help="default: 0.1 for SGD, 1e-3 for AdamW")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def make_accelerator(mode: str, force: bool = False):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    if mode in ("fsdp1", "fsdp2"):
        from accelerate import FullyShardedDataParallelPlugin

        version = 2 if mode == "fsdp2" else 1
        kwargs = dict(fsdp_version=version, auto_wrap_policy="transformer_based_wrap",
                      transformer_cls_names_to_wrap=["DeepseekDecoderLayer", "DeepseekMTPLayer"],
                      state_dict_type="FULL_STATE_DICT", cpu_ram_efficient_loading=False)
        if version == 2:
            kwargs["reshard_after_forward"] = True
        else:
            kwargs.update(sharding_strategy="FULL_SHARD", use_orig_params=True, sync_module_states=False)
        plugin = FullyShardedDataParallelPlugin(**kwargs)
        accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
        native = str(accelerator.distributed_type)
        if force and accelerator.distributed_type != DistributedType.FSDP:
            # accelerate 1.15 turns the plugin into DistributedType.FSDP only for accelerator devices (state.py,
            # AcceleratorState.__init__); on CPU it stays MULTI_CPU and prepare() silently falls back to DDP.
            # Both shared states carry the type (AcceleratorState re-reads PartialState's), so set both.
            from accelerate.state import PartialState

            accelerator.state.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            accelerator.state.fsdp_plugin = plugin
        return accelerator, native
    accelerator = Accelerator(cpu=True)
    return accelerator, str(accelerator.distributed_type)


def make_optimizer(model, args):
    """SGD by default: its update is linear in the gradient, so a wrong gradient scale across ranks (a sum instead of a
    mean) shows in the parameters. Adam's update is scale-invariant and amplifies rounding noise on near-zero
    gradients (an expert that saw one token), which makes it a poor probe for an element-wise 1e-5 comparison."""
    if args.optim == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1 if args.lr is None else args.lr, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=1e-3 if args.lr is None else args.lr, weight_decay=0.0)


def full_parameters(accelerator, model) -> dict[str, torch.Tensor]:
    """The unsharded state (parameters and persistent buffers) on rank 0 ({} elsewhere under FSDP1).

    FSDP2: every DTensor is gathered with full_tensor() on all ranks, in the same order. (accelerate's get_state_dict
    hands back DTensors on CPU here, and reducing them later on rank 0 alone deadlocks.)
    """
    if getattr(accelerator, "is_fsdp2", False):
        state = {}
        for k, v in model.state_dict().items():
            state[k] = v.full_tensor() if hasattr(v, "full_tensor") else v
    else:
        state = accelerator.get_state_dict(model, unwrap=True)
    return {k.removeprefix("_orig_mod."): v.detach().float().cpu().clone() for k, v in (state or {}).items()}


def main():
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", 0))
    try:
        run(args, out)
    except Exception:
        (out / f"rank{rank}.error.txt").write_text(traceback.format_exc())
        raise


def run(args, out: Path):
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader, TensorDataset

    import modeling_deepseek  # noqa: F401
    from modeling_deepseek import balancing
    from conftest import random_ids, record_bias_updates, tiny_model

    torch.use_deterministic_algorithms(True)
    accelerator, native_type = make_accelerator(args.mode, args.force_fsdp)
    world = accelerator.num_processes
    rank = accelerator.process_index
    if args.mode != "single" and world < 2:
        raise RuntimeError(f"--mode {args.mode} expects several ranks, got world size {world}")
    if args.global_batch % world:
        raise ValueError("the global batch must divide by the number of processes")
    per_rank = args.global_batch // world

    # Identical on every rank: fixed seed, randomised weights and a non-zero starting bias.
    set_seed(args.seed)
    model = tiny_model(seed=args.seed, train=True)
    assert balancing.bias_update_enabled(model.config)
    ids = random_ids(args.steps * args.global_batch, args.seq_len, seed=args.seed + 1)
    # No shuffling: with per-rank batches, accelerate hands rank r the batches r, r + world, ... so one optimizer step
    # covers samples [step * global_batch, (step + 1) * global_batch), exactly the single-process batch.
    loader = DataLoader(TensorDataset(ids), batch_size=per_rank, shuffle=False)
    optimizer = make_optimizer(model, args)

    if args.mode == "fsdp1":  # FSDP1 wraps the model first, the optimizer then sees the flattened parameters
        model = accelerator.prepare(model)
        optimizer = make_optimizer(model, args)
        optimizer, loader = accelerator.prepare(optimizer, loader)
    else:  # DDP, and FSDP2, which swaps the optimizer's parameters for the sharded ones itself
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    lm = accelerator.unwrap_model(model)
    routers = balancing.balancing_routers(lm)

    # Count the balancing updates and the (all-reduced) token counts they saw.
    updates, reduced = [], []
    unwrap = record_bias_updates(updates, reduced)

    record = {"rank": rank, "world": world, "mode": args.mode, "per_rank_batch": per_rank,
              "native_distributed_type": native_type, "distributed_type": str(accelerator.distributed_type),
              "wrapped_model_type": type(model).__name__,
              "dtensor_params": sum(type(p.data).__name__ == "DTensor" for p in model.parameters()),
              "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
              "optimizer_type": type(optimizer).__name__, "losses": [], "main_losses": [], "biases": [],
              "pending_zero_after_step": [], "max_violation": []}
    model.train()
    for step, (input_ids,) in enumerate(loader):
        if step >= args.steps:
            break
        output = model(input_ids=input_ids, labels=input_ids)
        accelerator.backward(output.loss)
        optimizer.step()
        optimizer.zero_grad()
        record["losses"].append(output.loss.item())
        record["main_losses"].append(output.main_loss.item())
        record["max_violation"].append(float(output.max_violation))
        record["pending_zero_after_step"].append(
            all(not r.has_pending_load and float(r.pending_load.abs().sum()) == 0.0 for r in routers)
        )
        record["biases"].append([r.e_score_correction_bias.tolist() for r in routers])
    unwrap()

    record["bias_updates"] = len(updates)
    record["local_token_counts"] = updates  # per router, before the all-reduce
    record["reduced_token_counts"] = reduced  # per router, after it (empty with one process)
    record["bias_dtypes"] = [str(r.e_score_correction_bias.dtype) for r in routers]
    record["final_bias"] = [r.e_score_correction_bias.tolist() for r in routers]

    # Full parameters (FSDP gathers them; a collective, so every rank takes part).
    params = full_parameters(accelerator, model)
    if rank == 0:
        record["param_checksum"] = float(sum(v.double().sum() for v in params.values()))
        record["param_abs_checksum"] = float(sum(v.double().abs().sum() for v in params.values()))
        torch.save(params, out / "params.pt")
    # And this rank's own view of its (possibly sharded) parameters, to show that the shards differ under FSDP.
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    record["local_param_numel"] = int(sum(p.numel() for p in local))
    record["local_param_checksum"] = float(sum(p.detach().double().sum() for p in local))

    (out / f"rank{rank}.json").write_text(json.dumps(record))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
