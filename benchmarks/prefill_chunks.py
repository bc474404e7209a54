"""Long-prompt prefill through generate(): chunked by default (config.prefill_chunk_tokens) against one shot.

    python -m benchmarks.prefill_chunks --contexts 8192,16384,32768

Ours only (the point is the default, not the peer): the serving benchmark's checkpoint shape, one random checkpoint,
`generate(prompt, max_new_tokens=1)` (prefill plus one token) in a fresh process per variant and context, after a
short warm-up generate:

    one_shot   config.prefill_chunk_tokens = None: the whole prompt in one forward
    chunked    config.prefill_chunk_tokens = --chunk (the default 4096): prompts longer than that are prefilled chunk
               by chunk, each chunk attending to the latent cache of the ones before

Reported per context: peak memory added by the generate call (RSS high-water mark, reset at entry), and its time
(best of --repeats).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks import harness, models
from benchmarks.harness import RESULTS_DIR
from benchmarks.measure import PeakMemory
from benchmarks.models import DTYPES

import torch

VARIANTS = ("one_shot", "chunked")


def worker(spec: dict) -> dict:
    harness.setup(seed=0)
    model = models.load_ours(spec["ckpt"], DTYPES[spec["dtype"]], "cpu")
    model.config.prefill_chunk_tokens = spec["chunk"] if spec["variant"] == "chunked" else None
    vocab = model.config.vocab_size
    model.generate(torch.randint(3, vocab, (1, 64)), max_new_tokens=1, do_sample=False)  # warm-up
    prompt = torch.randint(3, vocab, (1, spec["context"]), generator=torch.Generator().manual_seed(1))
    times = []
    for _ in range(spec["repeats"]):
        with PeakMemory("cpu") as peak:
            t0 = time.perf_counter()
            out = model.generate(prompt, max_new_tokens=1, do_sample=False)
            times.append(time.perf_counter() - t0)
    return {"peak_bytes": peak.bytes, "peak_kind": peak.kind, "seconds": min(times), "seconds_all": times,
            "next_token": out[0, -1].item()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="8192,16384,32768")
    p.add_argument("--chunk", type=int, default=4096, help="config.prefill_chunk_tokens of the chunked variant")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None, help="default: benchmarks/results/prefill_chunks_cpu_<dtype>.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    json_out = Path(args.json_out or RESULTS_DIR / f"prefill_chunks_cpu_{args.dtype}.json")
    report = {**harness.report_head("prefill_chunks"),
              "settings": {"contexts": contexts, "chunk": args.chunk, "dtype": args.dtype, "repeats": args.repeats,
                           "threads": torch.get_num_threads()},
              "config": dict(models.REFERENCE_SHAPE, max_position_embeddings=max(contexts) + 64), "rows": []}
    with tempfile.TemporaryDirectory(prefix="bench_prefill_") as tmp:
        ckpt = Path(tmp) / "ckpt"
        models.make_checkpoint(ckpt, seed=args.seed, max_position_embeddings=max(contexts) + 64)
        for ctx in contexts:
            row = {"context": ctx}
            for variant in VARIANTS:
                spec = {"ckpt": str(ckpt), "dtype": args.dtype, "context": ctx, "chunk": args.chunk,
                        "variant": variant, "repeats": args.repeats, "label": f"{variant} @ {ctx}"}
                row[variant] = harness.run_worker(worker, spec)
                print(f"ctx {ctx:6d} {variant:9s} {row[variant]['seconds']:.2f} s, peak "
                      f"+{row[variant]['peak_bytes'] / 2**20:.0f} MiB", flush=True)
            row["same_next_token"] = row["one_shot"]["next_token"] == row["chunked"]["next_token"]
            report["rows"].append(row)
    harness.write_json(json_out, report)
    print(render_table(report))
    print(f"wrote {json_out}")
    return report


def render_table(report) -> str:
    headers = ["prompt tokens", "one shot: peak +MiB", "chunked: peak +MiB", "peak chunked / one shot",
               "one shot: s", "chunked: s", "time chunked / one shot", "same next token"]
    rows = []
    for r in report["rows"]:
        one, ch = r["one_shot"], r["chunked"]
        rows.append([str(r["context"]), one["peak_bytes"] / 2**20, ch["peak_bytes"] / 2**20,
                     f"{ch['peak_bytes'] / one['peak_bytes']:.2f}", one["seconds"], ch["seconds"],
                     f"{ch['seconds'] / one['seconds']:.2f}", "yes" if r["same_next_token"] else "NO"])
    return harness.markdown_table(headers, rows)


def render_section(report) -> str:
    """This benchmark's RESULTS.md section from its report."""
    s = report["settings"]
    head = harness.section_head(f"Long-prompt prefill: chunked by default vs one shot (cpu, {s['dtype']})", report)
    return "\n".join(head + [
        f"Model: ours only, DeepseekV3Config({harness.config_line(report['config'])}). `generate(prompt, max_new_tokens=1)` "
        f"in a fresh process per variant and context, best of {s['repeats']}; chunked = "
        f"`config.prefill_chunk_tokens={s['chunk']}` (the default), one shot = `prefill_chunk_tokens=None`; peak = "
        "RSS high-water mark added by the call.",
        "",
        render_table(report),
    ])


if __name__ == "__main__":
    main()
