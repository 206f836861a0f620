"""What every per-sample masked solver shares: state, f evaluation, compaction, the loop.

A solve keeps its state in flat ``(B, D)`` tensors and per-sample ``(B,)``
vectors (docs/design.md). After every evaluation of f the fused ``residual_status_``
op updates residuals, the lowest-residual iterate and the status of every
active sample; a method (Broyden, Anderson, fixed point) only supplies
``step()``, which moves z for the active samples with its own extension ops.
Samples that converged, diverged or stalled are frozen bit for bit, and nothing
a sample gets depends on which other samples share its batch. The loop reads
one number from the device every ``check_every`` iterations (the pending count)
and none at all with ``stop_early=False``; since finished samples are frozen,
neither changes the results.
"""

from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass, fields, replace
from typing import Callable, Optional

import torch

from .. import _extension
from .._tree import map_tensors
from ..result import SolverResult
from ..status import Status

Func = Callable[..., torch.Tensor]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_common(f, z0: torch.Tensor, max_iter: int, tol: float, stop_mode: str,
                    stall_patience: int, diverge_ratio: float) -> None:
    """Checks shared by every solver; raises a clear TypeError/ValueError."""
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    if not isinstance(z0, torch.Tensor):
        raise TypeError(f"z0 must be a torch.Tensor, got {type(z0).__name__}")
    if z0.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"z0 must be a float16/bfloat16/float32/float64 tensor, got {z0.dtype}")
    if z0.dim() < 1:
        raise ValueError("z0 must be batched on dim 0: shape (B, ...), got a 0-d tensor")
    if not _is_int(max_iter) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not math.isfinite(tol) or tol <= 0:
        raise ValueError(f"tol must be a positive finite number, got {tol!r}")
    if stop_mode not in ("abs", "rel"):
        raise ValueError(f"stop_mode must be 'abs' or 'rel', got {stop_mode!r}")
    if not _is_int(stall_patience):
        raise ValueError(f"stall_patience must be an integer (<= 0 disables), got {stall_patience!r}")
    if not (isinstance(diverge_ratio, (int, float)) and diverge_ratio > 1):
        raise ValueError(f"diverge_ratio must be a number > 1 (math.inf disables), got {diverge_ratio!r}")


def validate_positive_int(name: str, value) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


NARROW_HISTORY = (torch.float16, torch.bfloat16)


def validate_history_dtype(history_dtype) -> None:
    """None (the state dtype) or a half-precision dtype for the method's (B, m, D) history."""
    if history_dtype is not None and not isinstance(history_dtype, torch.dtype):
        raise TypeError(f"history_dtype must be a torch.dtype or None, got {history_dtype!r}")
    if history_dtype is not None and history_dtype not in NARROW_HISTORY:
        raise ValueError(f"history_dtype must be torch.bfloat16, torch.float16 or None (the "
                         f"state dtype), got {history_dtype}")


def validate_positive(name: str, value, upper: Optional[float] = None) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and value > 0 and (upper is None or value <= upper)
    if not ok:
        bound = f" and <= {upper}" if upper is not None else ""
        raise ValueError(f"{name} must be a positive finite number{bound}, got {value!r}")


def take_rows(x, rows: torch.Tensor, batch: int):
    """The ``rows`` of every batched tensor in ``x`` (dim 0 of size ``batch``), also inside lists,
    tuples (named too) and dicts; everything else is returned unchanged."""
    return map_tensors(
        lambda t: t.index_select(0, rows) if t.dim() >= 1 and t.shape[0] == batch else t, x)


@dataclass(frozen=True)
class SolveOptions:
    """The options every method takes, as keyword arguments of :func:`deq_ext.broyden`,
    :func:`deq_ext.anderson` and :func:`deq_ext.fixed_point` (documented on ``broyden``)."""

    inputs: tuple = ()
    compact: Optional[bool] = None
    max_iter: int = 50
    tol: float = 1e-3
    stop_mode: str = "abs"
    per_sample: bool = True
    return_final: bool = False
    stall_patience: int = 30
    diverge_ratio: float = 1e6
    trace: bool = False
    stop_early: bool = True
    check_every: int = 1
    return_state: bool = False
    use_reference: bool = False
    record: Optional[tuple] = None

    @classmethod
    def of(cls, method: str, f, z0: torch.Tensor, options: dict) -> "SolveOptions":
        """The checked options of a call of ``method`` (TypeError/ValueError when wrong)."""
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"{method}() got unexpected keyword argument(s) {unknown}; its "
                            f"options are {sorted(known)} and the method's own")
        opts = cls(**options)
        validate_common(f, z0, opts.max_iter, opts.tol, opts.stop_mode, opts.stall_patience,
                        opts.diverge_ratio)
        validate_positive_int("check_every", opts.check_every)
        record = _checked_record(opts.record, opts.max_iter)
        # Compaction by default only with inputs: an f that closes over batched tensors
        # cannot be handed a subset of the rows.
        return replace(opts, inputs=tuple(opts.inputs), record=record,
                       compact=bool(opts.inputs) if opts.compact is None else opts.compact)


