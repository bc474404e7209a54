"""Activation memory of a training step with the memory options and V3's FP8 caching (issue 23), on CPU.

    python -m benchmarks.training_memory --shapes small v3-layer

Shapes: `small` (hub_configs/small: 4 layers, 256 wide, 16 routed experts, MTP, vocab 4096) and `v3-layer`, one
MoE layer at DeepSeek-V3's widths (hidden 7168, q_lora 1536, kv_lora 512, 128 heads of 128 + 64 / 128, experts
of 2048) with fewer experts and a smaller vocabulary than V3's 256 experts and 129,280 tokens (see --v3-*: what fits
the machine), no MTP. Variants, each in a fresh process from the same initialisation:

    fp32           no option
    bf16           torch.autocast(cpu, bfloat16), no option: the reference of both targets
    bf16+<option>  autocast with one memory option (small only), bf16+all with the four
    fp8            convert_to_fp8_training(model, FP8TrainingConfig(backend="reference")): V3's whole recipe
    fp8-no-opts    FP8 GEMMs with their inputs cached in e4m3 only (the recipe before issue 23)

Per variant: the bytes autograd saves for backward in one training forward + loss, per token (unique storages,
parameters excluded: deterministic, unlike RSS on a shared machine; the forward's copies of the weights, autocast's
bf16 casts and FP8's e4m3 weights, reported apart: they scale with the model, not the tokens); the peak memory of one step (forward and
backward, gradients already allocated: the process's VmHWM above its RSS at the step's start); the median
forward + backward time. Targets (issue 23): fp8 <= 0.5x bf16, bf16+all <= 0.7x bf16.
Writes benchmarks/results/training_memory.json and the `training-memory` section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from benchmarks import harness
from benchmarks.harness import REPO_ROOT, RESULTS_DIR, RESULTS_MD
from benchmarks.measure import PeakMemory, median

OPTIONS = ("recompute_norms", "recompute_mla_up_proj", "recompute_swiglu", "chunked_cross_entropy")
FP8_TARGET, BF16_TARGET = 0.5, 0.7
SECTION = "training-memory"


def build_config(spec: dict):
    from modeling_deepseek import DeepseekConfig

    if spec["shape"] == "small":
        return DeepseekConfig.from_pretrained(REPO_ROOT / "hub_configs" / "small")
    return DeepseekConfig(
        vocab_size=spec["v3_vocab"], hidden_size=7168, q_lora_rank=1536, kv_lora_rank=512, num_attention_heads=128,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=1, first_k_dense_replace=0, n_routed_experts=spec["v3_experts"], num_experts_per_tok=2,
        n_group=1, topk_group=1, n_shared_experts=1, num_nextn_predict_layers=0, max_position_embeddings=4096)


def build_variant(spec: dict, variant: str):
    """(model, autocast context, token ids) of one variant, from the spec's seed."""
    from modeling_deepseek import DeepseekForCausalLM
    from quant.fp8_training import FP8TrainingConfig, convert_to_fp8_training

    config = build_config(spec)
    options = set(OPTIONS) if variant.endswith("+all") else {variant.split("+", 1)[1]} if "+" in variant else set()
    for name in options:
        setattr(config, name, True)
    torch.manual_seed(spec["seed"])
    model = DeepseekForCausalLM(config).train()
    if variant.startswith("fp8"):
        off = {name: False for name in OPTIONS} if variant == "fp8-no-opts" else {}
        convert_to_fp8_training(model, FP8TrainingConfig(backend="reference", **off,
                                                         cache_o_proj_input_e5m6=variant == "fp8"))
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if variant.startswith("bf16") else nullcontext
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    ids = torch.randint(3, config.vocab_size, (spec["batch"], spec["seq"]), generator=g)
    return model, ctx, ids


def train_step(model, ctx, ids, hooks=None) -> tuple[float, float]:
    """(seconds, loss) of one forward + backward; the gradients stay allocated."""
    t0 = time.perf_counter()
    with (torch.autograd.graph.saved_tensors_hooks(*hooks) if hooks else nullcontext()), ctx():
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    elapsed = time.perf_counter() - t0
    model.zero_grad(set_to_none=False)  # gradients stay allocated: a step's peak is its own
    return elapsed, loss.item()


