"""Drop-in adapters for code written against locuslab/deq and torchdeq.

locuslab/deq: replace ``from lib.solvers import anderson, broyden`` with
``from deq_ext.compat import anderson, broyden`` wherever the solvers are imported (in
DEQ-Sequence the model file *and* ``train_transformer.py``; in MDEQ-Vision ``mdeq_core.py``).
Two semantics (``semantics=`` per call, :func:`set_semantics` or the environment variable
``DEQ_EXT_COMPAT_SEMANTICS`` for a whole script):

* ``"official"`` (the default): the original algorithm, batch-level stopping and all, with the
  original's result dict (:mod:`deq_ext._locuslab_official`); the same numbers as the original.
* ``"deq_ext"``: deq_ext's per-sample solvers behind the same dict (each sample stops at its own
  tolerance, stall and divergence rules), plus ``status``, ``nstep_per_sample`` and ``name``.

torchdeq: ``deq_ext.compat.register_all_torchdeq()`` once, then
``get_deq(f_solver='deq_ext_broyden', b_solver='deq_ext_anderson')`` (also
``'deq_ext_fixed_point'``).

Every adapter raises TypeError on a keyword argument it does not implement (the originals
silently ignore unknown keywords). Under ``torch.autocast`` every adapter runs f under the
caller's autocast setting, casts f's output to x0's dtype and runs the solver's own arithmetic with
autocast off (:mod:`deq_ext.precision`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, Optional

import torch

from ._locuslab_official import official_anderson, official_broyden
from .precision import AutocastState
from .result import SolverResult
from .solvers.anderson import anderson as _anderson
from .solvers.broyden import broyden as _broyden
from .solvers.fixed_point import fixed_point as _fixed_point
from .status import REL_EPS, Status

TORCHDEQ_NAME = "deq_ext_broyden"
TORCHDEQ_NAMES = {"broyden": "deq_ext_broyden", "anderson": "deq_ext_anderson",
                  "fixed_point": "deq_ext_fixed_point"}

SEMANTICS = ("official", "deq_ext")
DEFAULT_SEMANTICS = "official"
SEMANTICS_ENV = "DEQ_EXT_COMPAT_SEMANTICS"
_semantics_override: Optional[str] = None


def _checked_semantics(value: Any, source: str) -> str:
    if value not in SEMANTICS:
        raise ValueError(f"{source} must be one of {SEMANTICS}, got {value!r}")
    return value


def get_semantics() -> str:
    """The semantics the locuslab adapters use when a call does not name one.

    :func:`set_semantics` if called, else ``$DEQ_EXT_COMPAT_SEMANTICS`` (read at each call), else
    :data:`DEFAULT_SEMANTICS` (``"official"``).
    """
    if _semantics_override is not None:
        return _semantics_override
    env = os.environ.get(SEMANTICS_ENV)
    if env:
        return _checked_semantics(env, f"environment variable {SEMANTICS_ENV}")
    return DEFAULT_SEMANTICS


def set_semantics(semantics: Optional[str]) -> Optional[str]:
    """Set the semantics of every later locuslab-adapter call in this process.

    ``"official"`` or ``"deq_ext"``; ``None`` goes back to the environment variable / default.
    Returns the previous setting (``None`` when none was set), so it can be restored.
    """
    global _semantics_override
    previous = _semantics_override
    _semantics_override = None if semantics is None else _checked_semantics(semantics, "semantics")
    return previous


def _resolve(semantics: Optional[str]) -> str:
    return get_semantics() if semantics is None else _checked_semantics(semantics, "semantics")


def _reject(adapter: str, kwargs: dict[str, Any]) -> None:
    """The originals swallow unknown keywords; a setting that is not applied should be an error."""
    if kwargs:
        raise TypeError(f"deq_ext.compat.{adapter} does not implement the keyword argument(s) "
                        f"{sorted(kwargs)}; see its docstring for those it accepts")


@contextlib.contextmanager
def _solver_precision(f: Callable[..., torch.Tensor], x0: Any) -> Iterator[Callable[..., torch.Tensor]]:
    """f under the caller's autocast setting with its output in x0's dtype, yielded inside a
    block with autocast off: the solver's products (the official Broyden's einsums, Anderson's
    Gram matrix) stay in x0's precision."""
    if not isinstance(x0, torch.Tensor):  # the solver's own check rejects it
        yield f
        return
    autocast = AutocastState.now(x0.device)
    with autocast.off():
        yield autocast.wrap(f, x0.dtype)


