"""Run every benchmark and (re)write benchmarks/RESULTS.md and benchmarks/results/decode_tokens_per_s.png.

    python -m benchmarks.run                    # CPU, full settings (serving, training, mtp, prefill)
    python -m benchmarks.run --device cuda      # passed through to every benchmark
    python -m benchmarks.run --quick            # small settings, for a smoke test (writes to /tmp/benchmarks_quick)
    python -m benchmarks.run --render-only      # rebuild RESULTS.md and the plot from the JSON files

Each benchmark runs as its own process (`python -m benchmarks.<name> ... --json-out benchmarks/results/...`) and
writes a JSON file; RESULTS.md is rebuilt from those files. Each benchmark owns one section of RESULTS.md, between
`<!-- BEGIN name -->` and `<!-- END name -->`; text outside the markers is kept as it is. A benchmark that did not
run this time keeps its previous section (mtp_speedup exits with status 2 while the demo model is missing; its
section then says so unless it has results from an earlier run).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from benchmarks import mtp_speedup, prefill_chunks, serving, training
from benchmarks.harness import REPO_ROOT, RESULTS_DIR, RESULTS_MD, replace_section

PLOT = RESULTS_DIR / "decode_tokens_per_s.png"
BENCHMARKS = ("serving", "training", "mtp", "prefill")
RENDERERS = {"serving": serving.render_section, "training": training.render_section,
             "mtp": mtp_speedup.render_section, "prefill": prefill_chunks.render_section}

HEADER = """# Benchmark results

