"""Measuring: wall-clock timing with device syncs, peak host and GPU memory of a block, other processes' CPU share."""

from __future__ import annotations

import contextlib
import gc
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


class CpuShare:
    """Share of the machine's CPU time that *other* processes used between start() and stop().

    Busy time of all cores (``/proc/stat``) minus this process's own CPU time (its children included,
    e.g. DataLoader workers), over wall time x cores. Near 0: the figures were measured on a quiet machine.
    """

    def __init__(self):
        self._start: tuple[float, float, float] | None = None

    @staticmethod
    def _busy_s() -> float | None:
        try:
            fields = [float(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
        busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal (guest is in user)
        return busy / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_s() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def start(self) -> CpuShare:
        busy = self._busy_s()
        self._start = None if busy is None else (busy, self._own_s(), time.perf_counter())
        return self

    def stop(self) -> float | None:
        busy = self._busy_s()
        if self._start is None or busy is None:
            return None
        busy0, own0, wall0 = self._start
        others = (busy - busy0) - (self._own_s() - own0)
        capacity = (time.perf_counter() - wall0) * (os.cpu_count() or 1)
        return round(min(1.0, max(0.0, others / capacity)), 3) if capacity > 0 else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "times_s": times}


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 0) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf


MB = 2**20


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _lifetime_peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class PeakMemory(contextlib.AbstractContextManager):
    """Peak host RSS and peak GPU memory of a block, absolute and relative to the block's start.

    Host RSS counts this process only (not DataLoader or cache-building worker processes). Where the
    peak mark cannot be reset (not Linux), the process-lifetime peak is reported and marked so.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.result: dict = {}

    def __enter__(self) -> PeakMemory:
        gc.collect()
        self._resettable = _reset_peak_rss()
        current = _status_kb("VmRSS")
        self._rss_start = current * 1024 if current is not None else _lifetime_peak_rss()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._gpu_start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        peak_kb = _status_kb("VmHWM") if self._resettable else None
        peak = peak_kb * 1024 if peak_kb is not None else _lifetime_peak_rss()
        self.result = {
            "peak_rss_mb": round(peak / MB, 1),
            "peak_rss_delta_mb": round(max(0, peak - self._rss_start) / MB, 1),
            "rss_peak_scope": "block" if peak_kb is not None else "process lifetime",
            "peak_gpu_mb": None,
            "peak_gpu_delta_mb": None,
        }
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            gpu_peak = torch.cuda.max_memory_allocated(self.device)
            self.result["peak_gpu_mb"] = round(gpu_peak / MB, 1)
            self.result["peak_gpu_delta_mb"] = round(max(0, gpu_peak - self._gpu_start) / MB, 1)


def larger(a: dict, b: dict) -> dict:
    """Field-by-field maximum of two PeakMemory results."""
    out = dict(a)
    for key, value in b.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value if out.get(key) is None else max(out[key], value)
    return out
