"""Measurement utilities shared by every deq_ext benchmark: clocks, bandwidth, environment, JSON.

Used by ``python -m deq_ext.bench``, the pytest-benchmark microbenchmarks and the
table scripts under ``benchmarks/``, so that every recorded figure carries the same
device description, versions and command.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

import deq_ext


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so that host clocks measure device work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Progress of the benchmarks goes through logging (logger ``deq_ext.bench``), shown on stderr
# by default: stdout carries only the tables. Silence it with
# ``logging.getLogger("deq_ext.bench").setLevel(logging.WARNING)``.
_log = logging.getLogger("deq_ext.bench")
if not _log.handlers:
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("[deq_ext] %(message)s"))
    _log.addHandler(_handler)
    _log.setLevel(logging.INFO)
    _log.propagate = False


def progress(msg: str) -> None:
    """A progress line (logger ``deq_ext.bench``, on stderr by default)."""
    _log.info(msg)


def median(values: list[float]) -> float:
    """The median, NaN for no values."""
    return float(statistics.median(values)) if values else math.nan


def ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    """num / den, or None when either is missing, NaN or the denominator is zero."""
    if num is None or den is None or not den or math.isnan(num) or math.isnan(den):
        return None
    return num / den


def time_calls(device: torch.device, body: Callable[[], object], reset: Callable[[], object],
               reps: int, warmup: int = 2) -> list[float]:
    """Seconds of ``body()`` per call (``reset()`` runs before each call, untimed)."""
    for _ in range(warmup):
        reset()
        body()
    if device.type == "cuda":
        # Events time the device work only; the host does not wait between calls.
        marks = []
        for _ in range(reps):
            reset()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            body()
            end.record()
            marks.append((start, end))
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) / 1e3 for s, e in marks]
    times = []
    for _ in range(reps):
        reset()
        t0 = time.perf_counter()
        body()
        times.append(time.perf_counter() - t0)
    return times


def copy_bandwidth(device: torch.device, mib: int, reps: int) -> dict[str, float]:
    """Bytes read + written per second by ``dst.copy_(src)`` of a ``mib`` MiB tensor."""
    n = mib * 2**20 // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    t = median(time_calls(device, lambda: dst.copy_(src), lambda: None, reps, warmup=3))
    moved = 2 * src.numel() * src.element_size()
    return {"bytes": moved, "seconds": t, "gbps": moved / t / 1e9}


def load_average() -> Optional[list[float]]:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, or what platform knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model with its core and torch thread counts."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 0
    return f"{cpu_name()} ({cores} cores, {torch.get_num_threads()} torch threads)"


def versions() -> dict[str, Any]:
    """Versions of everything that shapes the figures."""
    try:
        from importlib.metadata import version
        td: Optional[str] = version("torchdeq")
    except Exception:  # not installed, or no metadata
        td = None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "deq_ext": deq_ext.__version__,
            "torchdeq": td, "deq_ext_build": deq_ext.build_info()}


def provenance(device: torch.device, program: str, argv: list[str]) -> dict[str, Any]:
    """Where a figure comes from: device, versions, the exact command, time and machine load.

    Every recorded result starts with this record; the load average matters because
    other processes on the machine skew every timing.
    """
    return {
        "device": device_name(device),
        "versions": versions(),
        "command": " ".join([program, *map(shlex.quote, argv)]).strip(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": load_average(),
    }


def write_json(results: dict[str, Any], path: str) -> None:
    """Write ``results`` as indented JSON, creating parent directories."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(results, indent=2, default=str) + "\n")

