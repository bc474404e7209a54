"""Serving benchmark: prefill and decode speed of our DeepseekForCausalLM against transformers' DeepseekV3ForCausalLM.

    python -m benchmarks.serving --device cpu --dtype fp32 --contexts 128,1024,2048,4096 --new-tokens 32

Both models load the same random checkpoint (benchmarks.models.make_checkpoint, the issue's 3-layer 512-wide
shape). Variants, batch 1:

    peer      transformers' DeepseekV3ForCausalLM with DynamicCache(config=...): it caches the latent but re-expands
              per-head K/V from the whole cache at every decode step
    ours      DeepseekForCausalLM (mla_impl="auto": absorbed MLA for decode) with DeepseekLatentCache() in the model dtype
    ours_fp8  the same with DeepseekLatentCache(fp8=True) (e4m3 + one fp32 scale per token)

Per context length, two kinds of fresh worker process:

- timing: every variant in one process, timed in --repeats interleaved rounds (so that load from other processes
  hits all variants alike). A round: fresh cache, prefill = one forward over the prompt (logits_to_keep=1, as
  generate does), then decode = a manual loop of N single-token forwards with that cache, greedy (argmax) feeding.
  Reported: the best round (noise on a shared machine only ever adds time); the medians are kept in the JSON.
- trace: one process per variant: peak memory of one prefill + decode (CPU: peak RSS with VmHWM reset at the start;
  CUDA: max_memory_allocated), cache bytes per token (ours: DeepseekLatentCache.nbytes_per_token(); peer: its
  DynamicCache tensors' bytes / tokens), the greedy tokens and logits. FP8 runs teacher-forced on the model-dtype
  cache's tokens: max / mean |logit diff| and argmax agreement over prefill + decode steps.

Also: greedy agreement of ours vs the peer over each decode, an fp32 greedy-equivalence check of both models'
`generate` on a short prompt, and with --profile, torch.profiler tables at the largest context.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks import harness, models
from benchmarks.harness import RESULTS_DIR, RESULTS_MD
from benchmarks.measure import PeakMemory, clock, median
from benchmarks.models import DTYPES

import torch
from modeling_deepseek.compat import cache_kwargs

VARIANTS = ("peer", "ours", "ours_fp8")
# The issue's targets: decode ratio (ours / peer) by context, and prefill ratio by context.
DECODE_TARGETS = {128: 1.0, 2048: 4.0, 4096: 10.0}
PREFILL_TARGETS = {1024: 1.0, 4096: 1.0}


# ----------------------------------------------------------------------------------------------------------------
# worker side (one model variant, one context, fresh process)
def _load(spec):
    dtype = DTYPES[spec["dtype"]]
    if spec["model"] == "peer":
        return models.load_peer(spec["ckpt"], dtype, spec["device"])
    return models.load_ours(spec["ckpt"], dtype, spec["device"])


def _new_cache(spec, model):
    if spec["model"] == "peer":
        from transformers import DynamicCache

        return DynamicCache(config=model.config)
    from modeling_deepseek.cache import DeepseekLatentCache

    return DeepseekLatentCache(fp8=spec["model"] == "ours_fp8")


def _prompt(spec, length: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(spec["seed"] + length)
    return torch.randint(3, vocab, (1, length), generator=g).to(spec["device"])


def _prefill(model, ids, cache) -> torch.Tensor:
    return model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(cache)).logits[:, -1].float()


def _decode(model, cache, first_logits, n: int, forced: list[int] | None = None, keep_logits: bool = False):
    """n single-token forwards. Feeds argmax (or the forced tokens). Returns (fed tokens, logits rows or None)."""
    tokens, rows = [], [first_logits] if keep_logits else None
    logits = first_logits
    for i in range(n):
        tok = forced[i] if forced is not None else int(logits.argmax(-1))
        tokens.append(tok)
        ids = torch.tensor([[tok]], device=first_logits.device)
        logits = model(input_ids=ids, use_cache=True, **cache_kwargs(cache)).logits[:, -1].float()
        if keep_logits:
            rows.append(logits)
    if forced is None:
        tokens.append(int(logits.argmax(-1)))
    return tokens, rows


def _cache_bytes(spec, cache) -> tuple[float, float]:
    """(bytes per cached token as stored, bytes per token as allocated)."""
    if spec["model"] == "peer":
        total = tokens = 0
        for layer in cache.layers:
            if getattr(layer, "keys", None) is None or not layer.keys.numel():
                continue
            total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
            tokens = max(tokens, layer.keys.shape[0] * layer.keys.shape[-2])
        per_token = total / max(tokens, 1)
        return per_token, per_token  # DynamicCache concatenates: allocated == stored
    return cache.nbytes_per_token(), cache.nbytes_allocated_per_token()


def trace_worker(spec: dict) -> dict:
    """One variant at one context, alone in a fresh process: peak memory of one prefill + decode, cache bytes per
    token, the greedy tokens and logits (saved for the cross-variant comparisons) and, for FP8, the comparison with
    the model-dtype cache teacher-forced on its tokens."""
    harness.setup(threads=spec["threads"], seed=spec["seed"])
    device, ctx, n = spec["device"], spec["context"], spec["new_tokens"]
    model = _load(spec)
    vocab = model.config.vocab_size
    forced = json.loads(Path(spec["forced_trace"]).read_text())["tokens"][:n] if spec.get("forced_trace") else None
    result = {"label": spec["label"], "model": spec["model"], "context": ctx, "new_tokens": n}
    if spec["model"] != "peer":
        attn = model.model.layers[0].self_attn
        result["mla_impl"] = model.config.mla_impl
        result["decode_path"] = "absorbed" if attn.use_absorbed(1, ctx + 1) else "expanded"
        result["prefill_path"] = "absorbed" if attn.use_absorbed(ctx, ctx) else "expanded"
    with torch.inference_mode():
        warm = _new_cache(spec, model)  # a short warm-up (kernels, allocator), far below the measured peak
        _decode(model, warm, _prefill(model, _prompt(spec, 32, vocab), warm), 4)
        del warm
        prompt = _prompt(spec, ctx, vocab)
        cache = _new_cache(spec, model)
        with PeakMemory(device) as peak_prefill:
            first = _prefill(model, prompt, cache)
        with PeakMemory(device) as peak_decode:  # on top of the prefilled cache
            tokens, rows = _decode(model, cache, first, n, forced=forced, keep_logits=True)
        result["cache_bytes_per_token"], result["cache_alloc_bytes_per_token"] = _cache_bytes(spec, cache)
        result["cache_tokens"] = cache.get_seq_length()
    result.update(peak_mem_prefill_bytes=peak_prefill.bytes, peak_mem_decode_bytes=peak_decode.bytes,
                  peak_mem_kind=peak_decode.kind, tokens=tokens)
    logits = torch.cat(rows).cpu()
    torch.save(logits, spec["save_trace"] + ".pt")
    Path(spec["save_trace"]).write_text(json.dumps({"tokens": tokens}))
    if forced is not None and spec.get("compare_logits"):
        ref = torch.load(spec["compare_logits"])
        k = min(len(ref), len(logits))
        diff = (logits[:k] - ref[:k]).abs()
        result["vs_reference"] = {
            "steps": k,
            "max_abs_logit_diff": float(diff.max()),
            "mean_abs_logit_diff": float(diff.mean()),
            "max_abs_logit": float(ref[:k].abs().max()),
            "argmax_agreement": float((logits[:k].argmax(-1) == ref[:k].argmax(-1)).float().mean()),
        }
    if spec.get("profile"):
        result["profile"] = _profile(spec, model, prompt)
    return result


def timing_worker(spec: dict) -> dict:
    """All variants at one context in one process, timed in interleaved rounds (peer, ours, ours_fp8, peer, ...), so
    that load from other processes on the machine hits every variant alike. Each round: a fresh cache, a timed
    prefill, then N timed greedy decode steps."""
    harness.setup(threads=spec["threads"], seed=spec["seed"])
    device, ctx, n = spec["device"], spec["context"], spec["new_tokens"]
    loaded = {}
    for v in spec["variants"]:
        key = "peer" if v == "peer" else "ours"
        if key not in loaded:
            loaded[key] = _load(dict(spec, model=key))
    times = {v: {"prefill_s": [], "decode_s": []} for v in spec["variants"]}
    with torch.inference_mode():
        for v in spec["variants"]:
            vs = dict(spec, model=v)
            model = loaded["peer" if v == "peer" else "ours"]
            warm = _new_cache(vs, model)
            _decode(model, warm, _prefill(model, _prompt(vs, 32, model.config.vocab_size), warm), 4)
        prompt = _prompt(spec, ctx, loaded[next(iter(loaded))].config.vocab_size)
        for _ in range(spec["repeats"]):
            for v in spec["variants"]:
                vs = dict(spec, model=v)
                model = loaded["peer" if v == "peer" else "ours"]
                cache = _new_cache(vs, model)
                t0 = clock(device)
                first = _prefill(model, prompt, cache)
                t1 = clock(device)
                _decode(model, cache, first, n)
                t2 = clock(device)
                times[v]["prefill_s"].append(t1 - t0)
                times[v]["decode_s"].append(t2 - t1)
                del cache
    result = {"context": ctx, "new_tokens": n, "threads": torch.get_num_threads(), "variants": {}}
    for v, t in times.items():
        result["variants"][v] = dict(
            t,
            prefill_tok_s=ctx / min(t["prefill_s"]), decode_tok_s=n / min(t["decode_s"]),
            prefill_tok_s_median=ctx / median(t["prefill_s"]), decode_tok_s_median=n / median(t["decode_s"]),
        )
    return result


def _table(prof, sort: str, title: str) -> str:
    by_op = prof.key_averages().table(sort_by=sort, row_limit=20, max_name_column_width=45)
    by_shape = prof.key_averages(group_by_input_shape=True).table(
        sort_by=sort, row_limit=25, max_name_column_width=30, max_shapes_column_width=70)
    return f"{title}: by operator\n{by_op}\n{title}: by operator and input shapes\n{by_shape}\n"


def _profile(spec, model, prompt, steps: int = 8) -> dict:
    """torch.profiler tables (self CPU / CUDA time) of `steps` decode steps and of one prefill."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if spec["device"] == "cuda" else [])
    sort = "self_cuda_time_total" if spec["device"] == "cuda" else "self_cpu_time_total"
    out = {}
    with torch.inference_mode():
        cache = _new_cache(spec, model)
        first = _prefill(model, prompt, cache)
        with profile(activities=activities, record_shapes=True) as prof:
            _decode(model, cache, first, steps)
        out["decode"] = _table(prof, sort, f"{steps} decode steps at context {prompt.shape[1]}")
        cache = _new_cache(spec, model)
        with profile(activities=activities, record_shapes=True) as prof:
            _prefill(model, prompt, cache)
        out["prefill"] = _table(prof, sort, f"one prefill of {prompt.shape[1]} tokens")
    return out


