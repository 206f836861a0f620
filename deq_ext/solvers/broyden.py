"""Batched, per-sample masked limited-memory Broyden (the default solver).

Per iteration, on top of the shared residual/status op (see ``_base``), two
extension ops (semantics in :mod:`deq_ext.reference`):

1. ``broyden_reduce``: one pass over the history (U, V) for all dot products;
2. ``broyden_expand_``: one pass that stores the new rank-1 pair, forms the
   next step and moves z.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from ..result import SolverResult
from ..states import solves_structured_states
from ..status import NUM_SCALARS, Status
from ._base import (
    Func,
    MaskedSolve,
    SolveOptions,
    run_solve,
    state_dtype_of,
    validate_history_dtype,
    validate_positive_int,
    workspace_bytes,
)
from ._buckets import Bucket
from ._history import History


def default_history_dtype(state_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Broyden's history dtype when none is given, per device and state dtype: bfloat16 under a
    float32 state on every device, the state dtype (float64) under a float64 one.

    The passes accumulate in float64 and only the stored pairs are rounded, on the CPU and on
    CUDA alike, so the steps to tolerance are a property of the arithmetic, not of the device:
    ``python -m benchmarks.history_precision`` measured the same steps and the same converged
    samples with a bfloat16 and a float32 history on every float32 problem (and on the trained
    models' forward and adjoint solves, ``python -m benchmarks.history_size``), at half the bytes
    of the largest buffer. float64 solves are asked for tight tolerances: they stay wide. float16
    is never the default (its range fails where the pairs shrink; on the CPU it is 4x slower).
    """
    del device  # one choice for every device (see above)
    return torch.bfloat16 if state_dtype == torch.float32 else state_dtype