def _checked_record(record, max_iter: int) -> Optional[tuple]:
    """``record`` as a tuple of step numbers in [0, max_iter] (ValueError/TypeError otherwise)."""
    if record is None:
        return None
    if isinstance(record, (str, bytes)) or not hasattr(record, "__iter__"):
        raise TypeError(f"record must be a list of step numbers, got {type(record).__name__}")
    steps = []
    for k in record:
        try:  # Python and NumPy integers, not floats or bools
            step = operator.index(k) if not isinstance(k, bool) else None
        except TypeError:
            step = None
        if step is None or not 0 <= step <= max_iter:
            raise ValueError(f"record must hold integer steps in [0, max_iter={max_iter}], got {k!r}")
        steps.append(step)
    return tuple(steps)


class MaskedSolve:
    """State and loop of one batched solve; subclasses implement :meth:`step`."""

    def __init__(self, f: Func, z0: torch.Tensor, opts: SolveOptions) -> None:
        self.f, self.inputs = f, opts.inputs
        # Compaction needs the active count on the host, which only stop_early reads.
        self.compact = bool(opts.compact) and opts.stop_early
        self.shape, self.dtype, self.device = z0.shape, z0.dtype, z0.device
        self.max_iter, self.tol = opts.max_iter, float(opts.tol)
        self.use_rel = opts.stop_mode == "rel"
        self.per_sample, self.stall_patience = opts.per_sample, opts.stall_patience
        self.diverge_ratio = float(opts.diverge_ratio)
        self.trace, self.stop_early, self.check_every = opts.trace, opts.stop_early, opts.check_every
        self.ops = self._pick_ops(opts.use_reference)

        B = z0.shape[0]
        self.B, self.D = B, z0.numel() // B
        self.state_dtype = torch.float64 if z0.dtype == torch.float64 else torch.float32
        # Any strided z0 is accepted: the state is a fresh contiguous copy.
        self.z = z0.detach().reshape(B, self.D).to(self.state_dtype).clone(
            memory_format=torch.contiguous_format)
        # Compacted evaluations are scattered into this buffer (rows of finished samples go stale).
        self.fz_rows = torch.empty(B, self.D, dtype=z0.dtype, device=self.device) if self.compact else None
        self.g, self.dg = self.zeros(self.D), self.zeros(self.D)
        self.z_best = self.z.clone()
        self.best_abs, self.best_rel = self.full(math.inf), self.full(math.inf)
        self.res_abs, self.res_rel = self.full(math.inf), self.full(math.inf)
        self.status = self.full(int(Status.ACTIVE), torch.int64)
        self.nstep, self.nfev, self.stall = (self.full(0, torch.int64) for _ in range(3))
        self.abs_trace: list[torch.Tensor] = []
        self.rel_trace: list[torch.Tensor] = []
        # record=[k, ...]: copies of the iterate the solve would return after step k, only those.
        self.return_final = opts.return_final
        self.record_steps = opts.record or ()
        self.snapshots: dict[int, torch.Tensor] = {}

    def zeros(self, *shape: int) -> torch.Tensor:
        """A zeroed per-sample state tensor ``(B, *shape)`` of the state dtype."""
        return torch.zeros(self.B, *shape, dtype=self.state_dtype, device=self.device)

    def full(self, fill: float, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """A per-sample vector ``(B,)`` (state dtype unless given)."""
        return torch.full((self.B,), fill, dtype=dtype or self.state_dtype, device=self.device)

    def _pick_ops(self, use_reference: bool):
        if use_reference:
            return _extension.ops(force_reference=True)
        if self.device.type == "cuda" and not _extension.build_info().get("cuda", False):
            warnings.warn("deq_ext was built without CUDA kernels: solving on the GPU with the "
                          "pure-PyTorch reference ops (slow). Rebuild with CUDA_HOME set.",
                          RuntimeWarning, stacklevel=5)
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
        inputs = [take_rows(x, rows, self.B) for x in self.inputs]
        shape = (n,) + tuple(self.shape[1:])
        out = self.f(z.index_select(0, rows).view(shape).to(self.dtype), *inputs)
        assert self.fz_rows is not None  # allocated whenever rows can be given (compaction)
        self.fz_rows.index_copy_(0, rows, self._checked(out, shape).reshape(n, self.D))
        return self.fz_rows

    def _checked(self, out, shape) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"f must return a torch.Tensor, got {type(out).__name__}")
        if tuple(out.shape) != tuple(shape):
            raise ValueError(f"f must return a tensor of its input's shape {tuple(shape)}, "
                             f"got {tuple(out.shape)}")
        if out.dtype != self.dtype:
            # Under torch.autocast f returns autocast's dtype (or float32): cast, don't refuse.
            from ..precision import autocast_output
            cast = autocast_output(out, self.dtype)
            if cast is None:
                raise TypeError(f"f must return z0's dtype {self.dtype}, got {out.dtype} (outside "
                                "torch.autocast; under it, also autocast's dtype or float32)")
            out = cast
        if out.device != self.device:
            raise ValueError(f"f must return a tensor on z0's device {self.device}, got {out.device}")
        return out

    def rows_of(self, mask: torch.Tensor, count: int) -> Optional[torch.Tensor]:
        """Indices of the ``count`` samples in ``mask`` (None: all of them), without a sync."""
        if not self.compact or count == self.B:
            return None
        return torch.argsort((~mask).to(torch.uint8), stable=True)[:count]

    def narrow(self, rows: Optional[torch.Tensor]) -> None:
        """Tell an f that defines ``on_compact(rows)`` that every later call, until the next
        one, gets a subset of ``rows`` (the active samples at this read; None: no compaction).
        The layer's adjoint uses it to re-record f's graph on fewer rows."""
        hook = getattr(self.f, "on_compact", None)
        if rows is not None and hook is not None:
            hook(rows)

    def record(self, fz: torch.Tensor, count_step: bool) -> None:
        self.ops.residual_status_(
            fz, self.z, self.g, self.dg, self.z_best, self.best_abs, self.best_rel,
            self.res_abs, self.res_rel, self.status, self.nstep, self.nfev, self.stall,
            self.tol, self.use_rel, self.stall_patience, self.diverge_ratio, count_step,
            self.per_sample)
        if not self.per_sample:
            # Batch-wide stopping ends the solve when no sample is pending. Deciding it here, on
            # the device, freezes the batch at that very evaluation whenever the host looks.
            done = ~self.pending().any()
            self.status = torch.where(done, self.final_status(), self.status)
        if self.trace:
            self.abs_trace.append(self.res_abs.clone())
            self.rel_trace.append(self.res_rel.clone())

    def step(self) -> None:
        """Move z for the active samples (one solver step)."""
        raise NotImplementedError

    def after_evaluation(self, fz: torch.Tensor) -> torch.Tensor:
        """Hook between evaluating f at the new z and recording it (Broyden's line search)."""
        return fz

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

    def snapshot(self, step: int) -> None:
        """Keep the iterate the solve would return now, if ``record`` asks for ``step``."""
        if step in self.record_steps:
            self.snapshots[step] = (self.z if self.return_final else self.z_best).clone()

    # -- the loop -------------------------------------------------------------------------------------
    def run(self) -> None:
        self.record(self.evaluate(self.z), count_step=False)
        self.snapshot(0)
        rows = None
        for it in range(self.max_iter):
            if self.stop_early and it % self.check_every == 0:
                n_pending, n_active = self.counts()
                if n_pending == 0:
                    break
                # Until the next read, samples that finish stay among the rows: f is evaluated
                # on their frozen z and the masked ops ignore the result.
                rows = self.rows_of(self.status == Status.ACTIVE, n_active)
                self.narrow(rows)
            self.step()
            fz = self.after_evaluation(self.evaluate(self.z, rows))
            self.record(fz, count_step=True)
            self.snapshot(it + 1)
        self.finish()

    def final_status(self) -> torch.Tensor:
        """The statuses the solve ends with if it ends now (where(), no device sync)."""
        status = self.status
        if not self.per_sample:
            best = self.best_rel if self.use_rel else self.best_abs
            open_ = (status == Status.ACTIVE) | (status == Status.STALLED)
            status = torch.where(open_ & (best < self.tol), int(Status.CONVERGED), status)
        return torch.where(status == Status.ACTIVE, int(Status.MAX_ITER), status)

    def finish(self) -> None:
        self.status = self.final_status()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The internal tensors attached with ``return_state=True``."""
        names = ("z", "g", "dg", "z_best", "best_abs", "best_rel")
        return {n: getattr(self, n) for n in names}

    def result(self, return_final: bool, return_state: bool) -> SolverResult:
        z = self.z if return_final else self.z_best
        res_abs = self.res_abs if return_final else self.best_abs
        res_rel = self.res_rel if return_final else self.best_rel
        return SolverResult(
            z=z.view(self.shape).to(self.dtype),
            abs_residual=res_abs.clone(), rel_residual=res_rel.clone(),
            nstep=self.nstep, nfev=self.nfev, status=self.status,
            abs_trace=torch.stack(self.abs_trace, 1) if self.trace else None,
            rel_trace=torch.stack(self.rel_trace, 1) if self.trace else None,
            state=self.state_tensors() if return_state else None,
            recorded=self.recorded(z) if self.record_steps else None)

    def recorded(self, final: torch.Tensor) -> list[torch.Tensor]:
        """The requested snapshots as z0-shaped tensors; steps never reached (every sample had
        stopped) are the final iterate, which frozen samples would have repeated."""
        return [self.snapshots.get(k, final).view(self.shape).to(self.dtype, copy=True)
                for k in self.record_steps]


# The data-dependent loop is a deliberate graph break for torch.compile: it runs eagerly
# (an explicitly compiled f inside it still runs compiled).
@torch.compiler.disable
def run_solve(solve_cls, f: Func, z0: torch.Tensor, opts: SolveOptions,
              **method_options) -> SolverResult:
    """Runs one solve under no_grad: the empty-batch shortcut and the z0 check first.

    Without ``stop_early`` nothing is read from the device, so a non-finite z0 is not
    rejected: its samples are flagged DIVERGED by their first residual.
    """
    with torch.no_grad():
        if z0.shape[0] == 0 or z0.numel() == 0:
            return _empty_result(z0, opts.trace, opts.record)
        if opts.stop_early and not bool(torch.isfinite(z0).all()):
            raise ValueError("z0 contains NaN or inf values")
        solve = solve_cls(f, z0, opts, **method_options)
        solve.run()
        return solve.result(opts.return_final, opts.return_state)


def workspace_bytes(solve_cls, z0: torch.Tensor, opts: SolveOptions,
                    **method_options) -> dict[str, int]:
    """Bytes of the state a solve of ``z0`` allocates, without running it (z0 may be on the
    meta device): ``total`` and ``history`` (the method's (B, m, D) buffers), ``B`` and ``D``."""
    with torch.no_grad():
        solve = solve_cls(None, z0, opts, **method_options)
    tensors = {id(t): t for t in vars(solve).values() if isinstance(t, torch.Tensor)}
    history = sum(t.nbytes for t in tensors.values() if t.dim() == 3 and t.shape[-1] == solve.D)
    return {"total": sum(t.nbytes for t in tensors.values()), "history": history,
            "B": solve.B, "D": solve.D}


def _empty_result(z0: torch.Tensor, trace: bool, record: Optional[tuple]) -> SolverResult:
    """Result for a batch with no samples (or no elements per sample): nothing to solve."""
    B = z0.shape[0]
    sdt = torch.float64 if z0.dtype == torch.float64 else torch.float32
    zeros = torch.zeros(B, dtype=sdt, device=z0.device)
    ints = torch.zeros(B, dtype=torch.int64, device=z0.device)
    empty_trace = torch.zeros(B, 0, dtype=sdt, device=z0.device) if trace else None
    return SolverResult(z=z0.detach().clone(), abs_residual=zeros, rel_residual=zeros.clone(),
                        nstep=ints, nfev=ints.clone(),
                        status=torch.full_like(ints, int(Status.CONVERGED)),
                        abs_trace=empty_trace, rel_trace=empty_trace,
                        recorded=None if record is None else [z0.detach().clone() for _ in record])
