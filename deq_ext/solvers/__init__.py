"""Solver drivers and the ``solve(..., method=)`` entry point."""

from __future__ import annotations

from typing import Callable

import torch

from ..result import SolverResult
from .broyden import broyden

SOLVERS: dict[str, Callable[..., SolverResult]] = {"broyden": broyden}


def solve(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, method: str = "broyden",
          **options) -> SolverResult:
    """Solve ``z = f(z)`` with the named method; ``options`` go to that solver.

    Available methods: the keys of :data:`SOLVERS` (``'broyden'``).
    """
    try:
        solver = SOLVERS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; available: {sorted(SOLVERS)}") from None
    return solver(f, z0, **options)


__all__ = ["SOLVERS", "broyden", "solve"]
