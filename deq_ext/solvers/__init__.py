"""Solver drivers, the solver registry and the ``solve(..., method=)`` entry point."""

from __future__ import annotations

from ._base import CUDA_CHUNK, scratch_partials
from .anderson import anderson
from .broyden import broyden, broyden_workspace
from .fixed_point import fixed_point
from .registry import SOLVERS, get_solver, register_solver, solve, unregister_solver

__all__ = ["CUDA_CHUNK", "SOLVERS", "anderson", "broyden", "broyden_workspace", "fixed_point",
           "get_solver", "register_solver", "scratch_partials", "solve", "unregister_solver"]