def _official(semantics: Optional[str], graph: bool, adapter: str) -> bool:
    """Whether the call runs the original algorithm (which has no CUDA-graph mode)."""
    official = _resolve(semantics) == "official"
    if official and graph:
        raise ValueError(f"deq_ext.compat.{adapter}: graph=True replays deq_ext's solver loop; the "
                         "official algorithm has none: pass semantics='deq_ext'")
    return official


def _batch_norm(per_sample: torch.Tensor) -> float:
    """The norm over the whole batch of per-sample norms, as locuslab/deq measures residuals."""
    return float(per_sample.double().pow(2).sum().sqrt())


def broyden(f: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, threshold: int,
            eps: float = 1e-3, stop_mode: str = "rel", ls: bool = False,
            name: str = "unknown", *, semantics: Optional[str] = None, graph: bool = False,
            **kwargs: Any) -> dict[str, Any]:
    """locuslab/deq's ``broyden(f, x0, threshold, eps, stop_mode, ls, name)``.

    Any other keyword argument is a TypeError.

    Returns the dict that code reads: ``result`` (x0's shape), ``lowest``, ``nstep``,
    ``prot_break``, ``abs_trace``, ``rel_trace``, ``eps``, ``threshold``, plus ``name`` and
    ``semantics``. Their meaning depends on ``semantics`` (None: :func:`get_semantics`):

    * ``"official"``: the original algorithm (x0 must be ``(bsz, hidden, seq_len)``):
      ``lowest`` is the lowest batch residual, ``nstep`` the step it was reached at, traces
      hold one batch residual per step padded with the lowest to ``threshold + 1`` entries,
      ``ls`` is the original's line search. See :mod:`deq_ext._locuslab_official`.
    * ``"deq_ext"``: :func:`deq_ext.broyden` with per-sample stopping (any x0 shape):
      ``lowest`` is the batch norm of the per-sample residuals of the result, ``nstep`` the
      slowest sample's step count, traces start with x0's residual and are as long as the solve
      ran, ``prot_break`` means some sample diverged, ``ls`` is deq_ext's per-sample Armijo
      search; also ``status`` and ``nstep_per_sample``.

    ``graph=True`` (CUDA, ``"deq_ext"`` semantics only) replays the solver loop as CUDA graphs
    (see :func:`deq_ext.broyden`).
    """
    _reject("broyden", kwargs)
    official = _official(semantics, graph, "broyden")
    with _solver_precision(f, x0) as f:
        if official:
            out = official_broyden(f, x0, threshold, eps=eps, stop_mode=stop_mode, ls=ls)
            return {**out, "name": name, "semantics": "official"}
        # The original keeps every pair: memory = threshold, whatever broyden's own default.
        res = _broyden(f, x0, max_iter=threshold, tol=eps, stop_mode=stop_mode, line_search=ls,
                       memory=threshold, trace=True, graph=graph)
        return _locuslab_dict(res, stop_mode, eps, threshold, name)


