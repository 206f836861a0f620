"""The named solvers behind ``solve(method=...)`` and the DEQ layer's ``method`` setting.

The three built-in methods are always there; :func:`register_solver` adds user solvers. A
solver is called as ``fn(f, z0, **options)`` with a flat ``(B, ...)`` tensor ``z0`` (structured
states are flattened before it sees them) and must return a
:class:`~deq_ext.result.SolverResult`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..result import SolverResult
from ..states import solves_structured_states
from .anderson import anderson
from .broyden import broyden
from .fixed_point import fixed_point

SolverFn = Callable[..., SolverResult]

BUILTIN_SOLVERS = ("broyden", "anderson", "fixed_point")

# Read-only by convention: change it through register_solver / unregister_solver.
SOLVERS: dict[str, SolverFn] = {"broyden": broyden, "anderson": anderson, "fixed_point": fixed_point}


def register_solver(name: str, fn: SolverFn, *, replace: bool = False) -> str:
    """Make ``fn`` available as ``solve(..., method=name)`` and ``SolverSettings(method=name)``.

    ``fn(f, z0, **options) -> SolverResult`` receives the options the caller gave; the DEQ layer
    passes ``inputs``, ``compact``, ``max_iter``, ``tol``, ``stop_mode``, ``memory`` when set, the
    settings' ``options``, and ``record`` when the layer returns several states (``n_states``).
    ``f`` is called as ``f(z, *inputs)``; for the adjoint solve the one input is each sample's
    index (gather it with the rows of a compacted call), and f may define ``on_compact(rows)``,
    which a compacting solver calls with the active rows whenever it narrows them (see
    ``MaskedSolve.narrow``). The layer reads ``z``, ``nstep``, ``nfev``, the two
    residuals, ``status`` and (with ``n_states``) ``recorded`` of the result.

    Args:
        name: a non-empty string; the built-in names cannot be taken.
        fn: the solver.
        replace: allow replacing an earlier user registration of ``name``.

    Returns:
        ``name``.

    Raises:
        TypeError: ``name`` is not a string or ``fn`` is not callable.
        ValueError: ``name`` is empty, built in, or already registered (without ``replace``).
    """
    if not isinstance(name, str):
        raise TypeError(f"solver name must be a str, got {type(name).__name__}")
    if not name:
        raise ValueError("solver name must be a non-empty string")
    if not callable(fn):
        raise TypeError(f"solver fn must be callable, got {type(fn).__name__}")
    if name in BUILTIN_SOLVERS:
        raise ValueError(f"solver name {name!r} is built in and cannot be replaced; pick another name")
    if name in SOLVERS and not replace:
        raise ValueError(f"a solver named {name!r} is already registered; pass replace=True to "
                         "replace it, or unregister_solver it first")
    SOLVERS[name] = fn
    return name


def unregister_solver(name: str) -> None:
    """Remove a solver added with :func:`register_solver` (ValueError for unknown or built-in names)."""
    if name in BUILTIN_SOLVERS:
        raise ValueError(f"solver {name!r} is built in and cannot be unregistered")
    if name not in SOLVERS:
        raise ValueError(f"no solver named {name!r} is registered; registered: {sorted(SOLVERS)}")
    del SOLVERS[name]


def get_solver(method: str) -> SolverFn:
    """The solver registered as ``method`` (ValueError listing the registered names otherwise)."""
    if not isinstance(method, str):
        raise TypeError(f"method must be a solver name (str), got {type(method).__name__}")
    try:
        return SOLVERS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; registered solvers: {sorted(SOLVERS)} "
                         "(add one with deq_ext.register_solver)") from None


@solves_structured_states
def solve(f: Callable[..., torch.Tensor], z0: Any, method: str = "broyden",
          **options: Any) -> SolverResult:
    """Solve ``z = f(z)`` with the registered solver ``method``; ``options`` go to that solver.

    The built-in methods are ``'broyden'``, ``'anderson'`` and ``'fixed_point'``; others are
    added with :func:`register_solver`; every solver runs under ``torch.no_grad()``. ``z0`` may
    be a tensor or a tuple, list or dict of tensors batched on dim 0 (see
    :mod:`deq_ext.states`); a registered solver always gets the flattened ``(B, D)`` form.

    Raises:
        ValueError: ``method`` is not registered.
        TypeError: a registered solver returned something other than a ``SolverResult``.
    """
    solver = get_solver(method)
    with torch.no_grad():  # as the built-in solvers: no graph of the iterations, ever
        res = solver(f, z0, **options)
    if not isinstance(res, SolverResult):
        raise TypeError(f"solver {method!r} returned {type(res).__name__}, not a deq_ext.SolverResult")
    if isinstance(z0, torch.Tensor) and (not isinstance(res.z, torch.Tensor) or res.z.shape != z0.shape):
        got = tuple(res.z.shape) if isinstance(res.z, torch.Tensor) else type(res.z).__name__
        raise ValueError(f"solver {method!r} returned z of shape {got}, expected z0's {tuple(z0.shape)}")
    return res
