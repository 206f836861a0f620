"""The project's run of the solver benchmark: ``python -m deq_ext.bench`` plus the issues' targets.

``python -m benchmarks.solver_bench [options of python -m deq_ext.bench]`` runs the user-facing
benchmark (:func:`deq_ext.bench.main`, same options, same report), then checks the project's
performance targets against the measured ratios and prints a verdict for each. The JSON written
with ``--out`` is the benchmark's record with ``targets`` and ``targets_met`` added, the fields of
the recorded ``benchmarks/results/*-broyden*.json`` files (written when ``python -m deq_ext.bench``
still checked the targets itself); ``python -m benchmarks.summary`` reads both kinds of record.

A run on a busy machine (see :func:`deq_ext.bench.machine_busy`) gets its figures but no verdict.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Optional

import torch

from deq_ext.bench import build_parser, resolve_config, write_json
from deq_ext.bench import main as bench_main

PROGRAM = "python -m benchmarks.solver_bench"


@dataclass(frozen=True)
class Target:
    """One performance target of the issues: ``value <op> threshold`` on ``devices``."""

    name: str
    description: str
    op: str  # "<=" or ">="
    threshold: float
    devices: tuple[str, ...]


TARGETS = (
    Target("solver_overhead_ratio", "deq_ext solver time / torchdeq solver time", "<=", 0.5, ("cpu",)),
    Target("total_speedup", "torchdeq total time / deq_ext total time", ">=", 2.0, ("cpu",)),
    Target("compaction_rows_saved", "1 - f rows with compaction / f rows without", ">=", 0.40,
           ("cpu", "cuda")),
    Target("fused_bandwidth_fraction", "fused passes GB/s / device copy GB/s", ">=", 0.70, ("cuda",)),
    Target("step_speedup", "torchdeq-style step time / fused passes time", ">=", 3.0, ("cuda",)),
)


def check_targets(ratios: dict[str, Optional[float]], bandwidth: Optional[dict[str, Any]],
                  device: torch.device, busy: bool = False) -> list[dict[str, Any]]:
    """Every target with its measured value; ``passed`` is None when it could not be measured,
    or for every target when the machine was ``busy`` (no verdict from a disturbed run)."""
    values: dict[str, Optional[float]] = {
        "solver_overhead_ratio": ratios.get("solver_overhead_ratio"),
        "total_speedup": ratios.get("total_speedup"),
        "compaction_rows_saved": ratios.get("compaction_rows_saved"),
        "fused_bandwidth_fraction": (bandwidth or {}).get("fused", {}).get("fraction_of_copy"),
        "step_speedup": (bandwidth or {}).get("step_speedup"),
    }
    checks = []
    for t in TARGETS:
        v = values[t.name]
        passed = None if v is None or busy else (
            v <= t.threshold if t.op == "<=" else v >= t.threshold)
        checks.append({"name": t.name, "description": t.description, "value": v, "op": t.op,
                       "threshold": t.threshold, "devices": list(t.devices),
                       "applies": device.type in t.devices, "passed": passed})
    return checks


def targets_met(checks: list[dict[str, Any]]) -> Optional[bool]:
    """True when every target that applies on this device passed; None if one was not measured."""
    applicable = [c["passed"] for c in checks if c["applies"]]
    if any(p is None for p in applicable):
        return None
    return all(applicable)


def results_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets of a benchmark record (one written by ``python -m deq_ext.bench``)."""
    device = torch.device("cuda" if str(results["config"]["device"]).startswith("cuda") else "cpu")
    return check_targets(results["ratios"], results.get("bandwidth"), device,
                         busy=results.get("busy") is not None)


def format_targets(results: dict[str, Any]) -> str:
    """The verdict lines printed after the benchmark's report."""
    lines = ["targets"]
    if results.get("busy"):
        lines.append(f"  WARNING: the machine was busy ({results['busy']}); no verdicts")
    for t in results["targets"]:
        verdict = "n/a" if t["passed"] is None else ("PASS" if t["passed"] else "FAIL")
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        scope = "" if t["applies"] else f"  (informational: a target on {'/'.join(t['devices'])} only)"
        lines.append(f"  {t['name']:<26}{value:>8} {t['op']} {t['threshold']:<5g}{verdict:>6}{scope}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the benchmark, add the targets and verdicts, print them, rewrite ``--out``."""
    args = sys.argv[1:] if argv is None else list(argv)
    results = bench_main(args)
    results["command"] = results["command"].replace("python -m deq_ext.bench", PROGRAM, 1)
    results["targets"] = results_targets(results)
    results["targets_met"] = targets_met(results["targets"])
    print("\n" + format_targets(results), flush=True)
    out = resolve_config(build_parser().parse_args(args)).out
    if out:
        write_json(results, out)
    return results


if __name__ == "__main__":
    main()
