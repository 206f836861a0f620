"""Drop-in adapters for code written against locuslab/deq and torchdeq.

locuslab/deq: replace ``from lib.solvers import broyden, anderson`` with
``from deq_ext.compat import broyden, anderson``; the returned dict has the
keys that code reads. torchdeq: ``deq_ext.compat.register_all_torchdeq()``
once, then ``get_deq(f_solver='deq_ext_broyden', b_solver='deq_ext_anderson')``
(also ``'deq_ext_fixed_point'``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .result import SolverResult
from .solvers.anderson import anderson as _anderson
from .solvers.broyden import broyden as _broyden
from .solvers.fixed_point import fixed_point as _fixed_point
from .status import REL_EPS, Status

TORCHDEQ_NAME = "deq_ext_broyden"
TORCHDEQ_NAMES = {"broyden": "deq_ext_broyden", "anderson": "deq_ext_anderson",
                  "fixed_point": "deq_ext_fixed_point"}


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
    return _locuslab_dict(res, stop_mode, eps, threshold, name)


def anderson(f: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, m: int = 6,
             lam: float = 1e-4, threshold: int = 50, eps: float = 1e-3, stop_mode: str = "rel",
             beta: float = 1.0, **kwargs) -> dict[str, Any]:
    """locuslab/deq's ``anderson(f, x0, m, lam, threshold, eps, stop_mode, beta)``, per-sample.

    Returns the same dict as :func:`broyden`. ``lam`` is deq_ext's relative
    ridge (see :func:`deq_ext.anderson`). Other keyword arguments are ignored.
    """
    res = _anderson(f, x0, memory=m, lam=lam, max_iter=threshold, tol=eps, stop_mode=stop_mode,
                    beta=beta, trace=True)
    return _locuslab_dict(res, stop_mode, eps, threshold, kwargs.get("name", "unknown"))


def _locuslab_dict(res: SolverResult, stop_mode: str, eps: float, threshold: int,
                   name: str) -> dict[str, Any]:
    # ||f(z)|| per sample, recovered from the two residuals: rel = abs / (||f(z)|| + REL_EPS). Where
    # both are 0, z is an exact fixed point, the sample's lowest-residual iterate (res.z), and
    # ||f(z)|| = ||z||.
    assert res.abs_trace is not None and res.rel_trace is not None  # solved with trace=True
    z_norm = res.z.reshape(res.z.shape[0], -1).norm(dim=1).to(res.abs_residual.dtype)
    fz_norm = torch.where(res.rel_trace > 0, res.abs_trace / res.rel_trace, z_norm[:, None])
    abs_trace = [_batch_norm(res.abs_trace[:, t]) for t in range(res.abs_trace.shape[1])]
    rel_trace = [a / (_batch_norm(fz_norm[:, t]) + REL_EPS) for t, a in enumerate(abs_trace)]
    lowest_abs = _batch_norm(res.abs_residual)
    fz_lowest = torch.where(res.rel_residual > 0, res.abs_residual / res.rel_residual, z_norm)
    lowest = lowest_abs if stop_mode == "abs" else lowest_abs / (_batch_norm(fz_lowest) + REL_EPS)
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


def _torchdeq_info(res: SolverResult):
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
    return _torchdeq_triple(res, stop_mode, indexing)


def torchdeq_anderson(func: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor,
                      max_iter: int = 50, tol: float = 1e-3, stop_mode: str = "abs",
                      indexing: Optional[list] = None, m: int = 6, lam: float = 1e-4,
                      tau: float = 1.0, return_final: bool = False, **kwargs):
    """torchdeq's ``anderson_solver`` signature (``tau`` is the mixing ``beta``); see torchdeq_broyden."""
    res = _anderson(func, x0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, memory=m, lam=lam,
                    beta=tau, return_final=return_final, trace=True)
    return _torchdeq_triple(res, stop_mode, indexing)


def torchdeq_fixed_point(func: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor,
                         max_iter: int = 50, tol: float = 1e-3, stop_mode: str = "abs",
                         indexing: Optional[list] = None, tau: float = 1.0,
                         return_final: bool = False, **kwargs):
    """torchdeq's ``fixed_point_iter`` signature (``tau`` is the damping); see torchdeq_broyden."""
    res = _fixed_point(func, x0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, tau=tau,
                       return_final=return_final, trace=True)
    return _torchdeq_triple(res, stop_mode, indexing)


def _torchdeq_triple(res: SolverResult, stop_mode: str, indexing: Optional[list]):
    trajectory = [res.z for _ in (indexing or [])]
    return res.z, trajectory, _torchdeq_info(res)


_TORCHDEQ_SOLVERS = {"broyden": torchdeq_broyden, "anderson": torchdeq_anderson,
                     "fixed_point": torchdeq_fixed_point}


def register_torchdeq(name: str = TORCHDEQ_NAME, method: str = "broyden") -> str:
    """Register deq_ext's ``method`` in torchdeq's solver registry under ``name``.

    ``register_torchdeq()`` registers Broyden as ``'deq_ext_broyden'``;
    :func:`register_all_torchdeq` registers every method under :data:`TORCHDEQ_NAMES`.
    """
    try:
        from torchdeq.solver import register_solver
    except ImportError as exc:
        raise ImportError("register_torchdeq needs torchdeq (pip install torchdeq)") from exc
    if method not in _TORCHDEQ_SOLVERS:
        raise ValueError(f"unknown method {method!r}; available: {sorted(_TORCHDEQ_SOLVERS)}")
    register_solver(name, _TORCHDEQ_SOLVERS[method])
    return name


def register_all_torchdeq() -> list[str]:
    """Register every deq_ext method in torchdeq's registry (names in :data:`TORCHDEQ_NAMES`)."""
    return [register_torchdeq(name, method) for method, name in TORCHDEQ_NAMES.items()]