# ----------------------------------------------------------------------------------------------------------------
# main side
def equivalence_check(ckpt, device: str, prompt_len: int = 32, new_tokens: int = 32) -> dict:
    """fp32, the models' own generate(): greedy outputs of ours and the peer on a short random prompt."""
    peer = models.load_peer(ckpt, torch.float32, device)
    ours = models.load_ours(ckpt, torch.float32, device)
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, peer.config.vocab_size, (1, prompt_len), generator=g).to(device)
    with torch.inference_mode():
        a = peer.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        b = ours.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        la = peer(a).logits
        lb = ours(a).logits
    same = a.shape == b.shape and bool((a == b).all())
    return {
        "dtype": "fp32", "prompt_tokens": prompt_len, "new_tokens": new_tokens,
        "identical": same,
        "peer_tokens": a[0, prompt_len:].tolist(), "ours_tokens": b[0, prompt_len:].tolist(),
        "max_abs_logit_diff_full_forward": float((la - lb).abs().max()),
    }


def _agreement(a: list[int], b: list[int]) -> dict:
    n = min(len(a), len(b))
    first = next((i for i in range(n) if a[i] != b[i]), n)
    return {"tokens": n, "identical_prefix": first, "matching_fraction": sum(x == y for x, y in zip(a, b)) / max(n, 1)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--contexts", default="128,1024,2048,4096", help="comma-separated prompt lengths")
    p.add_argument("--new-tokens", type=int, default=64, help="decode steps timed per run")
    p.add_argument("--repeats", type=int, default=5,
                   help="interleaved timed rounds per context (the best is reported, the median kept too)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own, one per core)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config-overrides", default="{}",
                   help='JSON object of DeepseekV3Config fields replacing the reference shape\'s, e.g. '
                        '\'{"kv_lora_rank": 512, "qk_rope_head_dim": 64}\' for DeepSeek-V3\'s latent width')
    p.add_argument("--profile", action="store_true", help="torch.profiler tables of ours and the peer at the largest context")
    p.add_argument("--json-out", default=None, help="default: benchmarks/results/serving_<device>_<dtype>.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    harness.setup(args.device)
    contexts = [int(c) for c in args.contexts.split(",") if c]
    variants = [v for v in args.variants.split(",") if v]
    json_out = Path(args.json_out or RESULTS_DIR / f"serving_{args.device}_{args.dtype}.json")
    report = {
        **harness.report_head("serving", args.device),
        "settings": {"device": args.device, "dtype": args.dtype, "contexts": contexts, "new_tokens": args.new_tokens,
                     "repeats": args.repeats, "batch": 1, "seed": args.seed,
                     "threads": args.threads or torch.get_num_threads(), "variants": variants},
        "config": dict(models.REFERENCE_SHAPE, **json.loads(args.config_overrides)),
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench_serving_") as tmp:
        ckpt = Path(tmp) / "ckpt"
        models.make_checkpoint(ckpt, seed=args.seed, **json.loads(args.config_overrides))
        report["peer_impl"] = {"attn_implementation": "sdpa (default)", "experts_implementation": "grouped_mm (default)"}
        eq = equivalence_check(ckpt, args.device)
        report["equivalence"] = eq
        print(f"greedy equivalence (fp32 generate, {eq['new_tokens']} tokens): identical={eq['identical']}, "
              f"max |logit diff| on the full sequence {eq['max_abs_logit_diff_full_forward']:.2e}", flush=True)
        for ctx in contexts:
            base = {"ckpt": str(ckpt), "dtype": args.dtype, "device": args.device, "context": ctx,
                    "new_tokens": args.new_tokens, "seed": args.seed, "threads": args.threads}
            spec = dict(base, label=f"timing@{ctx}", variants=variants, repeats=args.repeats)
            timing = harness.run_worker(timing_worker, spec)
            traces = {}
            for variant in variants:
                spec = dict(base, label=f"{variant}@{ctx}", model=variant,
                            save_trace=str(Path(tmp) / f"trace_{variant}_{ctx}.json"),
                            profile=bool(args.profile and ctx == max(contexts) and variant != "ours_fp8"))
                if variant == "ours_fp8" and "ours" in traces:  # teacher-forced on the model-dtype cache's tokens
                    spec["forced_trace"] = traces["ours"]
                    spec["compare_logits"] = traces["ours"] + ".pt"
                res = harness.run_worker(trace_worker, spec)
                traces[variant] = spec["save_trace"]
                res.update(timing["variants"][variant], threads=timing["threads"])
                report["runs"].append(res)
                print(f"ctx {ctx:5d} {variant:9s} prefill {res['prefill_tok_s']:9.1f} tok/s  decode "
                      f"{res['decode_tok_s']:8.2f} tok/s (median {res['decode_tok_s_median']:8.2f})  cache "
                      f"{res['cache_bytes_per_token']:7.1f} B/tok  peak +{res['peak_mem_prefill_bytes'] / 2**20:.1f} MiB "
                      f"prefill, +{res['peak_mem_decode_bytes'] / 2**20:.1f} MiB decode",
                      flush=True)
    report["summary"] = summarize(report)
    for name, text in _profiles(report).items():
        path = json_out.with_name(json_out.stem + f"_profile_{name}.txt")
        path.write_text(text)
    harness.write_json(json_out, report)
    print(render_table(report))
    print(f"wrote {json_out}")
    return report


def _profiles(report) -> dict:
    out = {}
    for run in report["runs"]:
        for phase, table in (run.get("profile") or {}).items():
            out[f"{run['model']}_{phase}_ctx{run['context']}"] = table
    return out


def summarize(report) -> dict:
    by = {(r["model"], r["context"]): r for r in report["runs"]}
    rows, targets = [], []
    for ctx in report["settings"]["contexts"]:
        peer = by.get(("peer", ctx))
        row = {"context": ctx}
        for v in VARIANTS:
            r = by.get((v, ctx))
            if r is None:
                continue
            row[f"{v}_decode_tok_s"] = r["decode_tok_s"]
            row[f"{v}_prefill_tok_s"] = r["prefill_tok_s"]
            row[f"{v}_cache_bytes_per_token"] = r["cache_bytes_per_token"]
            row[f"{v}_peak_prefill_mib"] = r["peak_mem_prefill_bytes"] / 2**20
            row[f"{v}_peak_decode_mib"] = r["peak_mem_decode_bytes"] / 2**20
            if peer is not None and v != "peer":
                row[f"{v}_decode_ratio"] = r["decode_tok_s"] / peer["decode_tok_s"]
                row[f"{v}_prefill_ratio"] = r["prefill_tok_s"] / peer["prefill_tok_s"]
                row[f"{v}_decode_ratio_median"] = r["decode_tok_s_median"] / peer["decode_tok_s_median"]
                row[f"{v}_prefill_ratio_median"] = r["prefill_tok_s_median"] / peer["prefill_tok_s_median"]
        if ("ours_fp8", ctx) in by and "vs_reference" in by[("ours_fp8", ctx)]:
            row["fp8_vs_ours"] = by[("ours_fp8", ctx)]["vs_reference"]
        if peer is not None and ("ours", ctx) in by:
            row["ours_vs_peer_greedy"] = _agreement(peer["tokens"], by[("ours", ctx)]["tokens"])
        rows.append(row)
        for v in ("ours", "ours_fp8"):
            if f"{v}_decode_ratio" in row and ctx in DECODE_TARGETS:
                t = DECODE_TARGETS[ctx]
                targets.append({"what": f"decode {v}/peer @ {ctx}", "target": t, "measured": row[f"{v}_decode_ratio"],
                                "met": row[f"{v}_decode_ratio"] >= t})
            if f"{v}_prefill_ratio" in row and ctx in PREFILL_TARGETS and v == "ours":
                t = PREFILL_TARGETS[ctx]
                targets.append({"what": f"prefill {v}/peer @ {ctx}", "target": t,
                                "measured": row[f"{v}_prefill_ratio"], "met": row[f"{v}_prefill_ratio"] >= t})
    return {"rows": rows, "targets": targets}


def render_table(report) -> str:
    s = report["summary"]
    headers = ["context", "peer decode tok/s", "ours decode tok/s", "ours/peer", "ours FP8 decode tok/s",
               "FP8/peer", "peer prefill tok/s", "ours prefill tok/s", "ours/peer prefill"]
    rows = []
    for r in s["rows"]:
        rows.append([r["context"], r.get("peer_decode_tok_s"), r.get("ours_decode_tok_s"),
                     _x(r.get("ours_decode_ratio")), r.get("ours_fp8_decode_tok_s"), _x(r.get("ours_fp8_decode_ratio")),
                     r.get("peer_prefill_tok_s"), r.get("ours_prefill_tok_s"), _x(r.get("ours_prefill_ratio"))])
    out = [harness.markdown_table(headers, rows), ""]
    headers = ["context", "cache B/token peer / ours / ours FP8", "prefill peak +MiB peer / ours / FP8",
               "decode peak +MiB peer / ours / FP8", "FP8 vs ours: max (mean) abs logit diff",
               "FP8 argmax agreement", "ours vs peer greedy: matching (identical prefix)"]
    rows = []
    for r in s["rows"]:
        f = r.get("fp8_vs_ours") or {}
        g = r.get("ours_vs_peer_greedy")
        trio = lambda key: " / ".join(harness.fmt(r.get(f"{v}_{key}"), 1) for v in VARIANTS)  # noqa: E731
        rows.append([r["context"], trio("cache_bytes_per_token"), trio("peak_prefill_mib"), trio("peak_decode_mib"),
                     f"{f['max_abs_logit_diff']:.3g} ({f['mean_abs_logit_diff']:.2g}); max abs logit "
                     f"{f['max_abs_logit']:.3g}" if f else "-",
                     f"{f['argmax_agreement']:.1%} of {f['steps']}" if f else "-",
                     f"{g['matching_fraction']:.1%} ({g['identical_prefix']} of {g['tokens']})" if g else "-"])
    out += [harness.markdown_table(headers, rows), ""]
    if s["targets"]:
        rows = [[t["what"], f">= {t['target']:.1f}x", _x(t["measured"]), "met" if t["met"] else "MISSED"]
                for t in s["targets"]]
        out.append(harness.markdown_table(["target", "needed", "measured", ""], rows))
    return "\n".join(out)


def _x(v):
    return None if v is None else f"{v:.2f}x"


def render_section(report, results_dir: Path = RESULTS_DIR, md_dir: Path = RESULTS_MD.parent) -> str:
    """This benchmark's RESULTS.md section from its report; `results_dir` holds the report's side files, `md_dir`
    is the folder of the RESULTS.md that links to them."""
    s = report["settings"]
    eq = report.get("equivalence", {})
    lines = harness.section_head(f"Serving: decode and prefill vs transformers' DeepseekV3 ({s['device']}, {s['dtype']})", report) + [
        f"Model (both): DeepseekV3Config({harness.config_line(report['config'])}), rope default, random weights "
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
    profiles = sorted(results_dir.glob(f"serving_{s['device']}_{s['dtype']}_profile_*.txt"))
    if profiles:
        lines += ["", "torch.profiler tables (largest context, written by `--profile`): " + ", ".join(
            f"[{p.stem.split('_profile_')[1]}]({p.relative_to(md_dir).as_posix()})" for p in profiles) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
