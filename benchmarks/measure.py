"""What the benchmarks measure with: a synchronised clock, medians and percentiles, and the peak memory of a block."""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def clock(device: str) -> float:
    """perf_counter after the device's queued work has finished (CUDA kernels run asynchronously)."""
    sync(device)
    return time.perf_counter()


def median(values):
    return statistics.median(values) if values else float("nan")


def percentile(values, q: float):
    """The value at quantile `q` (0 to 1) of `values`, nearest rank."""
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


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
