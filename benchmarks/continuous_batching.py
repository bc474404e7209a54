"""Continuous batching: many requests at once through transformers' paged engine, ours vs transformers' DeepseekV3.

    python -m benchmarks.continuous_batching --requests 32 --min-prompt 256 --max-prompt 2048 --new-tokens 64
    python -m benchmarks.continuous_batching ... --http-requests 16 --clients 8      # + the OpenAI server, client side
    python -m benchmarks.continuous_batching ... --grpo                             # + GRPO step with CB rollouts
    python -m benchmarks.continuous_batching ... --variants ours,ours_fp8           # the FP8 paged latent vs ours
    python -m benchmarks.continuous_batching ... --device cuda --dtype bf16         # on a GPU (benchmarks.gpu_suite)

One random checkpoint in transformers' DeepseekV3 format at the V3-latent shape (the reference shape with
kv_lora_rank 512, qk_rope_head_dim 64: 576 cached values per token and layer), loaded by both models (fp32 on the
CPU by default; --device / --dtype). Every measurement runs in a fresh process per variant, the variants alternating:

- generate_batch: R requests with prompt lengths spread evenly over [min, max] (random tokens), N new tokens each,
  greedy, one call, the same ContinuousBatchingConfig for both (page 256, 512 batch tokens, a cache sized for the
  workload). Generated tokens/s over the call's wall time; per request (record_timestamps) the time to first token
  and the latency from submission; cache bytes per token from the paged cache's allocator; whether both models
  generate the same tokens. `ours_fp8` is ours with latent_cache_dtype="fp8" (e4m3 rows, per-token scales).
- http: `python -m modeling_deepseek.serve` (ours) and `transformers serve` (peer) with --continuous-batching on a
  loopback port, a word-level tokenizer; `--clients` threads of the `openai` client send `--http-requests`
  completions (same prompt lengths, N tokens, temperature 0); requests/s and client-side latency.
- grpo (benchmarks.grpo's worker): trainers.GRPOTrainer with its own rollouts vs with
  use_transformers_continuous_batching=True; EOS disabled in both so every completion has full length.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import grpo, harness, models
from benchmarks.harness import REPO_ROOT, RESULTS_DIR, RESULTS_MD
from benchmarks.measure import median, percentile
from benchmarks.models import DTYPES, REFERENCE_SHAPE

V3_LATENT = {"kv_lora_rank": 512, "qk_rope_head_dim": 64}
VARIANTS = ("peer", "ours")
FP8_VARIANTS = ("ours", "ours_fp8")
PAGE, BATCH_TOKENS = 256, 512


def prompt_lengths(n: int, lo: int, hi: int) -> list[int]:
    return [round(lo + (hi - lo) * i / max(n - 1, 1)) for i in range(n)]


def prompts_for(spec) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, REFERENCE_SHAPE["vocab_size"], (n,), generator=g).tolist()
            for n in prompt_lengths(spec["requests"], spec["min_prompt"], spec["max_prompt"])]


def num_blocks(spec) -> int:
    return spec["requests"] * (-(-(spec["max_prompt"] + spec["new_tokens"]) // PAGE) + 1)


# ----------------------------------------------------------------------------------------------------------------
# workers
def generate_batch_worker(spec: dict) -> dict:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    harness.setup(threads=spec["threads"])
    load = models.load_peer if spec["variant"] == "peer" else models.load_ours
    model = load(spec["checkpoint"], DTYPES[spec["dtype"]], spec["device"])
    fp8 = {"latent_cache_dtype": "fp8"} if spec["variant"] == "ours_fp8" else {}
    prompts = prompts_for(spec)
    gc = GenerationConfig(do_sample=False, max_new_tokens=spec["new_tokens"], eos_token_id=-1, pad_token_id=0)
    # sdpa for both: transformers would switch the peer (not ours) to a flash kernel where one is installed
    cbc = ContinuousBatchingConfig(page_size=PAGE, max_batch_tokens=BATCH_TOKENS, num_blocks=num_blocks(spec),
                                   allow_block_sharing=False, auto_switch_to_flash=False)
    start = time.perf_counter()
    out = model.generate_batch(prompts, generation_config=gc, continuous_batching_config=cbc,
                               record_timestamps=True, persistent_manager=True, **fp8)
    wall = time.perf_counter() - start
    cache = model._cached_continuous_batching_manager.batch_processor.cache
    per_token = sum(a.bytes_per_block / a.tokens_per_page for a in cache.cache_allocators.values())
    model.destroy_cached_continuous_batching_manager()
    results = list(out.values())
    assert all(r.error is None for r in results), [r.error for r in results if r.error]
    return {
        "variant": spec["variant"], "wall_s": wall, "generated": sum(len(r.generated_tokens) for r in results),
        "ttft_s": [r.timestamps[0] - r.created_time for r in results],
        "latency_s": [r.timestamps[-1] - r.created_time for r in results],
        "tokens": [r.generated_tokens for r in results], "cache_bytes_per_token": per_token,
        "allocator": sorted(type(a).__name__ for a in cache.cache_allocators.values()),
    }


def http_worker(spec: dict) -> dict:
    """Start the variant's server on spec["folder"], send the requests from `clients` threads, stop the server."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    harness.setup()
    folder = spec["folder"]
    port = harness.free_port()
    serve = (["-m", "modeling_deepseek.serve"] if spec["variant"] == "ours"
             else ["-m", "transformers.cli.transformers", "serve"])
    cmd = [sys.executable, *serve, folder, "--continuous-batching", "--host", "127.0.0.1", "--port", str(port),
           "--device", "cpu", "--cb-num-blocks", str(num_blocks(spec)), "--cb-block-size", str(PAGE),
           "--cb-max-batch-tokens", str(BATCH_TOKENS), "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": str(spec["threads"])}
    with harness.serving(cmd, port, Path(spec["server_log"]), env):
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=3600)
        texts = [" ".join(f"w{i}" for i in p) for p in prompts_for({**spec, "requests": spec["http_requests"]})]
        # one short request first: the server's warm-up is not the load being measured
        client.completions.create(model=folder, prompt=texts[0][:200], max_tokens=2, temperature=0)

        def one(text):
            t0 = time.perf_counter()
            r = client.completions.create(model=folder, prompt=text, max_tokens=spec["new_tokens"], temperature=0)
            return time.perf_counter() - t0, r.usage.completion_tokens

        start = time.perf_counter()
        with ThreadPoolExecutor(spec["clients"]) as pool:
            done = list(pool.map(one, texts))
        wall = time.perf_counter() - start
    return {"variant": spec["variant"], "wall_s": wall, "requests": len(done),
            "latency_s": [d[0] for d in done], "completion_tokens": [d[1] for d in done]}


