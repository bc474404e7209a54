"""DeepSeek-V3.2 sparse attention (DSA): ours (top-k latent rows gathered) vs transformers' DeepseekV32ForCausalLM
(dense attention under the top-k mask) on the same weights.

    python -m benchmarks.sparse_attention                                    # decode, prefill, retrieval
    python -m benchmarks.sparse_attention --parts decode --decode-contexts 2048,16384,32768

One random checkpoint saved by transformers' DeepseekV32ForCausalLM at V3.2's attention widths (kv_lora_rank 512,
qk_rope_head_dim 64, qk_nope / v 128, q_lora_rank 1536, indexer 64 heads x 128, k = 2048) with fewer layers, heads and
a smaller hidden size (`BENCH_SHAPE`, flags below), loaded by both models. Each variant runs in a fresh process:

- decode: one decode step at context L (2K, 16K, 32K). Both caches are filled with the same L tokens of synthetic
  state (latent, RoPE key and indexer key drawn from one seeded generator, written through each cache's own API), so
  that no O(L^2) prefill is needed to reach L; then single-token forwards after one warm-up step, timed (best and
  median of `--steps`; `--peer-steps` for transformers, whose steps take tens of seconds). Our contexts take turns
  step by step in one process, so that the shared machine's changing load reaches them alike (the "within 1.5x of
  2K" ratio compares them). The first step's logits of both models are compared (same cache, same weights: the same top-k set).
  transformers' step re-expands K and V of all L cached tokens through kv_b_proj and masks all but k; ours reads the
  L indexer keys and k latent rows.
- prefill: `generate(prompt, max_new_tokens=1)` at 16K. transformers' generate prefills in one forward by default,
  whose indexer alone would hold [16K, 64, 16K] fp32 scores (64 GiB): it runs with its own `prefill_chunk_size`
  (`--peer-chunk`); ours with its default chunked prefill (config.prefill_chunk_tokens). Time and peak RSS added.
- retrieval: a long prompt (random filler, a 6-token "key -> value" needle near the start, the key again at the end),
  greedy `--retrieval-new` tokens: ours sparse, ours dense-masked (dsa_impl="masked", the reference semantics), and
  transformers'. Whether the tokens are equal.
"""

from __future__ import annotations

import argparse
import inspect
import json
import tempfile
import time
from pathlib import Path

from benchmarks import harness, models
from benchmarks.harness import RESULTS_DIR
from benchmarks.measure import PeakMemory, median
from benchmarks.models import DTYPES

import torch

BENCH_SHAPE = dict(
    vocab_size=16384,
    hidden_size=2048,
    num_hidden_layers=2,
    num_attention_heads=16,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    intermediate_size=8192,
    moe_intermediate_size=1024,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    n_shared_experts=1,
    first_k_dense_replace=1,
    index_topk=2048,
    index_n_heads=64,
    index_head_dim=128,
)
PARTS = ("decode", "prefill", "retrieval")


def make_checkpoint(path, seed: int, **shape) -> dict:
    """Random weights saved by transformers' DeepseekV32ForCausalLM (its own initialisation, a seeded routing bias)."""
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    harness.quiet()
    torch.manual_seed(seed)
    model = DeepseekV32ForCausalLM(DeepseekV32Config(**shape))
    models.randomize_routing_bias_(model)
    model.save_pretrained(str(path))
    return model.config.to_dict()


def load(spec):
    harness.setup(threads=spec.get("threads"), seed=0)
    dtype = DTYPES[spec["dtype"]]
    if spec["variant"] == "peer":
        from transformers import DeepseekV32ForCausalLM

        return DeepseekV32ForCausalLM.from_pretrained(spec["ckpt"], dtype=dtype).eval()
    from modeling_deepseek import DeepseekForCausalLM

    impl = "masked" if spec["variant"] == "ours_masked" else "sparse"
    return DeepseekForCausalLM.from_pretrained(spec["ckpt"], dtype=dtype, dsa_impl=impl,
                                               num_nextn_predict_layers=0).eval()


