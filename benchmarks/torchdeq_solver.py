"""torchdeq's Broyden solver behind deq_ext's solver interface, for side-by-side tables.

Registered as ``deq_ext`` method :data:`METHOD`, it lets a model's own DEQ layer run its forward
and adjoint solves with ``torchdeq.solver.broyden_solver`` at the same settings (iterations,
tolerance, stop mode, history), so that a table compares the solvers inside one and the same
model: everything but the solver is shared. torchdeq iterates the whole batch until every sample
meets the tolerance (or the limit), and evaluates f on every sample at every step.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from deq_ext import SolverResult, Status

METHOD = "torchdeq_broyden"
_ACCEPTED = {"inputs", "compact", "max_iter", "tol", "stop_mode", "memory"}


def torchdeq_broyden(f: Callable[..., torch.Tensor], z0: torch.Tensor, *,
                     inputs: tuple = (), compact: Optional[bool] = None, max_iter: int = 40,
                     tol: float = 1e-3, stop_mode: str = "abs", memory: Optional[int] = None,
                     **unknown: Any) -> SolverResult:
    """Solve ``z = f(z, *inputs)`` with torchdeq's ``broyden_solver``; a deq_ext result.

    ``compact`` is accepted and has no effect (torchdeq always evaluates the whole batch).
    ``memory`` is torchdeq's ``LBFGS_thres`` (its default, ``max_iter``, when None). Every
    sample's ``nstep`` and ``nfev`` are the loop's (the batch iterates together).

    Raises:
        TypeError: an option this wrapper does not implement.
        ImportError: torchdeq is not installed.
    """
    if unknown:
        raise TypeError(f"torchdeq_broyden does not implement {sorted(unknown)}; "
                        f"it accepts {sorted(_ACCEPTED)}")
    from torchdeq.solver import broyden_solver

    calls = [0]

    def g(z: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return f(z, *inputs)

    # As torchdeq's own DEQ layer does: no graph through the iterations (an adjoint's f
    # re-enables grad for its own VJP).
    with torch.no_grad():
        z, _, info = broyden_solver(g, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode,
                                    LBFGS_thres=memory)
    B = z0.shape[0]
    abs_res = info["abs_lowest"].reshape(B).to(torch.float64)
    rel_res = info["rel_lowest"].reshape(B).to(torch.float64)
    reached = (abs_res if stop_mode == "abs" else rel_res) <= tol
    status = torch.where(reached, int(Status.CONVERGED), int(Status.MAX_ITER)).to(torch.int64)
    steps = torch.full((B,), calls[0] - 1, dtype=torch.int64)
    return SolverResult(z=z, abs_residual=abs_res, rel_residual=rel_res, nstep=steps,
                        nfev=torch.full((B,), calls[0], dtype=torch.int64), status=status)


def register() -> str:
    """Register :func:`torchdeq_broyden` as :data:`METHOD` (once; later calls do nothing)."""
    from deq_ext import SOLVERS, register_solver

    if SOLVERS.get(METHOD) is not torchdeq_broyden:
        register_solver(METHOD, torchdeq_broyden, replace=True)
    return METHOD


def available() -> bool:
    """Whether torchdeq's solver can be imported."""
    try:
        from torchdeq.solver import broyden_solver  # noqa: F401
    except ImportError:
        return False
    return True