def is_weight_copy(t: torch.Tensor, weight_shapes: set) -> bool:
    """Whether a saved tensor is a forward's copy of a weight, which scales with the model, not with the tokens:
    autocast's cast of a parameter (a ToCopy node over the parameter's AccumulateGrad, through views), or an e4m3
    tensor of a parameter's shape (FP8 training's quantized weights, saved inside its autograd functions)."""
    if t.dtype == torch.float8_e4m3fn:
        return tuple(t.shape) in weight_shapes
    node, copied = t.grad_fn, False
    for _ in range(4):
        if node is None or len(node.next_functions) != 1:
            return False
        copied |= type(node).__name__ == "ToCopyBackward0"
        node = node.next_functions[0][0]
        if type(node).__name__ == "AccumulateGrad":
            return copied
    return False


def measure_variant(spec: dict) -> dict:
    """One variant in this (fresh) process: saved bytes, peak memory and step time of forward + backward."""
    harness.setup(threads=spec["threads"])
    variant = spec["variant"]
    model, ctx, ids = build_variant(spec, variant)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weight_shapes = {tuple(p.shape) for p in model.parameters()}
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), is_weight_copy(t, weight_shapes))
        return t

    _, loss = train_step(model, ctx, ids, hooks=(pack, lambda t: t))
    saved = sum(n for ptr, (n, weight) in storages.items() if ptr not in params and not weight)
    weight_copies = sum(n for ptr, (n, weight) in storages.items() if ptr not in params and weight)
    with PeakMemory("cpu") as peak:
        times = [train_step(model, ctx, ids)[0]]
    times += [train_step(model, ctx, ids)[0] for _ in range(spec["steps"] - 1)]
    tokens = spec["batch"] * spec["seq"]
    return {"variant": variant, "saved_bytes": saved, "saved_bytes_per_token": saved / tokens, "tokens": tokens,
            "saved_weight_copy_bytes": weight_copies,
            "peak_step_bytes": peak.bytes, "peak_kind": peak.kind, "step_s": median(times), "times": times,
            "loss": loss, "options_on": sorted(name for name in OPTIONS if getattr(model.config, name))}


def time_variants(spec: dict) -> dict:
    """Median forward + backward time of each of spec["variants"], all in this process with their steps
    interleaved (one step of each per round), so that load from other processes hits every variant alike."""
    harness.setup(threads=spec["threads"])
    built = {v: build_variant(spec, v) for v in spec["variants"]}
    for model, ctx, ids in built.values():
        train_step(model, ctx, ids)  # warm-up
    times = {v: [] for v in built}
    for _ in range(spec["rounds"]):
        for v, (model, ctx, ids) in built.items():
            times[v].append(train_step(model, ctx, ids)[0])
    return {v: median(t) for v, t in times.items()}


def variants_for(shape: str) -> list[str]:
    per_option = [f"bf16+{name}" for name in OPTIONS] if shape == "small" else []
    return ["fp32", "bf16", *per_option, "bf16+all", "fp8-no-opts", "fp8"]


