"""Training step time and bytes per rank on transformers' distributed engine: 2 CPU ranks (torchrun, gloo) under
DistributedConfig tp / ep / fsdp against one process, ours side by side with transformers' DeepseekV3 on the same
checkpoint and the same DistributedConfig.

    python -m benchmarks.parallel [--steps 8] [--batch 4] [--seq 128]

The driver saves one random checkpoint (the peer's format, no MTP module: both models do the same work), runs the
one-process reference (`--worker single`, 1 torch thread: one core) and one torchrun launch of 2 ranks (`--worker dist`, 1 thread
each: two cores) that measures every layout in turn, then writes benchmarks/results/parallel.json and
the section of benchmarks/RESULTS.md between <!-- BEGIN parallel --> and <!-- END parallel -->.

A step is forward + backward + AdamW step on a global batch of `batch` x `seq` tokens: under tp / ep both ranks take
the whole batch (they share it), under fsdp each rank takes half. Models alternate step by step; the median of the
timed steps is reported (after 2 warm-up steps). Bytes per rank are the parameters this rank holds (local shards).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks.common import RESULTS_DIR, median  # noqa: E402

import torch  # noqa: E402

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


def measure(path: str, layout: str | None, args) -> dict:
    """Both models under one layout, steps interleaved; per model the median step time and the bytes held."""
    dp = torch.distributed.get_world_size() if layout == "fsdp" else 1
    rank = torch.distributed.get_rank() if layout == "fsdp" else 0
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4096, (args.steps + 2, args.batch, args.seq), generator=gen)
    per = args.batch // dp
    runs = {}
    for kind in ("peer", "ours"):
        model = load(kind, path, layout).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
        runs[kind] = {"model": model, "opt": opt, "times": [], "bytes": local_bytes(model), "losses": []}
    for step in range(args.steps + 2):
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


def worker(args) -> None:
    common.quiet()
    if args.worker == "single":
        torch.set_num_threads(1)
        result = {"single": measure(args.ckpt, None, args)}
    else:
        torch.set_num_threads(1)
        import torch.distributed as dist

        dist.init_process_group("gloo")
        result = {layout: measure(args.ckpt, layout, args) for layout in LAYOUTS}
        if dist.get_rank() != 0:
            return
    Path(args.out).write_text(json.dumps(result))


def render(report: dict) -> str:
    m = report["machine"]
    single = report["single"]["single"]
    lines = [
        "## Distributed engine: 2 CPU ranks, tp / ep / fsdp vs one process, ours vs transformers' DeepseekV3",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {m['nproc']} CPU cores ({m['cpu_model']}), no GPU; torch {m['torch']}, transformers "
        f"{m['transformers']}, Python {m['python']}; git {m['git']}; {m['date_utc']}, load avg at start "
        f"{m.get('load_avg_at_start')} (cores shared with other agents)",
        "",
        f"Model: the reference shape (benchmarks/common.py REFERENCE_SHAPE, fp32, no MTP module in either model), "
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
    p.add_argument("--worker", choices=["single", "dist"])
    p.add_argument("--ckpt")
    p.add_argument("--out")
    p.add_argument("--json-out", default=str(RESULTS_DIR / "parallel.json"))
    p.add_argument("--results-md", default=str(common.REPO_ROOT / "benchmarks" / "RESULTS.md"))
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    machine = common.machine_info("cpu")
    sizes = ["--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(common.REPO_ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        common.make_checkpoint(Path(tmp) / "ckpt")
        ckpt = str(Path(tmp) / "ckpt")
        single_out, dist_out = Path(tmp) / "single.json", Path(tmp) / "dist.json"
        subprocess.run([sys.executable, "-m", "benchmarks.parallel", "--worker", "single", "--ckpt", ckpt,
                        "--out", str(single_out), *sizes], check=True, env=env,
                       cwd=common.REPO_ROOT)
        torchrun = Path(sys.executable).with_name("torchrun")
        subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                        str(common.free_port()), "-m", "benchmarks.parallel", "--worker", "dist", "--ckpt", ckpt,
                        "--out", str(dist_out), *sizes], check=True, env=env, cwd=common.REPO_ROOT)
        report = {"machine": machine, "steps": args.steps, "batch": args.batch, "seq": args.seq,
                  "command": "python -m benchmarks.parallel " + " ".join(sizes),
                  "single": json.loads(single_out.read_text()), "dist": json.loads(dist_out.read_text())}
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(report, indent=1))
    body = render(report)
    common.write_section(SECTION, body, Path(args.results_md))
    print(body)


if __name__ == "__main__":
    main()