class _BroydenSolve(MaskedSolve):
    """Broyden state: a ring of m rank-1 pairs (U, V) of H = -I + U V^T, grown in chunks."""

    state_vectors = MaskedSolve.state_vectors + 1  # dz

    def __init__(self, f: Func, z0: torch.Tensor, opts: SolveOptions, *, memory: int,
                 line_search: bool, ls_max_iter: int, history_dtype: torch.dtype,
                 restart: bool) -> None:
        self.m = memory
        super().__init__(f, z0, opts)
        self.line_search, self.ls_max_iter = line_search, ls_max_iter
        self.restart = restart
        self.dz = self.zeros(self.D)
        self.history = History(("U", "V"), self.B, self.D, memory, history_dtype, self.device)
        self.proj, self.scal = self.zeros(3, memory), self.zeros(NUM_SCALARS)
        self.npairs = self.full(0, torch.int64)

    def partials_layout(self) -> tuple[int, int]:
        return max(2, 3 * self.m + 2), 0  # U.dz, V.dg, V.g per pair, dz.dg, dz.g

    def history_of(self) -> History:
        return self.history

    def prepare(self, it: int) -> bool:
        # Step `it` reads the npairs <= it stored pairs and writes slot npairs % m.
        return self.history.reserve(it + 1, held=self.state_nbytes)

    def step(self) -> None:
        """One Broyden update of the inverse Jacobian and one move of z, active samples only."""
        U, V = self.history["U"], self.history["V"]
        # With restart, the kernels start a full ring over (H = -I, the newest secant pair in
        # slot 0: restarted Broyden); a finished sample keeps its count and its m pairs.
        self.ops.broyden_reduce(U, V, self.dz, self.dg, self.g, self.status, self.npairs,
                                self.proj, self.scal, self.partials, self.tickets, self.m,
                                self.restart)
        self.ops.broyden_expand_(U, V, self.dz, self.dg, self.g, self.z, self.proj, self.scal,
                                 self.status, self.npairs, self.tickets, self.m, self.restart)

    def after_evaluation(self, fz: torch.Tensor, bucket: Bucket) -> torch.Tensor:
        return self.armijo(fz) if self.line_search else fz

    # -- Armijo line search with a step size per sample -----------------------------------------
    def armijo(self, fz: torch.Tensor, c1: float = 1e-4, alpha_min: float = 1e-2) -> torch.Tensor:
        """Backtrack the step of every active sample whose residual did not drop enough.

        ``z`` has already moved by the full step ``dz``; ``g`` still holds the
        residual before the step. Returns f at the accepted points, ``(B, D)``.
        """
        B, D = self.B, self.D
        active = self.status == Status.ACTIVE
        acc = torch.float64
        phi0 = self.g.to(acc).pow(2).sum(1)
        step = self.dz.clone()
        z_old = self.z - step
        fz = fz.reshape(B, D)
        best_fz, best_alpha = fz.clone(), torch.ones_like(phi0)
        best_phi = (fz.to(acc) - self.z.to(acc)).pow(2).sum(1).nan_to_num(math.inf)
        alpha, phi = best_alpha.clone(), best_phi.clone()
        # Reading how many samples need a trial costs a sync per trial; without reads (and in a
        # CUDA graph) every trial runs, masked.
        reads = self.stop_early and not self.graph
        for _ in range(self.ls_max_iter):
            need = active & ~(phi <= phi0 * (1 - c1 * alpha)) & (alpha > alpha_min)
            rows = None
            if reads:
                n_need = int(need.sum())
                if n_need == 0:
                    break
                rows = self.rows_of(need, n_need)
            # Minimiser of the quadratic through phi(0), phi'(0) = -phi0 and phi(alpha).
            quad = phi0 * alpha ** 2 / (2 * (phi - phi0 + phi0 * alpha))
            quad = torch.where(torch.isfinite(quad), quad, 0.5 * alpha)
            alpha = torch.where(need, quad.clamp(0.1 * alpha, 0.5 * alpha), alpha)
            trial = z_old + alpha.to(step.dtype)[:, None] * step
            fz_trial = self.evaluate(torch.where(need[:, None], trial, self.z),
                                     self.bucket(rows)).reshape(B, D)
            self.nfev += need
            phi_t = (fz_trial.to(acc) - trial.to(acc)).pow(2).sum(1).nan_to_num(math.inf)
            phi = torch.where(need, phi_t, phi)
            better = need & (phi_t < best_phi)
            best_phi = torch.where(better, phi_t, best_phi)
            best_alpha = torch.where(better, alpha, best_alpha)
            best_fz = torch.where(better[:, None], fz_trial, best_fz)
        self.dz.copy_(torch.where(active[:, None], best_alpha.to(step.dtype)[:, None] * step,
                                  self.dz))
        self.z.copy_(torch.where(active[:, None], z_old + self.dz, self.z))
        return best_fz

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """With the history as ``(B, capacity, D)`` tensors (copies of the chunks)."""
        return {**super().state_tensors(), "dz": self.dz, "U": self.history.full("U"),
                "V": self.history.full("V"), "npairs": self.npairs}


