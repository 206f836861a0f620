"""Time per solver iteration against the fraction of samples still active.

Per-sample masks are only worth having if an iteration gets cheaper as samples
converge. For each fraction of active samples this section times, on the
bandwidth section's sizes:

* ``deq_ext passes``: the two fused passes with the converged samples masked out;
* ``reference passes``: the same two passes by the pure-PyTorch twin;
* ``deq_ext iteration``: f on the active rows only (gather, f, scatter) plus the passes,
  i.e. one whole compacted iteration;
* ``torchdeq iteration``: f on every row plus a torchdeq-style step, which cost the same
  at every fraction because the whole batch keeps iterating.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

import deq_ext

from .bandwidth import fused_passes_time, torchdeq_step_time
from .config import Config
from .env import median, progress, time_calls
from .problem import Problem

FRACTIONS = (0.125, 0.25, 0.5, 0.75, 1.0)
QUICK_FRACTIONS = (0.5, 1.0)


def _f_time(problem: Problem, cfg: Config, active: int) -> float:
    """Median seconds of f on the first ``active`` rows, gathered and scattered as the driver does."""
    idx = torch.arange(active, device=cfg.torch_device)
    z = torch.randn(problem.z0.shape, generator=torch.Generator().manual_seed(cfg.seed + 2),
                    dtype=problem.z0.dtype).to(cfg.torch_device)
    out = torch.empty_like(z)

    def body() -> None:
        fz = problem.f(z.index_select(0, idx), problem.x.index_select(0, idx),
                       problem.rho.index_select(0, idx))
        out.index_copy_(0, idx, fz)

    return median(time_calls(cfg.torch_device, body, lambda: None, cfg.bw.reps))


def _active_counts(batch: int, fractions: tuple[float, ...]) -> list[int]:
    """Distinct active-sample counts (at least one) for the requested fractions."""
    return sorted({max(1, round(frac * batch)) for frac in fractions})


def bench_active_fraction(cfg: Config) -> dict[str, Any]:
    """Every curve of the section, one point per active count; milliseconds per iteration."""
    sizes = cfg.bw
    # f on the same (B, D) as the history the passes work on.
    problem = Problem(dataclasses.replace(cfg, batch=sizes.batch, dim=sizes.dim))
    fractions = QUICK_FRACTIONS if cfg.quick else FRACTIONS
    compiled = deq_ext.build_info().get("loaded") and (
        cfg.torch_device.type != "cuda" or deq_ext.build_info().get("cuda"))
    progress("active fraction: torchdeq-style step and f on the whole batch")
    step_s, _ = torchdeq_step_time(cfg, sizes)
    f_all_s = _f_time(problem, cfg, sizes.batch)
    points = []
    for active in _active_counts(sizes.batch, fractions):
        progress(f"active fraction: {active}/{sizes.batch} samples active")
        point: dict[str, Any] = {"active": active, "fraction": active / sizes.batch}
        f_s = _f_time(problem, cfg, active)
        point["f_ms"] = f_s * 1e3
        point["reference_passes_ms"] = fused_passes_time(cfg, sizes, active,
                                                         ops=deq_ext.reference) * 1e3
        if compiled:
            passes_s = fused_passes_time(cfg, sizes, active)
            point["deq_ext_passes_ms"] = passes_s * 1e3
            point["deq_ext_iteration_ms"] = (f_s + passes_s) * 1e3
        point["torchdeq_iteration_ms"] = (f_all_s + step_s) * 1e3
        points.append(point)
    return {"sizes": dataclasses.asdict(sizes), "torchdeq_step_ms": step_s * 1e3,
            "f_all_rows_ms": f_all_s * 1e3, "points": points}
