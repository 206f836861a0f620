"""Python driver of the batched, per-sample masked limited-memory Broyden solver.

The heavy lifting per iteration is three extension ops (see
:mod:`deq_ext.reference` for their exact semantics):

1. ``residual_status_`` after every evaluation of f: residual, norms, best
   iterate and per-sample status, fused;
2. ``broyden_reduce``: one pass over the history (U, V) for all dot products;
3. ``broyden_expand_``: one pass that stores the new rank-1 pair, forms the
   next step and moves z.

Samples that converged, diverged or stalled leave the active set and are frozen
bit for bit; nothing a sample gets depends on which other samples share its
batch. The loop reads one number from the device per iteration (the number of
samples still pending) and none at all with ``stop_early=False``.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Optional

import torch

from .. import _extension
from ..result import SolverResult
from ..status import Status

Func = Callable[[torch.Tensor], torch.Tensor]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _validate(z0: torch.Tensor, max_iter: int, tol: float, stop_mode: str, memory: int,
              stall_patience: int, diverge_ratio: float, ls_max_iter: int) -> None:
    if not isinstance(z0, torch.Tensor):
        raise TypeError(f"z0 must be a torch.Tensor, got {type(z0).__name__}")
    if z0.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"z0 must be a float16/bfloat16/float32/float64 tensor, got {z0.dtype}")
    if z0.dim() < 1:
        raise ValueError("z0 must be batched on dim 0: shape (B, ...), got a 0-d tensor")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not math.isfinite(tol) or tol <= 0:
        raise ValueError(f"tol must be a positive finite number, got {tol!r}")
    if stop_mode not in ("abs", "rel"):
        raise ValueError(f"stop_mode must be 'abs' or 'rel', got {stop_mode!r}")
    if isinstance(memory, bool) or not isinstance(memory, int) or memory < 1:
        raise ValueError(f"memory (history size m) must be an integer >= 1, got {memory!r}")
    if not isinstance(stall_patience, int) or isinstance(stall_patience, bool):
        raise ValueError(f"stall_patience must be an integer (<= 0 disables), got {stall_patience!r}")
    if not (isinstance(diverge_ratio, (int, float)) and diverge_ratio > 1):
        raise ValueError(f"diverge_ratio must be a number > 1 (math.inf disables), got {diverge_ratio!r}")
    if isinstance(ls_max_iter, bool) or not isinstance(ls_max_iter, int) or ls_max_iter < 1:
        raise ValueError(f"ls_max_iter must be an integer >= 1, got {ls_max_iter!r}")


class _BroydenSolve:
    """State and loop of one batched solve (internal; use :func:`broyden`)."""

    def __init__(self, f: Func, z0: torch.Tensor, *, inputs: tuple, compact: bool, max_iter: int,
                 tol: float, stop_mode: str, memory: int, per_sample: bool, stall_patience: int,
                 diverge_ratio: float, line_search: bool, ls_max_iter: int, trace: bool,
                 stop_early: bool, use_reference: bool) -> None:
        self.f, self.inputs = f, inputs
        # Compaction needs the active count on the host, which only stop_early reads.
        self.compact = compact and stop_early
        self.shape, self.dtype, self.device = z0.shape, z0.dtype, z0.device
        self.max_iter, self.tol, self.use_rel = max_iter, float(tol), stop_mode == "rel"
        self.per_sample, self.stall_patience = per_sample, stall_patience
        self.diverge_ratio = float(diverge_ratio)
        self.line_search, self.ls_max_iter = line_search, ls_max_iter
        self.trace, self.stop_early = trace, stop_early
        self.ops = self._pick_ops(use_reference)

        B = z0.shape[0]
        D = z0.numel() // B
        sdt = torch.float64 if z0.dtype == torch.float64 else torch.float32
        dev = z0.device
        self.B, self.D = B, D

        def vec() -> torch.Tensor:
            return torch.zeros(B, D, dtype=sdt, device=dev)

        def per_sample_of(dtype: torch.dtype, fill: float = 0.0) -> torch.Tensor:
            return torch.full((B,), fill, dtype=dtype, device=dev)

        self.batched = [isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == B
                        for x in inputs]
        self.z = z0.detach().reshape(B, D).to(sdt).clone()
        # Compacted evaluations are scattered into this buffer (rows of finished samples go stale).
        self.fz_rows = torch.empty(B, D, dtype=z0.dtype, device=dev) if self.compact else None
        self.g, self.dg, self.dz = vec(), vec(), vec()
        self.z_best = self.z.clone()
        self.U = torch.zeros(B, memory, D, dtype=sdt, device=dev)
        self.V = torch.zeros(B, memory, D, dtype=sdt, device=dev)
        self.proj = torch.zeros(B, 3, memory, dtype=sdt, device=dev)
        self.scal = torch.zeros(B, 5, dtype=sdt, device=dev)
        self.best_abs = per_sample_of(sdt, math.inf)
        self.best_rel = per_sample_of(sdt, math.inf)
        self.res_abs = per_sample_of(sdt, math.inf)
        self.res_rel = per_sample_of(sdt, math.inf)
        self.status = per_sample_of(torch.int64, int(Status.ACTIVE))
        self.nstep = per_sample_of(torch.int64)
        self.nfev = per_sample_of(torch.int64)
        self.stall = per_sample_of(torch.int64)
        self.npairs = per_sample_of(torch.int64)
        self.abs_trace: list[torch.Tensor] = []
        self.rel_trace: list[torch.Tensor] = []

    def _pick_ops(self, use_reference: bool):
        if use_reference:
            return _extension.ops(force_reference=True)
        if self.device.type == "cuda" and not _extension.build_info().get("cuda", False):
            warnings.warn("deq_ext was built without CUDA kernels: solving on the GPU with the "
                          "pure-PyTorch reference ops (slow). Rebuild with CUDA_HOME set.",
                          RuntimeWarning, stacklevel=4)
            return _extension.ops(force_reference=True)
        return _extension.ops()

    # -- f and the fused ops ---------------------------------------------------------------
    def evaluate(self, z: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """f at z, checked and flattened to (B, D).

        With ``rows`` (compaction), f only sees those samples, and of every
        batched input the same rows; the other rows of the result are stale and
        must not be read (the masked ops don't).
        """
        if rows is None:
            out = self.f(z.view(self.shape).to(self.dtype), *self.inputs)
            return self._checked(out, self.shape).reshape(self.B, self.D).contiguous()
        n = rows.numel()
        inputs = [x.index_select(0, rows) if batched else x
                  for x, batched in zip(self.inputs, self.batched)]
        shape = (n,) + tuple(self.shape[1:])
        out = self.f(z.index_select(0, rows).view(shape).to(self.dtype), *inputs)
        self.fz_rows.index_copy_(0, rows, self._checked(out, shape).reshape(n, self.D))
        return self.fz_rows

    def _checked(self, out, shape) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"f must return a torch.Tensor, got {type(out).__name__}")
        if tuple(out.shape) != tuple(shape):
            raise ValueError(f"f must return a tensor of its input's shape {tuple(shape)}, got {tuple(out.shape)}")
        if out.dtype != self.dtype:
            raise TypeError(f"f must return z0's dtype {self.dtype}, got {out.dtype}")
        if out.device != self.device:
            raise ValueError(f"f must return a tensor on z0's device {self.device}, got {out.device}")
        return out

    def rows_of(self, mask: torch.Tensor, count: int) -> Optional[torch.Tensor]:
        """Indices of the ``count`` samples in ``mask`` (None: all of them), without a sync."""
        if not self.compact or count == self.B:
            return None
        return torch.argsort((~mask).to(torch.uint8), stable=True)[:count]

    def record(self, fz: torch.Tensor, count_step: bool) -> None:
        self.ops.residual_status_(
            fz, self.z, self.g, self.dg, self.z_best, self.best_abs, self.best_rel,
            self.res_abs, self.res_rel, self.status, self.nstep, self.nfev, self.stall,
            self.tol, self.use_rel, self.stall_patience, self.diverge_ratio, count_step,
            self.per_sample)
        if self.trace:
            self.abs_trace.append(self.res_abs.clone())
            self.rel_trace.append(self.res_rel.clone())

    def step(self) -> None:
        """One Broyden update of the inverse Jacobian and one move of z, active samples only."""
        self.ops.broyden_reduce(self.U, self.V, self.dz, self.dg, self.g, self.status,
                                self.npairs, self.proj, self.scal)
        self.ops.broyden_expand_(self.U, self.V, self.dz, self.dg, self.g, self.z, self.proj,
                                 self.scal, self.status, self.npairs)

    def pending(self) -> torch.Tensor:
        """Mask of the samples the loop still has to wait for."""
        active = self.status == Status.ACTIVE
        if self.per_sample:
            return active
        objective = self.res_rel if self.use_rel else self.res_abs
        return active & ~(objective < self.tol)

    def counts(self) -> tuple[int, int]:
        """(pending, active) sample counts: the loop's one device-to-host read."""
        active = self.status == Status.ACTIVE
        n_pending, n_active = torch.stack([self.pending().sum(), active.sum()]).tolist()
        return int(n_pending), int(n_active)

    # -- Armijo line search with a step size per sample -----------------------------------------
    def armijo(self, fz: torch.Tensor, c1: float = 1e-4, alpha_min: float = 1e-2) -> torch.Tensor:
        """Backtrack the step of every active sample whose residual did not drop enough.

        ``z`` has already moved by the full step ``dz``; ``g`` still holds the
        residual before the step. Returns f at the accepted points.
        """
        active = self.status == Status.ACTIVE
        acc = torch.float64
        phi0 = self.g.to(acc).pow(2).sum(1)
        step = self.dz.clone()
        z_old = self.z - step
        best_fz, best_alpha = fz.clone(), torch.ones_like(phi0)
        best_phi = (fz.to(acc) - self.z.to(acc)).pow(2).sum(1).nan_to_num(math.inf)
        alpha, phi = best_alpha.clone(), best_phi.clone()
        for _ in range(self.ls_max_iter):
            need = active & ~(phi <= phi0 * (1 - c1 * alpha)) & (alpha > alpha_min)
            n_need = int(need.sum())
            if n_need == 0:
                break
            # Minimiser of the quadratic through phi(0), phi'(0) = -phi0 and phi(alpha).
            quad = phi0 * alpha ** 2 / (2 * (phi - phi0 + phi0 * alpha))
            quad = torch.where(torch.isfinite(quad), quad, 0.5 * alpha)
            alpha = torch.where(need, quad.clamp(0.1 * alpha, 0.5 * alpha), alpha)
            trial = z_old + alpha.to(step.dtype)[:, None] * step
            fz_trial = self.evaluate(torch.where(need[:, None], trial, self.z),
                                     self.rows_of(need, n_need))
            self.nfev += need
            phi_t = (fz_trial.to(acc) - trial.to(acc)).pow(2).sum(1).nan_to_num(math.inf)
            phi = torch.where(need, phi_t, phi)
            better = need & (phi_t < best_phi)
            best_phi = torch.where(better, phi_t, best_phi)
            best_alpha = torch.where(better, alpha, best_alpha)
            best_fz = torch.where(better[:, None], fz_trial, best_fz)
        self.dz = torch.where(active[:, None], best_alpha.to(step.dtype)[:, None] * step, self.dz)
        self.z = torch.where(active[:, None], z_old + self.dz, self.z)
        return best_fz

    # -- the loop -------------------------------------------------------------------------------------
    def run(self) -> None:
        self.record(self.evaluate(self.z), count_step=False)
        for _ in range(self.max_iter):
            rows = None
            if self.stop_early:
                n_pending, n_active = self.counts()
                if n_pending == 0:
                    break
                rows = self.rows_of(self.status == Status.ACTIVE, n_active)
            self.step()
            fz = self.evaluate(self.z, rows)
            if self.line_search:
                fz = self.armijo(fz)
            self.record(fz, count_step=True)
        self.finish()

    def finish(self) -> None:
        """Final statuses, with where() rather than masked assignment: no device sync."""
        if not self.per_sample:
            best = self.best_rel if self.use_rel else self.best_abs
            open_ = (self.status == Status.ACTIVE) | (self.status == Status.STALLED)
            self.status = torch.where(open_ & (best < self.tol), int(Status.CONVERGED), self.status)
        self.status = torch.where(self.status == Status.ACTIVE, int(Status.MAX_ITER), self.status)

    def result(self, return_final: bool, return_state: bool) -> SolverResult:
        z = self.z if return_final else self.z_best
        res_abs = self.res_abs if return_final else self.best_abs
        res_rel = self.res_rel if return_final else self.best_rel
        state = None
        if return_state:
            names = ("z", "g", "dg", "dz", "z_best", "U", "V", "npairs", "best_abs", "best_rel")
            state = {n: getattr(self, n) for n in names}
        return SolverResult(
            z=z.view(self.shape).to(self.dtype),
            abs_residual=res_abs.clone(), rel_residual=res_rel.clone(),
            nstep=self.nstep, nfev=self.nfev, status=self.status,
            abs_trace=torch.stack(self.abs_trace, 1) if self.trace else None,
            rel_trace=torch.stack(self.rel_trace, 1) if self.trace else None,
            state=state)


def broyden(
    f: Func,
    z0: torch.Tensor,
    *,
    inputs: tuple = (),
    compact: Optional[bool] = None,
    max_iter: int = 50,
    tol: float = 1e-3,
    stop_mode: str = "abs",
    memory: Optional[int] = None,
    per_sample: bool = True,
    return_final: bool = False,
    line_search: bool = False,
    ls_max_iter: int = 4,
    stall_patience: int = 30,
    diverge_ratio: float = 1e6,
    trace: bool = False,
    stop_early: bool = True,
    return_state: bool = False,
    use_reference: bool = False,
) -> SolverResult:
    """Solve ``z = f(z)`` for every sample of a batch with limited-memory Broyden.

    Args:
        f: ``f(z, *inputs)`` maps a tensor shaped like ``z0`` to one of the same
            shape, dtype and device; each sample (row of dim 0) must only depend
            on its own row of z and of the batched inputs. It is called under
            ``torch.no_grad()`` and must not modify its input in place.
        z0: initial guess, batched on dim 0: ``(B, ...)``. float16/bfloat16
            iterates are accepted; the solver state is then kept in float32.
        inputs: extra arguments of f. A tensor whose dim 0 has size B is
            batched: with compaction f gets its rows of the active samples.
            Anything else (non-tensors, tensors of another leading size) is
            passed unchanged. To pass an unbatched tensor whose dim 0 happens
            to be B, close over it in f instead.
        compact: evaluate f only on the samples still active (gathering their
            rows of z and of the batched inputs). Default: on when ``inputs``
            are given, off otherwise (an f that closes over batched tensors
            cannot be compacted). Set False for an f that mixes samples (batch
            norm, attention across the batch): f then always sees the whole
            batch and finished rows are ignored.
        max_iter: maximum solver steps per sample (>= 1).
        tol: per-sample stopping tolerance on the ``stop_mode`` residual.
        stop_mode: ``'abs'`` for ``||f(z)-z||``, ``'rel'`` for
            ``||f(z)-z|| / (||f(z)|| + 1e-9)``.
        memory: number of rank-1 pairs kept (history size m, a ring buffer);
            defaults to ``max_iter``.
        per_sample: stop each sample as soon as it converges (default). With
            False every sample iterates until all have converged, as torchdeq does.
        return_final: return the last iterate instead of the lowest-residual one.
        line_search: Armijo backtracking with a step size per sample (extra f
            evaluations; each trial reads one flag from the device).
        ls_max_iter: at most this many backtracking trials per step.
        stall_patience: a sample with no new lowest residual for this many
            steps stops as STALLED (<= 0 disables).
        diverge_ratio: a sample whose residual exceeds this multiple of its best
            is flagged DIVERGED (non-finite residuals always are).
        trace: record the residuals after every evaluation (``abs_trace``, ``rel_trace``).
        stop_early: check once per iteration whether any sample is still
            pending (one device-to-host read); with False exactly ``max_iter``
            steps run, f sees the whole batch and the loop never synchronises
            with the device (only the up-front finiteness check of z0 does).
        return_state: attach the internal tensors to the result (for debugging/tests).
        use_reference: run the pure-PyTorch reference ops instead of the extension.

    Returns:
        A :class:`~deq_ext.result.SolverResult`.

    Example:
        >>> A = 0.5 * torch.eye(3)
        >>> res = deq_ext.broyden(lambda z: z @ A + 1.0, torch.zeros(4, 3), tol=1e-8)
        >>> res.z  # every entry is 2.0
    """
    if memory is None:
        memory = max_iter
    _validate(z0, max_iter, tol, stop_mode, memory, stall_patience, diverge_ratio, ls_max_iter)
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    with torch.no_grad():
        if z0.shape[0] == 0 or z0.numel() == 0:
            return _empty_result(z0, trace)
        if not bool(torch.isfinite(z0).all()):
            raise ValueError("z0 contains NaN or inf values")
        solve = _BroydenSolve(
            f, z0, inputs=tuple(inputs), compact=bool(inputs) if compact is None else compact,
            max_iter=max_iter, tol=tol, stop_mode=stop_mode, memory=memory,
            per_sample=per_sample, stall_patience=stall_patience, diverge_ratio=diverge_ratio,
            line_search=line_search, ls_max_iter=ls_max_iter, trace=trace,
            stop_early=stop_early, use_reference=use_reference)
        solve.run()
        return solve.result(return_final, return_state)


def _empty_result(z0: torch.Tensor, trace: bool) -> SolverResult:
    """Result for a batch with no samples (or no elements per sample): nothing to solve."""
    B = z0.shape[0]
    sdt = torch.float64 if z0.dtype == torch.float64 else torch.float32
    zeros = torch.zeros(B, dtype=sdt, device=z0.device)
    ints = torch.zeros(B, dtype=torch.int64, device=z0.device)
    empty_trace = torch.zeros(B, 0, dtype=sdt, device=z0.device) if trace else None
    return SolverResult(z=z0.detach().clone(), abs_residual=zeros, rel_residual=zeros.clone(),
                        nstep=ints, nfev=ints.clone(),
                        status=torch.full_like(ints, int(Status.CONVERGED)),
                        abs_trace=empty_trace, rel_trace=empty_trace)
