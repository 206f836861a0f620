"""Batched, per-sample masked (damped) fixed-point iteration: ``z <- z + tau (f(z) - z)``."""

from __future__ import annotations

from typing import Any

import torch

from ..result import SolverResult
from ..states import solves_structured_states
from ._base import Func, MaskedSolve, SolveOptions, run_solve, validate_positive


class _FixedPointSolve(MaskedSolve):
    def __init__(self, f: Func, z0: torch.Tensor, opts: SolveOptions, *, tau: float) -> None:
        super().__init__(f, z0, opts)
        self.tau = float(tau)

    def step(self) -> None:
        self.ops.fixed_point_step_(self.z, self.g, self.status, self.tau)


@solves_structured_states
def fixed_point(
    f: Func,
    z0: torch.Tensor,
    *,
    tau: float = 1.0,
    **options: Any,
) -> SolverResult:
    """Solve ``z = f(z)`` per sample by damped fixed-point iteration.

    ``tau`` in (0, 1] is the damping (1: plain ``z <- f(z)``). The other
    arguments mean the same as for :func:`deq_ext.broyden`.
    """
    opts = SolveOptions.of("fixed_point", f, z0, options)
    validate_positive("tau", tau, upper=1.0)
    return run_solve(_FixedPointSolve, f, z0, opts, tau=tau)