def render(report: dict) -> str:
    lines = harness.section_head("Training memory: recomputation, chunked cross-entropy and V3's FP8 caching (cpu)",
                                 report)
    s = report["settings"]
    lines += ["", "Bytes autograd keeps for backward in one training forward + loss (unique storages, parameters "
              "excluded, and the forward's copies of the weights, autocast's bf16 casts and FP8's e4m3 weights, "
              "shown apart: they scale with the model, not with the tokens), per token; peak memory of one forward + backward with the gradients already allocated "
              f"({report['peak_kind']}); median forward + backward time over {s['steps']} steps (1 for v3-layer). "
              f"Each variant in a fresh process with {s['threads']} torch thread(s), same initialisation, random "
              "tokens. Machine shared with other agents: the times of separate processes are indicative only (the "
              "interleaved timing below is the comparison), the saved bytes are exact.", ""]
    for shape, rows in report["shapes"].items():
        s = report.get("shape_settings", {}).get(shape, report["settings"])  # the run that measured this shape
        ref = rows["bf16"]
        desc = ("`small` (hub_configs/small, vocab 4096, MTP 1)" if shape == "small" else
                f"`v3-layer`: one MoE layer at V3's widths (hidden 7168, q_lora 1536, kv_lora 512, 128 heads, experts "
                f"of 2048), {s['v3_experts']} routed experts (top-2) + 1 shared instead of 256, vocabulary "
                f"{s['v3_vocab']} instead of 129,280, no MTP")
        batch, seq = (s["batch"], s["seq"]) if shape == "small" else (s["v3_batch"], s["v3_seq"])
        lines += [f"**{desc}**, {batch} x {seq} tokens:", "",
                  "| variant | saved for backward / token | vs bf16 | weight copies saved | peak step memory | "
                  "step time (s) | vs bf16 |", "|---|---|---|---|---|---|---|"]
        for name, r in rows.items():
            lines.append(f"| {name} | {r['saved_bytes_per_token'] / 1024:.1f} KiB | "
                         f"{r['saved_bytes'] / ref['saved_bytes']:.2f}x | "
                         f"{r['saved_weight_copy_bytes'] / 2**20:.1f} MiB | {r['peak_step_bytes'] / 2**20:.0f} MiB | "
                         f"{r['step_s']:.2f} | {r['step_s'] / ref['step_s']:.2f}x |")
        fp8 = rows["fp8"]["saved_bytes"] / ref["saved_bytes"]
        bf16_all = rows["bf16+all"]["saved_bytes"] / ref["saved_bytes"]
        timed = {n: r["interleaved_step_s"] for n, r in rows.items() if "interleaved_step_s" in r}
        if timed:
            lines += ["", "Step time with the steps of these variants interleaved in one process (median of "
                      f"{s['steps']} rounds; the cost of the recomputation): " + ", ".join(
                          f"{n} {t:.2f} s ({t / timed['bf16']:.2f}x bf16)" for n, t in timed.items()) + "."]
        lines += ["", f"Targets: fp8 with every option {fp8:.2f}x bf16 (<= {FP8_TARGET}x: "
                  f"{'met' if fp8 <= FP8_TARGET else 'NOT met'}); bf16 with the options {bf16_all:.2f}x "
                  f"(<= {BF16_TARGET}x: {'met' if bf16_all <= BF16_TARGET else 'NOT met'}).", ""]
    if report.get("fp8_loss_runs"):
        lines += render_loss(report["fp8_loss_runs"])
    if report.get("other_commands"):
        lines += ["", "The shapes were measured by separate runs; also: "
                  + "; ".join(f"`{c}`" for c in report["other_commands"]) + "."]
    return "\n".join(lines).rstrip()


def loss_summary(run: dict) -> dict:
    """What the section shows of one benchmarks.fp8_training report: the fp8 run's loss gap to fp32."""
    s = run["settings"]
    return {"seed": s["seed"], "command": run["command"], "steps": s["steps"], "tokens_per_step": s["batch"] * s["seq"],
            "skip_from": s["skip_from"], "gap_fp32": run["gap_summary"]["fp32"], "gap_bf16": run["gap_summary"]["bf16"],
            "final_ema_loss": run["final_ema_loss"], "median_step_s": run["median_step_s"]}


