"""``python -m deq_ext.bench``: run every section, print the report, write JSON and the plot."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from typing import Any, Optional

import torch

from .active import bench_active_fraction
from .bandwidth import bench_bandwidth
from .config import build_parser, resolve_config
from .env import load_average, machine_busy, progress, provenance, write_json
from .limits import add_limits
from .plot import plot_active_fraction
from .problem import Problem
from .report import format_table
from .solves import SOLVER_EXT, SOLVER_TD, bench_solvers, ratio_spreads, solver_ratios


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the benchmark, print the table, optionally write JSON and a PNG; returns the results."""
    args = sys.argv[1:] if argv is None else list(argv)
    cfg = resolve_config(build_parser().parse_args(args))
    device = cfg.torch_device
    torch.manual_seed(cfg.seed)
    problem = Problem(cfg)
    results: dict[str, Any] = provenance(device, "python -m deq_ext.bench", args)
    results["config"] = {k: v for k, v in asdict(cfg).items() if k != "bw"}
    results["problem"] = {**problem.describe(), "rho_min": cfg.rho_min, "rho_max": cfg.rho_max}
    t0 = time.perf_counter()
    skipped_rows: dict[str, str] = {}
    results["solves"] = bench_solvers(cfg, problem, skipped=skipped_rows)
    results["skipped_solvers"] = skipped_rows
    results["ratios"] = solver_ratios(results["solves"])
    results["ratio_spreads"] = ratio_spreads(results["solves"])
    results["bandwidth"] = bench_bandwidth(cfg) if cfg.bandwidth else None
    add_limits(results["solves"], results["ratios"], results["bandwidth"], SOLVER_EXT, SOLVER_TD)
    results["active_fraction"] = bench_active_fraction(cfg) if cfg.sweep else None
    results["wall_s"] = time.perf_counter() - t0
    results["load_average_end"] = load_average()
    # Other work on the machine skews every timing: the report says so.
    results["busy"] = machine_busy(results["load_average_start"], results["load_average_end"])
    if cfg.plot and results["active_fraction"]:
        why_not = plot_active_fraction(results["active_fraction"],
                                       f"deq_ext.bench on {results['device']}", cfg.plot)
        results["plot"] = cfg.plot if why_not is None else None
        progress(f"wrote {cfg.plot}" if why_not is None else f"plot skipped: {why_not}")
    print(format_table(results), flush=True)
    if cfg.out:
        write_json(results, cfg.out)
        progress(f"wrote {cfg.out}")
    return results


def cli() -> int:
    """Console-script entry point: runs :func:`main` on the command line's arguments."""
    main()
    return 0
