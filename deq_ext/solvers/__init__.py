"""Solver drivers and the ``solve(..., method=)`` entry point."""

from __future__ import annotations

from typing import Callable

import torch

from ..result import SolverResult
from .anderson import anderson
from .broyden import broyden, broyden_workspace
from .fixed_point import fixed_point

SOLVERS: dict[str, Callable[..., SolverResult]] = {
    "broyden": broyden,
    "anderson": anderson,
    "fixed_point": fixed_point,
}


def solve(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, method: str = "broyden",
          **options) -> SolverResult:
    """Solve ``z = f(z)`` with the named method; ``options`` go to that solver.

    Available methods: the keys of :data:`SOLVERS` (``'broyden'``, ``'anderson'``,
    ``'fixed_point'``).
    """
    try:
        solver = SOLVERS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; available: {sorted(SOLVERS)}") from None
    return solver(f, z0, **options)


__all__ = ["SOLVERS", "anderson", "broyden", "broyden_workspace", "fixed_point", "solve"]
