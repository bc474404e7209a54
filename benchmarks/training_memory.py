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
parameters excluded: deterministic, unlike RSS on a shared machine); the peak memory of one step (forward and
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


def measure_variant(spec: dict) -> dict:
    """One variant in this (fresh) process: saved bytes, peak memory and step time of forward + backward."""
    from modeling_deepseek import DeepseekForCausalLM
    from quant.fp8_training import FP8TrainingConfig, convert_to_fp8_training

    harness.setup(threads=spec["threads"])
    variant = spec["variant"]
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
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def step(hooks=False):
        t0 = time.perf_counter()
        with (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if hooks else nullcontext()), ctx():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        elapsed = time.perf_counter() - t0
        model.zero_grad(set_to_none=False)  # gradients stay allocated: the peak below is the step's own
        return elapsed, loss.item()

    _, loss = step(hooks=True)
    saved = sum(n for ptr, n in storages.items() if ptr not in params)
    with PeakMemory("cpu") as peak:
        times = [step()[0]]
    times += [step()[0] for _ in range(spec["steps"] - 1)]
    tokens = spec["batch"] * spec["seq"]
    return {"variant": variant, "saved_bytes": saved, "saved_bytes_per_token": saved / tokens, "tokens": tokens,
            "peak_step_bytes": peak.bytes, "peak_kind": peak.kind, "step_s": median(times), "times": times,
            "loss": loss, "options_on": sorted(name for name in OPTIONS if getattr(model.config, name))}


def variants_for(shape: str) -> list[str]:
    per_option = [f"bf16+{name}" for name in OPTIONS] if shape == "small" else []
    return ["fp32", "bf16", *per_option, "bf16+all", "fp8-no-opts", "fp8"]


def render(report: dict) -> str:
    lines = harness.section_head("Training memory: recomputation, chunked cross-entropy and V3's FP8 caching (cpu)",
                                 report)
    s = report["settings"]
    lines += ["", "Bytes autograd keeps for backward in one training forward + loss (unique storages, parameters "
              "excluded), per token; peak memory of one forward + backward with the gradients already allocated "
              f"({report['peak_kind']}); median forward + backward time over {s['steps']} steps (1 for v3-layer). "
              "Each variant in a fresh process, same initialisation, random tokens. Machine shared with other "
              "agents: the times are indicative, the saved bytes are exact.", ""]
    for shape, rows in report["shapes"].items():
        ref = rows["bf16"]
        desc = ("`small` (hub_configs/small, vocab 4096, MTP 1)" if shape == "small" else
                f"`v3-layer`: one MoE layer at V3's widths (hidden 7168, q_lora 1536, kv_lora 512, 128 heads, experts "
                f"of 2048), {s['v3_experts']} routed experts (top-2) + 1 shared instead of 256, vocabulary "
                f"{s['v3_vocab']} instead of 129,280, no MTP")
        batch, seq = (s["batch"], s["seq"]) if shape == "small" else (s["v3_batch"], s["v3_seq"])
        lines += [f"**{desc}**, {batch} x {seq} tokens:", "",
                  "| variant | saved for backward / token | vs bf16 | peak step memory | step time (s) | vs bf16 |",
                  "|---|---|---|---|---|---|"]
        for name, r in rows.items():
            lines.append(f"| {name} | {r['saved_bytes_per_token'] / 1024:.1f} KiB | "
                         f"{r['saved_bytes'] / ref['saved_bytes']:.2f}x | {r['peak_step_bytes'] / 2**20:.0f} MiB | "
                         f"{r['step_s']:.2f} | {r['step_s'] / ref['step_s']:.2f}x |")
        fp8 = rows["fp8"]["saved_bytes"] / ref["saved_bytes"]
        bf16_all = rows["bf16+all"]["saved_bytes"] / ref["saved_bytes"]
        lines += ["", f"Targets: fp8 with every option {fp8:.2f}x bf16 (<= {FP8_TARGET}x: "
                  f"{'met' if fp8 <= FP8_TARGET else 'NOT met'}); bf16 with the options {bf16_all:.2f}x "
                  f"(<= {BF16_TARGET}x: {'met' if bf16_all <= BF16_TARGET else 'NOT met'}).", ""]
    return "\n".join(lines).rstrip()


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
    p.add_argument("--render-only", action="store_true")
    args = p.parse_args(argv)
    if args.render_only:
        report = json.loads(Path(args.json_out).read_text())
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
            report["shapes"][shape] = rows
            report["peak_kind"] = next(iter(rows.values()))["peak_kind"]
            harness.write_json(args.json_out, report)
    if args.results_md:
        harness.write_section(SECTION, render(report), args.results_md)
    return report


if __name__ == "__main__":
    main()
