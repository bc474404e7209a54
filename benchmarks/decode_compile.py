"""Compiled decoding over a static cache, through generate(): ours and transformers' DeepseekV3 on the same weights.

    python -m benchmarks.decode_compile --shape tiny --contexts 128 --new-tokens 32 --repeats 7
    python -m benchmarks.decode_compile --contexts 128,2048,4096 \\
        --config-overrides '{"kv_lora_rank": 512, "qk_rope_head_dim": 64}' --profile

Variants (greedy, `--batch` random prompts of `context` tokens, no padding):

    peer_eager      transformers' DeepseekV3ForCausalLM.generate() with its default DynamicCache
    peer_compiled   the same with cache_implementation="static" and compile_config=CompileConfig(fullgraph=True):
                    transformers' own compiled decode over its StaticCache (the fair peer)
    ours_eager      DeepseekForCausalLM.generate() with the growing DeepseekLatentCache (absorbed decode)
    ours_static     ours with cache_implementation="static", not compiled (what attending over the whole
                    preallocated buffer costs by itself)
    ours_compiled   ours with cache_implementation="static" and the same compile_config

The decode step is measured through generate(), whatever generate does per token included (logits processing,
stopping checks): a logits processor that only reads the clock (StepClock) timestamps every new token of a generate
of 1 + N tokens, and the N intervals after the prefill's token are N decode steps. Rounds interleave the variants,
so that load from other processes hits them alike; reported is the median over all steps of all rounds (robust to
the load spikes of a shared machine; the best step is in the JSON). The compiled variants compile during an
untimed warm-up generate of the same shapes (its seconds are reported); the timed rounds must not compile again,
which the worker checks. Each context runs in a fresh process. Greedy tokens of every variant are compared with
ours_eager's (fp32: identical expected).

With --profile: torch.profiler tables (self CPU time) of the N decode steps (the prefill left out) of ours_eager,
ours_compiled and peer_eager at the largest context, next to --json-out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks import harness, models
from benchmarks.harness import RESULTS_DIR, RESULTS_MD
from benchmarks.measure import clock, median
from benchmarks.models import DTYPES

import torch

VARIANTS = ("peer_eager", "peer_compiled", "ours_eager", "ours_static", "ours_compiled")
# conftest.py's tiny model (the test suite's), in transformers' DeepseekV3 field names
TINY_SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                  qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                  n_group=2, topk_group=1, first_k_dense_replace=1, max_position_embeddings=8192)
# The targets, as step-time or speed ratios.
TARGETS = {
    "ours_compiled / ours_eager step (short context, at most)": 0.6,
    "ours_compiled / peer_compiled step (at most)": 1.0,
    "ours_compiled speed / peer_eager speed at 4096 (at least)": 10.0,
}


# ----------------------------------------------------------------------------------------------------------------
# worker side: one context, every variant, one fresh process
def _compile_config(mode: str | None, backend: str = "inductor"):
    from transformers import CompileConfig

    from modeling_deepseek.compat import compile_on_any_device

    return compile_on_any_device(CompileConfig(fullgraph=True, mode=mode, dynamic=False, backend=backend))


def generate_kwargs(variant: str, cache_len: int, mode: str | None, backend: str = "inductor") -> dict:
    """generate() options of a variant: static cache and compile_config where its name says so."""
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    if variant.endswith(("_compiled", "_static", "_cudagraphs")):
        kw.update(cache_implementation="static", max_cache_len=cache_len)
    if variant.endswith("_static"):
        kw["disable_compile"] = True  # generate would compile a static-cache decode by itself on an accelerator
    elif variant.endswith("_compiled"):
        kw["compile_config"] = _compile_config(mode, backend)
    elif variant.endswith("_cudagraphs"):
        kw["compile_config"] = _compile_config("reduce-overhead")
    return kw


class StepClock:
    """A logits processor that only reads the clock: generate() calls it once per new token, right after that token's
    forward, so consecutive calls are one decode step apart (the generate loop's own work included)."""

    def __init__(self, device: str):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        self.times.append(clock(self.device))
        return scores


def decode_steps(model, ids, kw: dict, new_tokens: int, device: str) -> tuple[float, list[float], torch.Tensor]:
    """One generate of 1 + new_tokens tokens: (prefill seconds, the new_tokens decode step seconds, sequences)."""
    from transformers import LogitsProcessorList

    step_clock = StepClock(device)
    t0 = clock(device)
    out = model.generate(ids, max_new_tokens=1 + new_tokens, logits_processor=LogitsProcessorList([step_clock]), **kw)
    times = [t0] + step_clock.times
    return times[1] - t0, [b - a for a, b in zip(times[1:], times[2:])], out


def _graph_count() -> int:
    """Frames dynamo compiled so far in this process (a compile during a timed round would show here)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def timing_worker(spec: dict) -> dict:
    harness.setup(threads=spec["threads"])
    device, dtype = spec["device"], DTYPES[spec["dtype"]]
    ctx, n, batch = spec["context"], spec["new_tokens"], spec["batch"]
    loaded = {"peer": models.load_peer(spec["ckpt"], dtype, device),
              "ours": models.load_ours(spec["ckpt"], dtype, device)}
    vocab = loaded["ours"].config.vocab_size
    g = torch.Generator().manual_seed(spec["seed"] + ctx)
    ids = torch.randint(3, vocab, (batch, ctx), generator=g).to(device)
    cache_len = ctx + n + 1
    variants = spec["variants"]
    kws = {v: generate_kwargs(v, cache_len, spec["compile_mode"], spec.get("compile_backend", "inductor"))
           for v in variants}
    model_of = {v: loaded[v.split("_")[0]] for v in variants}
    result = {"context": ctx, "new_tokens": n, "batch": batch, "cache_len": cache_len, "variants": {}}
    tokens = {}
    with torch.inference_mode():
        for v in variants:  # warm-up: compiles the compiled variants, at the timed shapes
            t0 = clock(device)
            model_of[v].generate(ids, max_new_tokens=1 + n, **kws[v])
            result["variants"][v] = {"warmup_s": clock(device) - t0, "step_s": [], "prefill_s": []}
        graphs = _graph_count()
        for _ in range(spec["repeats"]):
            for v in variants:
                prefill, steps, out = decode_steps(model_of[v], ids, kws[v], n, device)
                result["variants"][v]["prefill_s"].append(prefill)
                result["variants"][v]["step_s"] += steps
                tokens[v] = out[:, ctx:].tolist()
        result["recompiled_during_timing"] = _graph_count() - graphs
        for v in variants:
            r = result["variants"][v]
            r.update(step_s_median=median(r["step_s"]), step_s_best=min(r["step_s"]),
                     tokens_equal_ours_eager=tokens[v] == tokens.get("ours_eager", tokens[v]))
        if spec.get("profile"):
            result["profiles"] = {v: _profile(model_of[v], ids, kws[v], n, device) for v in variants
                                  if v in ("ours_eager", "ours_compiled", "peer_eager")}
    return result


def _profile(model, ids, kw, n, device) -> str:
    """torch.profiler table of the n decode steps of one generate (batch 1): a streamer starts the profiler when the
    first token arrives, i.e. after the prefill, and stops it at the end."""
    from torch.profiler import ProfilerActivity, profile
    from transformers.generation.streamers import BaseStreamer

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    prof = profile(activities=acts, record_shapes=True)

    class DecodeOnly(BaseStreamer):
        puts = 0

        def put(self, value):
            self.puts += 1
            if self.puts == 2:  # the prompt, then the prefill's token: decoding starts now
                prof.start()

        def end(self):
            prof.stop()

    model.generate(ids[:1], max_new_tokens=1 + n, streamer=DecodeOnly(), **kw)
    return prof.key_averages(group_by_input_shape=True).table(
        sort_by=sort, row_limit=30, max_name_column_width=45, max_shapes_column_width=70)


# ----------------------------------------------------------------------------------------------------------------
# main side
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--shape", default="reference", choices=["reference", "tiny"],
                   help="reference: benchmarks.models.REFERENCE_SHAPE; tiny: the test suite's model")
    p.add_argument("--config-overrides", default="{}", help="JSON of DeepseekV3Config fields over the shape")
    p.add_argument("--contexts", default="128,2048,4096")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--compile-mode", default=None, help="torch.compile mode of the compiled variants (default: "
                   "inductor's default; the _cudagraphs variants use reduce-overhead)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled variants "
                   "('eager': dynamo tracing only, for smoke runs)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--label", default=None, help="section name suffix in RESULTS.md (default: from --shape)")
    p.add_argument("--json-out", default=None)
    p.add_argument("--results-md", default=str(RESULTS_MD),
                   help="RESULTS.md whose section this run replaces ('' to skip)")
    return p.parse_args(argv)


def run(args) -> dict:
    label = args.label or (args.shape if args.config_overrides == "{}" else f"{args.shape}-custom")
    json_out = Path(args.json_out or RESULTS_DIR / f"decode_compile_{label}_{args.device}_{args.dtype}.json")
    overrides = dict(TINY_SHAPE if args.shape == "tiny" else {}, **json.loads(args.config_overrides))
    contexts = [int(c) for c in args.contexts.split(",") if c]
    report = {
        **harness.report_head("decode_compile", args.device), "label": label,
        "settings": {"device": args.device, "dtype": args.dtype, "contexts": contexts, "new_tokens": args.new_tokens,
                     "batch": args.batch, "repeats": args.repeats, "compile_mode": args.compile_mode,
                     "compile_backend": args.compile_backend,
                     "threads": args.threads or torch.get_num_threads(), "variants": args.variants.split(",")},
        "config": dict(models.REFERENCE_SHAPE, **overrides),
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench_decode_compile_") as tmp:
        ckpt = Path(tmp) / "ckpt"
        models.make_checkpoint(ckpt, seed=args.seed, **overrides)
        for ctx in contexts:
            spec = {"ckpt": str(ckpt), "device": args.device, "dtype": args.dtype, "context": ctx,
                    "new_tokens": args.new_tokens, "batch": args.batch, "repeats": args.repeats, "seed": args.seed,
                    "threads": args.threads, "variants": report["settings"]["variants"],
                    "compile_mode": args.compile_mode, "compile_backend": args.compile_backend,
                    "profile": args.profile and ctx == max(contexts), "label": f"decode_compile@{ctx}"}
            res = harness.run_worker(timing_worker, spec)
            for name, table in (res.pop("profiles", None) or {}).items():
                path = json_out.with_name(json_out.stem + f"_profile_{name}_ctx{ctx}.txt")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(f"{name}: the {args.new_tokens} decode steps of a generate at context {ctx}\n{table}\n")
                res.setdefault("profile_files", []).append(path.name)
            report["runs"].append(res)
            print(f"ctx {ctx}: " + "  ".join(f"{v} {r['step_s_median'] * 1e3:.2f} ms" for v, r in
                                             res["variants"].items()), flush=True)
    report["summary"] = summarize(report)
    harness.write_json(json_out, report)
    body = render(report)
    print(body)
    if args.results_md:
        harness.write_section(f"decode-compile-{label}-{args.device}-{args.dtype}", body, Path(args.results_md))
    print(f"wrote {json_out}")
    return report


def summarize(report) -> dict:
    rows, targets = [], []
    shortest = min(report["settings"]["contexts"])
    for run in report["runs"]:
        ms = {v: r["step_s_median"] * 1e3 for v, r in run["variants"].items()}
        row = {"context": run["context"], "step_ms": ms}
        ratio = lambda a, b: ms[a] / ms[b] if a in ms and b in ms else None  # noqa: E731
        row["ours_compiled_over_ours_eager"] = ratio("ours_compiled", "ours_eager")
        row["ours_compiled_over_peer_compiled"] = ratio("ours_compiled", "peer_compiled")
        row["peer_compiled_over_peer_eager"] = ratio("peer_compiled", "peer_eager")
        row["speed_ours_compiled_vs_peer_eager"] = ratio("peer_eager", "ours_compiled")
        row["speed_ours_eager_vs_peer_eager"] = ratio("peer_eager", "ours_eager")
        rows.append(row)
        t = [("ours_compiled / ours_eager step (short context, at most)", row["ours_compiled_over_ours_eager"])
             if run["context"] == shortest else None,
             ("ours_compiled / peer_compiled step (at most)", row["ours_compiled_over_peer_compiled"]),
             ("ours_compiled speed / peer_eager speed at 4096 (at least)", row["speed_ours_compiled_vs_peer_eager"])
             if run["context"] == 4096 else None]
        for what, value in filter(None, t):
            if value is not None:
                need = TARGETS[what]
                targets.append({"what": what, "context": run["context"], "target": need, "measured": value,
                                "met": value >= need if "at least" in what else value <= need})
    return {"rows": rows, "targets": targets}


def render(report) -> str:
    s = report["settings"]
    variants = s["variants"]
    lines = harness.section_head(f"Compiled static decode through generate(): ours vs transformers' DeepseekV3 "
                                 f"({report['label']} shape; {s['device']}, {s['dtype']})", report) + [
             f"Model (both): DeepseekV3Config({harness.config_line(report['config'])}), random weights.  ",
             f"Batch {s['batch']}; decode step = interval between consecutive tokens inside generate() (a clock-reading "
             f"logits processor), median over the {s['new_tokens']} steps of each of {s['repeats']} interleaved "
             "rounds; compiled = "
             f"`compile_config=CompileConfig(fullgraph=True, dynamic=False, mode={s['compile_mode']!r}, "
             f"backend={s.get('compile_backend', 'inductor')!r})`, cudagraphs = the same with mode='reduce-overhead', "
             "both with "
             "`cache_implementation=\"static\"` (ours: DeepseekStaticLatentCache; peer: transformers' StaticCache); "
             f"{s['threads']} torch threads.", ""]
    headers = ["context"] + [f"{v} ms/step" for v in variants] + [
        "ours compiled / ours eager", "ours compiled / peer compiled", "peer compiled / peer eager",
        "speed vs peer eager: ours eager / ours compiled"]
    rows = []
    for run, row in zip(report["runs"], report["summary"]["rows"]):
        rows.append([run["context"]] + [row["step_ms"].get(v) for v in variants] + [
            _x(row["ours_compiled_over_ours_eager"]), _x(row["ours_compiled_over_peer_compiled"]),
            _x(row["peer_compiled_over_peer_eager"]),
            f"{_x(row['speed_ours_eager_vs_peer_eager'])} / {_x(row['speed_ours_compiled_vs_peer_eager'])}"])
    lines += [harness.markdown_table(headers, rows), ""]
    lines += [harness.markdown_table(["context"] + [f"{v} tok/s" for v in variants], [
        [row["context"]] + [s["batch"] * 1e3 / row["step_ms"][v] if v in row["step_ms"] else None for v in variants]
        for row in report["summary"]["rows"]]), ""]
    if any("ours_cudagraphs" in row["step_ms"] for row in report["summary"]["rows"]):
        lines += ["CUDA graphs against the eager peer (speed): " + "; ".join(
            f"{row['context']}: ours {row['step_ms']['peer_eager'] / row['step_ms']['ours_cudagraphs']:.2f}x, peer "
            f"{row['step_ms']['peer_eager'] / row['step_ms']['peer_cudagraphs']:.2f}x"
            for row in report["summary"]["rows"] if "peer_cudagraphs" in row["step_ms"]) + " (target: ours >= 3x at "
            "batch 1).", ""]
    warm = "; ".join(f"{run['context']}: " + ", ".join(
        f"{v} {r['warmup_s']:.1f}" for v, r in run["variants"].items() if v.endswith(("_compiled", "_cudagraphs")))
        for run in report["runs"])
    lines.append(f"Warm-up generate (compiles) in seconds: {warm}. Graphs compiled during the timed rounds: "
                 + ", ".join(str(run["recompiled_during_timing"]) for run in report["runs"]) + ".")
    same = all(r["tokens_equal_ours_eager"] for run in report["runs"] for r in run["variants"].values())
    lines.append("Greedy tokens of every variant equal ours_eager's: " + ("**yes**" if same else "**NO**: " + "; ".join(
        f"{run['context']}: {[v for v, r in run['variants'].items() if not r['tokens_equal_ours_eager']]}"
        for run in report["runs"])) + ".")
    if report["summary"]["targets"]:
        lines += ["", harness.markdown_table(
            ["target (issue 14)", "context", "needed", "measured", ""],
            [[t["what"], t["context"], f"{t['target']:.2f}", f"{t['measured']:.2f}", "met" if t["met"] else "MISSED"]
             for t in report["summary"]["targets"]])]
    files = [f for run in report["runs"] for f in run.get("profile_files", [])]
    if files:
        lines += ["", "torch.profiler tables: " + ", ".join(f"[{f.split('_profile_')[1][:-4]}](results/{f})"
                                                         for f in files) + "."]
    return "\n".join(lines)


def _x(v):
    return "-" if v is None else f"{v:.2f}x"


def main(argv=None) -> dict:
    args = parse_args(argv)
    harness.setup(args.device, args.threads)  # the workers' threads, reported in the machine line too
    return run(args)


if __name__ == "__main__":
    main()
