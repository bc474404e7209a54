"""MTP self-speculative decoding: wall-clock speedup of generate(use_mtp=True) over plain greedy generate.

    python -m benchmarks.mtp_speedup --model-dir runs/demo/final

Needs a trained model with an MTP module (the demo model of `make demo`, by default); exits with status 2 when the
folder is missing. Prompts: the first --prompt-tokens tokens (BOS included) of --num-prompts Python stdlib source
files (the files are spread evenly over the sorted list of trainers.corpus.stdlib_source_files()); the tokenizer is
the one saved with the model. Greedy decoding, --max-new-tokens new tokens.

- batch 1: each prompt alone; plain and MTP runs interleaved per prompt, --repeats times (best time per prompt kept),
  MTP with each draft count of --draft-tokens (generate(use_mtp=True, mtp_draft_tokens=k); k=1 is V3's trained
  depth and the headline, larger k chain the MTP module on its own output);
- batch 4 (extra row, first k): prompts cut to different lengths and left-padded into one batch.

Reported: tokens/s of both (new tokens, EOS included, over the summed best times), the speedup, the MTP acceptance
rate (accepted / drafted), new tokens per MTP step, and whether the greedy outputs are token-for-token identical.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks import harness
from benchmarks.harness import REPO_ROOT, RESULTS_DIR
from benchmarks.measure import clock
from benchmarks.models import DTYPES

import torch

TARGET_SPEEDUP, TARGET_ACCEPTANCE = 1.6, 0.8
MISSING_MODEL_EXIT = 2


def stdlib_prompts(tokenizer, count: int, length: int) -> list[tuple[str, list[int]]]:
    """`count` files spread evenly over the sorted stdlib list (the first long enough one of each stretch)."""
    import sysconfig

    from trainers.corpus import read_text, stdlib_source_files

    files = stdlib_source_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    step = max(len(files) // count, 1)
    picked = []
    for i in range(count):
        for path in files[i * step : (i + 1) * step]:
            ids = tokenizer(read_text(path))["input_ids"]
            if len(ids) >= length:
                picked.append((str(path.relative_to(root)), ids[:length]))
                break
    return picked


def _new_tokens(row: torch.Tensor, prompt_width: int, eos: set[int]) -> list[int]:
    """New tokens of one output row, up to and including the first EOS."""
    out = []
    for t in row[prompt_width:].tolist():
        out.append(t)
        if t in eos:
            break
    return out


def time_batch(model, input_ids, attention_mask, args, eos, pad, draft_tokens: list[int]):
    """Plain greedy and MTP generate (for each draft count k) on the same batch, interleaved, --repeats times.

    Returns {"plain" | k: (best seconds, rows of new tokens, MTPStats or None)}."""
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=pad)
    if attention_mask is not None:
        kw["attention_mask"] = attention_mask
    width = input_ids.shape[1]
    best = {}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for k in ["plain"] + draft_tokens:
                extra = {"use_mtp": False} if k == "plain" else {"use_mtp": True, "mtp_draft_tokens": k}
                t0 = clock(args.device)
                out = model.generate(input_ids, **kw, **extra)
                dt = clock(args.device) - t0
                rows = [_new_tokens(r, width, eos) for r in out]
                stats = None if k == "plain" else model.last_mtp_stats
                if k not in best or dt < best[k][0]:
                    best[k] = (dt, rows, stats)
    return best


def step_breakdown(model, prompts, args, pad, draft_tokens: list[int]) -> dict:
    """Where a decoding step's time goes: forward hooks time the main decoder, the MTP block and lm_head over all
    prompts (batch 1), for plain greedy and each k. Per main-model forward (= one plain step or one MTP step), in ms."""
    import time

    totals: dict[str, float] = {}
    calls: dict[str, int] = {}

    def hook(module, name):
        def pre(*_a, **_k):
            module._bench_t0 = time.perf_counter()

        def post(*_a, **_k):
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - module._bench_t0
            calls[name] = calls.get(name, 0) + 1

        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    handles = hook(model.model, "main decoder") + hook(model.lm_head, "lm_head")
    handles += hook(model.model.mtp_layers[0], "MTP block")
    out = {}
    try:
        with torch.inference_mode():
            for k in ["plain"] + draft_tokens:
                extra = {"use_mtp": False} if k == "plain" else {"use_mtp": True, "mtp_draft_tokens": k}
                totals.clear()
                calls.clear()
                tokens, t0 = 0, time.perf_counter()
                for _, ids in prompts:
                    x = torch.tensor([ids], device=args.device)
                    y = model.generate(x, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=pad,
                                       **extra)
                    tokens += y.shape[1] - x.shape[1]
                wall = time.perf_counter() - t0
                steps = calls.get("main decoder", 1)
                parts = {name: 1e3 * t / steps for name, t in totals.items()}
                parts["rest (generate loop, masks, sampling)"] = 1e3 * wall / steps - sum(parts.values())
                out[str(k)] = {"tokens": tokens, "main_forwards": steps, "ms_per_main_forward": 1e3 * wall / steps,
                               "tokens_per_main_forward": tokens / steps, "parts_ms": parts, "calls": dict(calls)}
    finally:
        for h in handles:
            h.remove()
    plain = out["plain"]
    for k, b in out.items():
        if k == "plain":
            continue
        # The best a speculative step could cost if verifying k + 1 tokens cost no more than one plain step: a plain
        # step plus what drafting adds (the MTP block forwards and their lm_head calls).
        draft_ms = b["parts_ms"].get("MTP block", 0.0) + max(b["parts_ms"]["lm_head"] - plain["parts_ms"]["lm_head"], 0.0)
        b["free_verify_ms_per_step"] = plain["ms_per_main_forward"] + draft_ms
        b["speedup_bound_free_verify"] = (b["tokens_per_main_forward"] * plain["ms_per_main_forward"]
                                          / b["free_verify_ms_per_step"])
        b["speedup_from_breakdown"] = (b["tokens_per_main_forward"] * plain["ms_per_main_forward"]
                                       / b["ms_per_main_forward"])
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=str(REPO_ROOT / "runs" / "demo" / "final"))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help="batch size of the left-padded extra row (0: skip it)")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats per prompt (best kept)")
    p.add_argument("--draft-tokens", default="1",
                   help="comma-separated MTP draft counts per step (generate(mtp_draft_tokens=k)); the first is the "
                        "headline and the batch-N row; 1 = the trained MTP depth of V3")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--breakdown", action="store_true",
                   help="also time the parts of a step (main decoder, MTP block, lm_head, rest) with forward hooks")
    p.add_argument("--json-out", default=None, help="default: benchmarks/results/mtp_speedup_<device>.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        print(f"mtp_speedup: no trained model at {model_dir} (run `make demo` first, or pass --model-dir)",
              file=sys.stderr)
        sys.exit(MISSING_MODEL_EXIT)
    harness.setup(args.device, args.threads)
    from transformers import AutoTokenizer

    from modeling_deepseek import DeepseekForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = DeepseekForCausalLM.from_pretrained(str(model_dir), dtype=DTYPES[args.dtype]).to(args.device).eval()
    if model.config.num_nextn_predict_layers < 1:
        print(f"mtp_speedup: {model_dir} has no MTP module (num_nextn_predict_layers=0)", file=sys.stderr)
        sys.exit(MISSING_MODEL_EXIT)
    eos_id = model.generation_config.eos_token_id or tokenizer.eos_token_id
    eos = set(eos_id if isinstance(eos_id, list) else [eos_id])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos))
    prompts = stdlib_prompts(tokenizer, args.num_prompts, args.prompt_tokens)
    json_out = Path(args.json_out or RESULTS_DIR / f"mtp_speedup_{args.device}.json")
    report = {
        **harness.report_head("mtp_speedup", args.device),
        "model_dir": str(model_dir),
        "model": {k: getattr(model.config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                         "n_routed_experts", "num_experts_per_tok", "vocab_size",
                                                         "num_nextn_predict_layers")},
        "settings": {"device": args.device, "dtype": args.dtype, "prompt_tokens": args.prompt_tokens,
                     "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
                     "threads": torch.get_num_threads(), "greedy": True},
        "prompts": [p for p, _ in prompts],
        "rows": [],
    }
    # warm-up (kernels, allocator): one short run of each
    warm = torch.tensor([prompts[0][1]], device=args.device)
    with torch.inference_mode():
        model.generate(warm, max_new_tokens=8, do_sample=False, pad_token_id=pad)
        model.generate(warm, max_new_tokens=8, do_sample=False, pad_token_id=pad, use_mtp=True)

    draft_tokens = [int(k) for k in args.draft_tokens.split(",") if k]
    report["settings"]["draft_tokens"] = draft_tokens

    # batch 1
    per_prompt = {k: [] for k in draft_tokens}
    for path, ids in prompts:
        best = time_batch(model, torch.tensor([ids], device=args.device), None, args, eos, pad, draft_tokens)
        plain_s, plain_rows, _ = best["plain"]
        line = f"{path:40s} plain {len(plain_rows[0]) / plain_s:7.1f} tok/s"
        for k in draft_tokens:
            mtp_s, mtp_rows, stats = best[k]
            per_prompt[k].append({"prompt": path, "plain_s": plain_s, "mtp_s": mtp_s, "new_tokens": len(plain_rows[0]),
                                  "mtp_new_tokens": len(mtp_rows[0]), "identical": plain_rows == mtp_rows,
                                  "drafted": stats.drafted, "accepted": stats.accepted, "steps": stats.steps,
                                  "batch": 1})
            line += (f" | k={k}: {len(mtp_rows[0]) / mtp_s:7.1f} tok/s, accept {stats.acceptance_rate:.2f}, "
                     f"identical {plain_rows == mtp_rows}")
        print(line, flush=True)
    report["per_prompt"] = {str(k): v for k, v in per_prompt.items()}
    for k in draft_tokens:
        report["rows"].append(_row(f"batch 1, k={k}", per_prompt[k], k))

    # batch N, left padding, ragged prompt lengths
    if args.batch > 1:
        chosen = prompts[: args.batch]
        lengths = [max(8, args.prompt_tokens - 8 * i) for i in range(len(chosen))]
        width = max(lengths)
        input_ids = torch.full((len(chosen), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        for r, ((_, ids), n) in enumerate(zip(chosen, lengths)):
            input_ids[r, width - n:] = torch.tensor(ids[:n])
            mask[r, width - n:] = 1
        best = time_batch(model, input_ids.to(args.device), mask.to(args.device), args, eos, pad, draft_tokens[:1])
        plain_s, plain_rows, _ = best["plain"]
        k = draft_tokens[0]
        mtp_s, mtp_rows, stats = best[k]
        entry = [{"plain_s": plain_s, "mtp_s": mtp_s, "new_tokens": sum(len(r) for r in plain_rows),
                  "mtp_new_tokens": sum(len(r) for r in mtp_rows), "identical": plain_rows == mtp_rows,
                  "drafted": stats.drafted, "accepted": stats.accepted, "steps": stats.steps,
                  "batch": len(chosen)}]
        report["batch_prompt_lengths"] = lengths
        report["rows"].append(_row(f"batch {len(chosen)}, k={k} (left-padded, lengths {lengths})", entry, k))
        print(f"batch {len(chosen)}: plain {entry[0]['new_tokens'] / plain_s:.1f} tok/s  mtp "
              f"{entry[0]['mtp_new_tokens'] / mtp_s:.1f} tok/s  accept {stats.acceptance_rate:.2f}  "
              f"identical {plain_rows == mtp_rows}", flush=True)

    if args.breakdown:
        report["breakdown"] = step_breakdown(model, prompts, args, pad, draft_tokens)

    b1 = report["rows"][0]  # batch 1 with the default draft count (the first of --draft-tokens)
    report["target"] = {"what": f"batch-1 speedup >= {TARGET_SPEEDUP}x at acceptance >= {TARGET_ACCEPTANCE} "
                                f"(k={b1['draft_tokens']})",
                        "speedup": b1["speedup"], "acceptance": b1["acceptance_rate"],
                        "met": b1["speedup"] >= TARGET_SPEEDUP and b1["acceptance_rate"] >= TARGET_ACCEPTANCE}
    harness.write_json(json_out, report)
    print(render_table(report))
    print(f"wrote {json_out}")
    return report


def _row(name: str, entries: list[dict], k: int) -> dict:
    plain_s = sum(e["plain_s"] for e in entries)
    mtp_s = sum(e["mtp_s"] for e in entries)
    plain_tok = sum(e["new_tokens"] for e in entries)
    mtp_tok = sum(e["mtp_new_tokens"] for e in entries)
    drafted = sum(e["drafted"] for e in entries)
    accepted = sum(e["accepted"] for e in entries)
    plain_tps, mtp_tps = plain_tok / plain_s, mtp_tok / mtp_s
    row_steps = sum(e["steps"] * e["batch"] for e in entries)  # MTP steps times rows decoded by each
    return {"name": name, "draft_tokens": k, "tokens_per_step": mtp_tok / row_steps if row_steps else None,
            "plain_tok_s": plain_tps, "mtp_tok_s": mtp_tps, "speedup": mtp_tps / plain_tps,
            "acceptance_rate": accepted / drafted if drafted else 0.0, "drafted": drafted, "accepted": accepted,
            "new_tokens": plain_tok, "identical": all(e["identical"] for e in entries),
            "identical_count": f"{sum(e['identical'] for e in entries)}/{len(entries)}"}


def render_table(report) -> str:
    headers = ["run", "plain greedy tok/s", "MTP tok/s", "speedup", "acceptance", "new tokens per MTP step and row",
               "new tokens", "greedy outputs identical"]
    rows = [[r["name"], r["plain_tok_s"], r["mtp_tok_s"], f"{r['speedup']:.2f}x", f"{r['acceptance_rate']:.3f}",
             r.get("tokens_per_step"), str(r["new_tokens"]), "yes" if r["identical"] else f"NO ({r['identical_count']})"]
            for r in report["rows"]]
    out = harness.markdown_table(headers, rows)
    t = report.get("target")
    if t:
        out += (f"\n\ntarget: {t['what']}: measured {t['speedup']:.2f}x at {t['acceptance']:.3f} -> "
                f"{'met' if t['met'] else 'MISSED'}")
    if report.get("breakdown"):
        names = ["main decoder", "MTP block", "lm_head", "rest (generate loop, masks, sampling)"]
        def bound(b, key):
            return f"{b[key]:.2f}x" if key in b else "-"

        rows = [["plain greedy" if k == "plain" else f"MTP k={k}", b["ms_per_main_forward"],
                 b["tokens_per_main_forward"]] + [b["parts_ms"].get(n, 0.0) for n in names]
                + [bound(b, "speedup_from_breakdown"), bound(b, "speedup_bound_free_verify")]
                for k, b in report["breakdown"].items()]
        out += ("\n\nStep breakdown (batch 1, all prompts; a separate pass timed with forward hooks, not the runs of the table above; "
                "ms per main-model forward). Bound: the speedup if verifying k+1 tokens cost no more than a plain step, "
                "i.e. tokens per step x plain ms / (plain ms + MTP block ms + the extra lm_head ms of the drafts):\n\n"
                + harness.markdown_table(["decoding", "ms per step", "new tokens per step"] + [f"{n} ms" for n in names]
                                        + ["speedup (this pass)", "bound: free verification"], rows))
    return out


def render_section(report) -> str:
    """This benchmark's RESULTS.md section from its report."""
    s = report["settings"]
    head = harness.section_head(f"MTP self-speculative decoding speedup ({s['device']}, {s['dtype']})", report)
    return "\n".join(head + [
        f"Model: `{report['model_dir']}` ({harness.config_line(report['model'])}). Prompts: the first {s['prompt_tokens']} "
        f"tokens of {len(report['prompts'])} stdlib files ({', '.join(report['prompts'])}); greedy, "
        f"max_new_tokens {s['max_new_tokens']}, best of {s['repeats']} per prompt, plain and MTP interleaved; "
        f"MTP drafts per step k = {s.get('draft_tokens', [1])} (`generate(use_mtp=True, mtp_draft_tokens=k)`; k=1 is "
        "the trained depth, larger k chain the MTP module on its own output); "
        f"{s['threads']} torch threads.",
        "",
        render_table(report),
    ])


def render_missing(model_dir: str) -> str:
    """The section while no trained model exists (the benchmark exits with status 2)."""
    return "\n".join([
        "## MTP self-speculative decoding speedup",
        "",
        f"Not measured: no trained model at `{model_dir}` when `python -m benchmarks.run` ran (the benchmark exits "
        "with status 2). Train the demo model (`make demo`), then run `python -m benchmarks.mtp_speedup`.",
    ])


if __name__ == "__main__":
    main()
