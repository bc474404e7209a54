"""The benchmarks' harness: process set-up, the one worker protocol, and the one RESULTS.md section writer.

Every benchmark is a module run from the repository root as `python -m benchmarks.NAME`, and uses this module for:

- set-up: `setup(device, threads, seed)` silences the loaders (their logs would drown the tables), checks the device,
  sets torch's threads and seed; `report_head(name, device)` starts a report with the command that ran and the
  machine it ran on (`machine_info`: cores, CPU, GPU, library versions, git revision, date, load).
- workers: `run_worker(function, spec)` runs a module-level function of a benchmark in a fresh process, or under
  torchrun on `nproc` ranks, with one JSON-able argument, and returns the dict it returned (rank 0's under torchrun).
  A fresh process per measurement keeps one variant's allocator, compiled graphs and peak memory out of the next's.
- sections: `write_section(name, body)` replaces the part of benchmarks/RESULTS.md between `<!-- BEGIN name -->` and
  `<!-- END name -->` (text outside the markers is kept); `section_head(title, report)` gives a section's first lines
  (its title, the command and the machine), `markdown_table` and `fmt` its tables.
- servers: `serving(cmd, port, ...)` runs a server until it answers, `free_port()` a loopback port (tests use both).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
RESULTS_MD = REPO_ROOT / "benchmarks" / "RESULTS.md"

# Set before transformers is imported (it reads them once): progress bars and info logs would drown the tables.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


# ----------------------------------------------------------------------------------------------------------------
# set-up and the machine
def quiet() -> None:
    """Silence progress bars and the loaders' informational warnings (they would drown the tables)."""
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def setup(device: str = "cpu", threads: int | None = None, seed: int | None = None) -> None:
    """A benchmark process's start: quiet loaders, a device that exists, `threads` torch threads (None: torch's own
    choice, one per core) and torch's seed."""
    quiet()
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    if threads:
        torch.set_num_threads(threads)
    if seed is not None:
        torch.manual_seed(seed)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_revision() -> str:
    """Short HEAD commit, and whether modeling_deepseek differs from it ("unknown" outside a git checkout)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0 or not head.stdout.strip():
            return "unknown (no git checkout)"
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "modeling_deepseek"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + (" (modeling_deepseek modified)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info(device: str = "cpu") -> dict:
    import transformers

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    info = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": affinity,
        "cpu_model": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "git": git_revision(),
    }
    if os.environ.get("BENCH_CODE_NOTE"):  # e.g. which proposed diffs the measured code carries
        info["code_note"] = os.environ["BENCH_CODE_NOTE"]
    try:
        info["load_avg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def machine_line(m: dict) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    load = f", load avg at start {m['load_avg_at_start']}" if m.get("load_avg_at_start") else ""
    note = f"; code: {m['code_note']}" if m.get("code_note") else ""
    return (f"{m['nproc']} CPU cores ({m['cpu_model']}, torch threads {m['torch_threads']}){gpu}; "
            f"torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}; git {m['git']}{note}; "
            f"{m['date_utc']}{load}")


def command_line() -> str:
    """The command this process runs, as a benchmark is run: `python -m benchmarks.NAME ARGS`."""
    args = " ".join(sys.argv[1:])
    module = Path(sys.argv[0]).stem
    return f"python -m benchmarks.{module} {args}".strip()


def report_head(benchmark: str, device: str = "cpu") -> dict:
    """The first keys of every report: which benchmark, the command that ran it, the machine it ran on."""
    return {"benchmark": benchmark, "command": command_line(), "machine": machine_info(device)}


def write_json(path: str | os.PathLike, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# the worker protocol
def _module_name(function) -> str:
    """The importable module of `function`: a benchmark run with `python -m` defines its functions in __main__."""
    if function.__module__ != "__main__":
        return function.__module__
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is None:
        raise RuntimeError("a worker's module must be importable: run benchmarks as `python -m benchmarks.NAME` "
                           "from the repository root")
    return spec.name


def run_worker(function, spec: dict, nproc: int = 0, timeout: float | None = None, env: dict | None = None) -> dict:
    """Run `function(spec)` in a fresh Python process and return the dict it returned.

    `function` is a module-level function of a benchmark; `spec` its one argument, JSON-able. With `nproc` > 0 the
    function runs under torchrun on `nproc` local ranks (gloo or NCCL is the function's choice); rank 0 returns the
    result and the other ranks return None. `env` adds environment variables (e.g. OMP_NUM_THREADS). A failing
    worker raises with the tail of its output, labelled with spec["label"] when there is one.
    """
    target = f"{_module_name(function)}:{function.__qualname__}"
    launcher = [sys.executable, "-m"]
    if nproc:
        launcher = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(nproc),
                    "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m"]
    # PYTHONPATH: the checkout this process imports from, also where another install of the package is on the path
    full_env = {**os.environ, **(env or {}),
                "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryDirectory(prefix="bench_worker_") as tmp:
        out = Path(tmp) / "result.json"
        cmd = launcher + ["benchmarks.harness", target, json.dumps(spec), str(out)]
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
            what = "failed" if proc.returncode else "returned no result"
            raise RuntimeError(f"worker {target} {spec.get('label', '')} {what} (rc {proc.returncode}):\n{tail}")
        return json.loads(out.read_text())


def _worker_main(target: str, spec_json: str, out: str) -> None:
    """The worker process's side of run_worker: import the function, call it, write what it returned as JSON."""
    module, _, name = target.partition(":")
    result = getattr(importlib.import_module(module), name)(json.loads(spec_json))
    if result is not None:
        write_json(out, result)


# ----------------------------------------------------------------------------------------------------------------
# the RESULTS.md section writer
def replace_section(text: str, name: str, body: str) -> str:
    """`text` with its section `name` (between `<!-- BEGIN name -->` and `<!-- END name -->`) replaced by `body`,
    or with the section appended where there is none."""
    block = f"<!-- BEGIN {name} -->\n{body.rstrip()}\n<!-- END {name} -->"
    pattern = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->", re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text)
    return text.rstrip() + "\n\n" + block + "\n"


def write_section(name: str, body: str, results_md: str | os.PathLike = RESULTS_MD) -> None:
    """Replace (or append) the section `name` of the markdown file `results_md` (default benchmarks/RESULTS.md)."""
    results_md = Path(results_md)
    text = results_md.read_text() if results_md.exists() else "# Benchmark results\n"
    results_md.parent.mkdir(parents=True, exist_ok=True)
    results_md.write_text(replace_section(text, name, body).rstrip() + "\n")


def output_arguments(parser, json_name: str) -> None:
    """--json-out (default benchmarks/results/JSON_NAME) and --results-md, the two outputs of a benchmark's report."""
    parser.add_argument("--json-out", default=str(RESULTS_DIR / json_name))
    parser.add_argument("--results-md", default=str(RESULTS_MD))


def publish(report: dict, section: str, body: str, args) -> None:
    """Write `report` to args.json_out and `body` as the section `section` of args.results_md, and print it."""
    write_json(args.json_out, report)
    write_section(section, body, args.results_md)
    print(body)


def section_head(title: str, report: dict, machine_note: str = "") -> list[str]:
    """A section's first lines: its title, then the command and the machine that produced the report."""
    return [f"## {title}", "", f"Command: `{report['command']}`  ",
            f"Machine: {machine_line(report['machine'])}{machine_note}  "]


def config_line(config: dict) -> str:
    """A config's fields as `name=value, ...` (a section's model line)."""
    return ", ".join(f"{k}={v}" for k, v in config.items())


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:,.{digits}f}"
    return str(value)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(cmd: list[str], port: int, log_path: Path, env: dict, timeout: float = 600):
    """Run a server command (`transformers serve`, `python -m modeling_deepseek.serve`) from the repository root until
    its /health on the loopback `port` answers; yield the process, and stop it on leaving. A server that exits or does
    not answer within `timeout` seconds raises with the tail of its log."""
    import urllib.request

    log_path = Path(log_path)
    with log_path.open("w") as log:
        server = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"the server exited: {log_path.read_text()[-3000:]}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"no server after {timeout} s: {log_path.read_text()[-3000:]}") from None
                    time.sleep(0.5)
            yield server
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


if __name__ == "__main__":  # a worker process started by run_worker
    _worker_main(*sys.argv[1:])
