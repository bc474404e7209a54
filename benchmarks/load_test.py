"""Load test of the OpenAI-compatible server: many clients at once for a fixed time, good and bad requests mixed.

    python -m benchmarks.load_test --servers ours,peer --clients 32 --duration 120 --bad-share 0.1 --write-results
    python -m benchmarks.load_test --servers ours --duration 20 --warmup 5 --clients 8          # a quick look

One random checkpoint in transformers' DeepseekV3 format (benchmarks.continuous_batching's V3-latent shape), served
with --continuous-batching on a loopback port by `python -m modeling_deepseek.serve` (ours, with --api-key) or
`transformers serve` with transformers' DeepseekV3ForCausalLM (peer), the same --cb-* sizes, a word-level tokenizer
and a generation config whose EOS cannot be generated (every good answer has its max_tokens). For each server:

- `--clients` threads, each with its own keep-alive HTTP connection (http.client), send requests back to back:
  first for --warmup seconds and until each client had a good answer (not counted), then for --duration seconds
  (counted; a request still running at the end is waited for and counted). A good request is a completion with a
  prompt of --min-prompt..--max-prompt random words and --min-tokens..--max-tokens tokens, temperature 0; with
  probability --bad-share, a bad one instead
  (BAD_REQUESTS: no prompt, negative max_tokens, temperature -1, max_tokens over the context, an empty prompt, an
  unknown field, malformed JSON, n=2), which must be a 400 (ours only: transformers' server generates for
  `max_tokens: 10**9` until the request times out, which would measure its hung slots rather than its speed).
- checked: no 5xx, every good request a 200 with its max_tokens of text, every bad one a 400 (ours);
- reported: good requests/s over the counted time, latency p50 / p99 of good requests, the server's memory (RSS of
  its process tree: the HTTP server and the model's process) after the warm-up and at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import harness, models
from benchmarks.continuous_batching import PAGE, V3_LATENT, save_served_folder
from benchmarks.harness import REPO_ROOT, RESULTS_DIR, RESULTS_MD
from benchmarks.measure import percentile

API_KEY = "sk-load-test"
SECTION = "Load test: the OpenAI-compatible server under 32 clients"
BAD_REQUESTS = {  # name: (body changes, or raw bytes), all answered 400 by our server
    "no prompt": {"prompt": None},
    "max_tokens -5": {"max_tokens": -5},
    "temperature -1": {"temperature": -1},
    "max_tokens 10^9": {"max_tokens": 1_000_000_000},
    "empty prompt": {"prompt": ""},
    "unknown field": {"best_answer": True},
    "n 2": {"n": 2},
    "malformed JSON": b'{"prompt": "w5", "max_tokens": ',
}


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of process `pid` and all its descendants (Linux /proc)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return total


def request_for(rng: random.Random, spec: dict, folder: str) -> tuple[str, dict | bytes, int | None]:
    """(kind, body, max_tokens of a good request)."""
    if rng.random() < spec["bad_share"]:
        name = rng.choice(sorted(BAD_REQUESTS))
        change = BAD_REQUESTS[name]
        if isinstance(change, bytes):
            return name, change, None
        body = {"model": folder, "prompt": "w5 w6", "max_tokens": 4, "temperature": 0, **change}
        return name, {k: v for k, v in body.items() if v is not None}, None
    n = rng.randint(spec["min_prompt"], spec["max_prompt"])
    words = " ".join(f"w{rng.randint(3, spec['vocab'] - 1)}" for _ in range(n))
    max_tokens = rng.randint(spec["min_tokens"], spec["max_tokens"])
    return "good", {"model": folder, "prompt": words, "max_tokens": max_tokens, "temperature": 0}, max_tokens


def client_loop(index: int, spec: dict, port: int, folder: str, key: str | None, phases: dict, records: list) -> None:
    import http.client

    rng = random.Random(1000 + index)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    http = http.client.HTTPConnection("127.0.0.1", port, timeout=spec["request_timeout"])  # kept alive
    try:
        while time.monotonic() < phases["end"]:
            kind, body, max_tokens = request_for(rng, spec, folder)
            started = time.monotonic()
            try:
                http.request("POST", "/v1/completions", body if isinstance(body, bytes) else json.dumps(body), headers)
                answer = http.getresponse()
                status, data = answer.status, json.loads(answer.read())
            except (OSError, http.client.HTTPException, ValueError) as error:
                status, data = -1, {"client_error": f"{type(error).__name__}: {error}"}
                http.close()  # reconnects on the next request
            finished = time.monotonic()
            good_answer, error = None, None if status in (200, 400) else json.dumps(data)[:300]
            if kind == "good" and status == 200:
                usage, text = data.get("usage", {}), data["choices"][0]["text"]
                good_answer = usage.get("completion_tokens") == max_tokens and bool(text.strip())
                if not good_answer:  # what came back, for the report, and the request, to ask again alone
                    error = f"max_tokens {max_tokens}, usage {usage}, text {text[:80]!r}"
            records.append({"client": index, "kind": kind, "status": status, "latency_s": finished - started,
                            "counted": started >= phases["start"], "good_answer": good_answer, "error": error,
                            **({"body": body, "text": text, "usage": usage} if good_answer is False else {})})
    except BaseException as error:  # a client that dies is a failure of the benchmark, not a quiet gap in the load
        phases["client_failures"].append(f"client {index}: {type(error).__name__}: {error}")
        raise
    finally:
        http.close()


def serve_worker(spec: dict) -> dict:
    """Start one server, put the load on it, stop it."""
    harness.setup()
    folder, port = spec["folder"], harness.free_port()
    ours = spec["server"] == "ours"
    serve = ["-m", "modeling_deepseek.serve"] if ours else ["-m", "transformers.cli.transformers", "serve"]
    cmd = [sys.executable, *serve, folder, "--continuous-batching", "--host", "127.0.0.1", "--port", str(port),
           "--device", "cpu", "--cb-num-blocks", str(spec["num_blocks"]), "--cb-block-size", str(PAGE),
           "--cb-max-batch-tokens", str(spec["batch_tokens"]), "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": str(spec["threads"])}
    key = API_KEY if ours else None
    if key:
        env["DEEPSEEK_API_KEY"] = key
    with harness.serving(cmd, port, Path(spec["server_log"]), env) as server:
        # Warm-up: --warmup seconds, and until every client had a good answer (the first prefills are the slowest)
        phases = {"start": float("inf"), "end": float("inf"), "client_failures": []}
        records: list = []
        threads = [threading.Thread(target=client_loop, args=(i, spec, port, folder, key, phases, records))
                   for i in range(spec["clients"])]
        warmup_end = time.monotonic() + spec["warmup"]
        for thread in threads:
            thread.start()
        def warm() -> bool:
            answered = {r["client"] for r in list(records) if r["kind"] == "good" and r["status"] == 200}
            return time.monotonic() >= warmup_end and len(answered) == spec["clients"]

        while not warm() and any(thread.is_alive() for thread in threads):
            time.sleep(0.2)
        rss_warm = tree_rss_bytes(server.pid)
        phases["start"] = now = time.monotonic()
        phases["end"] = now + spec["duration"]
        for thread in threads:
            thread.join()
        rss_end = tree_rss_bytes(server.pid)
        last = time.monotonic()
        ask_alone(port, key, records)
        if phases["client_failures"]:
            raise RuntimeError(f"clients failed: {phases['client_failures'][:3]}")
    return {"server": spec["server"], "records": records, "rss_warm": rss_warm, "rss_end": rss_end,
            "counted_s": last - phases["start"]}


def ask_alone(port: int, key: str | None, records: list) -> None:
    """Send each good request whose answer came back short or blank once more, alone on the idle server: greedy
    decoding gives the same tokens, so an equal answer is the model's own (tokens that decode to blank text), and a
    different one is an answer the load lost or cut."""
    import http.client

    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    for record in records:
        if record["good_answer"] is not False:
            continue
        http = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        http.request("POST", "/v1/completions", json.dumps(record["body"]), headers)
        data = json.loads(http.getresponse().read())
        http.close()
        record["same_alone"] = (data["choices"][0]["text"], data.get("usage")) == (record["text"], record["usage"])


def summarize(run: dict) -> dict:
    counted = [r for r in run["records"] if r["counted"]]
    good = [r for r in counted if r["kind"] == "good"]
    bad = [r for r in counted if r["kind"] != "good"]
    latencies = [r["latency_s"] for r in good if r["status"] == 200]
    return {
        "good_requests": len(good), "bad_requests": len(bad),
        "good_requests_s": sum(r["status"] == 200 for r in good) / run["counted_s"],
        "latency_p50": percentile(latencies, 0.5) if latencies else None,
        "latency_p99": percentile(latencies, 0.99) if latencies else None,
        "status_5xx": sum(r["status"] >= 500 for r in counted), "no_answer": sum(r["status"] == -1 for r in counted),
        "good_not_200": sum(r["status"] != 200 for r in good),
        "good_short_or_empty": sum(r["good_answer"] is False and not r["same_alone"] for r in good),
        "blank_as_alone": sum(r["good_answer"] is False and r["same_alone"] for r in good),
        "bad_not_400": sum(r["status"] != 400 for r in bad),
        "bad_kinds": sorted({r["kind"] for r in bad}),
        "errors": sorted({r["error"] for r in counted if r["error"]})[:5],
        "rss_warm_mib": run["rss_warm"] / 2**20, "rss_end_mib": run["rss_end"] / 2**20,
        "rss_growth": run["rss_end"] / run["rss_warm"] - 1, "counted_s": run["counted_s"],
    }


def write_generation_config(folder: str, vocab: int) -> None:
    """Greedy, with an EOS the model cannot produce: every good answer runs to its max_tokens (both servers)."""
    from transformers import GenerationConfig

    GenerationConfig(do_sample=False, bos_token_id=1, eos_token_id=vocab + 1, pad_token_id=0).save_pretrained(folder)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", default="ours", help="comma-separated: ours, peer")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=120.0, help="seconds of counted load per server")
    p.add_argument("--warmup", type=float, default=20.0, help="seconds of load before counting (memory settles)")
    p.add_argument("--bad-share", type=float, default=0.1, help="share of bad requests (each a 400 from ours)")
    p.add_argument("--min-prompt", type=int, default=64)
    p.add_argument("--max-prompt", type=int, default=2048)
    p.add_argument("--min-tokens", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--batch-tokens", type=int, default=512, help="--cb-max-batch-tokens of both servers")
    p.add_argument("--threads", type=int, default=2, help="OMP threads of the servers")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--json-out", default=None)
    p.add_argument("--write-results", action="store_true", help="add / replace the section in benchmarks/RESULTS.md")
    p.add_argument("--render-only", action="store_true", help="only rewrite the section from the saved JSONs")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    servers = args.servers.split(",")
    harness.setup("cpu", args.threads)
    if args.render_only:
        write_results()
        return {}
    report = {**harness.report_head("load_test"), "settings": vars(args), "servers": {},
              "warmup_rule": f"a warm-up of {args.warmup:g} s and until every client had a good answer"}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(Path(tmp) / "ckpt")
        report["model_config"] = config = models.make_checkpoint(ckpt, **V3_LATENT)
        vocab = config["vocab_size"]
        for server in servers:
            folder = str(Path(tmp) / f"served_{server}")
            save_served_folder(ckpt, folder, server)
            write_generation_config(folder, vocab)
            # Bad requests go to ours only: transformers' server takes `max_tokens: 10**9` and generates until the
            # request times out, so that load would measure its hung slots, not its speed.
            spec = dict(vars(args), server=server, folder=folder, vocab=vocab,
                        bad_share=args.bad_share if server == "ours" else 0.0,
                        server_log=str(Path(tmp) / f"{server}.server.log"), label=f"load test {server}",
                        num_blocks=args.clients * (-(-(args.max_prompt + args.max_tokens) // PAGE) + 1))
            print(f"load test: {server} ...", flush=True)
            run = harness.run_worker(serve_worker, spec, timeout=args.warmup + args.duration + 1800)
            report["servers"][server] = summary = summarize(run)
            print(server, json.dumps(summary, indent=1), flush=True)
    if {"ours", "peer"} <= set(servers):
        report["ratio"] = report["servers"]["ours"]["good_requests_s"] / report["servers"]["peer"]["good_requests_s"]
    name = f"load_test_{'_'.join(servers)}_bad{args.bad_share:g}"
    harness.write_json(args.json_out or RESULTS_DIR / f"{name}.json", report)
    if args.write_results:
        write_results()
    return report


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def render(reports: list[dict]) -> str:
    lines = [f"## {SECTION}", "",
             "Ours: `python -m modeling_deepseek.serve DIR --continuous-batching --api-key ...`; peer: `transformers "
             "serve DIR --continuous-batching` with transformers' DeepseekV3ForCausalLM on the same weights and --cb-* "
             "sizes. "
             "Bad requests (BAD_REQUESTS) go to ours only: transformers' server takes `max_tokens: 10**9` and "
             "generates until the request times out. Latencies are client-side, of good requests; RSS is the server's "
             "process tree. The machine was shared with other jobs (load average in the machine line): absolute "
             "figures are several times those of an idle machine.", ""]
    for report in reports:
        s = report["settings"]
        warm = report.get("warmup_rule", f"{s['warmup']:g} s of warm-up")
        lines += [f"Command: `{report['command']}`  ", f"Machine: {harness.machine_line(report['machine'])}  ",
                  f"Load: {s['clients']} clients back to back for {s['duration']:g} s after {warm}; prompts of "
                  f"{s['min_prompt']}-{s['max_prompt']} words, {s['min_tokens']}-{s['max_tokens']} tokens each, "
                  f"temperature 0; {s['bad_share']:.0%} of ours' requests bad.", "",
                  harness.markdown_table(
                      ["server", "good req/s", "p50 s", "p99 s", "good / bad requests", "5xx", "good not 200 or "
                       "short", "bad not 400", "RSS warm / end MiB", "RSS growth"],
                      [[name, harness.fmt(r["good_requests_s"]), harness.fmt(r["latency_p50"]),
                        harness.fmt(r["latency_p99"]), f"{r['good_requests']} / {r['bad_requests']}", r["status_5xx"],
                        r["good_not_200"] + r["good_short_or_empty"], r["bad_not_400"] if r["bad_requests"] else "-",
                        f"{r['rss_warm_mib']:.0f} / {r['rss_end_mib']:.0f}", f"{r['rss_growth']:+.1%}"]
                       for name, r in report["servers"].items()]), ""]
        ours = report["servers"].get("ours")
        if ours is not None:
            clean = ours["status_5xx"] + ours["good_not_200"] + ours["good_short_or_empty"] + ours["no_answer"] == 0
            lines += [f"Targets (ours): no 5xx and every good request answered in full: {verdict(clean)}; every bad "
                      f"request a 400: {verdict(ours['bad_not_400'] == 0)}; RSS at the end within 10% of after the "
                      f"warm-up: {verdict(abs(ours['rss_growth']) <= 0.10)}."]
            if ours.get("blank_as_alone"):
                lines += [f"{ours['blank_as_alone']} good answer(s) came back with every token but blank text, and "
                          "the same when sent again alone on the idle server: the model's own greedy answer (tokens "
                          "that decode to blank), not one the load lost."]
        if "ratio" in report:
            lines += [f"ours / peer good requests/s: **{report['ratio']:.2f}x** (target >= 2x: "
                      f"{verdict(report['ratio'] >= 2)}; the peer's figure rests on "
                      f"{report['servers']['peer']['good_requests']} requests)."]
        lines += [""]
    return "\n".join(lines)


def write_results() -> None:
    """The section, from every load test's JSON in benchmarks/results."""
    reports = [json.loads(p.read_text()) for p in sorted(RESULTS_DIR.glob("load_test_*.json"))]
    harness.write_section(SECTION, render(reports), RESULTS_MD)


if __name__ == "__main__":
    main()