def _cache_kwarg(model) -> str:
    """transformers 5.25 renamed the forward's past_key_values to cache (5.23 has only the old name)."""
    return "cache" if "cache" in inspect.signature(type(model.model).forward).parameters else "past_key_values"


def synthetic_state(config, layers: int, context: int):
    """Per layer: latent [1, 1, L, C], rotated RoPE key [1, 1, L, R], indexer key [1, L, I], from one seeded generator
    (unit-scale values, as after kv_a_layernorm / the indexer's LayerNorm)."""
    g = torch.Generator().manual_seed(1234)
    C, R, I = config.kv_lora_rank, config.qk_rope_head_dim, config.index_head_dim
    return [(torch.randn(1, 1, context, C, generator=g), torch.randn(1, 1, context, R, generator=g),
             torch.randn(1, context, I, generator=g)) for _ in range(layers)]


def filled_cache(model, variant: str, context: int, dtype):
    """A cache holding `context` tokens of synthetic_state, written through the model's own cache API."""
    config = model.config
    state = synthetic_state(config, config.num_hidden_layers, context)
    if variant == "peer":
        from transformers import DynamicCache

        cache = DynamicCache(config=config)
        for i, (latent, k_rope, keys) in enumerate(state):
            cache.update(latent.to(dtype), k_rope.to(dtype), i)
            cache.update_indexer(keys.to(dtype), i)
        return cache
    from modeling_deepseek.cache import DeepseekLatentCache, update_latent_cache

    cache = DeepseekLatentCache(config=config)
    for i, (latent, k_rope, keys) in enumerate(state):
        update_latent_cache(cache, i, latent.to(dtype), k_rope.to(dtype), keys.to(dtype))
    return cache


# ----------------------------------------------------------------------------------------------------------------
# workers
@torch.no_grad()
def decode_worker(spec: dict) -> dict:
    """Decode steps at each of spec["contexts"], one cache per context; the contexts take turns step by step (a first,
    untimed warm-up round), so that a change of the machine's load reaches all of them alike. Per context: the
    step times (ms), their median, the first step's logits."""
    model = load(spec)
    dtype = DTYPES[spec["dtype"]]
    caches = {ctx: filled_cache(model, spec["variant"], ctx, dtype) for ctx in spec["contexts"]}
    kw = _cache_kwarg(model)
    ids = torch.randint(3, model.config.vocab_size, (1, spec["steps"] + 1), generator=torch.Generator().manual_seed(7))
    times = {ctx: [] for ctx in caches}
    first_logits = {}
    for step in range(spec["steps"] + 1):
        for ctx, cache in caches.items():
            t0 = time.perf_counter()
            out = model(ids[:, step : step + 1], use_cache=True, **{kw: cache})
            if step:
                times[ctx].append(time.perf_counter() - t0)
            else:
                first_logits[ctx] = out.logits[0, -1].float().tolist()
    return {str(ctx): {"ms": 1e3 * median(t), "ms_all": [1e3 * x for x in t], "first_logits": first_logits[ctx]}
            for ctx, t in times.items()}


@torch.no_grad()
def prefill_worker(spec: dict) -> dict:
    model = load(spec)
    vocab = model.config.vocab_size
    chunk = {"prefill_chunk_size": spec["peer_chunk"]} if spec["variant"] == "peer" else {}
    model.generate(torch.randint(3, vocab, (1, 64)), max_new_tokens=1, do_sample=False, **chunk)  # warm-up
    prompt = torch.randint(3, vocab, (1, spec["context"]), generator=torch.Generator().manual_seed(1))
    with PeakMemory("cpu") as peak:
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=1, do_sample=False, **chunk)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_bytes": peak.bytes, "peak_kind": peak.kind, "next_token": out[0, -1].item()}


def retrieval_prompt(vocab: int, context: int) -> list[int]:
    """Random filler with a needle (a 3-token key then a 3-token value) at 5% of the context, and the key again last."""
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, vocab, (context,), generator=g)
    needle = torch.randint(3, vocab, (6,), generator=g)
    at = context // 20
    ids[at : at + 6] = needle
    ids[-3:] = needle[:3]
    return ids.tolist()