@solves_structured_states
def broyden(
    f: Func,
    z0: torch.Tensor,
    *,
    memory: Optional[int] = None,
    line_search: bool = False,
    ls_max_iter: int = 4,
    history_dtype: Optional[torch.dtype] = None,
    restart: bool = False,
    **options: Any,
) -> SolverResult:
    """Solve ``z = f(z)`` for every sample of a batch with limited-memory Broyden.

    The options from ``inputs`` to ``record`` are those of every method
    (:class:`~deq_ext.solvers._base.SolveOptions`); ``memory``, ``restart``,
    ``line_search``, ``ls_max_iter`` and ``history_dtype`` are Broyden's own.

    Args:
        f: ``f(z, *inputs)`` maps a tensor shaped like ``z0`` to one of the same
            shape, dtype and device; each sample (row of dim 0) must only depend
            on its own row of z and of the batched inputs. It is called under
            ``torch.no_grad()`` and must not modify its input in place.
        z0: initial guess, batched on dim 0: ``(B, ...)``. float16/bfloat16
            iterates are accepted; the solver state is then kept in float32. A tuple,
            list or dict of such tensors (one dtype and device, e.g. the resolutions of
            a multiscale model) is solved as one flat state per sample; f then gets and
            returns that structure (:mod:`deq_ext.states`).
        inputs: extra arguments of f. A tensor whose dim 0 has size B is
            batched: with compaction f gets its rows of the active samples, also
            inside lists, tuples and dicts. Anything else (non-tensors, tensors
            of another leading size) is passed unchanged. To pass an unbatched
            tensor whose dim 0 happens to be B, close over it in f instead.
        compact: evaluate f only on the samples still active, in power-of-two
            buckets: the active rows padded with finished ones to a power of two,
            gathered (rows of z and of the batched inputs) only when the active count
            falls to the next lower power of two, so f runs on at most twice the
            active rows. ``"auto"`` (default): on when ``inputs`` are given (an f that
            closes over batched tensors cannot be compacted), on the CPU always, on a
            GPU as long as the first compacted evaluation measured at least 3% cheaper
            than a full one. True: always; False: f always sees the whole batch
            (needed for an f that mixes samples: batch norm, attention across the
            batch) and finished rows are ignored.
        max_iter: maximum solver steps per sample (>= 1).
        tol: per-sample stopping tolerance on the ``stop_mode`` residual.
        stop_mode: ``'abs'`` for ``||f(z)-z||``, ``'rel'`` for
            ``||f(z)-z|| / (||f(z)|| + 1e-9)``.
        memory: number of rank-1 pairs kept (history size m, a ring buffer);
            defaults to ``max_iter`` (the whole history). The ring is allocated in
            chunks of 8 pairs as the steps fill it, so a solve that stops after k
            steps holds about k pairs whatever m is. A smaller ring bounds the
            memory of long solves but can stall or diverge hard ones:
            ``python -m benchmarks.history_size`` measures it.
        restart: what a full ring does with the next pair. False (default): the newest
            pair replaces the oldest. True: every pair is dropped and the iteration starts
            over from H = -I with the newest secant pair (restarted Broyden), which keeps a
            consistent approximation: with a ring shorter than the solve it needs fewer
            steps, notably on the linear adjoint solve (``python -m
            benchmarks.history_size``). ``npairs`` then counts the pairs since the last
            restart (a sample that finished with a full ring keeps its m pairs); the
            kernels do the restart, at no extra op.
        history_dtype: the dtype of the stored pairs U, V: ``torch.bfloat16`` (the
            default under a float32 state, on every device), ``torch.float16``, or the
            state dtype (float32 for float16/bfloat16/float32 iterates, float64; the
            default under float64). A narrow history halves the bytes of the largest
            buffer and of the two bandwidth-bound passes over it; the passes still
            accumulate in float64 and only the stored pairs are rounded (an inexact
            Broyden: ``python -m benchmarks.history_precision`` measured the same steps to
            tolerance on every float32 problem). Widen it (``history_dtype=torch.float32``)
            for float32 tolerances near bfloat16's precision over many steps, e.g. a
            relative residual below about 1e-6. float16 overflows beyond 65504: prefer
            bfloat16.
        per_sample: stop each sample as soon as it converges (default). With
            False every sample iterates until all have converged, as torchdeq does.
        return_final: return the last iterate instead of the lowest-residual one.
        line_search: Armijo backtracking with a step size per sample (extra f
            evaluations; each trial reads one count from the device, except with
            ``stop_early=False``, where all ``ls_max_iter`` trials run, masked).
        ls_max_iter: at most this many backtracking trials per step.
        stall_patience: a sample with no new lowest residual for this many
            steps stops as STALLED (<= 0 disables).
        diverge_ratio: a sample whose residual exceeds this multiple of its best
            is flagged DIVERGED (non-finite residuals always are).
        trace: record the residuals after every evaluation (``abs_trace``, ``rel_trace``).
        stop_early: check whether any sample is still pending and stop when none
            is. The pending count is computed on the device and copied to the host
            without waiting; on a GPU the host reads the copy of the check before
            (one check late), so the loop never waits for the GPU. With False the
            solve never reads from the device: exactly ``max_iter`` steps run
            (finished samples stay frozen), f sees the whole batch, and a non-finite
            z0 is not rejected up front but flags its sample DIVERGED. The results
            are the same bits either way.
        check_every: with ``stop_early``, read the counts once every this many
            iterations (>= 1; default 1, or 4 with ``graph``: the iterations of one
            replay). Finished samples are frozen, so the results do not depend on
            it; only the wasted evaluations of f on finished rows between two reads
            (and the length of the traces) do.
        graph: replay the loop as CUDA graphs of ``check_every`` iterations (CUDA
            only; :mod:`deq_ext.solvers._graph` lists what f must satisfy, and a
            failed capture raises ``GraphCaptureError`` naming the cause). The whole
            history is allocated up front. Same results, bit for bit, as the eager
            loop on the same device.
        return_state: attach the internal tensors to the result (for debugging/tests).
        use_reference: run the pure-PyTorch reference ops instead of the extension.
        record: a list of step numbers ``k`` (0 <= k <= max_iter); ``result.recorded``
            then holds, per entry, each sample's iterate after k steps: exactly what the
            same solve with ``max_iter=k`` returns (the lowest-residual iterate so far,
            or the k-th iterate with ``return_final``). A sample that stopped earlier
            repeats its final iterate. Only these copies are kept, never the trajectory.

    Returns:
        A :class:`~deq_ext.result.SolverResult`.

    Example:
        >>> A = 0.5 * torch.eye(3)
        >>> res = deq_ext.broyden(lambda z: z @ A + 1.0, torch.zeros(4, 3), tol=1e-8)
        >>> res.z  # every entry is 2.0
    """
    opts, own = _checked(f, z0, memory, line_search, ls_max_iter, history_dtype, restart,
                         options)
    return run_solve(_BroydenSolve, f, z0, opts, **own)