def anderson(f: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, m: int = 6,
             lam: float = 1e-4, threshold: int = 50, eps: float = 1e-3, stop_mode: str = "rel",
             beta: float = 1.0, *, name: str = "unknown", semantics: Optional[str] = None,
             graph: bool = False, **kwargs: Any) -> dict[str, Any]:
    """locuslab/deq's ``anderson(f, x0, m, lam, threshold, eps, stop_mode, beta)``.

    ``name`` is accepted because MDEQ-Vision passes it (the original ignores it); any other
    keyword is a TypeError. Returns the same dict as :func:`broyden`. With
    ``semantics="official"``: ``threshold`` counts evaluations of f (two start the history),
    ``lam`` is an absolute ridge, the relative residual is ``|f(z) - z| / (|f(z)| + 1e-5)``,
    traces have ``threshold - 2`` entries, there is no stall or divergence rule and
    ``prot_break`` is False. With ``"deq_ext"``: :func:`deq_ext.anderson` per sample,
    ``threshold`` steps, ``lam`` relative to the Gram matrix's scale. ``graph``: as
    :func:`broyden`'s.
    """
    _reject("anderson", kwargs)
    official = _official(semantics, graph, "anderson")
    with _solver_precision(f, x0) as f:
        if official:
            out = official_anderson(f, x0, m=m, lam=lam, threshold=threshold, eps=eps,
                                    stop_mode=stop_mode, beta=beta)
            return {**out, "name": name, "semantics": "official"}
        res = _anderson(f, x0, memory=m, lam=lam, max_iter=threshold, tol=eps,
                        stop_mode=stop_mode, beta=beta, trace=True, graph=graph)
        return _locuslab_dict(res, stop_mode, eps, threshold, name)


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
        "semantics": "deq_ext",
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
                     ls: bool = False, return_final: bool = False, graph: bool = False,
                     **kwargs):
    """torchdeq's solver signature: returns ``(z, trajectory, info)``.

    ``info`` has torchdeq's fields (abs_lowest, rel_lowest, abs_trace,
    rel_trace, nstep; a ``SolverStat`` when torchdeq is installed).
    ``indexing``: the trajectory holds, per requested step k, what the solve
    returns when stopped after k steps (``record``; the k-th iterate with
    ``return_final``), per sample; a sample that stopped earlier repeats its
    final iterate, and a k beyond ``max_iter`` gives the solution. The history
    ``LBFGS_thres`` defaults to ``max_iter``, as torchdeq's. A keyword argument
    not in the signature is a TypeError (torchdeq's own solvers ignore it). ``graph=True``
    (CUDA) replays the solver loop as CUDA graphs (:func:`deq_ext.broyden`).
    """
    _reject("torchdeq_broyden", kwargs)
    with _solver_precision(func, x0) as func:
        res = _broyden(func, x0, max_iter=max_iter, tol=tol, stop_mode=stop_mode,
                       memory=LBFGS_thres or max_iter, line_search=ls, return_final=return_final,
                       trace=True, record=_recorded_steps(indexing, max_iter), graph=graph)
        return _torchdeq_triple(res, indexing, max_iter)


def torchdeq_anderson(func: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor,
                      max_iter: int = 50, tol: float = 1e-3, stop_mode: str = "abs",
                      indexing: Optional[list] = None, m: int = 6, lam: float = 1e-4,
                      tau: float = 1.0, return_final: bool = False, graph: bool = False,
                      **kwargs):
    """torchdeq's ``anderson_solver`` signature (``tau`` is the mixing ``beta``); see torchdeq_broyden."""
    _reject("torchdeq_anderson", kwargs)
    with _solver_precision(func, x0) as func:
        res = _anderson(func, x0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, memory=m,
                        lam=lam, beta=tau, return_final=return_final, trace=True,
                        record=_recorded_steps(indexing, max_iter), graph=graph)
        return _torchdeq_triple(res, indexing, max_iter)


def torchdeq_fixed_point(func: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor,
                         max_iter: int = 50, tol: float = 1e-3, stop_mode: str = "abs",
                         indexing: Optional[list] = None, tau: float = 1.0,
                         return_final: bool = False, graph: bool = False, **kwargs):
    """torchdeq's ``fixed_point_iter`` signature (``tau`` is the damping); see torchdeq_broyden."""
    _reject("torchdeq_fixed_point", kwargs)
    with _solver_precision(func, x0) as func:
        res = _fixed_point(func, x0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, tau=tau,
                           return_final=return_final, trace=True,
                           record=_recorded_steps(indexing, max_iter), graph=graph)
        return _torchdeq_triple(res, indexing, max_iter)


def _recorded_steps(indexing: Optional[list], max_iter: int) -> Optional[list[int]]:
    """The steps of ``indexing`` the solve can record (the others are past its end)."""
    if not indexing:
        return None
    steps = [int(k) for k in indexing]
    if any(k < 0 for k in steps):
        raise ValueError(f"indexing must hold non-negative steps, got {list(indexing)}")
    return sorted({k for k in steps if k <= max_iter}) or None


def _torchdeq_triple(res: SolverResult, indexing: Optional[list], max_iter: int):
    recorded = dict(zip(_recorded_steps(indexing, max_iter) or [], res.recorded or []))
    trajectory = [recorded.get(int(k), res.z) for k in (indexing or [])]
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