Every figure below was produced by the scripts in `benchmarks/` (the command, machine and date are given per section)
and is rebuilt from `benchmarks/results/*.json` by `python -m benchmarks.run` (`--render-only` to re-render only).
The peer is transformers' own `DeepseekV3ForCausalLM`; ours is `modeling_deepseek.DeepseekForCausalLM`. Both load
the same random checkpoint, saved by the peer with `save_pretrained`.
"""


def json_path(kind: str, device: str, dtype: str) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    return {
        "serving": RESULTS_DIR / f"serving_{device}_{dtype}.json",
        "training": RESULTS_DIR / f"training_{device}_{dtype}.json",
        "mtp": RESULTS_DIR / f"mtp_speedup_{device}.json",
        "prefill": RESULTS_DIR / f"prefill_chunks_cpu_{dtype}.json",
    }[kind]


def _rel(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def commands(args) -> dict[str, list[str]]:
    dev = ["--device", args.device]
    thr = ["--threads", str(args.threads)] if args.threads else []
    if args.quick:
        serving = ["--contexts", "128,512", "--new-tokens", "8", "--repeats", "2"]
        training = ["--steps", "3", "--warmup", "1", "--batch", "2", "--seq", "64"]
        mtp = ["--max-new-tokens", "32", "--num-prompts", "4", "--repeats", "1"]
        prefill = ["--contexts", "512,1024", "--chunk", "256", "--repeats", "1"]
    else:
        serving = ["--contexts", args.contexts, "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
        training = ["--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
        mtp = ["--max-new-tokens", "128", "--num-prompts", "8", "--draft-tokens", args.draft_tokens, "--breakdown"]
        prefill = []
    mod = [sys.executable, "-m"]
    return {
        "serving": mod + ["benchmarks.serving"] + dev + ["--dtype", args.dtype] + serving + thr
        + ([] if args.no_profile or args.quick else ["--profile"])
        + ["--json-out", _rel(json_path("serving", args.device, args.dtype))],
        "training": mod + ["benchmarks.training"] + dev + ["--dtype", args.dtype] + training + thr
        + ([] if args.no_profile or args.quick else ["--profile"])
        + ["--json-out", _rel(json_path("training", args.device, args.dtype))],
        "mtp": mod + ["benchmarks.mtp_speedup"] + dev + ["--model-dir", _rel(Path(args.model_dir))] + mtp + thr
        + ["--json-out", _rel(json_path("mtp", args.device, args.dtype))],
        "prefill": mod + ["benchmarks.prefill_chunks", "--dtype", args.dtype] + prefill
        + ["--json-out", _rel(json_path("prefill", args.device, args.dtype))],
    }


# ----------------------------------------------------------------------------------------------------------------
# rendering: each benchmark renders its own section (render_section); this module adds the plot and the earlier runs
def plot_decode(reports: list[dict], path: Path, proposed: dict | None = None) -> None:
    """Decode tokens/s against context, log-log, one panel per serving result (device, dtype); earlier runs of ours
    (`proposed`, keyed by (device, dtype): results/before/) are added to the matching panel as a gray line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, ScalarFormatter

    labels = {"peer": "transformers DeepseekV3 (peer)", "ours": "ours (latent cache, absorbed MLA)",
              "ours_fp8": "ours (FP8 latent cache)"}
    fig, axes = plt.subplots(1, len(reports), figsize=(6.5 * len(reports), 4.5), squeeze=False)
    for ax, report in zip(axes[0], reports):
        rows = report["summary"]["rows"]
        for v, style in (("peer", "o-"), ("ours", "s-"), ("ours_fp8", "^--")):
            pts = [(r["context"], r[f"{v}_decode_tok_s"]) for r in rows if f"{v}_decode_tok_s" in r]
            if pts:
                ax.plot(*zip(*pts), style, label=labels[v])
        prop = (proposed or {}).get((report["settings"]["device"], report["settings"]["dtype"]))
        if prop:
            pts = [(r["context"], r["ours_decode_tok_s"]) for r in prop["summary"]["rows"] if "ours_decode_tok_s" in r]
            ax.plot(*zip(*pts), "s:", color="gray", label="ours before da0970d (separate run)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        contexts = [r["context"] for r in rows]
        ax.set_xticks(contexts)
        ax.set_xticklabels([str(c) for c in contexts])
        ax.minorticks_off()
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("decode tokens/s (batch 1)")
        s, m = report["settings"], report["machine"]
        where = m["gpu"] if m.get("gpu") else f"{m['nproc']} CPU cores, {s.get('threads')} threads"
        ax.set_title(f"{s['device']} {s['dtype']} ({where}), {m['date_utc'][:10]}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _section(kind: str, report: dict, results_dir: Path) -> str:
    """A benchmark's section; serving's and training's link the profile tables found in `results_dir`."""
    if kind in ("serving", "training"):
        return RENDERERS[kind](report, results_dir, RESULTS_MD.parent)
    return RENDERERS[kind](report)


def _result_files(folder: Path | None = None) -> dict[str, list[Path]]:
    """Every result JSON of `folder` (default results/), per benchmark: CPU before CUDA, fp32 before bf16."""
    folder = folder or RESULTS_DIR
    def order(p: Path):
        return ("cuda" in p.stem, "bf16" in p.stem, p.stem)

    return {
        "serving": sorted((p for p in folder.glob("serving_*.json")), key=order),
        "training": sorted((p for p in folder.glob("training_*.json")), key=order),
        "mtp": sorted((p for p in folder.glob("mtp_speedup_*.json")), key=order),
        "prefill": sorted((p for p in folder.glob("prefill_chunks_*.json")), key=order),
    }


def render(args, ran: dict[str, int]) -> None:
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else HEADER
    files = _result_files()
    serving = [json.loads(p.read_text()) for p in files["serving"]]
    proposed_reports = {}  # the "before" runs, drawn in the matching panels
    for p in (RESULTS_DIR / "before").glob("serving_*.json"):
        r = json.loads(p.read_text())
        proposed_reports[(r["settings"]["device"], r["settings"]["dtype"])] = r
    if serving:
        plot_decode(serving, PLOT, proposed_reports)
        text = replace_section(text, "plot", "\n".join([
            "## Decode tokens/s against context (all serving runs below)", "",
            f"![decode tokens/s vs context]({PLOT.relative_to(RESULTS_MD.parent).as_posix()})"]))
    for kind in BENCHMARKS:
        for path in files[kind]:
            name = path.stem.replace("_", "-")
            text = replace_section(text, name, _section(kind, json.loads(path.read_text()), RESULTS_DIR))
    # Earlier runs kept for comparison: each subfolder of results/ with a LABEL.txt (what code they measured).
    for folder in sorted((p for p in RESULTS_DIR.iterdir() if (p / "LABEL.txt").is_file()), key=lambda p: p.name):
        label = (folder / "LABEL.txt").read_text().strip()
        sub = _result_files(folder)
        for kind in BENCHMARKS:
            for path in sub[kind]:
                body = _section(kind, json.loads(path.read_text()), folder)
                body = body.replace("## ", f"## {folder.name}: ", 1) + f"\n\nCode measured: {label}"
                text = replace_section(text, f"{folder.name}-" + path.stem.replace("_", "-"), body)
    if not files["mtp"]:
        text = replace_section(text, "mtp", mtp_speedup.render_missing(_rel(Path(args.model_dir))))
    elif "<!-- BEGIN mtp -->" in text:  # results exist now: drop the "not measured" note
        text = re.sub(r"\n*<!-- BEGIN mtp -->.*?<!-- END mtp -->\n?", "\n", text, flags=re.S)
    RESULTS_MD.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_MD.write_text(text.rstrip() + "\n")
    print(f"wrote {RESULTS_MD}" + (f" and {PLOT}" if PLOT.exists() else ""))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--only", default=",".join(BENCHMARKS), help=f"subset of {','.join(BENCHMARKS)}")
    p.add_argument("--quick", action="store_true", help="small settings (smoke test)")
    p.add_argument("--render-only", action="store_true", help="only rebuild RESULTS.md and the plot from the JSON")
    p.add_argument("--contexts", default="128,1024,2048,4096")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-profile", action="store_true",
                   help="serving: skip the torch.profiler tables at the largest context")
    p.add_argument("--model-dir", default="runs/demo/final")
    p.add_argument("--draft-tokens", default="1,2,3", help="mtp_speedup: MTP draft counts (the first is the headline)")
    p.add_argument("--out-dir", default=None,
                   help="write RESULTS.md and results/ there instead of benchmarks/ (default with --quick: "
                        "/tmp/benchmarks_quick)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    global RESULTS_DIR, RESULTS_MD, PLOT
    args = parse_args(argv)
    if args.out_dir or args.quick:  # smoke tests never overwrite the real results
        out = Path(args.out_dir or "/tmp/benchmarks_quick").resolve()
        RESULTS_DIR, RESULTS_MD, PLOT = out / "results", out / "RESULTS.md", out / "results" / PLOT.name
    ran: dict[str, int] = {}
    failed = False
    if not args.render_only:
        cmds = commands(args)
        for kind in [k for k in args.only.split(",") if k]:
            if kind == "prefill" and args.device != "cpu":
                continue  # a CPU memory measurement
            print(f"== {kind}: {' '.join(cmds[kind][1:])}", flush=True)
            rc = subprocess.run(cmds[kind], cwd=REPO_ROOT).returncode
            ran[kind] = rc
            if rc == 2 and kind == "mtp":
                print("== mtp: no trained model; section marked as not measured", flush=True)
            elif rc != 0:
                print(f"== {kind} FAILED (exit status {rc})", flush=True)
                failed = True
    render(args, ran)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
