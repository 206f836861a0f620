"""Solver drivers, the solver registry and the ``solve(..., method=)`` entry point."""

from __future__ import annotations

from .anderson import anderson
from .broyden import broyden, broyden_workspace
from .fixed_point import fixed_point
from .registry import SOLVERS, get_solver, register_solver, solve, unregister_solver

__all__ = ["SOLVERS", "anderson", "broyden", "broyden_workspace", "fixed_point", "get_solver",
           "register_solver", "solve", "unregister_solver"]