def save_served_folder(checkpoint: str, folder: str, variant: str) -> None:
    import shutil

    shutil.copytree(checkpoint, folder)
    if variant == "ours":  # our config.json, so that the folder names our class
        model = models.load_ours(checkpoint, DTYPES["fp32"], "cpu")
        model.save_pretrained(folder)
    grpo.word_tokenizer(REFERENCE_SHAPE["vocab_size"]).save_pretrained(folder)


# ----------------------------------------------------------------------------------------------------------------
def summarize(runs: dict) -> dict:
    best = {v: min(runs[v], key=lambda r: r["wall_s"]) for v in runs}
    return {v: {"tok_s": r["generated"] / r["wall_s"], "wall_s": r["wall_s"], "generated": r["generated"],
                "ttft_p50": percentile(r["ttft_s"], 0.5), "ttft_p95": percentile(r["ttft_s"], 0.95),
                "latency_p50": percentile(r["latency_s"], 0.5), "latency_p95": percentile(r["latency_s"], 0.95),
                "cache_bytes_per_token": r["cache_bytes_per_token"], "allocator": r["allocator"],
                "all_walls": [x["wall_s"] for x in runs[v]]} for v, r in best.items()}


def run_of(settings: dict) -> tuple[str, str]:
    """(device, dtype) of a run (runs from before --device / --dtype were CPU fp32)."""
    return settings.get("device", "cpu"), settings.get("dtype", "fp32")


