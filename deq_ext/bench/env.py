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
from typing import Any, Callable, Optional, Sequence

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


def median_index(values: list[float]) -> int:
    """Index of the median value (the lower one of an even count): picks the median *run*, so
    that every figure reported for it comes from one and the same run."""
    if not values:
        raise ValueError("median_index of no values")
    order = sorted(range(len(values)), key=values.__getitem__)
    return order[(len(values) - 1) // 2]


def spread(values: Sequence[Optional[float]]) -> dict[str, Any]:
    """Median, min, max and the count of ``values`` (NaN-free; None entries are dropped)."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


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


# Load above these marks means other work shared the machine (see machine_busy).
BUSY_LOAD_START = 0.5  # 1-minute load per core before the run
BUSY_LOAD_EXTRA = 0.5  # 1-minute load per core after the run, beyond the run's own threads


def core_count() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def machine_busy(start: Optional[list[float]], end: Optional[list[float]],
                 threads: Optional[int] = None) -> Optional[str]:
    """Why the machine was too busy for a verdict, or None when it was quiet (or unknown).

    Before the run the 1-minute load should be near zero; after it, near the run's own thread
    count (the run itself loads the machine). Either mark exceeded means other processes shared
    the cores and a timing ratio may be off by more than the effect it measures.
    """
    cores = core_count()
    threads = torch.get_num_threads() if threads is None else threads
    reasons = []
    if start and start[0] > BUSY_LOAD_START * cores:
        reasons.append(f"1-minute load {start[0]} before the run on {cores} cores "
                       f"(> {BUSY_LOAD_START * cores:g})")
    limit = min(threads, cores) + BUSY_LOAD_EXTRA * cores
    if end and end[0] > limit:
        reasons.append(f"1-minute load {end[0]} after the run (> {limit:g}: its {threads} "
                       f"threads plus {BUSY_LOAD_EXTRA:g} per core)")
    return "; ".join(reasons) or None


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache (Linux sysfs), or 32 MiB where it cannot be read."""
    best = 0
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in root.glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * scale)
    return best or 32 * 2**20


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
    return f"{cpu_name()} ({core_count()} cores, {torch.get_num_threads()} torch threads)"


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

