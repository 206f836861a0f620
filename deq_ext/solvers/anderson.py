"""Batched, per-sample masked Anderson acceleration.

Each step, on top of the shared residual/status op (see ``_base``), two
extension ops (semantics in :mod:`deq_ext.reference`):

1. ``anderson_store_``: stores the newest iterate and residual in the ring of m
   entries and computes its row of the residual Gram matrix in one pass;
2. ``anderson_mix_``: per sample, the mixing weights (a small ridge-regularised
   SPD solve; a failed solve falls back to a plain damped step and is counted in
   ``fallbacks``), then ``z = sum_i alpha_i (X_i + beta G_i)`` in one pass.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..result import SolverResult
from ._base import (Func, MaskedSolve, run_solve, validate_common, validate_positive,
                    validate_positive_int)


class _AndersonSolve(MaskedSolve):
    """Anderson state: iterates X and residuals G (B, m, D), their Gram matrix (B, m, m)."""

    def __init__(self, f: Func, z0: torch.Tensor, *, memory: int, beta: float, lam: float,
                 **common) -> None:
        super().__init__(f, z0, **common)
        self.beta, self.lam = float(beta), float(lam)
        self.X, self.G = self.zeros(memory, self.D), self.zeros(memory, self.D)
        self.gram, self.alpha = self.zeros(memory, memory), self.zeros(memory)
        self.nhist, self.fallbacks = self.full(0, torch.int64), self.full(0, torch.int64)

    def step(self) -> None:
        self.ops.anderson_store_(self.X, self.G, self.gram, self.z, self.g, self.status, self.nhist)
        self.ops.anderson_mix_(self.X, self.G, self.gram, self.z, self.alpha, self.fallbacks,
                               self.status, self.nhist, self.beta, self.lam)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        names = ("X", "G", "gram", "alpha", "nhist")
        return {**super().state_tensors(), **{n: getattr(self, n) for n in names}}

    def result(self, return_final: bool, return_state: bool) -> SolverResult:
        res = super().result(return_final, return_state)
        res.fallbacks = self.fallbacks
        return res


def anderson(
    f: Func,
    z0: torch.Tensor,
    *,
    inputs: tuple = (),
    compact: Optional[bool] = None,
    max_iter: int = 50,
    tol: float = 1e-3,
    stop_mode: str = "abs",
    memory: Optional[int] = None,
    beta: float = 1.0,
    lam: float = 1e-4,
    per_sample: bool = True,
    return_final: bool = False,
    stall_patience: int = 30,
    diverge_ratio: float = 1e6,
    trace: bool = False,
    stop_early: bool = True,
    check_every: int = 1,
    return_state: bool = False,
    use_reference: bool = False,
) -> SolverResult:
    """Solve ``z = f(z)`` for every sample of a batch with Anderson acceleration.

    The arguments shared with :func:`deq_ext.broyden` mean the same (f, z0,
    inputs, compact, max_iter, tol, stop_mode, per_sample, return_final,
    stall_patience, diverge_ratio, trace, stop_early, check_every, return_state,
    use_reference). Specific to Anderson:

    Args:
        memory: history size m (the last m iterates and residuals, a ring);
            default 5.
        beta: mixing (damping) parameter in (0, 1]: ``z = sum alpha_i (X_i + beta G_i)``.
        lam: ridge on the Gram matrix, relative to its smallest positive diagonal
            entry, i.e. to the smallest residual in the window (>= 0).

    Returns:
        A :class:`~deq_ext.result.SolverResult` whose ``fallbacks`` counts, per
        sample, the steps whose weights could not be solved for (singular or
        non-finite system) and fell back to a plain damped step.
    """
    if memory is None:
        memory = 5
    validate_common(f, z0, max_iter, tol, stop_mode, stall_patience, diverge_ratio)
    validate_positive_int("check_every", check_every)
    validate_positive_int("memory (history size m)", memory)
    validate_positive("beta", beta, upper=1.0)
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    return run_solve(
        _AndersonSolve, f, z0, return_final, return_state, trace,
        inputs=tuple(inputs), compact=bool(inputs) if compact is None else compact,
        max_iter=max_iter, tol=tol, stop_mode=stop_mode, per_sample=per_sample,
        stall_patience=stall_patience, diverge_ratio=diverge_ratio, stop_early=stop_early,
        check_every=check_every, use_reference=use_reference, memory=memory, beta=beta, lam=lam)
