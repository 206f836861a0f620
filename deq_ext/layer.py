"""The DEQ layer: a fixed point in the forward pass, implicit differentiation in the backward.

Forward: ``z* = f(z*, *inputs)`` is solved without keeping any graph of the
iterations. One more application ``f(z*, *inputs)`` is recorded to attach the
gradient. Backward (Bai et al. 2019, Theorem 1): the adjoint system
``y = J_f(z*)^T y + dL/dz*`` is solved with the same per-sample masked solver,
using vector-Jacobian products of f at z*; ``y`` then flows through that one
recorded application of f to the inputs and the parameters. The memory kept for
backward is one application of f, whatever the number of solver iterations.

Beyond the solve, the same recorded application of f at z* gives the Jacobian
regularizer (``jac_reg_samples``) and the spectral-radius estimate
(``spectral_radius_steps``, :mod:`deq_ext.jacobian`); ``n_states`` returns states along the
solver's trajectory for fixed-point correction; z may be a tuple, list or dict of tensors
(:mod:`deq_ext.states`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .adjoint import AdjointMap, SampleSubset, autocast_state, check_rerecord_below
from .adjoint import reusable_backward as _reusable_backward
from .chunks import (
    AUTO,
    auto_chunk,
    check_chunk,
    graph_leaves,
    implicit_in_chunks,
    joined,
    solve_in_chunks,
    summed,
)
from .jacobian import jac_reg, spectral_radius
from .mixing import check_compactable, sample_mixers
from .precision import AutocastState
from .result import SolverResult
from .shine import (
    DEFAULT_SHINE_TOL,
    ForwardPairs,
    ShineFallback,
    accept,
    check_backward_init,
    check_shine_tol,
    fallback_codes,
    residuals,
)
from .solvers import get_solver, solve
from .states import StateSpec, is_structured
from .status import Status


@dataclass(frozen=True)
class SolverSettings:
    """How one of the two solves (forward fixed point, backward adjoint) is run.

    ``options`` are passed on to the solver (e.g. ``line_search``,
    ``stall_patience``). The defaults follow torchdeq's; for the paper's scheme
    see :func:`paper_settings`.

    ``stop_mode``: ``"abs"`` stops a sample when its residual ``||f(z) - z||`` is below
    ``tol``, ``"rel"`` when ``||f(z) - z|| / (||f(z)|| + 1e-9)`` is. The backward (adjoint)
    solve also takes ``"grad"``, its default: the residual of the adjoint system relative to
    the sample's ``||dL/dz*||`` (the solve runs on ``dL/dz*`` divided by that norm and its
    result is multiplied back), so the stop and the gradient do not depend on how the loss
    is scaled (a GradScaler's factor, a sum or a mean over the batch).

    ``memory``: Broyden's history, in pairs. None (default): in the DEQ layer a ring of
    :data:`DEFAULT_MEMORY` pairs (16 forward, 8 backward) that restarts when full (the
    solver's ``restart=True``), stored in bfloat16 under a float32 state: the peak memory of a
    training step is then bounded whatever ``max_iter`` is (docs/design.md, "Memory"). A number
    keeps that many pairs, replacing the oldest once full unless ``options`` say
    ``restart=True``; ``memory=max_iter`` keeps every pair of the solve.
    """

    method: str = "broyden"
    max_iter: int = 40
    tol: float = 1e-3
    stop_mode: str = "abs"
    memory: Optional[int] = None
    options: dict = field(default_factory=dict)

    def solver_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the solver; ``memory=None`` (the solver's default) is left out,
        so methods without a history (fixed point) accept the same settings."""
        kw = {k: v for k, v in asdict(self).items() if k not in ("method", "options")}
        if kw["memory"] is None:
            del kw["memory"]
        kw.update(self.options)
        return kw

    def resolved(self, direction: str) -> "SolverSettings":
        """These settings as the DEQ layer runs the ``direction`` (``"forward"`` or
        ``"backward"``) solve: a Broyden solve with ``memory=None`` gets the layer's
        bounded, restarting ring (:data:`DEFAULT_MEMORY`)."""
        if self.memory is not None or self.method != "broyden":
            return self
        memory = min(DEFAULT_MEMORY[direction], self.max_iter)
        return replace(self, memory=memory, options={"restart": True, **self.options})


# Broyden pairs the layer keeps by default (SolverSettings.memory=None), per solve; a full ring
# restarts. Measured on the trained models of this repository (python -m benchmarks.history_size:
# steps, converged samples and gradient error per ring size) and sized so that a step whose
# solves run to their limit stays within the memory table's targets (docs/design.md, "Memory").
DEFAULT_MEMORY = {"forward": 16, "backward": 8}

DEFAULT_FORWARD = SolverSettings(max_iter=40, tol=1e-3)
# Relative to ||dL/dz*|| per sample: invariant to the loss scale (GradScaler, mean vs sum).
DEFAULT_BACKWARD = SolverSettings(max_iter=40, tol=1e-6, stop_mode="grad")
# The backward stop mode solved as an absolute one on dL/dz* normalized per sample.
GRAD_STOP = "grad"
# The adjoint solve re-records f on its active rows when they fall to this fraction of the
# recorded ones: 1, at every change of the solver's power-of-two bucket (1/2, 1/4, ... of the
# batch), so that its VJPs go through at most twice the active rows.
DEFAULT_RERECORD_BELOW = 1.0


def paper_settings(seq_len: int, training: bool = True) -> tuple[SolverSettings, SolverSettings]:
    """(forward, backward) settings of the DEQ paper for sequences of length T.

    Training: forward tol sqrt(T)*1e-5, backward tol sqrt(T)*1e-8 (absolute
    residual, section 5); at inference the forward tolerance is relaxed to
    sqrt(T)*1e-2.
    """
    root = math.sqrt(seq_len)
    fwd = SolverSettings(max_iter=30, tol=root * (1e-5 if training else 1e-2), stop_mode="abs")
    bwd = SolverSettings(max_iter=35, tol=root * 1e-8, stop_mode="abs")
    return fwd, bwd


def _warn_if_backward_diverged(status: torch.Tensor, nonfinite_grad: Optional[torch.Tensor],
                               stacklevel: int) -> None:
    """Warn about the samples whose adjoint solve was flagged DIVERGED, saying which of them
    came with a non-finite dL/dz* (passed on as is) and which diverged from a finite one."""
    diverged = status == Status.DIVERGED
    if not bool(diverged.any()):
        return
    ids = torch.nonzero(diverged).flatten().tolist()
    bad = [] if nonfinite_grad is None else torch.nonzero(diverged & nonfinite_grad).flatten().tolist()
    rest = [i for i in ids if i not in bad]
    parts = []
    if bad:
        parts.append(f"dL/dz* is not finite for samples {bad}: passed on as their gradient, so "
                     "a GradScaler sees the overflow and skips the step")
    if rest:
        parts.append(f"samples {rest} diverged from a finite dL/dz* (is f contractive at z*?): "
                     "their gradient is the best finite iterate of the adjoint solve")
    warnings.warn(f"deq_ext: the backward (adjoint) solve diverged for samples {ids}; "
                  + "; ".join(parts), RuntimeWarning, stacklevel=stacklevel)


@dataclass
class SolverStats:
    """Per-sample statistics of one solve, as device tensors (no sync to keep them).

    A sync-free backward solve (``stop_early=False``) cannot check for diverged
    samples without reading the device: its warning is issued by :meth:`summary`.
    ``spectral_radius`` (forward only): the per-sample estimate of J_f(z*)'s spectral
    radius when the layer was asked for one (``spectral_radius_steps``), else None.
    ``f_rows``: the rows the solve evaluated f (or, backward, the adjoint map) on, summed over
    its calls (None from a solver that does not count them).
    ``vjp_rows`` and ``rerecord_rows`` (backward only): the batch rows the adjoint solve's
    vector-Jacobian products went through (summed over its iterations) and the rows f was
    re-applied to at z* to shrink that graph (:mod:`deq_ext.adjoint`); an uncompacted solve
    takes B rows per VJP and re-records none. ``nonfinite_grad`` (backward only): per sample,
    whether dL/dz* had a non-finite entry; such a sample is flagged DIVERGED and its dL/dz* is
    passed on as its gradient (so a GradScaler sees the overflow and skips the step). With
    ``stop_mode="grad"`` the residuals are relative to the sample's ``||dL/dz*||``.
    ``fallback`` (backward of ``grad_mode="shine"`` only): per sample, the
    :class:`~deq_ext.shine.ShineFallback` code: 0 where the SHINE estimate is the gradient (its
    ``nstep`` is 0, its ``status`` CONVERGED, its residuals those of the estimate's check),
    else why the sample took the exact adjoint solve (whose figures it then has);
    ``estimate_rel_residual``: each sample's SHINE estimate's relative adjoint residual, from the
    check (None when ``shine_tol`` is infinite: no check), to compare with ``shine_tol``.
    """

    nstep: torch.Tensor
    nfev: torch.Tensor
    abs_residual: torch.Tensor
    rel_residual: torch.Tensor
    status: torch.Tensor
    check_backward_divergence: bool = field(default=False, repr=False, compare=False)
    spectral_radius: Optional[torch.Tensor] = None
    vjp_rows: Optional[int] = None
    rerecord_rows: Optional[int] = None
    f_rows: Optional[int] = None
    nonfinite_grad: Optional[torch.Tensor] = None
    fallback: Optional[torch.Tensor] = None
    estimate_rel_residual: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, res: SolverResult) -> "SolverStats":
        return cls(res.nstep, res.nfev, res.abs_residual, res.rel_residual, res.status,
                   f_rows=res.f_rows)

    @classmethod
    def cat(cls, parts: list["SolverStats"]) -> "SolverStats":
        """The statistics of a batch solved in chunks (:mod:`deq_ext.chunks`), from its chunks'
        in order: per-sample tensors joined, row counts summed."""
        if len(parts) == 1:
            return parts[0]

        def cat(name: str) -> torch.Tensor:
            return torch.cat([getattr(p, name) for p in parts])

        def tensors(name: str) -> Optional[torch.Tensor]:
            return joined([getattr(p, name) for p in parts])

        def counts(name: str) -> Optional[int]:
            return summed([getattr(p, name) for p in parts])

        return cls(cat("nstep"), cat("nfev"), cat("abs_residual"), cat("rel_residual"),
                   cat("status"), spectral_radius=tensors("spectral_radius"),
                   vjp_rows=counts("vjp_rows"), rerecord_rows=counts("rerecord_rows"),
                   f_rows=counts("f_rows"), nonfinite_grad=tensors("nonfinite_grad"),
                   fallback=tensors("fallback"),
                   estimate_rel_residual=tensors("estimate_rel_residual"))

    def summary(self) -> dict[str, float]:
        """Batch means for logging (reads from the device)."""
        if self.check_backward_divergence:
            self.check_backward_divergence = False
            _warn_if_backward_diverged(self.status, self.nonfinite_grad, stacklevel=3)
        out = {
            "nstep": float(self.nstep.double().mean()),
            "nfev": float(self.nfev.double().mean()),
            "abs_residual": float(self.abs_residual.double().mean()),
            "rel_residual": float(self.rel_residual.double().mean()),
            "converged": float((self.status == Status.CONVERGED).double().mean()),
        }
        if self.spectral_radius is not None:
            out["spectral_radius"] = float(self.spectral_radius.double().mean())
        if self.vjp_rows is not None:
            out["vjp_rows"] = float(self.vjp_rows)
        if self.rerecord_rows is not None:
            out["rerecord_rows"] = float(self.rerecord_rows)
        if self.fallback is not None:
            out["shine_fallback"] = float((self.fallback != ShineFallback.NONE).double().mean())
        return out


SettingsLike = Union[SolverSettings, dict, None]


def _settings(value: SettingsLike, default: SolverSettings) -> SolverSettings:
    if value is None:
        return default
    if isinstance(value, SolverSettings):
        return value
    if isinstance(value, dict):
        known = {"method", "max_iter", "tol", "stop_mode", "memory"}
        opts = {k: v for k, v in value.items() if k not in known}
        return replace(default, **{k: v for k, v in value.items() if k in known},
                       options={**default.options, **opts})
    raise TypeError(f"solver settings must be a SolverSettings or a dict, got {type(value).__name__}")


class _ImplicitGrad(torch.autograd.Function):
    """Identity on f(z*) in the forward pass; solves the adjoint system in the backward pass."""

    @staticmethod
    def forward(ctx, fz: torch.Tensor, z_leaf: torch.Tensor, backward_solve: Callable) -> torch.Tensor:
        ctx.backward_solve = backward_solve
        ctx.save_for_backward(fz, z_leaf)
        return fz.detach().clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if torch.is_grad_enabled():  # create_graph=True: the adjoint solve builds no graph
            raise RuntimeError("deq_ext: higher-order gradients through a DEQ's implicit backward "
                               "are not supported (backward with create_graph=True)")
        fz, z_leaf = ctx.saved_tensors
        return ctx.backward_solve(fz, z_leaf, grad), None, None


def _needs_more_than(out: torch.Tensor, leaf: torch.Tensor) -> bool:
    """Whether ``out``'s graph reaches a leaf other than ``leaf``: parameters or inputs to
    differentiate. A frozen f applied to inputs without grad needs no adjoint solve."""
    return bool(graph_leaves(out, [leaf]))


def _check_inputs(z0: torch.Tensor, inputs: tuple) -> None:
    B = z0.shape[0]
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            continue
        if x.dim() == 0 or x.shape[0] != B:
            raise ValueError(
                f"input {i} has shape {tuple(x.shape)} but every tensor input of a DEQ layer must be "
                f"batched on dim 0 with z's batch size {B}; pass unbatched tensors as attributes of f")
        if x.requires_grad and not (x.is_floating_point() or x.is_complex()):
            raise TypeError(f"input {i} is an integer tensor that requires grad ({x.dtype})")


def state_steps(n_states: int, max_iter: int) -> list[int]:
    """The solver steps of the ``n_states`` states a DEQ returns: evenly spaced, ``max_iter //
    n_states`` apart, the last at ``max_iter`` (torchdeq's ``n_states`` spacing)."""
    gap = max_iter // n_states
    return [max_iter - (n_states - 1 - k) * gap for k in range(n_states)]


def _check_stop_modes(fwd: SolverSettings, bwd: SolverSettings) -> None:
    """The forward solve takes 'abs' or 'rel'; the backward one also 'grad' (ValueError)."""
    if fwd.stop_mode not in ("abs", "rel"):
        extra = (" ('grad', relative to ||dL/dz*||, is a backward setting)"
                 if fwd.stop_mode == GRAD_STOP else "")
        raise ValueError(f"forward stop_mode must be 'abs' or 'rel', got {fwd.stop_mode!r}{extra}")
    if bwd.stop_mode not in ("abs", "rel", GRAD_STOP):
        raise ValueError(f"backward stop_mode must be 'abs', 'rel' or 'grad', got {bwd.stop_mode!r}")


def _may_compact(value: Any, has_inputs: bool) -> bool:
    """Whether a ``compact`` setting lets a solve evaluate f on fewer rows than the batch
    (None: with inputs, as the solvers decide; any other non-bool, e.g. "auto": it may)."""
    if value is None:
        return has_inputs
    return value if isinstance(value, bool) else True


def _check_count(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0 (0: off), got {value!r}")


def _check_n_states(n_states: Optional[int], max_iter: int) -> None:
    if n_states is None:
        return
    if not isinstance(n_states, int) or isinstance(n_states, bool) or not 1 <= n_states <= max_iter:
        raise ValueError(f"n_states must be None or an integer in [1, forward max_iter={max_iter}], "
                         f"got {n_states!r}")


def _per_sample_normalized(grad: torch.Tensor,
                           finite: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad / n, n)`` with ``n`` each sample's L2 norm of ``grad`` (1 for a zero or
    non-finite sample, left as it is). Computed as ``max|g| * ||g / max|g|||``: no overflow,
    and a power-of-two loss scale (a GradScaler's) gives the same normalized bits."""
    B = grad.shape[0]
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    flat = grad.reshape(B, -1).to(acc)
    if flat.shape[1] == 0:
        return grad, torch.ones(B, dtype=acc, device=grad.device)
    peak = flat.abs().amax(dim=1)
    usable = finite & (peak > 0)
    peak = torch.where(usable, peak, torch.ones_like(peak))
    norm = torch.where(usable, peak * (flat / peak[:, None]).norm(dim=1), torch.ones_like(peak))
    return (flat / norm[:, None]).view(grad.shape).to(grad.dtype), norm


def _times_rows(t: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``t`` with each row multiplied by ``factor``, in ``factor``'s precision, as ``t``'s dtype."""
    return (t.reshape(t.shape[0], -1).to(factor.dtype) * factor[:, None]).view(t.shape).to(t.dtype)


GRAD_MODES = ("implicit", "phantom", "shine")


def _check_backward_modes(grad_mode: Any, fwd: SolverSettings, bwd: SolverSettings) -> bool:
    """Checks ``grad_mode`` and the backward options ``init`` and ``shine_tol``; returns whether
    the backward pass needs the forward solve's Broyden pairs (:mod:`deq_ext.shine`)."""
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
    init = check_backward_init(bwd.options.get("init", "grad"))
    check_shine_tol(bwd.options.get("shine_tol", DEFAULT_SHINE_TOL))
    needs = grad_mode == "shine" or (grad_mode == "implicit" and init == "shine")
    if needs and fwd.method != "broyden":
        what = "grad_mode='shine'" if grad_mode == "shine" else "backward init='shine'"
        raise ValueError(f"{what} reuses the forward solve's inverse-Jacobian estimate, which "
                         f"only Broyden keeps; the forward method is {fwd.method!r} (use "
                         f"method='broyden' forward, or grad_mode='implicit' with init='grad')")
    return needs


def _chunk_conflict(f: Callable[..., Any], grad_mode: str, bwd: SolverSettings,
                    jac_reg_samples: int, spectral_radius_steps: int) -> Optional[str]:
    """Why the samples cannot be solved in chunks (None: they can): an f that mixes samples,
    or an option that needs f's graph or the forward's pairs on the whole batch at once."""
    mixers = sample_mixers(f)
    if mixers:
        return f"f mixes samples ({'; '.join(mixers)})"
    if grad_mode == "shine" or bwd.options.get("init", "grad") == "shine":
        return ("grad_mode='shine' and backward init='shine' keep the forward solve's Broyden "
                "pairs of the whole batch")
    if jac_reg_samples or spectral_radius_steps:
        return "jac_reg_samples and spectral_radius_steps need f's graph at z* on the whole batch"
    return None


def _settle_chunk(chunk: Any, f: Callable[..., Any], grad_mode: str, bwd: SolverSettings,
                  jac_reg_samples: int, spectral_radius_steps: int,
                  compact: Any) -> Union[int, str, None]:
    """``chunk`` checked against the other settings: ``"auto"`` gives way (None) to anything
    chunks cannot do, and to ``compact=False`` (the sign of an f that mixes samples); a number
    of samples that cannot be honoured is a ValueError."""
    chunk = check_chunk(chunk)
    if chunk is None:
        return None
    reason = _chunk_conflict(f, grad_mode, bwd, jac_reg_samples, spectral_radius_steps)
    if chunk == AUTO:
        return None if reason is not None or compact is False else AUTO
    if reason is not None:
        raise ValueError(f"deq_ext: chunk={chunk} solves the samples a few at a time, but "
                         f"{reason}; use chunk=None")
    return chunk


def _adjoint_start(grad: torch.Tensor, estimate: Optional[torch.Tensor]) -> torch.Tensor:
    """The adjoint solve's first iterate: ``dL/dz*`` (cold), or the SHINE estimate where it is
    finite (warm). Samples with a non-finite ``dL/dz*`` start at 0 (the solver rejects a
    non-finite start) and are flagged by the solve."""
    B = grad.shape[0]
    shape = (B, *[1] * (grad.dim() - 1))
    finite = torch.isfinite(grad.reshape(B, -1)).all(dim=1)
    y0 = torch.where(finite.view(shape), grad, torch.zeros_like(grad))
    if estimate is not None:
        ok = finite & torch.isfinite(estimate.reshape(B, -1)).all(dim=1)
        y0 = torch.where(ok.view(shape), estimate, y0)
    return y0


def _phantom(f: Callable[..., torch.Tensor], z: torch.Tensor, inputs: tuple, steps: int,
             damping: float, fz: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``steps`` damped steps ``z <- (1 - damping) z + damping f(z)`` with ordinary backprop
    (the first may reuse an application ``fz = f(z)`` already made)."""
    for i in range(steps):
        fz_i = fz if i == 0 and fz is not None else f(z, *inputs)
        z = (1 - damping) * z + damping * fz_i
    return z


def _solve_adjoint(adjoint: AdjointMap, y0: torch.Tensor, samples: Optional[torch.Tensor],
                   method: str, options: dict[str, Any]) -> SolverResult:
    """The adjoint solve from ``y0``, on every sample (``samples`` None) or on ``samples`` only
    (``y0`` holding their rows): their graph is re-recorded first when they are few enough."""
    fn: Callable[..., torch.Tensor] = adjoint
    if samples is not None:
        if options["compact"]:
            adjoint.on_compact(samples)
        fn = SampleSubset(adjoint, samples)
    # The solver gathers the sample indices with the rows it hands the adjoint map.
    with _reusable_backward():  # f's compiled backward may be built lazily, here
        return solve(fn, y0, method=method,
                     inputs=(adjoint.all_rows if samples is None else samples,), **options)


def _shine_backward(adjoint: AdjointMap, grad: torch.Tensor, estimate: torch.Tensor,
                    pairs: ForwardPairs, shine_tol: float, *, warm: bool, method: str,
                    options: dict[str, Any]) -> tuple[torch.Tensor, SolverStats]:
    """``grad_mode='shine'``: the SHINE estimate, checked with one VJP (unless ``shine_tol`` is
    infinite), and the exact adjoint solve on the samples that fall back (one device read)."""
    B = grad.shape[0]
    code = fallback_codes(pairs, grad, estimate)
    # Zeroed where not finite: an f that mixes samples would spread it through the check's VJP.
    y = torch.where((code == ShineFallback.NON_FINITE).view(B, *[1] * (grad.dim() - 1)),
                    torch.zeros_like(estimate), estimate)
    rdt = torch.float64 if grad.dtype == torch.float64 else torch.float32
    abs_res = torch.full((B,), math.nan, dtype=rdt, device=grad.device)
    rel_res = abs_res.clone()
    nfev = torch.zeros(B, dtype=torch.int64, device=grad.device)
    estimate_rel: Optional[torch.Tensor] = None
    if math.isfinite(shine_tol):
        with _reusable_backward():
            fy = adjoint(y)
        a, r = residuals(y, fy)
        abs_res, rel_res = a.to(rdt), r.to(rdt)
        estimate_rel = rel_res.clone()
        code = accept(code, r, shine_tol)
        nfev += 1
    nstep = torch.zeros_like(nfev)
    status = torch.full_like(nfev, int(Status.CONVERGED))
    samples = torch.nonzero(code != ShineFallback.NONE).flatten()
    if samples.numel():
        y0 = _adjoint_start(grad.index_select(0, samples),
                            estimate.index_select(0, samples) if warm else None)
        out = _solve_adjoint(adjoint, y0, None if samples.numel() == B else samples, method,
                             options)
        y = y.index_copy(0, samples, out.z)
        nstep.index_copy_(0, samples, out.nstep)
        nfev.index_add_(0, samples, out.nfev)
        status.index_copy_(0, samples, out.status)
        abs_res.index_copy_(0, samples, out.abs_residual.to(rdt))
        rel_res.index_copy_(0, samples, out.rel_residual.to(rdt))
    return y, SolverStats(nstep, nfev, abs_res, rel_res, status, fallback=code,
                          estimate_rel_residual=estimate_rel)


@torch.compiler.disable  # one deliberate graph break: the solves' loops depend on the data
def deq_fixed_point(
    f: Callable[..., Any],
    z0: Any,
    *inputs: Any,
    forward: SettingsLike = None,
    backward: SettingsLike = None,
    grad_mode: str = "implicit",
    phantom_steps: int = 1,
    phantom_damping: float = 1.0,
    compact: Union[bool, str] = "auto",
    chunk: Union[int, str, None] = "auto",
    stats: Optional[dict] = None,
    jac_reg_samples: int = 0,
    spectral_radius_steps: int = 0,
    n_states: Optional[int] = None,
) -> Any:
    """Functional DEQ: returns z* = f(z*, *inputs), differentiable w.r.t. inputs and f's parameters.

    Args:
        f: ``f(z, *inputs) -> z``; each sample must only depend on its own row
            of z and of the inputs, unless ``compact=False``.
        z0: initial guess ``(B, ...)`` (zeros are the usual choice), or a tuple, list or
            dict of such tensors (one dtype and device): f then takes and returns that
            structure, and so does the result (:mod:`deq_ext.states`).
        inputs: tensors batched on dim 0 (size B), or non-tensors passed as is.
        forward, backward: :class:`SolverSettings` (or a dict of its fields and
            solver options) of the fixed-point solve and of the adjoint solve. Besides the
            solver's options, the backward settings take ``init``: ``'grad'`` (default: the
            adjoint solve starts from dL/dz*) or ``'shine'`` (it starts from the forward
            Broyden estimate ``-H^T dL/dz*``, :mod:`deq_ext.shine`: the same gradient to the
            backward tolerance; whether it saves VJPs depends on the model, and on the
            workloads of docs/backward.md it did not), and ``shine_tol`` (see ``'shine'``).
        grad_mode: ``'implicit'`` (exact, Theorem 1), ``'phantom'`` (backprop
            through ``phantom_steps`` damped steps from z*; 1 step and damping 1
            is the one-step / Jacobian-free gradient) or ``'shine'`` (the forward Broyden
            estimate ``-H^T dL/dz*`` as the adjoint solution, no adjoint solve; inexact). With
            ``'shine'`` one VJP checks every sample's estimate: a sample whose forward solve did
            not converge, that has no stored pair, whose estimate is not finite, or whose
            estimate's adjoint relative residual is above the backward option ``shine_tol``
            (default 0.1; ``math.inf`` skips the check and its VJP) takes the exact adjoint
            solve instead (started as ``init`` says); ``stats['backward'].fallback`` gives the
            reason per sample (:class:`~deq_ext.shine.ShineFallback`). ``'shine'`` and
            ``init='shine'`` need a Broyden forward solve (ValueError otherwise) and keep its
            pairs U, V (2 x B x pairs x D values in the history dtype) alive until backward;
            the other modes keep none of the forward's state.
        compact: in the forward solve, evaluate f only on the active samples, in
            power-of-two buckets (``"auto"``, the default: where it pays on the device, see
            :func:`deq_ext.broyden`; True: always). Set False for an f that mixes samples
            (e.g. batch statistics): a compacted solve of an f with such a module (batch norm
            in training mode, or marked with :func:`deq_ext.mixes_samples`) raises a
            ValueError naming it (:mod:`deq_ext.mixing`). A ``compact`` among the forward
            settings' options overrides it. The backward (adjoint) solve is compacted as the
            forward one is unless its
            settings say ``compact=False``: when its active samples fall to ``rerecord_below``
            (a backward option, default 1: at every bucket change) times the rows of the graph its VJPs go
            through, f is applied once more at z* on those samples and the later VJPs
            go through that smaller graph (:mod:`deq_ext.adjoint`). f must then be a
            pure function of ``(z, *inputs)``: dropout masks drawn once per forward
            pass must be passed as inputs (or otherwise kept fixed), not redrawn per call.
        chunk: ``"auto"`` (default): on the CPU, a batch whose state holds at least 2**20
            values is solved in 4 chunks (:data:`deq_ext.chunks.AUTO_CHUNKS`; measured: about
            half the peak memory of a training step, for 1.02x its time); smaller
            batches, CUDA tensors, and the settings below that chunks cannot honour keep the
            whole batch. None: the whole batch at once. An integer N: the samples are solved N
            at a time, and no graph of f is kept from the forward pass; the backward pass
            applies f again at each chunk's z*, solves that chunk's adjoint system and sends
            it to the inputs and parameters before the next chunk (:mod:`deq_ext.chunks`). The
            solver's workspace, f's transients and the graph the VJPs go through then hold N
            samples, not B: a training step's peak memory shrinks about as N / B (docs/design.md,
            "Memory"), for one more application of f per step. f must be row-wise and must
            give the same result when applied again (as for compaction); not with
            ``grad_mode='shine'``, ``init='shine'``, ``jac_reg_samples`` or
            ``spectral_radius_steps``, nor with an f that mixes samples (ValueError for a
            number; ``"auto"`` then keeps the whole batch, as it does with ``compact=False``).
            With ``'phantom'`` only the forward solve is chunked.
        stats: if given, ``stats['forward']`` and, after backward,
            ``stats['backward']`` receive :class:`SolverStats`; with ``jac_reg_samples``,
            ``stats['jac_loss']`` receives the Jacobian regularizer.
        jac_reg_samples: with grad enabled and k > 0, ``stats['jac_loss']`` is the
            per-sample ``(B,)`` Hutchinson estimate of ``||J_f(z*)||_F^2 / D`` with k probes
            (:func:`deq_ext.jac_reg`), differentiable w.r.t. f's parameters, from the
            application of f at z* the gradient already records (no extra forward).
        spectral_radius_steps: n > 0 puts a per-sample power-iteration estimate (n VJPs)
            of J_f(z*)'s spectral radius in ``stats['forward'].spectral_radius``
            (:func:`deq_ext.spectral_radius`); without grad this costs one extra
            application of f.
        n_states: return a list of this many states along the forward solve instead of
            z* alone (fixed-point correction, as in DEQ-Flow): the iterates after steps
            :func:`state_steps` ``(n_states, max_iter)`` recorded by the solver (``record``),
            each with a phantom gradient (``phantom_steps`` damped steps of f from it), the
            last being z* with the ``grad_mode`` gradient. Without grad, the recorded
            iterates and z* as they are.

    Under ``torch.autocast`` every call of f runs under the caller's autocast setting (the
    backward's re-recordings too) and an output of autocast's dtype is cast to z0's dtype;
    the solves' own arithmetic runs with autocast off (:mod:`deq_ext.precision`). The backward
    settings' default ``stop_mode="grad"`` makes the adjoint solve's stop relative to each
    sample's ``||dL/dz*||``, so a GradScaler's loss scale changes nothing once unscaled.
    """
    fwd = _settings(forward, DEFAULT_FORWARD)
    bwd = _settings(backward, DEFAULT_BACKWARD)
    _check_backward_modes(grad_mode, fwd, bwd)
    if (grad_mode == "phantom" or n_states is not None) and (
            phantom_steps < 1 or not 0 < phantom_damping <= 1):
        raise ValueError("phantom gradients need phantom_steps >= 1 and 0 < phantom_damping <= 1")
    _check_count("jac_reg_samples", jac_reg_samples)
    _check_count("spectral_radius_steps", spectral_radius_steps)
    if (jac_reg_samples or spectral_radius_steps) and stats is None:
        raise ValueError("jac_reg_samples and spectral_radius_steps need a stats dict to put their "
                         "results in (stats=...)")
    _check_n_states(n_states, fwd.max_iter)
    _check_stop_modes(fwd, bwd)
    get_solver(fwd.method), get_solver(bwd.method)  # an unknown method fails before any work
    check_rerecord_below(bwd.options.get("rerecord_below", DEFAULT_RERECORD_BELOW))
    # Compaction hands f fewer rows: refuse an f that mixes samples (batch norm in training).
    fwd_compact = fwd.options.get("compact", compact)
    bwd_compact = bwd.options.get("compact", bool(fwd_compact))
    check_compactable(f, _may_compact(fwd_compact, bool(inputs)),
                      torch.is_grad_enabled() and grad_mode != "phantom"
                      and _may_compact(bwd_compact, True))
    chunk = _settle_chunk(chunk, f, grad_mode, bwd, jac_reg_samples, spectral_radius_steps,
                          fwd_compact)
    options: dict[str, Any] = dict(
        grad_mode=grad_mode, phantom_steps=phantom_steps, phantom_damping=phantom_damping,
        compact=compact, chunk=chunk, stats=stats, jac_reg_samples=jac_reg_samples,
        spectral_radius_steps=spectral_radius_steps, n_states=n_states)
    if is_structured(z0):
        # The solves, the gradients and the estimates all run on one flat state per sample.
        spec = StateSpec(z0)
        out = _deq_flat(spec.wrap(f), spec.pack(z0, what="z0").detach(), inputs, fwd, bwd, **options)
        return [spec.unpack(z) for z in out] if n_states is not None else spec.unpack(out)
    if not isinstance(z0, torch.Tensor):
        raise TypeError(f"z0 must be a torch.Tensor or a tuple, list or dict of tensors, "
                        f"got {type(z0).__name__}")
    return _deq_flat(f, z0, inputs, fwd, bwd, **options)


def _deq_flat(f: Callable[..., torch.Tensor], z0: torch.Tensor, inputs: tuple,
              fwd: SolverSettings, bwd: SolverSettings, *, grad_mode: str, phantom_steps: int,
              phantom_damping: float, compact: Union[bool, str], chunk: Union[int, str, None],
              stats: Optional[dict], jac_reg_samples: int,
              spectral_radius_steps: int, n_states: Optional[int]) -> Any:
    """:func:`deq_fixed_point` for a tensor z0 (arguments checked)."""
    _check_inputs(z0, inputs)
    steps = state_steps(n_states, fwd.max_iter)[:-1] if n_states is not None else []
    # A ``compact`` in the forward settings' options is the more specific choice: it wins.
    kwargs = {"compact": compact, **fwd.resolved("forward").solver_kwargs()}
    if steps:
        kwargs["record"] = steps
    # Only the SHINE modes keep the forward's pairs until backward (their bytes).
    keep_pairs = torch.is_grad_enabled() and _check_backward_modes(grad_mode, fwd, bwd)
    if keep_pairs:
        kwargs["return_state"] = True
    # Under autocast every call of f (solves, z*, re-recordings) runs under the caller's setting
    # and returns z0's dtype; the solvers' own arithmetic runs with autocast off.
    autocast = AutocastState.now(z0.device)
    f = autocast.wrap(f, z0.dtype)
    # chunk: the samples are solved (and differentiated) at most that many at a time.
    B = z0.shape[0]
    rows = auto_chunk(B, z0[0].numel(), z0.device) if chunk == AUTO else chunk
    chunk_rows = rows if isinstance(rows, int) and rows < B else None
    with autocast.off():
        if chunk_rows is None:
            res = solve(f, z0.detach(), method=fwd.method, inputs=inputs, **kwargs)
        else:
            res = solve_in_chunks(lambda z, ins: solve(f, z, method=fwd.method, inputs=ins,
                                                       **kwargs),
                                  z0.detach(), inputs, chunk_rows)
    pairs = ForwardPairs.of(res) if keep_pairs else None
    if stats is not None:
        stats["forward"] = SolverStats.of(res)
    z_star = res.z
    earlier = list(res.recorded or []) if steps else []
    if len(earlier) != len(steps):
        raise ValueError(f"n_states needs the forward solver to honour record={steps}: solver "
                         f"{fwd.method!r} returned {len(earlier)} recorded states")

    def result(last: torch.Tensor, states: list[torch.Tensor]) -> Any:
        return [*states, last] if n_states is not None else last

    if not torch.is_grad_enabled():
        if spectral_radius_steps:
            assert stats is not None
            with torch.enable_grad():
                z_leaf = z_star.detach().requires_grad_()
                stats["forward"].spectral_radius = spectral_radius(
                    f(z_leaf, *inputs), z_leaf, spectral_radius_steps)
        return result(z_star, earlier)

    # Fixed-point correction: a phantom gradient from every earlier recorded state.
    states = [_phantom(f, z.detach(), inputs, phantom_steps, phantom_damping) for z in earlier]

    fz: Optional[torch.Tensor] = None
    # In chunks, no graph of f is kept: the backward pass records it again, chunk by chunk.
    if chunk_rows is None and (grad_mode != "phantom" or jac_reg_samples or spectral_radius_steps):
        z_leaf = z_star.detach().requires_grad_()
        with _reusable_backward():
            fz = f(z_leaf, *inputs)
        if jac_reg_samples:
            assert stats is not None
            stats["jac_loss"] = jac_reg(fz, z_leaf, jac_reg_samples)
        if spectral_radius_steps:
            assert stats is not None
            stats["forward"].spectral_radius = spectral_radius(fz, z_leaf, spectral_radius_steps)

    if grad_mode == "phantom":
        start = z_leaf if fz is not None else z_star
        return result(_phantom(f, start, inputs, phantom_steps, phantom_damping, fz), states)

    if chunk_rows is None:
        assert fz is not None
        if not fz.requires_grad or not _needs_more_than(fz, z_leaf):
            return result(fz.detach(), states)

    autocast = autocast_state(z_star.device)  # as f was recorded: to re-record it the same way

    def adjoint_solution(fz: torch.Tensor, z_leaf: torch.Tensor, grad: torch.Tensor,
                         f_inputs: tuple) -> tuple[torch.Tensor, tuple[SolverStats, bool]]:
        """The adjoint solution through ``fz = f(z_leaf, *f_inputs)``, and the solve's
        statistics with whether it ran without reading the device (no divergence check)."""
        options = bwd.resolved("backward").solver_kwargs()
        rerecord_below = check_rerecord_below(options.pop("rerecord_below", DEFAULT_RERECORD_BELOW))
        init = options.pop("init", "grad")
        shine_tol = options.pop("shine_tol", DEFAULT_SHINE_TOL)
        # An f that mixes samples (forward compact=False) cannot be re-recorded on fewer rows.
        options.setdefault("compact", kwargs["compact"])
        finite = torch.isfinite(grad.reshape(grad.shape[0], -1)).all(dim=1)
        finite_rows = finite.view(-1, *[1] * (grad.dim() - 1))
        # stop_mode "grad": the solve (linear in dL/dz*) runs on dL/dz* / ||dL/dz*|| per sample
        # with an absolute tolerance, and its result is multiplied back.
        norm = None
        if options["stop_mode"] == GRAD_STOP:
            options["stop_mode"] = "abs"
            grad, norm = _per_sample_normalized(grad, finite)
        adjoint = AdjointMap(f, f_inputs, fz, z_leaf, grad, rerecord_below, autocast)
        # -H^T is linear: the estimate of the normalized dL/dz* is the normalized estimate.
        estimate = pairs.minus_h_transpose(grad) if pairs is not None else None
        # The solver's own arithmetic runs with autocast off even if backward() is called
        # inside an autocast block (the adjoint map re-records f under f's own setting).
        with AutocastState.now(grad.device).off():
            if grad_mode == "shine":
                assert pairs is not None and estimate is not None
                y, bstats = _shine_backward(adjoint, grad, estimate, pairs, shine_tol,
                                            warm=init == "shine", method=bwd.method,
                                            options=options)
                sync_free = False
            else:
                # Cold: dL/dz*, the first term of the Neumann series (from y = 0 a dL/dz*
                # already below an absolute tolerance would end the solve at once with a zero
                # gradient). Warm: the forward's estimate of the solution, leaving a correction
                # to find. Samples with non-finite entries start at 0 and are flagged.
                y0 = _adjoint_start(grad, estimate if init == "shine" else None)
                out = _solve_adjoint(adjoint, y0, None, bwd.method, options)
                y, bstats = out.z, SolverStats.of(out)
                sync_free = not options.get("stop_early", True)
        bstats.vjp_rows, bstats.rerecord_rows = adjoint.vjp_rows, adjoint.rerecord_rows
        bstats.nonfinite_grad = ~finite
        if norm is not None:
            y = _times_rows(y, norm)
        # A non-finite dL/dz* goes on as is (normalizing left those rows unchanged), as plain
        # autograd would pass it: the parameters' gradients show it, so a GradScaler skips the
        # step and lowers its scale.
        return torch.where(finite_rows, y, grad), (bstats, sync_free)

    def finish(solves: list[tuple[SolverStats, bool]]) -> None:
        """Keeps the backward statistics (of the chunks' solves, joined) and warns about
        diverged samples unless the solves ran without reading the device."""
        bstats = SolverStats.cat([st for st, _ in solves])
        sync_free = any(free for _, free in solves)
        if stats is not None:
            bstats.check_backward_divergence = sync_free
            stats["backward"] = bstats
        if not sync_free:
            _warn_if_backward_diverged(bstats.status, bstats.nonfinite_grad, stacklevel=4)

    if chunk_rows is not None:
        return result(implicit_in_chunks(f, z_star, inputs, chunk_rows, adjoint_solution, finish),
                      states)

    def backward_solve(fz: torch.Tensor, z_leaf: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        y, solved = adjoint_solution(fz, z_leaf, grad, inputs)
        finish([solved])
        return y

    assert fz is not None
    return result(_ImplicitGrad.apply(fz, z_leaf, backward_solve), states)


class DEQ(nn.Module):
    """A deep equilibrium layer around ``f(z, *inputs) -> z``.

    ``f`` is usually an ``nn.Module`` (registered as a submodule so its
    parameters train with the DEQ). Forward and backward solves are configured
    separately; the per-sample statistics of the last solves are kept in
    :attr:`forward_stats` and :attr:`backward_stats`.

    ``jac_reg_samples=k`` (k > 0) makes every training forward pass (``self.training`` and
    grad enabled) compute the Jacobian regularizer, kept in :attr:`jac_loss` for the loss;
    ``spectral_radius_steps=n`` puts a spectral-radius estimate in
    ``forward_stats.spectral_radius``; ``n_states=k`` returns a list of k states (see
    :func:`deq_fixed_point`). z may be a tuple, list or dict of tensors. ``grad_mode`` and the
    backward option ``init`` choose the gradient (docs/backward.md compares them).

    Example:
        >>> cell = MyCell(d)                      # cell(z, x) -> z
        >>> deq = DEQ(cell, forward=dict(tol=1e-4), backward=dict(tol=1e-6))
        >>> z_star = deq(x, z0=torch.zeros_like(x))
        >>> loss(z_star).backward()

        >>> deq = DEQ(cell, jac_reg_samples=1)    # Jacobian regularization in training
        >>> loss = task_loss(deq(x)) + 2.0 * deq.jac_loss.mean()
    """

    def __init__(self, f: Callable[..., Any], *, forward: SettingsLike = None,
                 backward: SettingsLike = None, grad_mode: str = "implicit",
                 phantom_steps: int = 1, phantom_damping: float = 1.0,
                 compact: Union[bool, str] = "auto", chunk: Union[int, str, None] = "auto",
                 jac_reg_samples: int = 0, spectral_radius_steps: int = 0,
                 n_states: Optional[int] = None) -> None:
        super().__init__()
        self.f = f
        self.forward_settings = _settings(forward, DEFAULT_FORWARD)
        self.backward_settings = _settings(backward, DEFAULT_BACKWARD)
        _check_backward_modes(grad_mode, self.forward_settings, self.backward_settings)
        self.grad_mode = grad_mode
        self.phantom_steps, self.phantom_damping = phantom_steps, phantom_damping
        self.compact = compact
        # Checked now (a number of samples the settings cannot honour is refused at once).
        _settle_chunk(chunk, f, grad_mode, self.backward_settings, jac_reg_samples,
                      spectral_radius_steps, self.forward_settings.options.get("compact", compact))
        self.chunk = chunk
        _check_count("jac_reg_samples", jac_reg_samples)
        _check_count("spectral_radius_steps", spectral_radius_steps)
        self.jac_reg_samples, self.spectral_radius_steps = jac_reg_samples, spectral_radius_steps
        _check_n_states(n_states, self.forward_settings.max_iter)
        self.n_states = n_states
        _check_stop_modes(self.forward_settings, self.backward_settings)
        get_solver(self.forward_settings.method), get_solver(self.backward_settings.method)
        self._stats: dict[str, Any] = {}

    @property
    def forward_stats(self) -> Optional[SolverStats]:
        """Per-sample statistics of the last forward solve."""
        return self._stats.get("forward")

    @property
    def backward_stats(self) -> Optional[SolverStats]:
        """Per-sample statistics of the last backward (adjoint) solve."""
        return self._stats.get("backward")

    @property
    def jac_loss(self) -> Optional[torch.Tensor]:
        """The last training forward pass's Jacobian regularizer: a per-sample ``(B,)`` tensor
        estimating ``||J_f(z*)||_F^2 / D`` (:func:`deq_ext.jac_reg`), differentiable w.r.t. f's
        parameters; add ``weight * deq.jac_loss.mean()`` to the loss. None unless
        ``jac_reg_samples > 0`` and the pass was in training mode with grad enabled."""
        return self._stats.get("jac_loss")

    # Eager under torch.compile, like the solve: traced code would pass deq_fixed_point the
    # module behind a compiled f instead of the compiled f.
    @torch.compiler.disable
    def forward(self, *inputs: Any, z0: Any = None) -> Any:
        """Solve for z* given the inputs; ``z0`` defaults to zeros shaped like the first input.

        Returns z* (a tensor, or z0's structure), or with ``n_states`` a list of states."""
        if z0 is None:
            if not inputs or not isinstance(inputs[0], torch.Tensor):
                raise ValueError("z0 is required when the first input is not a tensor shaped like z")
            z0 = torch.zeros_like(inputs[0], dtype=inputs[0].dtype if inputs[0].is_floating_point()
                                  else torch.get_default_dtype())
        # Cleared, not replaced: the backward of an earlier call still writes into this dict.
        self._stats.clear()
        return deq_fixed_point(
            self.f, z0, *inputs, forward=self.forward_settings, backward=self.backward_settings,
            grad_mode=self.grad_mode, phantom_steps=self.phantom_steps,
            phantom_damping=self.phantom_damping, compact=self.compact, chunk=self.chunk,
            stats=self._stats,
            jac_reg_samples=self.jac_reg_samples if self.training else 0,
            spectral_radius_steps=self.spectral_radius_steps, n_states=self.n_states)

    def extra_repr(self) -> str:
        f, b = self.forward_settings, self.backward_settings
        return (f"forward=({f.method}, max_iter={f.max_iter}, tol={f.tol}, {f.stop_mode}), "
                f"backward=({b.method}, max_iter={b.max_iter}, tol={b.tol}, {b.stop_mode}), "
                f"grad_mode={self.grad_mode}, compact={self.compact}"
                + (f", chunk={self.chunk!r}" if self.chunk != AUTO else "")
                + (f", jac_reg_samples={self.jac_reg_samples}" if self.jac_reg_samples else "")
                + (f", spectral_radius_steps={self.spectral_radius_steps}"
                   if self.spectral_radius_steps else "")
                + (f", n_states={self.n_states}" if self.n_states is not None else ""))
