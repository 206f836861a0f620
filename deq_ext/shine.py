"""SHINE: the forward Broyden solve's inverse-Jacobian estimate reused in the backward pass.

A Broyden forward solve of ``g(z) = f(z) - z`` ends holding, per sample, a low-rank estimate
``H = -I + sum_j u_j v_j^T`` of ``J_g(z*)^{-1}`` (the pairs ``U, V`` of
:mod:`deq_ext.reference`'s ``broyden_expand_``). The adjoint system of the implicit gradient,
``y = J_f(z*)^T y + dL/dz*``, has the solution ``y* = (I - J_f^T)^{-1} dL/dz* =
-(J_g^{-1})^T dL/dz*``, so ``-H^T dL/dz* = dL/dz* - V (U^T dL/dz*)`` estimates it at the cost of
two passes over the pairs and no vector-Jacobian product (Ramzi et al., "SHINE: SHaring the
INverse Estimate from the forward pass for bi-level optimization and implicit models", ICLR
2022). The layer uses it two ways (:func:`deq_ext.deq_fixed_point`):

* ``grad_mode="shine"``: the estimate is the gradient (inexact), except for the samples that
  fall back to the exact adjoint solve (:class:`ShineFallback` says why, per sample);
* ``backward=dict(init="shine")``: the exact adjoint solve starts from the estimate instead of
  ``dL/dz*``, leaving only a correction to find (exact to the backward tolerance).

How good the estimate is depends on the model: Broyden's ``H`` satisfies the secant conditions
along the forward's own steps, not along ``dL/dz*``. With one value per sample it is exact after
one step; on the trained models of docs/backward.md it was poorer than ``dL/dz*`` itself.

Both keep the forward's pairs alive until backward (their bytes, in the history dtype); the
default implicit backward keeps none of the forward's state.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .result import SolverResult
from .status import REL_EPS, Status

BACKWARD_INITS = ("grad", "shine")
# Accept the SHINE estimate of a sample when its adjoint relative residual is at most this.
DEFAULT_SHINE_TOL = 0.1
# Slots of U, V widened to the accumulation dtype at a time (bounds the temporary copy).
_SLOT_CHUNK = 8


class ShineFallback(enum.IntEnum):
    """Why a sample of a ``grad_mode="shine"`` backward took the exact adjoint solve instead of
    the SHINE estimate (``backward_stats.fallback``, per sample)."""

    NONE = 0
    """The SHINE estimate is the sample's gradient."""
    NOT_CONVERGED = 1
    """The forward solve stopped this sample short of its tolerance: the pairs describe a point
    that is not the fixed point."""
    NO_PAIRS = 2
    """The forward solve stored no pair for this sample (H = -I: nothing was learnt)."""
    NON_FINITE = 3
    """``dL/dz*`` or the estimate has non-finite entries."""
    RESIDUAL = 4
    """The estimate's adjoint relative residual ``||y - J_f^T y - dL/dz*|| / ||J_f^T y +
    dL/dz*||`` is above the backward option ``shine_tol``."""