def section_name(summary: dict) -> str:
    """RESULTS.md section of a run: `continuous-batching` / `continuous-batching-fp8` for CPU fp32, with
    -DEVICE-DTYPE after them otherwise."""
    device, dtype = run_of(summary["settings"])
    name = "continuous-batching" + ("-fp8" if "ours_fp8" in summary["generate_batch"] else "")
    return name if (device, dtype) == ("cpu", "fp32") else f"{name}-{device}-{dtype}"


def render(b: dict) -> str:
    st, cfg, g = b["settings"], b["model_config"], b["generate_batch"]
    device, dtype = run_of(st)
    H, nope, v, rope = (cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"],
                        cfg["qk_rope_head_dim"])
    itemsize = DTYPES[dtype].itemsize
    rebuilt = H * (nope + v + nope + rope) * itemsize  # K/V the peer builds per cached token and layer, every step
    ratio = g["ours"]["tok_s"] / g["peer"]["tok_s"]
    rows = [[name, g[k]["tok_s"], g[k]["wall_s"], g[k]["ttft_p50"], g[k]["ttft_p95"], g[k]["latency_p50"],
             g[k]["latency_p95"], f"{g[k]['cache_bytes_per_token']:,.0f}"]
            for k, name in (("peer", "transformers' DeepseekV3ForCausalLM"), ("ours", "DeepseekForCausalLM"))]
    lines = harness.section_head(
        f"Continuous batching: generate_batch, the OpenAI server, GRPO rollouts ({device}, {dtype})", b,
        f"; load avg at end {b.get('load_avg_at_end')} (the machine was shared with other jobs throughout)") + [
             f"Model (both, one checkpoint): the reference shape with DeepSeek-V3's latent width (kv_lora_rank "
             f"{cfg['kv_lora_rank']}, qk_rope_head_dim {cfg['qk_rope_head_dim']}: {cfg['kv_lora_rank'] + rope} cached "
             f"values per token and layer), {cfg['num_hidden_layers']} layers, {H} heads, random weights, {dtype}; sdpa "
             "attention for both.  ",
             f"Load: {st['requests']} requests submitted together, prompts of {st['min_prompt']} to {st['max_prompt']} "
             f"random tokens (evenly spread), {st['new_tokens']} new tokens each (EOS off), greedy, one "
             f"`generate_batch` call; ContinuousBatchingConfig(page_size={PAGE}, max_batch_tokens={BATCH_TOKENS}, "
             "num_blocks = the workload, no block sharing) for both; each model in a fresh process with "
             f"{st['threads']} torch threads; best of {st['repeats']} round(s).", "",
             harness.markdown_table(["model", "generated tok/s", "wall s", "TTFT p50 s", "TTFT p95 s",
                                    "latency p50 s", "latency p95 s", "paged cache B/token"], rows), "",
             f"Target: ours >= 2x the peer's generated tokens/s; measured **{ratio:.2f}x** "
             f"({'met' if ratio >= 2 else 'MISSED'}). Both engines store the same latent row per token and layer "
             f"(transformers' MLACacheAllocator: {g['ours']['cache_bytes_per_token']:,.0f} B per token over "
             f"{cfg['num_hidden_layers']} layers in {dtype}). The difference is what each step does with it: the peer "
             f"re-expands every cached token of every scheduled request through kv_b_proj ({rebuilt:,} B of per-head "
             "K/V per cached token and layer, built and dropped at every step) and attends with one block-diagonal "
             "mask over all requests' keys; ours attends request by request, decode tokens absorbed over the "
             "latent rows in one padded batch. Same greedy tokens for every request: "
             f"**{'yes' if g['same_tokens'] else 'no'}** ({g['same_tokens_share']:.0%} of requests identical).", ""]
    scaled = b.get("scaled")  # the server and GRPO parts of a smaller run (--scaled-json)
    if scaled:
        b = {**b, "http": scaled.get("http"), "grpo": scaled.get("grpo")}
        b = {k: v for k, v in b.items() if v is not None}
        st = scaled["settings"]
        lines += [f"The server and GRPO parts below come from a scaled-down run (fewer and shorter requests, to fit "
                  f"the session's time on these shared cores): `{scaled['command']}`; machine: "
                  f"{harness.machine_line(scaled['machine'])}. Its own generate_batch, {st['requests']} requests of "
                  f"{st['min_prompt']} to {st['max_prompt']} tokens, {st['new_tokens']} new: ours "
                  f"{scaled['generate_batch']['ours']['tok_s']:.2f} tok/s, peer "
                  f"{scaled['generate_batch']['peer']['tok_s']:.2f} "
                  f"({scaled['generate_batch']['ours']['tok_s'] / scaled['generate_batch']['peer']['tok_s']:.2f}x), "
                  f"same tokens: {'yes' if scaled['generate_batch']['same_tokens'] else 'no'}.", ""]
    if "http" in b:
        h = b["http"]
        lines += ["### Through the OpenAI-compatible server, client side", "",
                  f"`python -m modeling_deepseek.serve DIR --continuous-batching` (ours) and `transformers serve DIR "
                  f"--continuous-batching` (peer), the same --cb-* sizes, on a loopback port; {st['clients']} client "
                  f"threads of the `openai` client send {st['http_requests']} completions (prompts as above, "
                  f"max_tokens {st['new_tokens']}, temperature 0), after one warm-up request.", "",
                  harness.markdown_table(["server", "requests/s", "wall s", "latency p50 s", "latency p95 s",
                                         "completion tokens"],
                                        [[k, h[k]["requests_s"], h[k]["wall_s"], h[k]["latency_p50"],
                                          h[k]["latency_p95"], h[k]["completion_tokens"]] for k in VARIANTS]), "",
                  f"ours / peer requests/s: **{h['ours']['requests_s'] / h['peer']['requests_s']:.2f}x**.", ""]
    if "grpo" in b:
        r = b["grpo"]
        lines += ["### GRPO step: the package's rollouts vs continuous-batching rollouts", "",
                  "`benchmarks.grpo`'s worker, trainers.GRPOTrainer + DeepseekForCausalLM on the reference shape: 8 "
                  f"completions per step (2 prompts x 4) of {st['grpo_new_tokens']} tokens after "
                  f"{st['grpo_prompt_len']}-token prompts; median of 2 steps after 1 warm-up step.", "",
                  harness.markdown_table(["rollouts", "step s", "rollout s", "rest s"],
                                        [[k, r[k]["step_s"], r[k]["generate_s"], r[k]["step_s"] - r[k]["generate_s"]]
                                         for k in ("ours", "ours+cb")]), "",
                  f"Step speedup of continuous-batching rollouts over the package's own: "
                  f"{r['ours']['step_s'] / r['ours+cb']['step_s']:.2f}x (rollout alone "
                  f"{r['ours']['generate_s'] / r['ours+cb']['generate_s']:.2f}x). Every completion has full length in "
                  "both (min_new_tokens in one, EOS off in the other, whose engine cannot apply min_new_tokens); the "
                  "continuous-batching path returns no rollout "
                  "log-probabilities (TRL's branch) and routes in the policy's training mode.", ""]
    lines += b.get("notes", [])
    return "\n".join(lines)


