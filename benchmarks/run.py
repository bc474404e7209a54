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

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks.common import REPO_ROOT, RESULTS_DIR  # noqa: E402

RESULTS_MD = REPO_ROOT / "benchmarks" / "RESULTS.md"
PLOT = RESULTS_DIR / "decode_tokens_per_s.png"
BENCHMARKS = ("serving", "training", "mtp", "prefill")

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
# rendering
def _machine(report) -> str:
    return common.machine_line(report["machine"])


def _header(title: str, report) -> list[str]:
    """A section's first lines: its title, then the command and the machine that produced its JSON."""
    return [f"## {title}", "", f"Command: `{report['command']}`  ", f"Machine: {_machine(report)}  "]


def _config_line(cfg: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in cfg.items())


def render_serving(report, results_dir: Path | None = None) -> str:
    from benchmarks.serving import render_table

    s = report["settings"]
    eq = report.get("equivalence", {})
    lines = _header(f"Serving: decode and prefill vs transformers' DeepseekV3 ({s['device']}, {s['dtype']})", report) + [
        f"Model (both): DeepseekV3Config({_config_line(report['config'])}), rope default, random weights "
        "(the peer's initialisation, router biases uniform in [-0.02, 0.02]).  ",
        f"Peer: {report['peer_impl']['attn_implementation']} attention, {report['peer_impl']['experts_implementation']} "
        "experts, `DynamicCache(config=...)`. Ours: `mla_impl=\"auto\"` (absorbed MLA for decode, expanded for "
        "prefill), `DeepseekLatentCache()` in the model dtype, or `DeepseekLatentCache(fp8=True)`.  ",
        f"Batch 1; decode = {s['new_tokens']} greedy single-token forwards after the prefill; best of "
        f"{s['repeats']} interleaved rounds (medians in the JSON); {s.get('threads')} torch threads.",
        "",
        render_table(report),
        "",
    ]
    if eq:
        lines.append(
            f"Greedy equivalence (fp32, each model's own `generate`, {eq['prompt_tokens']}-token random prompt, "
            f"{eq['new_tokens']} new tokens): **{'identical' if eq['identical'] else 'DIFFERENT'}**; max |logit "
            f"difference| over the whole sequence {eq['max_abs_logit_diff_full_forward']:.2e}.")
    med = [r for r in report["summary"]["rows"] if "ours_decode_ratio_median" in r]
    if med:
        lines.append("Median-based ratios (ours/peer decode; prefill): " + "; ".join(
            f"{r['context']}: {r['ours_decode_ratio_median']:.2f}x, {r['ours_prefill_ratio_median']:.2f}x" for r in med)
            + ".")
    lines += [
        "",
        "Memory: peak RSS added during the prefill, and during the decode on top of the prefilled cache (CPU: "
        "VmHWM reset through /proc/self/clear_refs, one fresh process per variant; CUDA: max_memory_allocated). "
        "Cache bytes/token count what is stored (ours' growing buffers may hold up to 2x that, see "
        "`cache_alloc_bytes_per_token` in the JSON). FP8 accuracy is teacher-forced on the model-dtype cache's greedy "
        "tokens, prefill logits included.",
    ]
    profiles = sorted((results_dir or RESULTS_DIR).glob(f"serving_{s['device']}_{s['dtype']}_profile_*.txt"))
    if profiles:
        lines += ["", "torch.profiler tables (largest context, written by `--profile`): " + ", ".join(
            f"[{p.stem.split('_profile_')[1]}]({p.relative_to(RESULTS_MD.parent).as_posix()})" for p in profiles) + "."]
    return "\n".join(lines)


