"""pytest glue of the microbenchmarks: parametrization, timing and the extra_info record.

Timing uses pytest-benchmark's pedantic mode with one call per round: ``setup`` restores the
state the op mutates, evicts the caches (reads and writes a buffer several times the size of
the last-level cache) and synchronises the device; the timed target issues the op calls and
synchronises again, because CUDA launches return before the kernels finish. A CUDA figure
therefore includes the launch and one synchronisation (a few microseconds). Caches are
evicted because in a solve f runs between two iterations and leaves little of the solver
state cached; without it the (B, D) state of the small ops (1 MiB per tensor at the CPU base
point) would be read from cache and beat the copy bandwidth.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

from deq_ext.bench import sync

from .cases import DEVICES, Case, Kind, Point, ops_module, specs


@dataclass(frozen=True)
class Timing:
    """How long to time each case: about ``budget_s`` of calls, within the round limits."""

    budget_s: float
    min_rounds: int
    max_rounds: int


@dataclass(frozen=True)
class Env:
    """What every benchmark of one device shares: copy bandwidth, cache eviction, timing."""

    copy: dict[str, float]
    evict: Callable[[], None]
    timing: Timing


TIMING = {
    "full": Timing(budget_s=1.0, min_rounds=5, max_rounds=100),
    "tiny": Timing(budget_s=0.005, min_rounds=1, max_rounds=5),
}

CUDA_MARKS = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def parametrize(metafunc: pytest.Metafunc, kinds: dict[str, Kind], argname: str) -> None:
    """Parametrize ``argname`` (the kind), ``impl`` and ``point`` jointly for every device."""
    sizes = metafunc.config.getoption("micro_sizes")
    params = []
    for device in DEVICES:
        marks = CUDA_MARKS if device == "cuda" else []
        params += [pytest.param(s.name, s.impl, s.point, id=s.id, marks=marks)
                   for s in specs(kinds, sizes, device)]
    metafunc.parametrize(f"{argname},impl,point", params)


def _rounds(setup: Callable[[], None], target: Callable[[], None], timing: Timing) -> int:
    """Rounds filling the time budget, from the second of two untimed calls.

    The first call is the warm-up (first touch of the buffers, lazy CUDA/BLAS setup).
    """
    for _ in range(2):
        setup()
        start = time.perf_counter()
        target()
        took = time.perf_counter() - start
    wanted = math.ceil(timing.budget_s / max(took, 1e-9))
    return max(timing.min_rounds, min(timing.max_rounds, wanted))


def run_case(benchmark: Any, name: str, impl: str, point: Point, build: Callable,
             env: Env) -> None:
    """Build the case, time it and record the bytes, GB/s and copy bandwidth in extra_info."""
    if impl == "torchdeq":
        pytest.importorskip("torchdeq")
    try:
        ops = ops_module(impl, point.device)
    except RuntimeError as exc:  # the compiled extension is what these benchmarks are about
        pytest.fail(str(exc))
    case: Case = build(ops, point)
    device = point.torch_device

    def setup() -> None:
        case.reset()
        env.evict()
        sync(device)

    def target() -> None:
        case.body()
        sync(device)

    benchmark.group = f"{name} {point.id}"
    rounds = 1 if benchmark.disabled else _rounds(setup, target, env.timing)
    benchmark.pedantic(target, setup=setup, rounds=rounds)
    benchmark.extra_info.update(record(name, impl, point, case, env.copy, rounds, benchmark.stats))


def record(name: str, impl: str, point: Point, case: Case, copy: dict[str, float],
           rounds: int, stats: Any) -> dict[str, Any]:
    """The extra_info of one benchmark; the GB/s fields only when it was timed.

    ``gbps`` uses the median time: other processes on a shared machine inflate the mean
    (kept as ``gbps_mean``) far more than the median.
    """
    info: dict[str, Any] = {
        "op": name, "impl": impl, "device": point.device, "B": point.batch, "D": point.dim,
        "m": point.m, "dtype": point.dtype, "converged_fraction": point.converged,
        "active": point.active, "axis": point.axis,
        "bytes": case.nbytes, "bytes_formula": f"itemsize * active * D * ({case.rows})",
        "torch_threads": torch.get_num_threads(), "rounds": rounds,
        "copy_gbps": copy["gbps"],
    }
    if stats is not None:  # None with --benchmark-disable
        mean, median = stats.stats.mean, stats.stats.median
        info["gbps"] = case.nbytes / median / 1e9
        info["gbps_mean"] = case.nbytes / mean / 1e9
        info["fraction_of_copy"] = info["gbps"] / copy["gbps"]
    return info


__all__ = ["Env", "TIMING", "Timing", "parametrize", "record", "run_case"]