def render_fp8(b: dict) -> str:
    st, cfg, g = b["settings"], b["model_config"], b["generate_batch"]
    device, dtype = run_of(st)
    latent = cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
    rows = [[name, g[k]["tok_s"], g[k]["wall_s"], g[k]["ttft_p50"], g[k]["ttft_p95"], g[k]["latency_p50"],
             g[k]["latency_p95"], f"{g[k]['cache_bytes_per_token']:,.0f}", ", ".join(g[k]["allocator"])]
            for k, name in (("ours", f"ours, {dtype} latent"), ("ours_fp8", 'ours, latent_cache_dtype="fp8"'))]
    per_layer = g["ours_fp8"]["cache_bytes_per_token"] / cfg["num_hidden_layers"]
    return "\n".join(harness.section_head(
        f"Continuous batching with the FP8 paged latent ({device}, {dtype} model)", b,
        f"; load avg at end {b.get('load_avg_at_end')}") + [
        f"Model: as in the section above (one random checkpoint at the reference shape with V3's latent width, "
        f"{cfg['num_hidden_layers']} layers, {dtype}, sdpa); the same load: {st['requests']} requests, prompts of "
        f"{st['min_prompt']} to {st['max_prompt']} tokens, {st['new_tokens']} new tokens each, greedy, one "
        f"`generate_batch` call, ContinuousBatchingConfig(page_size={PAGE}, max_batch_tokens={BATCH_TOKENS}, "
        f"num_blocks = the workload, no block sharing); each variant in a fresh process with {st['threads']} torch "
        f"threads; best of {st['repeats']} round(s).", "",
        harness.markdown_table(["variant", "generated tok/s", "wall s", "TTFT p50 s", "TTFT p95 s", "latency p50 s",
                               "latency p95 s", "paged cache B/token", "allocator"], rows), "",
        f"The FP8 row holds {latent} e4m3 values and two fp32 scales per token and layer ({per_layer:,.0f} B; "
        f"{latent * 2:,} B in bf16, {latent * 4:,} B in fp32): "
        f"{g['ours']['cache_bytes_per_token'] / g['ours_fp8']['cache_bytes_per_token']:.2f}x fewer bytes per token "
        f"than this {dtype} run's cache. Throughput fp8 / {dtype} latent: "
        f"{g['ours_fp8']['tok_s'] / g['ours']['tok_s']:.2f}x (reads dequantize the rows of every scheduled request "
        f"each step, on the {'CPU' if device == 'cpu' else 'GPU'} in eager PyTorch). Greedy tokens equal to the {dtype} latent's for "
        f"{g['same_tokens_share']:.0%} of requests (random weights: the e4m3 rounding flips near-tied tokens; "
        "tests/test_continuous_batching.py checks the exact tokens against generate(latent_cache_dtype=\"fp8\")).",
        *b.get("notes", [])])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--min-prompt", type=int, default=256)
    p.add_argument("--max-prompt", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"generate_batch: {','.join(VARIANTS)} (the peer comparison) or {','.join(FP8_VARIANTS)} "
                        "(the FP8 paged latent against ours)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--http-requests", type=int, default=0, help="requests through the HTTP server (0: skip)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--grpo", action="store_true", help="also the GRPO step: own rollouts vs continuous batching")
    p.add_argument("--grpo-prompt-len", type=int, default=512)
    p.add_argument("--grpo-new-tokens", type=int, default=128)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--json-out", default=None, help="default: benchmarks/results/continuous_batching_DEVICE_DTYPE"
                   ".json (_fp8_latent.json with the FP8 variants)")
    p.add_argument("--results-md", default=None, help="the markdown file the section goes to (default: "
                   "benchmarks/RESULTS.md when --json-out is in benchmarks/results/)")
    p.add_argument("--render-only", action="store_true", help="rewrite the RESULTS.md section from --json-out")
    p.add_argument("--scaled-json", default=None, help="with --render-only: the server and GRPO parts from this run")
    args = p.parse_args(argv)
    variants = tuple(args.variants.split(","))
    if variants not in (VARIANTS, FP8_VARIANTS):
        p.error(f"--variants must be {','.join(VARIANTS)} or {','.join(FP8_VARIANTS)}, got {args.variants!r}")
    if variants == FP8_VARIANTS and (args.http_requests or args.grpo):
        p.error("--http-requests and --grpo compare with the peer: run them with the default --variants")
    if args.json_out is None:
        name = f"continuous_batching_{args.device}_{args.dtype}" + ("_fp8_latent" if variants == FP8_VARIANTS else "")
        args.json_out = str(RESULTS_DIR / f"{name}.json")
    if args.render_only:
        summary = json.loads(Path(args.json_out).read_text())
        if args.scaled_json:
            summary["scaled"] = json.loads(Path(args.scaled_json).read_text())
        write_section(summary, Path(args.results_md or RESULTS_MD))
        return {}

    if args.device == "cuda" and (args.http_requests or args.grpo):
        p.error("--http-requests and --grpo run on the CPU only")
    harness.setup(args.device, args.threads)  # the threads the machine line reports; the workers set their own
    summary = {**harness.report_head("continuous_batching", args.device), "settings": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(Path(tmp) / "ckpt")
        summary["model_config"] = models.make_checkpoint(ckpt, **V3_LATENT)
        base = dict(checkpoint=ckpt, requests=args.requests, min_prompt=args.min_prompt, max_prompt=args.max_prompt,
                    new_tokens=args.new_tokens, threads=args.threads, http_requests=args.http_requests,
                    clients=args.clients, device=args.device, dtype=args.dtype)
        runs = {v: [] for v in variants}
        for r in range(args.repeats):
            for v in variants:
                print(f"generate_batch {v} round {r} ...", flush=True)
                spec = dict(base, variant=v, label=f"generate_batch {v} round {r}")
                runs[v].append(harness.run_worker(generate_batch_worker, spec, timeout=7200))
        summary["generate_batch"] = summarize(runs)
        reference, other = variants  # same tokens: the second variant's against the first's
        summary["generate_batch"]["same_tokens"] = runs[reference][0]["tokens"] == runs[other][0]["tokens"]
        summary["generate_batch"]["same_tokens_share"] = sum(
            a == b for a, b in zip(runs[reference][0]["tokens"], runs[other][0]["tokens"])) / args.requests
        g = summary["generate_batch"]
        print({v: {k: g[v][k] for k in ("tok_s", "ttft_p50", "latency_p95")} for v in variants}, g["same_tokens"])

        if args.http_requests:
            summary["http"] = {}
            for v in VARIANTS:
                folder = str(Path(tmp) / f"served_{v}")
                save_served_folder(ckpt, folder, v)
                print(f"http {v} ...", flush=True)
                spec = dict(base, variant=v, folder=folder, server_log=str(Path(tmp) / f"http_{v}.server.log"),
                            label=f"http {v}")
                r = harness.run_worker(http_worker, spec, timeout=7200)
                summary["http"][v] = {"requests_s": r["requests"] / r["wall_s"], "wall_s": r["wall_s"],
                                      "latency_p50": percentile(r["latency_s"], 0.5),
                                      "latency_p95": percentile(r["latency_s"], 0.95),
                                      "completion_tokens": sum(r["completion_tokens"])}
            print(summary["http"])

        if args.grpo:
            summary["grpo"] = {}
            for v, cb in (("ours", False), ("ours+cb", True)):
                print(f"grpo {v} ...", flush=True)
                spec = dict(variant="ours", continuous_batching=cb, checkpoint=str(Path(tmp) / "grpo_ckpt"),
                            output_dir=str(Path(tmp) / f"grpo_{v}"), label=f"grpo {v}", vocab_size=REFERENCE_SHAPE["vocab_size"],
                            prompt_len=args.grpo_prompt_len, new_tokens=args.grpo_new_tokens, batch=8, num_generations=4, steps=2, warmup=1,
                            threads=args.threads)
                if not Path(spec["checkpoint"]).exists():
                    models.make_checkpoint(spec["checkpoint"])
                r = harness.run_worker(grpo.worker, spec, timeout=7200)
                summary["grpo"][v] = {"step_s": median(r["step_s"]), "generate_s": median(r["generate_s"]),
                                      "all_step_s": r["step_s"]}
            print(summary["grpo"])
    try:
        summary["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    harness.write_json(args.json_out, summary)
    if args.results_md:
        write_section(summary, Path(args.results_md))
    elif Path(args.json_out).resolve().parent == RESULTS_DIR.resolve():
        write_section(summary, RESULTS_MD)
    return summary


def write_section(summary: dict, results_md: Path) -> None:
    body = render_fp8(summary) if "ours_fp8" in summary["generate_batch"] else render(summary)
    harness.write_section(section_name(summary), body, results_md)


if __name__ == "__main__":
    main()