def render_loss(runs: list[dict]) -> list[str]:
    lines = ["", "FP8 training with V3's recipe (every memory option on, o_proj's input in E5M6) against fp32 on the "
             "`small` config, benchmarks.fp8_training: relative gap of the EMA(0.9) training loss, (fp8 - fp32) / "
             "fp32, after the first steps (target: mean and final gap within 0.25%):", "",
             "| seed | steps x tokens | mean gap | gap at the last step | max abs gap | final EMA loss fp32 / fp8 | "
             "step time fp32 / fp8 (s) |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        g, loss, t = r["gap_fp32"], r["final_ema_loss"], r["median_step_s"]
        lines.append(f"| {r['seed']} | {r['steps']} x {r['tokens_per_step']} (gaps from step {r['skip_from']}) | "
                     f"{100 * g['mean_after_skip']:+.3f}% | {100 * g['final']:+.3f}% | "
                     f"{100 * g['max_abs_after_skip']:.3f}% | {loss['fp32']:.4f} / {loss['fp8']:.4f} | "
                     f"{t['fp32']:.2f} / {t['fp8']:.2f} |")
    means = [r["gap_fp32"]["mean_after_skip"] for r in runs]
    finals = [r["gap_fp32"]["final"] for r in runs]
    met = all(abs(v) <= 0.0025 for v in means + finals)
    lines += ["", f"Over the {len(runs)} seeds: mean gap {100 * sum(means) / len(means):+.3f}%, final gap "
              f"{100 * sum(finals) / len(finals):+.3f}%; every seed's mean and final gap within 0.25%: "
              f"{'met' if met else 'NOT met'}. Commands: " + "; ".join(f"`{r['command']}`" for r in runs) + "."]
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["small", "v3-layer"], choices=["small", "v3-layer"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps of the small shape (v3-layer: 1)")
    p.add_argument("--v3-batch", type=int, default=1)
    p.add_argument("--v3-seq", type=int, default=256)
    p.add_argument("--v3-vocab", type=int, default=16384)
    p.add_argument("--v3-experts", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json-out", default=str(RESULTS_DIR / "training_memory.json"))
    p.add_argument("--results-md", default=str(RESULTS_MD), help="'' to leave RESULTS.md alone")
    p.add_argument("--render-only", action="store_true",
                   help="rebuild the section from --json-out (and the reports of --merge and --loss-json)")
    p.add_argument("--merge", nargs="*", default=[], help="with --render-only: reports of other shapes to add")
    p.add_argument("--loss-json", nargs="*", default=[],
                   help="benchmarks.fp8_training reports (one per seed) whose fp8-vs-fp32 loss gaps the section shows")
    args = p.parse_args(argv)
    if args.render_only:
        report = json.loads(Path(args.json_out).read_text())
        for other in args.merge:
            extra = json.loads(Path(other).read_text())
            report["shapes"].update(extra["shapes"])
            report.setdefault("shape_settings", {}).update({shape: extra["settings"] for shape in extra["shapes"]})
            if extra["command"] not in report.setdefault("other_commands", []):
                report["other_commands"].append(extra["command"])
        if args.loss_json:
            report["fp8_loss_runs"] = [loss_summary(json.loads(Path(f).read_text())) for f in args.loss_json]
        harness.write_json(args.json_out, report)
    else:
        report = {"settings": vars(args), **harness.report_head("training_memory"), "shapes": {}}
        for shape in args.shapes:
            rows = {}
            for variant in variants_for(shape):
                v3 = shape == "v3-layer"
                spec = {"shape": shape, "variant": variant, "seed": args.seed, "threads": args.threads,
                        "batch": args.v3_batch if v3 else args.batch, "seq": args.v3_seq if v3 else args.seq,
                        "steps": 1 if v3 else args.steps, "v3_vocab": args.v3_vocab, "v3_experts": args.v3_experts,
                        "label": f"{shape} {variant}"}
                rows[variant] = harness.run_worker(measure_variant, spec)
                r = rows[variant]
                print(f"{shape} {variant}: {r['saved_bytes_per_token'] / 1024:.1f} KiB/token saved, peak "
                      f"{r['peak_step_bytes'] / 2**20:.0f} MiB, {r['step_s']:.2f} s", flush=True)
            if shape == "small":
                timed = harness.run_worker(time_variants, {
                    "shape": shape, "variants": ["bf16", "bf16+all", "fp8-no-opts", "fp8"], "seed": args.seed,
                    "threads": args.threads, "batch": args.batch, "seq": args.seq, "rounds": args.steps,
                    "label": "interleaved timing"})
                for variant, seconds in timed.items():
                    rows[variant]["interleaved_step_s"] = seconds
                print("interleaved step times:", timed, flush=True)
            report["shapes"][shape] = rows
            report["peak_kind"] = next(iter(rows.values()))["peak_kind"]
            harness.write_json(args.json_out, report)
    if args.results_md:
        harness.write_section(SECTION, render(report), args.results_md)
    return report


if __name__ == "__main__":
    main()
