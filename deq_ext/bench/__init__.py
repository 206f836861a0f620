"""Side-by-side benchmark of deq_ext's solvers against torchdeq: ``python -m deq_ext.bench``.

Every section is measured in one run, so that each ratio compares figures taken
on the same machine at the same time:

1. **Solves** (:mod:`.solves`). A batch with heterogeneous convergence
   (:mod:`.problem`: per-sample contraction rho_b from 0.3 to 0.95) is solved by
   deq_ext's compiled solver, by the same solver evaluating f on the whole batch
   (what compaction saves), by the same solver reading the device every 4th
   iteration and never (``check_every=4``, ``stop_early=False``), on CUDA with
   ``graph=True`` (CUDA-graph replay), by the driver on the pure-PyTorch reference twin, and
   by torchdeq. f is wrapped in a timer (CUDA events on a GPU: nothing waits inside the timed
   solve), so each solve splits into the time spent inside f and the solver's own time.
2. **Bandwidth** (:mod:`.bandwidth`). The device copy bandwidth against the bytes
   the two fused passes of one Broyden iteration move, and those passes against one
   torchdeq-style update over the same history. :mod:`.limits` turns it into each solve's
   bandwidth floor, next to the Amdahl limit (the speedup if the solver cost nothing but f).
3. **Active fraction** (:mod:`.active`, plotted by :mod:`.plot`). Time per iteration
   against the fraction of samples still active.

:mod:`.report` prints the result. The project's own performance targets and their verdicts
are not part of this package: ``python -m benchmarks.solver_bench`` (in the repository) runs
this benchmark and checks them.

The names in ``__all__`` are the package's public API (docs/api.md, "Benchmark"): the run
itself, its settings, the benchmark problem, and the clocks, statistics, provenance record
and bandwidth measurements every deq_ext figure is taken with. The submodules are
implementation; import from ``deq_ext.bench``.
"""

from .bandwidth import fused_bytes, fused_passes_time, torchdeq_matvecs, torchdeq_update
from .cli import main
from .config import BandwidthSizes, Config, build_parser, resolve_config
from .env import (
    copy_bandwidth,
    device_name,
    load_average,
    machine_busy,
    median,
    median_index,
    progress,
    provenance,
    ratio,
    spread,
    sync,
    time_calls,
    write_json,
)
from .limits import passes_bytes
from .problem import Problem, TimedF

__all__ = [
    # the run
    "main",
    # its settings
    "BandwidthSizes",
    "Config",
    "build_parser",
    "resolve_config",
    # the benchmark problem
    "Problem",
    "TimedF",
    # clocks and statistics
    "copy_bandwidth",
    "median",
    "median_index",
    "ratio",
    "spread",
    "sync",
    "time_calls",
    # provenance of a recorded figure
    "device_name",
    "load_average",
    "machine_busy",
    "progress",
    "provenance",
    "write_json",
    # Broyden's fused passes and torchdeq's step
    "fused_bytes",
    "fused_passes_time",
    "passes_bytes",
    "torchdeq_matvecs",
    "torchdeq_update",
]
