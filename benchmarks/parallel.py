"""Training step time and bytes per rank on transformers' distributed engine: 2 CPU ranks (torchrun, gloo) under
DistributedConfig tp / ep / fsdp against one process, ours side by side with transformers' DeepseekV3 on the same
checkpoint and the same DistributedConfig.

    python -m benchmarks.parallel [--steps 8] [--batch 4] [--seq 128]

The driver saves one random checkpoint (the peer's format, no MTP module: both models do the same work), runs the
one-process reference (`single_worker`, 1 torch thread: one core) and one torchrun launch of 2 ranks (`dist_worker`,
1 thread each: two cores) that measures every layout in turn, then writes benchmarks/results/parallel.json and the
section of benchmarks/RESULTS.md between <!-- BEGIN parallel --> and <!-- END parallel -->.

A step is forward + backward + AdamW step on a global batch of `batch` x `seq` tokens: under tp / ep both ranks take
the whole batch (they share it), under fsdp each rank takes half. Models alternate step by step; the median of the
timed steps is reported (after 2 warm-up steps). Bytes per rank are the parameters this rank holds (local shards).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks import harness
from benchmarks.measure import median
from benchmarks.models import make_checkpoint

import torch

SECTION = "parallel"
LAYOUTS = {
    "tp": dict(tp_size=2),
    "ep": dict(tp_size=2, tp_plan={}, ep_size=2),
    "tp_ep": dict(tp_size=2, ep_size=2),
    "fsdp": dict(fsdp_size=2),
}


def load(kind: str, path: str, layout: str | None):
    from transformers import DeepseekV3ForCausalLM
    from transformers.distributed import DistributedConfig

    from modeling_deepseek import DeepseekForCausalLM

    kwargs = {"distributed_config": DistributedConfig(**LAYOUTS[layout])} if layout else {}
    if kind == "peer":
        return DeepseekV3ForCausalLM.from_pretrained(path, experts_implementation="grouped_mm", **kwargs)
    return DeepseekForCausalLM.from_pretrained(path, num_nextn_predict_layers=0, **kwargs)


def local_bytes(model) -> int:
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in model.parameters())


def measure(path: str, layout: str | None, spec: dict) -> dict:
    """Both models under one layout, steps interleaved; per model the median step time and the bytes held."""
    dp = torch.distributed.get_world_size() if layout == "fsdp" else 1
    rank = torch.distributed.get_rank() if layout == "fsdp" else 0
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4096, (spec["steps"] + 2, spec["batch"], spec["seq"]), generator=gen)
    per = spec["batch"] // dp
    runs = {}
    for kind in ("peer", "ours"):
        model = load(kind, path, layout).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
        runs[kind] = {"model": model, "opt": opt, "times": [], "bytes": local_bytes(model), "losses": []}
    for step in range(spec["steps"] + 2):
        batch = ids[step, rank * per:(rank + 1) * per]
        for kind, run in runs.items():
            if torch.distributed.is_initialized():
                torch.distributed.barrier()
            start = time.perf_counter()
            loss = run["model"](batch, labels=batch).loss
            loss.backward()
            run["opt"].step()
            run["opt"].zero_grad()
            if torch.distributed.is_initialized():
                torch.distributed.barrier()
            if step >= 2:
                run["times"].append(time.perf_counter() - start)
            run["losses"].append(loss.item())
    return {kind: {"step_s": median(run["times"]), "bytes_per_rank": run["bytes"], "first_loss": run["losses"][0]}
            for kind, run in runs.items()}


def single_worker(spec: dict) -> dict:
    """Both models in this one process, one torch thread."""
    harness.setup(threads=1)
    return {"single": measure(spec["ckpt"], None, spec)}


def dist_worker(spec: dict) -> dict | None:
    """One rank of the torchrun launch (gloo, one torch thread): every layout in turn; rank 0 returns them."""
    import torch.distributed as dist

    harness.setup(threads=1)
    dist.init_process_group("gloo")
    result = {layout: measure(spec["ckpt"], layout, spec) for layout in LAYOUTS}
    return result if dist.get_rank() == 0 else None


def render(report: dict) -> str:
    single = report["single"]["single"]
    lines = harness.section_head(
        "Distributed engine: 2 CPU ranks, tp / ep / fsdp vs one process, ours vs transformers' DeepseekV3", report,
        " (cores shared with other agents)") + [
        "",
        f"Model: the reference shape (benchmarks.models.REFERENCE_SHAPE, fp32, no MTP module in either model), "
        f"forward + backward + AdamW on {report['batch']} x {report['seq']} tokens per step, median of "
        f"{report['steps']} timed steps after 2 warm-ups, the two models alternating step by step. One process: 1 "
        "torch thread (one core; with 2 threads the busy machine's contention dominated). 2 ranks: torchrun + gloo, 1 thread each; under tp / ep both ranks take "
        "the whole batch, under fsdp half each. Peer: `DeepseekV3ForCausalLM.from_pretrained(..., "
        "experts_implementation='grouped_mm', distributed_config=...)`; ours: `DeepseekForCausalLM` with the same "
        "DistributedConfig.",
        "",
        "| layout | DistributedConfig | peer step (s) | ours step (s) | ours / peer speed | ours vs one process "
        "| peer MB / rank | ours MB / rank | ours share of the full model |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    mb = 1e6
    lines.append(f"| one process | - | {single['peer']['step_s']:.3f} | {single['ours']['step_s']:.3f} | "
                 f"{single['peer']['step_s'] / single['ours']['step_s']:.2f}x | 1.00x | "
                 f"{single['peer']['bytes_per_rank'] / mb:.1f} | {single['ours']['bytes_per_rank'] / mb:.1f} | 100% |")
    for layout, cfg in LAYOUTS.items():
        row = report["dist"][layout]
        peer, ours = row["peer"], row["ours"]
        lines.append(
            f"| {layout} | {cfg} | {peer['step_s']:.3f} | {ours['step_s']:.3f} | "
            f"{peer['step_s'] / ours['step_s']:.2f}x | {single['ours']['step_s'] / ours['step_s']:.2f}x | "
            f"{peer['bytes_per_rank'] / mb:.1f} | {ours['bytes_per_rank'] / mb:.1f} | "
            f"{100 * ours['bytes_per_rank'] / single['ours']['bytes_per_rank']:.0f}% |")
    lines += ["", "Speeds are ratios of median step times (> 1: faster). \"vs one process\" compares ours on 2 ranks "
              "with ours in one process at the same global batch."]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    harness.output_arguments(p, "parallel.json")
    args = p.parse_args(argv)

    report = {**harness.report_head("parallel"), "steps": args.steps, "batch": args.batch, "seq": args.seq}
    with tempfile.TemporaryDirectory() as tmp:
        make_checkpoint(Path(tmp) / "ckpt")
        spec = {"ckpt": str(Path(tmp) / "ckpt"), "steps": args.steps, "batch": args.batch, "seq": args.seq}
        one_thread = {"OMP_NUM_THREADS": "1"}
        report["single"] = harness.run_worker(single_worker, dict(spec, label="one process"), env=one_thread)
        report["dist"] = harness.run_worker(dist_worker, dict(spec, label="2 ranks"), nproc=2, env=one_thread)
    harness.publish(report, SECTION, render(report), args)


if __name__ == "__main__":
    main()
