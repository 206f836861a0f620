"""Batched, per-sample masked (damped) fixed-point iteration: ``z <- z + tau (f(z) - z)``."""

from __future__ import annotations

from typing import Optional

import torch

from ..result import SolverResult
from ._base import (Func, MaskedSolve, run_solve, validate_common, validate_positive,
                    validate_positive_int)


class _FixedPointSolve(MaskedSolve):
    def __init__(self, f: Func, z0: torch.Tensor, *, tau: float, **common) -> None:
        super().__init__(f, z0, **common)
        self.tau = float(tau)

    def step(self) -> None:
        self.ops.fixed_point_step_(self.z, self.g, self.status, self.tau)


def fixed_point(
    f: Func,
    z0: torch.Tensor,
    *,
    inputs: tuple = (),
    compact: Optional[bool] = None,
    max_iter: int = 50,
    tol: float = 1e-3,
    stop_mode: str = "abs",
    tau: float = 1.0,
    per_sample: bool = True,
    return_final: bool = False,
    stall_patience: int = 30,
    diverge_ratio: float = 1e6,
    trace: bool = False,
    stop_early: bool = True,
    check_every: int = 1,
    return_state: bool = False,
    use_reference: bool = False,
) -> SolverResult:
    """Solve ``z = f(z)`` per sample by damped fixed-point iteration.

    ``tau`` in (0, 1] is the damping (1: plain ``z <- f(z)``). The other
    arguments mean the same as for :func:`deq_ext.broyden`.
    """
    validate_common(f, z0, max_iter, tol, stop_mode, stall_patience, diverge_ratio)
    validate_positive_int("check_every", check_every)
    validate_positive("tau", tau, upper=1.0)
    return run_solve(
        _FixedPointSolve, f, z0, return_final, return_state, trace,
        inputs=tuple(inputs), compact=bool(inputs) if compact is None else compact,
        max_iter=max_iter, tol=tol, stop_mode=stop_mode, per_sample=per_sample,
        stall_patience=stall_patience, diverge_ratio=diverge_ratio, stop_early=stop_early,
        check_every=check_every, use_reference=use_reference, tau=tau)
