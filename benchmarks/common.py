"""Shared pieces of the benchmarks: the reference model shape, one random checkpoint loaded into both models,
machine description, timing and memory helpers, worker subprocesses and markdown tables.

The peer is transformers' own `DeepseekV3ForCausalLM`. Both models read the very same weights: the peer is built from
a `DeepseekV3Config` with a fixed seed, its random initialisation saved with `save_pretrained` to a folder, and that
folder is loaded by `DeepseekV3ForCausalLM.from_pretrained` (peer) and `DeepseekForCausalLM.from_pretrained` (ours).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# The reference shape ("a 3-layer 512-wide model"), V3-style routing (sigmoid, noaux_tc, group-limited).
REFERENCE_SHAPE = dict(
    vocab_size=4096,
    hidden_size=512,
    num_hidden_layers=3,
    num_attention_heads=8,
    q_lora_rank=192,
    kv_lora_rank=128,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
    intermediate_size=1024,
    moe_intermediate_size=256,
    n_routed_experts=16,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
    max_position_embeddings=8192,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def quiet() -> None:
    """Silence progress bars and the loaders' informational warnings (they would drown the tables)."""
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def peer_config(**overrides):
    from transformers import DeepseekV3Config

    kwargs = dict(REFERENCE_SHAPE, num_mtp_layers=0)
    kwargs.update(overrides)
    return DeepseekV3Config(**kwargs)


def make_checkpoint(path: str | os.PathLike, seed: int = 0, **config_overrides) -> dict:
    """Random weights in transformers' DeepseekV3 format, saved to `path`. Returns the config as a dict.

    Weights come from the peer's own initialisation (normal(0, initializer_range) for linear and expert weights);
    the routers' `e_score_correction_bias` gets small random values so that loading it is exercised too.
    """
    from transformers import DeepseekV3ForCausalLM

    quiet()
    torch.manual_seed(seed)
    config = peer_config(**config_overrides)
    model = DeepseekV3ForCausalLM(config)
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                bias.uniform_(-0.02, 0.02)
    model.save_pretrained(str(path))
    return config.to_dict()


def load_peer(path, dtype: torch.dtype, device: str, **kwargs):
    from transformers import DeepseekV3ForCausalLM

    quiet()
    model = DeepseekV3ForCausalLM.from_pretrained(str(path), dtype=dtype, **kwargs)
    return model.to(device).eval()


def load_ours(path, dtype: torch.dtype, device: str, **config_overrides):
    from modeling_deepseek import DeepseekForCausalLM

    quiet()
    config_overrides.setdefault("num_nextn_predict_layers", 0)
    allow_missing = config_overrides.pop("allow_missing_weights", False)
    model = DeepseekForCausalLM.from_pretrained(
        str(path), dtype=dtype, allow_missing_weights=allow_missing, **config_overrides
    )
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------------------------
# machine, timing, memory
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


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def clock(device: str) -> float:
    sync(device)
    return time.perf_counter()


def median(values):
    return statistics.median(values) if values else float("nan")


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _reset_rss_peak() -> bool:
    """Linux >= 4.0: writing 5 to /proc/self/clear_refs resets VmHWM (the peak RSS) to the current RSS."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back first, so the baseline is honest
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


class PeakMemory:
    """Peak memory added by the code inside the block.

    CUDA: torch.cuda.max_memory_allocated() minus what was allocated at entry. CPU: the peak RSS (VmHWM, reset at
    entry through /proc/self/clear_refs) minus the RSS at entry; where that reset is unavailable, the ru_maxrss
    high-water mark delta, which only sees growth beyond the process's earlier peak (model loading included).
    """

    def __init__(self, device: str):
        self.device = device
        self.bytes = 0
        self.kind = ""

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            self.kind = "cuda max_memory_allocated delta"
        elif _reset_rss_peak():
            self._start = _status_kib("VmRSS") * 1024
            self.kind = "peak RSS delta (VmHWM reset)"
        else:
            self._start = peak_rss_bytes()
            self.kind = "ru_maxrss delta"
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self._start
        elif self.kind.startswith("peak RSS"):
            self.bytes = _status_kib("VmHWM") * 1024 - self._start
        else:
            self.bytes = peak_rss_bytes() - self._start
        return False


# ----------------------------------------------------------------------------------------------------------------
# worker subprocesses and files
def run_worker(module: str, spec: dict, timeout: float | None = None) -> dict:
    """Run `python -m module --worker SPEC_JSON` in a fresh process; the worker writes its result to spec['out']."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", module, "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise RuntimeError(f"worker {module} {spec.get('label', '')} failed (rc {proc.returncode}):\n{tail}")
    return json.loads(Path(spec["out"]).read_text())


def write_results_section(begin: str, end: str, text: str) -> None:
    """Replace the RESULTS.md section between the markers `begin` and `end` with `text` (append it if absent)."""
    md_path = REPO_ROOT / "benchmarks" / "RESULTS.md"
    md = md_path.read_text()
    if begin in md and end in md:
        md = md[: md.index(begin)] + text + md[md.index(end) + len(end):]
    else:
        md = md.rstrip("\n") + "\n\n" + text + "\n"
    md_path.write_text(md)


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


def write_section(name: str, body: str, results_md: Path) -> None:
    """Replace (or append) the section `<!-- BEGIN name -->` ... `<!-- END name -->` of the markdown file `results_md`."""
    from benchmarks.run import replace_section

    text = results_md.read_text() if results_md.exists() else ""
    results_md.write_text(replace_section(text, name, body).rstrip() + "\n")


def write_json(path: str | os.PathLike, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def command_line() -> str:
    args = " ".join(sys.argv[1:])
    module = Path(sys.argv[0]).stem
    return f"python -m benchmarks.{module} {args}".strip()


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


def machine_line(m: dict) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    load = f", load avg at start {m['load_avg_at_start']}" if m.get("load_avg_at_start") else ""
    note = f"; code: {m['code_note']}" if m.get("code_note") else ""
    return (f"{m['nproc']} CPU cores ({m['cpu_model']}, torch threads {m['torch_threads']}){gpu}; "
            f"torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}; git {m['git']}{note}; "
            f"{m['date_utc']}{load}")
