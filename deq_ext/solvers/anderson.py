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
from typing import Any, Optional

import torch

from ..result import SolverResult
from ..states import solves_structured_states
from ._base import (
    Func,
    MaskedSolve,
    SolveOptions,
    run_solve,
    state_dtype_of,
    validate_history_dtype,
    validate_positive,
    validate_positive_int,
)
from ._history import History


class _AndersonSolve(MaskedSolve):
    """Anderson state: a ring of m iterates X and residuals G (grown in chunks), their Gram
    matrix (B, m, m) and the next mixing weights (B, m)."""

    def __init__(self, f: Func, z0: torch.Tensor, opts: SolveOptions, *, memory: int,
                 beta: float, lam: float, history_dtype: Optional[torch.dtype]) -> None:
        self.m = memory
        super().__init__(f, z0, opts)
        self.beta, self.lam = float(beta), float(lam)
        self.history = History(("X", "G"), self.B, self.D, memory,
                               history_dtype or self.state_dtype, self.device)
        self.gram, self.alpha = self.zeros(memory, memory), self.zeros(memory)
        self.nhist, self.fallbacks = self.full(0, torch.int64), self.full(0, torch.int64)

    def partials_layout(self) -> tuple[int, int]:
        # Gram-row dots per entry; per sample the weights' solve (K, its factor, the weights).
        return max(2, self.m), 2 * self.m * self.m + self.m

    def history_of(self) -> History:
        return self.history

    def prepare(self, it: int) -> bool:
        # Step `it` stores entry nhist <= it into slot nhist % m.
        return self.history.reserve(it + 1, held=self.state_nbytes)

    def step(self) -> None:
        X, G = self.history["X"], self.history["G"]
        self.ops.anderson_store_(X, G, self.gram, self.z, self.g, self.alpha, self.fallbacks,
                                 self.status, self.nhist, self.partials, self.tickets, self.m,
                                 self.lam)
        self.ops.anderson_mix_(X, G, self.z, self.alpha, self.status, self.nhist, self.m,
                               self.beta)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().state_tensors(), "X": self.history.full("X"),
                "G": self.history.full("G"), "gram": self.gram, "alpha": self.alpha,
                "nhist": self.nhist}

    def result(self, return_final: bool, return_state: bool) -> SolverResult:
        res = super().result(return_final, return_state)
        res.fallbacks = self.fallbacks
        return res


@solves_structured_states
def anderson(
    f: Func,
    z0: torch.Tensor,
    *,
    memory: Optional[int] = None,
    beta: float = 1.0,
    lam: float = 1e-4,
    history_dtype: Optional[torch.dtype] = None,
    **options: Any,
) -> SolverResult:
    """Solve ``z = f(z)`` for every sample of a batch with Anderson acceleration.

    ``f``, ``z0`` and the ``options`` every method takes (``inputs``, ``compact``,
    ``max_iter``, ``tol``, ``stop_mode``, ``per_sample``, ``return_final``,
    ``stall_patience``, ``diverge_ratio``, ``trace``, ``stop_early``, ``check_every``,
    ``return_state``, ``use_reference``, ``record``) mean what they mean for :func:`deq_ext.broyden`.
    Specific to Anderson:

    Args:
        memory: history size m (the last m iterates and residuals, a ring);
            default 5.
        beta: mixing (damping) parameter in (0, 1]: ``z = sum alpha_i (X_i + beta G_i)``.
        lam: ridge on the Gram matrix, relative to its smallest positive diagonal
            entry, i.e. to the smallest residual in the window (>= 0).
        history_dtype: store X and G in ``torch.bfloat16`` or ``torch.float16`` (as
            :func:`deq_ext.broyden`'s option: the Gram matrix is of the stored rows and the
            passes accumulate in float64). X holds the iterates themselves, so the reachable
            relative residual stops near the dtype's precision (measured: about 1e-3 with
            bfloat16, 1.5e-4 with float16): for loose tolerances only, and so the default
            (None) is the state dtype, unlike Broyden's.

    Returns:
        A :class:`~deq_ext.result.SolverResult` whose ``fallbacks`` counts, per
        sample, the steps whose weights could not be solved for (singular or
        non-finite system) and fell back to a plain damped step.
    """
    opts = SolveOptions.of("anderson", f, z0, options)
    memory = 5 if memory is None else memory
    validate_positive_int("memory (history size m)", memory)
    validate_positive("beta", beta, upper=1.0)
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    validate_history_dtype(history_dtype, state_dtype_of(z0))
    return run_solve(_AndersonSolve, f, z0, opts, memory=memory, beta=beta, lam=lam,
                     history_dtype=history_dtype)
