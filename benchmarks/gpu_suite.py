"""Every serving and FP8-training measurement that needs a GPU, in one run that writes its RESULTS.md sections.

    python -m benchmarks.gpu_suite --device cuda                       # on a CUDA machine (H100 / H200)
    python -m benchmarks.gpu_suite --smoke --out-dir /tmp/gpu_suite   # CPU, tiny sizes (the test suite runs this)

Parts, each its own RESULTS.md section (`gpu-suite-...`) and JSON under <out-dir>/results/:

1. decode: benchmarks.decode_compile at batch 1 and batch 32, contexts 128 / 2K / 8K (bf16), ours against
   transformers' DeepseekV3 on the same weights, each eager, compiled (inductor, fullgraph, over the static cache)
   and captured in CUDA graphs (mode="reduce-overhead"): decode ms per step through generate(), tokens/s derived.
   Shape: the reference shape with DeepSeek-V3's latent width (kv_lora_rank 512, qk_rope_head_dim 64).
2. mtp: benchmarks.mtp_speedup on --mtp-model-dir (the `make demo` model: MTP speculation needs trained MTP weights;
   without one the section says it was not measured).
3. fp8-gemm: DeepSeek-V3's block-wise FP8 GEMM (quant.fp8_training_modules.fp8_linear: Fprop, Dgrad and Wgrad in
   e4m3 with 1 x 128 / 128 x 128 scales) forward + backward against bf16 F.linear, on V3's projection shapes, median ms and
   the ratio. Backend "auto": torch's scaled_mm on a Hopper GPU, the reference (dequantize + matmul) elsewhere.

4. fp8-train-step: one training step (forward, backward, AdamW) of one MoE layer at V3's widths (benchmarks.fp8_dispatch
   .V3_LAYER, 8 routed experts, 4K tokens), bf16 weights, against the same model converted to FP8 training: median
   step time and the step's peak memory (benchmarks.measure.PeakMemory: the CUDA allocator's high-water mark).
5. continuous-batching: benchmarks.continuous_batching on the device (generate_batch, 32 requests of 256 to 2,048
   tokens, 64 new each, V3's latent width): ours against transformers' DeepseekV3, then ours with the FP8 paged
   latent (latent_cache_dtype="fp8") against ours: tokens/s, TTFT and latency percentiles, cache bytes per token.

Targets (issue 14): CUDA-graph decode >= 3x the eager peer at batch 1; MTP speculation >= 1.6x at acceptance >= 0.8.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks import continuous_batching, decode_compile, harness, mtp_speedup
from benchmarks.harness import REPO_ROOT
from benchmarks.measure import clock, median

import torch

V3_LATENT = {"kv_lora_rank": 512, "qk_rope_head_dim": 64}
# (name, tokens M, in K, out N) of DeepSeek-V3's projections; experts at 256 tokens each (a balanced 4K-token batch:
# 4096 x 8 routed / 256 experts = 128, doubled for imbalance)
V3_GEMMS = [
    ("q_a_proj", 4096, 7168, 1536),
    ("q_b_proj", 4096, 1536, 24576),
    ("kv_a_proj_with_mqa", 4096, 7168, 576),
    ("kv_b_proj", 4096, 512, 32768),
    ("o_proj", 4096, 16384, 7168),
    ("dense gate/up (one of two)", 4096, 7168, 18432),
    ("expert gate_up", 256, 7168, 4096),
    ("expert down", 256, 2048, 7168),
]
SMOKE_GEMMS = [("smoke", 128, 256, 256)]
TARGET_CUDA_GRAPHS_VS_EAGER_PEER = 3.0


def decode_part(args, batch: int, results: Path, results_md: Path) -> dict:
    variants = ["peer_eager", "peer_compiled", "ours_eager", "ours_compiled"]
    if args.device == "cuda":
        variants += ["peer_cudagraphs", "ours_cudagraphs"]
    argv = ["--device", args.device, "--dtype", args.dtype, "--batch", str(batch), "--variants", ",".join(variants),
            "--label", f"gpu-suite-b{batch}", "--results-md", str(results_md),
            "--json-out", str(results / f"gpu_suite_decode_b{batch}_{args.device}.json")]
    if args.smoke:
        argv += ["--shape", "tiny", "--contexts", "16", "--new-tokens", "2", "--repeats", "1",
                 "--compile-backend", "eager"]
    else:
        argv += ["--contexts", args.contexts, "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
                 "--config-overrides", json.dumps(V3_LATENT)]
    return decode_compile.run(decode_compile.parse_args(argv))


def mtp_part(args, results: Path, results_md: Path) -> dict | None:
    model_dir = Path(args.mtp_model_dir)
    name = f"gpu-suite-mtp-{args.device}"
    if not (model_dir / "config.json").is_file():
        body = (f"## MTP self-speculative decoding speedup ({args.device})\n\nNot measured: no trained model at "
                f"`{model_dir}` (MTP speculation needs trained MTP weights: `make demo`, then "
                f"`python -m benchmarks.gpu_suite --mtp-model-dir runs/demo/final`).")
        report = None
    else:
        argv = ["--device", args.device, "--model-dir", str(model_dir), "--json-out",
                str(results / f"gpu_suite_mtp_{args.device}.json")]
        argv += (["--num-prompts", "1", "--prompt-tokens", "16", "--max-new-tokens", "4", "--repeats", "1",
                  "--batch", "0"] if args.smoke else
                 ["--num-prompts", "8", "--max-new-tokens", "128", "--draft-tokens", "1,2,3", "--batch", "4"])
        report = mtp_speedup.main(argv)
        body = mtp_speedup.render_section(report)
    harness.write_section(name, body, results_md)
    return report


def time_fwd_bwd(fn, x, w, dy, repeats: int, device: str) -> float:
    times = []
    for i in range(repeats + 1):  # the first is a warm-up
        x.grad = w.grad = None
        t0 = clock(device)
        fn(x, w).backward(dy)
        dt = clock(device) - t0
        if i:
            times.append(dt)
    return median(times)


def fp8_gemm_part(args, results: Path, results_md: Path) -> dict:
    import torch.nn.functional as F

    from modeling_deepseek.fp8_gemm import resolve_backend
    from quant.fp8_training import FP8TrainingConfig
    from quant.fp8_training_modules import fp8_linear

    device = torch.device(args.device)
    config = FP8TrainingConfig(backend="auto")
    backend = resolve_backend(config.backend, device)
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    for name, M, K, N in SMOKE_GEMMS if args.smoke else V3_GEMMS:
        x = torch.randn(M, K, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
        w = (torch.randn(N, K, device=device, dtype=torch.bfloat16, generator=g) * K ** -0.5).requires_grad_()
        dy = torch.randn(M, N, device=device, dtype=torch.bfloat16, generator=g)
        bf16 = time_fwd_bwd(F.linear, x, w, dy, args.repeats, args.device)
        fp8 = time_fwd_bwd(lambda a, b: fp8_linear(a, b, None, config), x, w, dy, args.repeats, args.device)
        flops = 3 * 2 * M * K * N  # forward, data gradient, weight gradient
        rows.append({"gemm": name, "M": M, "K": K, "N": N, "bf16_ms": bf16 * 1e3, "fp8_ms": fp8 * 1e3,
                     "fp8_speedup": bf16 / fp8, "bf16_tflops": flops / bf16 / 1e12, "fp8_tflops": flops / fp8 / 1e12})
        print(f"{name}: bf16 {bf16 * 1e3:.3f} ms, fp8 {fp8 * 1e3:.3f} ms", flush=True)
    report = {**harness.report_head("gpu_suite_fp8_gemm", args.device), "backend": backend, "repeats": args.repeats,
              "rows": rows}
    harness.write_json(results / f"gpu_suite_fp8_gemm_{args.device}.json", report)
    body = "\n".join(harness.section_head(
        f"FP8 block-wise GEMM forward + backward vs bf16 ({args.device}, backend {backend})", report) + [
        "y = x W^T with Fprop, Dgrad and Wgrad in e4m3 (activations 1 x 128, weights 128 x 128 scales; "
        "`quant.fp8_training_modules.fp8_linear`, quantization included) against `F.linear` in bf16, forward + "
        "backward, "
        f"median of {args.repeats} after a warm-up; TFLOP/s count the three GEMMs.", "",
        harness.markdown_table(["GEMM", "M x K -> N", "bf16 ms", "FP8 ms", "FP8 speedup", "bf16 TFLOP/s",
                               "FP8 TFLOP/s"],
                              [[r["gemm"], f"{r['M']} x {r['K']} -> {r['N']}", r["bf16_ms"], r["fp8_ms"],
                                f"{r['fp8_speedup']:.2f}x", r["bf16_tflops"], r["fp8_tflops"]] for r in rows])])
    harness.write_section(f"gpu-suite-fp8-gemm-{args.device}", body, results_md)
    return report


def fp8_train_step_part(args, results: Path, results_md: Path) -> dict:
    from benchmarks.fp8_dispatch import V3_LAYER
    from benchmarks.measure import PeakMemory
    from modeling_deepseek import DeepseekConfig, DeepseekForCausalLM
    from quant.fp8_training import FP8TrainingConfig, convert_to_fp8_training

    shape = dict(V3_LAYER, n_routed_experts=8, num_nextn_predict_layers=0)
    tokens = (1, 4096)
    if args.smoke:
        shape.update(hidden_size=256, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=32,
                     v_head_dim=32, moe_intermediate_size=128, intermediate_size=256, vocab_size=512)
        tokens = (1, 64)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], tokens, generator=gen).to(args.device)
    rows = {}
    for mode in ("bf16", "fp8"):
        torch.manual_seed(0)
        with torch.device(args.device):
            model = DeepseekForCausalLM(DeepseekConfig(**shape)).to(torch.bfloat16).train()
        if mode == "fp8":
            convert_to_fp8_training(model, FP8TrainingConfig(backend="auto"))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        times, peaks, kind = [], [], ""
        for i in range(args.repeats + 1):  # the first (optimizer state created) is a warm-up
            opt.zero_grad(set_to_none=True)
            with PeakMemory(args.device) as peak:
                t0 = clock(args.device)
                model(ids, labels=ids).loss.backward()
                opt.step()
                dt = clock(args.device) - t0
            if i:
                times.append(dt)
                peaks.append(peak.bytes)
                kind = peak.kind
        rows[mode] = {"step_ms": median(times) * 1e3, "peak_bytes": max(peaks), "peak_kind": kind,
                      "parameters": sum(p.numel() for p in model.parameters())}
        del model, opt
    report = {**harness.report_head("gpu_suite_fp8_train_step", args.device), "shape": shape, "tokens": tokens,
              "repeats": args.repeats, "rows": rows}
    harness.write_json(results / f"gpu_suite_fp8_train_step_{args.device}.json", report)
    mib, widths = 2 ** 20, "(smoke: small widths)" if args.smoke else "at V3's widths"
    title = f"FP8 training step vs bf16: time and peak memory ({args.device})"
    body = "\n".join(harness.section_head(title, report) + [
        f"One MoE layer {widths} ({harness.config_line(shape)}), bf16 weights, {tokens[0]} x {tokens[1]} "
        f"tokens; forward + backward + AdamW, median of {args.repeats} after a warm-up step. Peak: "
        f"{rows['bf16']['peak_kind']} over the step (weights and optimizer state excluded).", "",
        harness.markdown_table(["run", "step ms", "peak MiB", "vs bf16"],
                               [[m, r["step_ms"], r["peak_bytes"] / mib,
                                 f"{r['peak_bytes'] / rows['bf16']['peak_bytes']:.2f}x"] for m, r in rows.items()])])
    harness.write_section(f"gpu-suite-fp8-train-step-{args.device}", body, results_md)
    return report


def continuous_batching_part(args, results: Path, results_md: Path) -> dict | None:
    from modeling_deepseek.compat import MLA_PAGED_CACHE, PAGED_CACHE_MIN_VERSION, installed_transformers_version

    if not MLA_PAGED_CACHE:
        harness.write_section(f"gpu-suite-continuous-batching-{args.device}", (
            f"## Continuous batching ({args.device})\n\nNot measured: continuous batching of MLA needs transformers >= "
            f"{PAGED_CACHE_MIN_VERSION}; {installed_transformers_version()} is installed."), results_md)
        return None

    load = (["--requests", "4", "--min-prompt", "16", "--max-prompt", "48", "--new-tokens", "4"] if args.smoke else
            ["--requests", str(args.cb_requests), "--min-prompt", "256", "--max-prompt", "2048", "--new-tokens", "64"])
    done = {}
    for variants in (continuous_batching.VARIANTS, continuous_batching.FP8_VARIANTS):
        name = "_".join(variants)
        done[name] = continuous_batching.main([
            *load, "--device", args.device, "--dtype", args.dtype, "--variants", ",".join(variants), "--threads", "1",
            "--json-out", str(results / f"gpu_suite_cb_{name}_{args.device}_{args.dtype}.json"),
            "--results-md", str(results_md)])
    return done


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--contexts", default="128,2048,8192")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batches", default="1,32")
    p.add_argument("--parts", default="decode,mtp,fp8-gemm,fp8-train-step,continuous-batching")
    p.add_argument("--cb-requests", type=int, default=32, help="continuous-batching: requests in the batch")
    p.add_argument("--mtp-model-dir", default=str(REPO_ROOT / "runs" / "demo" / "final"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes, any device: checks that every part runs")
    p.add_argument("--out-dir", default=None, help="RESULTS.md and results/ go there (default: benchmarks/)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    harness.setup(args.device)
    out = Path(args.out_dir) if args.out_dir else REPO_ROOT / "benchmarks"
    results, results_md = out / "results", out / "RESULTS.md"
    results.mkdir(parents=True, exist_ok=True)
    parts = [p for p in args.parts.split(",") if p]
    done = {}
    if "decode" in parts:
        done["decode"] = {b: decode_part(args, int(b), results, results_md) for b in args.batches.split(",")}
        if args.device == "cuda":
            for report in done["decode"].values():
                for row in report["summary"]["rows"]:
                    ms = row["step_ms"]
                    if "ours_cudagraphs" in ms:
                        print(f"batch {report['settings']['batch']} ctx {row['context']}: CUDA graphs vs eager peer "
                              f"{ms['peer_eager'] / ms['ours_cudagraphs']:.2f}x (target >= "
                              f"{TARGET_CUDA_GRAPHS_VS_EAGER_PEER}x at batch 1)", flush=True)
    if "mtp" in parts:
        done["mtp"] = mtp_part(args, results, results_md)
    if "fp8-gemm" in parts:
        done["fp8-gemm"] = fp8_gemm_part(args, results, results_md)
    if "fp8-train-step" in parts:
        done["fp8-train-step"] = fp8_train_step_part(args, results, results_md)
    if "continuous-batching" in parts:
        done["continuous-batching"] = continuous_batching_part(args, results, results_md)
    print(f"wrote {results_md}")
    return done


if __name__ == "__main__":
    main()
