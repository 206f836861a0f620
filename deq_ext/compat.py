"""Drop-in adapters for code written against locuslab/deq and torchdeq.

locuslab/deq: replace ``from lib.solvers import broyden`` with
``from deq_ext.compat import broyden``; the returned dict has the keys that code
reads. torchdeq: ``deq_ext.compat.register_torchdeq()`` once, then
``get_deq(f_solver='deq_ext_broyden', b_solver='deq_ext_broyden')``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .result import SolverResult
from .solvers import broyden as _broyden
from .status import Status

TORCHDEQ_NAME = "deq_ext_broyden"


def _batch_norm(per_sample: torch.Tensor) -> float:
    """The norm over the whole batch of per-sample norms, as locuslab/deq measures residuals."""
    return float(per_sample.double().pow(2).sum().sqrt())


def broyden(f: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, threshold: int,
            eps: float = 1e-3, stop_mode: str = "rel", ls: bool = False,
            name: str = "unknown") -> dict[str, Any]:
    """locuslab/deq's ``broyden(f, x0, threshold, eps, stop_mode, ls, name)``, per-sample inside.

    Returns the dict that code reads: ``result`` (x0's shape), ``lowest``
    (batch residual of the result in ``stop_mode``), ``nstep`` (steps of the
    slowest sample), ``prot_break`` (a sample diverged), ``abs_trace`` and
    ``rel_trace`` (batch residual after each evaluation), ``eps``,
    ``threshold``; plus ``status``, ``nstep_per_sample`` and ``name``.
    Convergence is decided per sample rather than for the batch as a whole.
    """
    res = _broyden(f, x0, max_iter=threshold, tol=eps, stop_mode=stop_mode, line_search=ls,
                   trace=True)
    # ||f(z)|| per sample, recovered from the two residuals: rel = abs / (||f(z)|| + 1e-9).
    fz_norm = torch.where(res.rel_trace > 0, res.abs_trace / res.rel_trace, torch.zeros_like(res.abs_trace))
    abs_trace = [_batch_norm(res.abs_trace[:, t]) for t in range(res.abs_trace.shape[1])]
    rel_trace = [a / (_batch_norm(fz_norm[:, t]) + 1e-9) for t, a in enumerate(abs_trace)]
    lowest_abs = _batch_norm(res.abs_residual)
    fz_lowest = torch.where(res.rel_residual > 0, res.abs_residual / res.rel_residual,
                            torch.zeros_like(res.abs_residual))
    lowest = lowest_abs if stop_mode == "abs" else lowest_abs / (_batch_norm(fz_lowest) + 1e-9)
    return {
        "result": res.z,
        "lowest": lowest,
        "nstep": int(res.nstep.max()) if res.nstep.numel() else 0,
        "prot_break": bool((res.status == Status.DIVERGED).any()),
        "abs_trace": abs_trace,
        "rel_trace": rel_trace,
        "eps": eps,
        "threshold": threshold,
        "name": name,
        "status": res.status,
        "nstep_per_sample": res.nstep,
    }


def _torchdeq_info(res: SolverResult, stop_mode: str):
    info = {
        "abs_lowest": res.abs_residual,
        "rel_lowest": res.rel_residual,
        "abs_trace": res.abs_trace,
        "rel_trace": res.rel_trace,
        "nstep": res.nstep.to(res.abs_residual.dtype),
    }
    try:
        from torchdeq.solver.stat import SolverStat
    except ImportError:
        return info
    return SolverStat(**info)


def torchdeq_broyden(func: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor,
                     max_iter: int = 50, tol: float = 1e-3, stop_mode: str = "abs",
                     indexing: Optional[list] = None, LBFGS_thres: Optional[int] = None,
                     ls: bool = False, return_final: bool = False, **kwargs):
    """torchdeq's solver signature: returns ``(z, trajectory, info)``.

    ``info`` has torchdeq's fields (abs_lowest, rel_lowest, abs_trace,
    rel_trace, nstep; a ``SolverStat`` when torchdeq is installed).
    ``indexing`` (intermediate iterates) is not recorded: the trajectory list
    holds the final solution once per requested index. Unknown keyword
    arguments are ignored, as torchdeq's own solvers do.
    """
    res = _broyden(func, x0, max_iter=max_iter, tol=tol, stop_mode=stop_mode,
                   memory=LBFGS_thres, line_search=ls, return_final=return_final, trace=True)
    trajectory = [res.z for _ in (indexing or [])]
    return res.z, trajectory, _torchdeq_info(res, stop_mode)


def register_torchdeq(name: str = TORCHDEQ_NAME) -> str:
    """Register :func:`torchdeq_broyden` in torchdeq's solver registry under ``name``."""
    try:
        from torchdeq.solver import register_solver
    except ImportError as exc:
        raise ImportError("register_torchdeq needs torchdeq (pip install torchdeq)") from exc
    register_solver(name, torchdeq_broyden)
    return name
