"""Options, the per-device session state (copy bandwidth, cache eviction) and the machine record."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import pytest
import torch

from deq_ext.bench import copy_bandwidth, device_name, load_average, provenance

from .cases import SIZE_SETS, Point
from .harness import TIMING, Env

# (MiB, repetitions) of the copy every GB/s figure is compared with: far beyond the caches.
COPY = {("full", "cpu"): (64, 20), ("full", "cuda"): (256, 30),
        ("tiny", "cpu"): (1, 3), ("tiny", "cuda"): (1, 3)}
# MiB read and written before every timed call to evict the caches: twice the 32 MiB L3 of the
# development machine; 256 MiB (five times an H100's L2) on CUDA.
EVICT_MIB = {("full", "cpu"): 64, ("full", "cuda"): 256, ("tiny", "cpu"): 1, ("tiny", "cuda"): 1}

_envs: dict[str, Env] = {}
_start: dict[str, Any] = {}  # provenance taken when the run starts (load average included)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("deq_ext microbenchmarks")
    group.addoption("--micro-sizes", choices=SIZE_SETS, default="full",
                    help="sweep sizes: 'tiny' for a smoke run, 'full' (default) to record")
    group.addoption("--micro-budget", type=float, default=None, metavar="SECONDS",
                    help="time spent on each case (default: 1.0 full, 0.005 tiny); the rounds "
                         "still stay within their limits")
    group.addoption("--micro-threads", type=int, default=0,
                    help="torch.set_num_threads for the run (0, the default: torch's choice)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")
    threads = config.getoption("micro_threads")
    if threads > 0:
        torch.set_num_threads(threads)
    args = [str(a) for a in config.invocation_params.args]
    _start.update(provenance(torch.device("cpu"), "python -m pytest", args))


def _evictor(device: torch.device, mib: int) -> Callable[[], None]:
    """Reads and writes ``mib`` MiB (add_ rather than a fill, which may bypass the caches)."""
    buf = torch.zeros(mib * 2**20 // 4, device=device)
    return lambda: buf.add_(1.0)


@pytest.fixture
def env(point: Point, pytestconfig: pytest.Config) -> Env:
    """The device's shared state, made once per session and device."""
    if point.device not in _envs:
        sizes = pytestconfig.getoption("micro_sizes")
        key = (sizes, point.device)
        mib, reps = COPY[key]
        copy = {**copy_bandwidth(point.torch_device, mib, reps), "mib": mib}
        timing = TIMING[sizes]
        budget = pytestconfig.getoption("micro_budget")
        if budget is not None:
            timing = dataclasses.replace(timing, budget_s=budget)
        _envs[point.device] = Env(copy=copy, evict=_evictor(point.torch_device, EVICT_MIB[key]),
                                  timing=timing)
    return _envs[point.device]


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    """Add what shapes the figures: devices, threads, versions and build, command, copy bandwidth."""
    sizes = config.getoption("micro_sizes")
    machine_info["deq_ext"] = {
        "provenance": dict(_start),
        "cuda_device": device_name(torch.device("cuda")) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "micro_sizes": sizes,
        "copy_bandwidth": {dev: e.copy for dev, e in _envs.items()},
        "evict_mib": {dev: EVICT_MIB[(sizes, dev)] for dev in _envs},
        # Called when the results are saved: the load at the end of the run.
        "load_average_end": load_average(),
    }