def render_training(report, results_dir: Path | None = None) -> str:
    from benchmarks.training import render_table

    s = report["settings"]
    return "\n".join(_header(f"Training: forward + backward + AdamW step ({s['device']}, {s['dtype']})", report) + [
        f"Model: DeepseekV3Config({_config_line(report['config'])}), batch {s['batch']} x seq "
        f"{s['seq']}, {s['optimizer']} lr {s['lr']}, {s['steps']} timed steps per model after {s['warmup']} warm-up "
        f"steps, models interleaved step by step; {s['threads']} torch threads. Peer: "
        f"`DeepseekV3ForCausalLM.from_pretrained(..., experts_implementation=\"grouped_mm\")` (the value its config "
        "reports is in the table), CE loss only. Ours: MTP depth 1 (loss CE + 0.3 MTP CE), sequence-wise balance loss, "
        "bias update after each optimizer step; `ours_nomtp` drops the MTP module (the peer's amount of work).",
        "",
        render_table(report),
        "",
        "Parameters: " + ", ".join(f"{n} {r['parameters'] / 1e6:.2f}M" for n, r in report["models"].items()) + ".",
    ] + ([
        "",
        "torch.profiler tables (three steps each, written by `--profile`): " + ", ".join(
            f"[{n}]({((results_dir or RESULTS_DIR) / r['profile_file']).relative_to(RESULTS_MD.parent).as_posix()})"
            for n, r in report["models"].items() if r.get("profile_file")) + "."
    ] if any(r.get("profile_file") for r in report["models"].values()) else []))


def render_mtp(report, results_dir: Path | None = None) -> str:
    from benchmarks.mtp_speedup import render_table

    s = report["settings"]
    return "\n".join(_header(f"MTP self-speculative decoding speedup ({s['device']}, {s['dtype']})", report) + [
        f"Model: `{report['model_dir']}` ({_config_line(report['model'])}). Prompts: the first {s['prompt_tokens']} "
        f"tokens of {len(report['prompts'])} stdlib files ({', '.join(report['prompts'])}); greedy, "
        f"max_new_tokens {s['max_new_tokens']}, best of {s['repeats']} per prompt, plain and MTP interleaved; "
        f"MTP drafts per step k = {s.get('draft_tokens', [1])} (`generate(use_mtp=True, mtp_draft_tokens=k)`; k=1 is "
        "the trained depth, larger k chain the MTP module on its own output); "
        f"{s['threads']} torch threads.",
        "",
        render_table(report),
    ])


def render_prefill(report, results_dir: Path | None = None) -> str:
    from benchmarks.prefill_chunks import render_table

    s = report["settings"]
    return "\n".join(_header(f"Long-prompt prefill: chunked by default vs one shot (cpu, {s['dtype']})", report) + [
        f"Model: ours only, DeepseekV3Config({_config_line(report['config'])}). `generate(prompt, max_new_tokens=1)` "
        f"in a fresh process per variant and context, best of {s['repeats']}; chunked = "
        f"`config.prefill_chunk_tokens={s['chunk']}` (the default), one shot = `prefill_chunk_tokens=None`; peak = "
        "RSS high-water mark added by the call.",
        "",
        render_table(report),
    ])


def render_missing_mtp(model_dir: str) -> str:
    return "\n".join([
        "## MTP self-speculative decoding speedup",
        "",
        f"Not measured: no trained model at `{model_dir}` when `python -m benchmarks.run` ran (the benchmark exits "
        "with status 2). Train the demo model (`make demo`), then run `python -m benchmarks.mtp_speedup`.",
    ])


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


def replace_section(text: str, name: str, body: str) -> str:
    block = f"<!-- BEGIN {name} -->\n{body.rstrip()}\n<!-- END {name} -->"
    pattern = re.compile(rf"<!-- BEGIN {name} -->.*?<!-- END {name} -->", re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text)
    return text.rstrip() + "\n\n" + block + "\n"


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
    renderers = {"serving": render_serving, "training": render_training, "mtp": render_mtp,
                 "prefill": render_prefill}
    for kind in BENCHMARKS:
        for path in files[kind]:
            name = path.stem.replace("_", "-")
            text = replace_section(text, name, renderers[kind](json.loads(path.read_text())))
    # Earlier runs kept for comparison: each subfolder of results/ with a LABEL.txt (what code they measured).
    for folder in sorted((p for p in RESULTS_DIR.iterdir() if (p / "LABEL.txt").is_file()), key=lambda p: p.name):
        label = (folder / "LABEL.txt").read_text().strip()
        sub = _result_files(folder)
        for kind in BENCHMARKS:
            for path in sub[kind]:
                body = renderers[kind](json.loads(path.read_text()), results_dir=folder)
                body = body.replace("## ", f"## {folder.name}: ", 1) + f"\n\nCode measured: {label}"
                text = replace_section(text, f"{folder.name}-" + path.stem.replace("_", "-"), body)
    if not files["mtp"]:
        text = replace_section(text, "mtp", render_missing_mtp(_rel(Path(args.model_dir))))
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