@torch.no_grad()
def retrieval_worker(spec: dict) -> dict:
    model = load(spec)
    chunk = {"prefill_chunk_size": spec["peer_chunk"]} if spec["variant"] == "peer" else {}
    prompt = torch.tensor([retrieval_prompt(model.config.vocab_size, spec["context"])])
    t0 = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=spec["new_tokens"], do_sample=False, **chunk)
    return {"tokens": out[0, prompt.shape[1]:].tolist(), "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------------------------
# driver
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--decode-contexts", default="2048,16384,32768")
    p.add_argument("--steps", type=int, default=5, help="our timed decode steps per context (after one warm-up)")
    p.add_argument("--peer-steps", type=int, default=2, help="transformers' timed decode steps per context")
    p.add_argument("--prefill-context", type=int, default=16384)
    p.add_argument("--peer-chunk", type=int, default=512, help="transformers' generate(prefill_chunk_size=...)")
    p.add_argument("--retrieval-context", type=int, default=8192)
    p.add_argument("--retrieval-new", type=int, default=8)
    p.add_argument("--hidden", type=int, default=BENCH_SHAPE["hidden_size"])
    p.add_argument("--layers", type=int, default=BENCH_SHAPE["num_hidden_layers"])
    p.add_argument("--heads", type=int, default=BENCH_SHAPE["num_attention_heads"])
    p.add_argument("--topk", type=int, default=BENCH_SHAPE["index_topk"])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--from-json", default=None, help="only re-render RESULTS.md's section from this report")
    p.add_argument("--section", default="sparse_attention", help="RESULTS.md section to write (parts run with "
                   "another model shape go in their own)")
    harness.output_arguments(p, "sparse_attention_cpu.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.from_json:  # re-render a finished run's section (e.g. after a change to this renderer)
        report = json.loads(Path(args.from_json).read_text())
        harness.write_section(args.section, render_section(report), args.results_md)
        return report
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"--parts: unknown {unknown}; choose from {PARTS}")
    contexts = [int(c) for c in args.decode_contexts.split(",")]
    longest = max(contexts + [args.prefill_context, args.retrieval_context]) + args.steps + 64
    shape = dict(BENCH_SHAPE, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                 index_topk=args.topk, max_position_embeddings=longest)
    report = {**harness.report_head("sparse_attention"), "config": shape,
              "settings": {k: v for k, v in vars(args).items() if k not in ("json_out", "results_md")},
              "decode": [], "prefill": None, "retrieval": None}
    base = {"dtype": args.dtype, "threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="bench_dsa_") as tmp:
        ckpt = str(Path(tmp) / "ckpt")
        make_checkpoint(ckpt, args.seed, **shape)
        base["ckpt"] = ckpt
        if "decode" in parts:
            # Ours: all contexts in one process, taking turns (decode_worker); transformers': a process per context,
            # --peer-steps steps (tens of seconds each at 16K and beyond).
            ours = harness.run_worker(decode_worker, {**base, "variant": "ours", "contexts": contexts,
                                                      "steps": args.steps, "label": "decode ours"})
            for ctx in contexts:
                row = {"context": ctx, "ours": ours[str(ctx)]}
                spec = {**base, "variant": "peer", "contexts": [ctx], "steps": args.peer_steps,
                        "label": f"decode peer @ {ctx}"}
                row["peer"] = harness.run_worker(decode_worker, spec)[str(ctx)]
                print(f"decode ctx {ctx:6d} ours {row['ours']['ms']:9.1f} ms/step, transformers "
                      f"{row['peer']['ms']:9.1f} ms/step", flush=True)
                a, b = (torch.tensor(row[v].pop("first_logits")) for v in ("ours", "peer"))
                row["logits_max_diff"] = (a - b).abs().max().item()
                row["same_argmax"] = a.argmax().item() == b.argmax().item()
                report["decode"].append(row)
        if "prefill" in parts:
            row = {"context": args.prefill_context}
            for variant in ("ours", "peer"):
                spec = {**base, "variant": variant, "context": args.prefill_context, "peer_chunk": args.peer_chunk,
                        "label": f"prefill {variant}"}
                row[variant] = harness.run_worker(prefill_worker, spec)
                print(f"prefill {variant:5s} {row[variant]['seconds']:.1f} s, peak "
                      f"+{row[variant]['peak_bytes'] / 2**20:.0f} MiB", flush=True)
            report["prefill"] = row
        if "retrieval" in parts:
            row = {"context": args.retrieval_context}
            for variant in ("ours", "ours_masked", "peer"):
                spec = {**base, "variant": variant, "context": args.retrieval_context, "new_tokens": args.retrieval_new,
                        "peer_chunk": args.peer_chunk, "label": f"retrieval {variant}"}
                row[variant] = harness.run_worker(retrieval_worker, spec)
                print(f"retrieval {variant:11s} {row[variant]['tokens']} ({row[variant]['seconds']:.1f} s)", flush=True)
            report["retrieval"] = row
    previous = Path(args.json_out)
    if set(parts) != set(PARTS) and previous.is_file():  # a partial re-run keeps the other parts of the last report
        kept = json.loads(previous.read_text())
        if kept.get("config") == report["config"]:
            for part in set(PARTS) - set(parts):
                report[part] = kept.get(part)
            report["earlier_parts_command"] = kept.get("earlier_parts_command", kept["command"])
            report["earlier_parts_machine"] = kept.get("earlier_parts_machine", kept["machine"])
    harness.publish(report, args.section, render_section(report), args)
    return report


def render_section(report) -> str:
    s, c = report["settings"], report["config"]
    parts = ", ".join(part for part in PARTS if report.get(part))
    head = harness.section_head(f"DeepSeek-V3.2 sparse attention: ours vs transformers' DeepseekV32, {parts} (cpu, "
                                f"{s['dtype']})", report, " (machine shared with other jobs)")
    if report.get("earlier_parts_command"):
        head += [f"Parts not re-run come from: `{report['earlier_parts_command']}` on "
                 f"{harness.machine_line(report['earlier_parts_machine'])}  "]
    lines = head + [
        f"Model: DeepseekV32Config({harness.config_line(c)}); random weights saved by transformers, loaded by both. "
        "Each variant in a fresh process.", ""]
    if report["decode"]:
        base = next((r for r in report["decode"] if r["context"] == min(x["context"] for x in report["decode"])))
        lines += [f"Decode step, best of {s['steps']} (ours) / {s.get('peer_steps', s['steps'])} (transformers) "
                  f"after a warm-up, median in brackets; caches filled with the same synthetic state, k = "
                  f"{c['index_topk']}; our contexts take turns step by step in one process:", ""]
        best = {(r["context"], v): min(r[v]["ms_all"]) for r in report["decode"] for v in ("ours", "peer")}
        rows = [[str(r["context"]), f"{best[r['context'], 'ours']:,.1f} ({r['ours']['ms']:,.1f})",
                 f"{best[r['context'], 'peer']:,.1f} ({r['peer']['ms']:,.1f})",
                 f"{best[r['context'], 'peer'] / best[r['context'], 'ours']:.1f}x",
                 f"{best[r['context'], 'ours'] / best[base['context'], 'ours']:.2f}x", f"{r['logits_max_diff']:.1e}",
                 "yes" if r["same_argmax"] else "NO"] for r in report["decode"]]
        lines += [harness.markdown_table(
            ["context", "ours ms/step", "transformers ms/step", "speed-up", f"ours vs ours @ {base['context']}",
             "first-step logits max diff", "same argmax"], rows), ""]
    if report["prefill"]:
        r = report["prefill"]
        o, p = r["ours"], r["peer"]
        cpu = report.get("cpu_minutes") or {}
        rows = [[name, x["seconds"], x["peak_bytes"] / 2**20, str(x["next_token"]), cpu.get(key)]
                for name, key, x in (("ours", "ours", o), ("transformers", "peer", p)) if x is not None]
        lines += [f"Prefill: `generate(prompt, max_new_tokens=1)` at {r['context']} tokens; transformers with "
                  f"`prefill_chunk_size={s['peer_chunk']}` (one forward would hold a [{r['context']}, "
                  f"{c['index_n_heads']}, {r['context']}] fp32 indexer score tensor, "
                  f"{r['context'] ** 2 * c['index_n_heads'] * 4 / 2**30:.0f} GiB), ours with its default chunked "
                  f"prefill. Peak = {o['peak_kind']}; CPU minutes = the worker process's CPU time (model load "
                  "included), read from ps where recorded: on a machine at load 10-15 the wall seconds of two "
                  "processes run at different times are not comparable, their CPU time is closer to it.", "",
                  harness.markdown_table(["", "seconds (wall)", "peak +MiB", "next token", "CPU minutes"], rows), ""]
        if p is None:
            lines += ["transformers' prefill did not finish within this session (see the report).", ""]
        else:
            lines += [f"Prefill speed-up {p['seconds'] / o['seconds']:.2f}x (wall), peak memory "
                      f"{o['peak_bytes'] / max(p['peak_bytes'], 1):.2f}x of transformers'.", ""]
    if report["retrieval"]:
        r = report["retrieval"]
        same = r["ours"]["tokens"] == r["ours_masked"]["tokens"]
        same_peer = r["ours"]["tokens"] == r["peer"]["tokens"]
        lines += [f"Retrieval prompt ({r['context']} tokens, needle at 5%, k = {c['index_topk']}), greedy "
                  f"{s['retrieval_new']} tokens:", "",
                  harness.markdown_table(["", "tokens", "seconds"],
                                         [[v, str(r[v]["tokens"]), r[v]["seconds"]]
                                          for v in ("ours", "ours_masked", "peer")]),
                  "", f"Sparse == dense-masked reference: {'yes' if same else 'NO'}; == transformers: "
                  f"{'yes' if same_peer else 'NO'}.", ""]
    note = [report["note"], ""] if report.get("note") else []
    return "\n".join(lines + targets(report) + ([""] + note if note else []))


def targets(report) -> list[str]:
    """Issue 27's targets, each with the figure that decides it."""
    out = []
    if report["decode"]:
        best = {(r["context"], v): min(r[v]["ms_all"]) for r in report["decode"] for v in ("ours", "peer")}
        low = min(r["context"] for r in report["decode"])
        for r in report["decode"]:
            ctx = r["context"]
            if ctx >= 16384:
                up, own = best[ctx, "peer"] / best[ctx, "ours"], best[ctx, "ours"] / best[low, "ours"]
                by_median = r["ours"]["ms"] / next(x for x in report["decode"] if x["context"] == low)["ours"]["ms"]
                out.append(f"- decode at {ctx}: {up:.1f}x transformers' step (target >= 4x: "
                           f"{'met' if up >= 4 else 'NOT met'}); {own:.2f}x our step at {low} (target <= 1.5x: "
                           f"{'met' if own <= 1.5 else 'NOT met'}; by the medians {by_median:.2f}x)")
    if report["prefill"] and report["prefill"]["peer"] is None:
        out.append(f"- prefill at {report['prefill']['context']}: transformers' side not measured (did not finish)")
    elif report["prefill"]:
        o, p = report["prefill"]["ours"], report["prefill"]["peer"]
        out.append(f"- prefill at {report['prefill']['context']}: {p['seconds'] / o['seconds']:.2f}x transformers' "
                   f"speed (target > 1: {'met' if o['seconds'] < p['seconds'] else 'NOT met'}), peak "
                   f"{o['peak_bytes'] / 2**20:,.0f} MiB vs {p['peak_bytes'] / 2**20:,.0f} MiB (target below: "
                   f"{'met' if o['peak_bytes'] < p['peak_bytes'] else 'NOT met'})")
    if report["retrieval"]:
        r = report["retrieval"]
        same = r["ours"]["tokens"] == r["ours_masked"]["tokens"]
        out.append(f"- greedy tokens on the retrieval prompt equal to the dense-masked reference: "
                   f"{'met' if same else 'NOT met'}")
    return ["Targets (issue 27):", "", *out] if out else []


if __name__ == "__main__":
    main()