def broyden_workspace(z0: torch.Tensor, *, memory: Optional[int] = None,
                      line_search: bool = False, ls_max_iter: int = 4,
                      history_dtype: Optional[torch.dtype] = None, restart: bool = False,
                      **options: Any) -> dict[str, int]:
    """Bytes of the state ``broyden(f, z0, ...)`` allocates, without running it.

    ``z0`` may live on the meta device. Returns ``total`` (every state tensor: iterate,
    residuals, compaction's buffers, per-sample vectors, and the history as a full ring: the
    most the solve can hold), ``history`` (U and V, full ring), ``history_chunk`` (the bytes
    of one growth of the history: a solve that stops after k steps holds
    ``ceil(k / chunk) * history_chunk``), and the batch ``B`` and flattened size ``D``.
    """
    opts, own = _checked(lambda z, *inputs: z, z0, memory, line_search, ls_max_iter,
                         history_dtype, restart, options)
    return workspace_bytes(_BroydenSolve, z0, opts, **own)


def _checked(f, z0, memory, line_search, ls_max_iter, history_dtype, restart,
             options) -> tuple[SolveOptions, dict]:
    opts = SolveOptions.of("broyden", f, z0, options)
    memory = opts.max_iter if memory is None else memory
    validate_positive_int("memory (history size m)", memory)
    validate_positive_int("ls_max_iter", ls_max_iter)
    if not isinstance(restart, bool):
        raise TypeError(f"restart must be True or False, got {restart!r}")
    state_dtype = state_dtype_of(z0)
    validate_history_dtype(history_dtype, state_dtype)
    if history_dtype is None:
        history_dtype = default_history_dtype(state_dtype, z0.device)
    return opts, dict(memory=memory, line_search=line_search, ls_max_iter=ls_max_iter,
                      history_dtype=history_dtype, restart=restart)
