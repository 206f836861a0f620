"""The object a solve returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .status import Status


@dataclass
class SolverResult:
    """Outcome of a batched solve; every per-sample tensor has shape ``(B,)``.

    Attributes:
        z: the solution, shaped and typed like ``z0``: per sample, the
            lowest-residual iterate (default) or the last one (``return_final``). For a
            structured ``z0`` (tuple, list or dict of tensors), the same structure.
        abs_residual: ``||f(z) - z||`` of the returned iterate, per sample.
        rel_residual: ``||f(z) - z|| / (||f(z)|| + 1e-9)`` of the returned iterate.
        nstep: solver steps each sample took.
        nfev: evaluations of f each sample took part in while it was active
            (the initial one and line-search trials included).
        status: a :class:`~deq_ext.status.Status` code per sample.
        abs_trace, rel_trace: ``(B, T)`` residuals after every evaluation, when
            ``trace=True`` (a finished sample repeats its last value).
        state: the solver's internal tensors, when ``return_state=True``.
        fallbacks: Anderson only: per sample, the steps whose mixing weights
            could not be solved for and fell back to a plain damped step.
        recorded: with ``record=[k1, k2, ...]``, one entry per requested step, shaped like
            ``z``: per sample, what the solve would have returned with ``max_iter=k``
            (the lowest-residual iterate after k steps, or the k-th iterate with
            ``return_final``); a sample that stopped before step k repeats its final one.
        f_rows: rows f was evaluated on over the solve (its batch dimension, summed over its
            calls): with compaction fewer than the calls times B, at least ``nfev.sum()``.
    """

    # Any: a tensor, or z0's structure for a structured state (see deq_ext.states).
    z: Any
    abs_residual: torch.Tensor
    rel_residual: torch.Tensor
    nstep: torch.Tensor
    nfev: torch.Tensor
    status: torch.Tensor
    abs_trace: Optional[torch.Tensor] = None
    rel_trace: Optional[torch.Tensor] = None
    state: Optional[dict[str, torch.Tensor]] = field(default=None, repr=False)
    fallbacks: Optional[torch.Tensor] = None
    recorded: Optional[list[Any]] = None
    f_rows: Optional[int] = None

    @property
    def converged(self) -> torch.Tensor:
        """Boolean mask of the samples that reached the tolerance."""
        return self.status == Status.CONVERGED

    @property
    def diverged(self) -> torch.Tensor:
        """Boolean mask of the samples flagged as diverged (non-finite or blown up)."""
        return self.status == Status.DIVERGED

    def summary(self) -> str:
        """One line: how many samples ended in each status, mean steps and worst residual."""
        counts = {s.name.lower(): int((self.status == s).sum()) for s in Status if s != Status.ACTIVE}
        parts = ", ".join(f"{n} {name}" for name, n in counts.items() if n)
        steps = self.nstep.double().mean().item() if self.nstep.numel() else 0.0
        worst = self.abs_residual.max().item() if self.abs_residual.numel() else 0.0
        return f"{parts or 'empty batch'}; mean nstep {steps:.1f}; max abs residual {worst:.3g}"