@dataclass
class ForwardPairs:
    """What the backward pass keeps of a Broyden forward solve: the pairs of each sample's
    estimate ``H = -I + sum_j u_j v_j^T`` (ring slots ``j < min(npairs, U.shape[1])``), in the
    history dtype, and the forward status (a sample that did not converge falls back)."""

    U: torch.Tensor
    V: torch.Tensor
    npairs: torch.Tensor
    status: torch.Tensor

    @classmethod
    def of(cls, res: SolverResult) -> "ForwardPairs":
        """The pairs of a Broyden solve run with ``return_state=True``."""
        state = res.state or {}
        missing = [k for k in ("U", "V", "npairs") if k not in state]
        if missing:
            raise ValueError(f"SHINE needs the forward solve's Broyden pairs; its state lacks "
                             f"{missing} (was it a Broyden solve with return_state=True?)")
        return cls(state["U"], state["V"], state["npairs"], res.status)

    @property
    def nbytes(self) -> int:
        """Bytes kept alive until backward."""
        return sum(t.nbytes for t in (self.U, self.V, self.npairs, self.status))

    def live(self) -> torch.Tensor:
        """``(B, capacity)`` mask of the stored pairs."""
        k = torch.clamp(self.npairs, max=self.U.shape[1])
        return torch.arange(self.U.shape[1], device=self.U.device)[None, :] < k[:, None]

    def minus_h_transpose(self, grad: torch.Tensor) -> torch.Tensor:
        """``-H^T grad = grad - V (U^T grad)`` per sample, shaped and typed like ``grad``.

        Accumulates in float64 for a float64 ``grad``, else in float32, whatever the history
        dtype (bfloat16 pairs are widened a few slots at a time)."""
        B = grad.shape[0]
        acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
        g = grad.reshape(B, -1).to(acc)
        live = self.live().to(acc)
        y = g.clone()
        for s in range(0, self.U.shape[1], _SLOT_CHUNK):
            U = self.U[:, s:s + _SLOT_CHUNK].to(acc)
            V = self.V[:, s:s + _SLOT_CHUNK].to(acc)
            coef = torch.einsum("bkd,bd->bk", U, g) * live[:, s:s + _SLOT_CHUNK]
            y -= torch.einsum("bkd,bk->bd", V, coef)
        return y.to(grad.dtype).view_as(grad)


def check_backward_init(value: Any) -> str:
    """The backward option ``init`` (ValueError unless one of :data:`BACKWARD_INITS`)."""
    if value not in BACKWARD_INITS:
        raise ValueError(f"backward option init must be 'grad' (start the adjoint solve from "
                         f"dL/dz*) or 'shine' (from the forward Broyden estimate -H^T dL/dz*), "
                         f"got {value!r}")
    return str(value)


def check_shine_tol(value: Any) -> float:
    """The backward option ``shine_tol``: a positive number (math.inf: no residual check)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 \
        and not math.isnan(value)
    if not ok:
        raise ValueError(f"backward option shine_tol must be a positive number (the SHINE "
                         f"estimate's largest accepted adjoint relative residual; math.inf: no "
                         f"check), got {value!r}")
    return float(value)


def fallback_codes(pairs: ForwardPairs, grad: torch.Tensor,
                   estimate: torch.Tensor) -> torch.Tensor:
    """Per-sample :class:`ShineFallback` codes that need no VJP (the first reason that applies,
    in the order NON_FINITE, NO_PAIRS, NOT_CONVERGED)."""
    B = grad.shape[0]
    code = torch.full((B,), int(ShineFallback.NONE), dtype=torch.int64, device=grad.device)
    code = torch.where(pairs.status != Status.CONVERGED, int(ShineFallback.NOT_CONVERGED), code)
    code = torch.where(pairs.npairs == 0, int(ShineFallback.NO_PAIRS), code)
    finite = torch.isfinite(grad.reshape(B, -1)).all(1) & torch.isfinite(estimate.reshape(B, -1)).all(1)
    return torch.where(finite, code, int(ShineFallback.NON_FINITE))


def residuals(y: torch.Tensor, fy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute and relative residuals ``||fy - y||``, ``||fy - y|| / (||fy|| + 1e-9)`` per sample
    (as the solvers define them), in float64."""
    B = y.shape[0]
    d = (fy.reshape(B, -1).double() - y.reshape(B, -1).double()).norm(dim=1)
    return d, d / (fy.reshape(B, -1).double().norm(dim=1) + REL_EPS)


def accept(code: torch.Tensor, rel: Optional[torch.Tensor], shine_tol: float) -> torch.Tensor:
    """``code`` with RESIDUAL for the samples still accepted whose relative residual ``rel`` is
    above ``shine_tol`` (or not finite); ``rel`` None: no check was made."""
    if rel is None:
        return code
    bad = (code == ShineFallback.NONE) & ~(rel <= shine_tol)
    return torch.where(bad, int(ShineFallback.RESIDUAL), code)


__all__ = ["BACKWARD_INITS", "DEFAULT_SHINE_TOL", "ForwardPairs", "ShineFallback",
           "check_backward_init", "check_shine_tol", "fallback_codes", "residuals", "accept"]
