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
from typing import Callable, Optional, Union

import torch

from .. import _extension
from ..precision import autocast_output
from ..result import SolverResult
from ..status import NUM_COUNTS, PENDING_COUNT, Status
from ._buckets import Bucket, CompactionTimer, bucket_size, rows_first, take_rows
from ._counts import CountReader
from ._graph import GraphRunner
from ._memory import ensure_fits

Func = Callable[..., torch.Tensor]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Iterations per replayed CUDA graph (graph=True) unless check_every says otherwise.
DEFAULT_GRAPH_ITERATIONS = 4


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


def state_dtype_of(z0: torch.Tensor) -> torch.dtype:
    """The dtype a solve of ``z0`` keeps its state in: float64 for float64, else float32."""
    return torch.float64 if z0.dtype == torch.float64 else torch.float32


def validate_history_dtype(history_dtype, state_dtype: torch.dtype) -> None:
    """None (the method's default), a half-precision dtype, or the state dtype itself (a wide
    history) for the method's ring buffers; TypeError/ValueError otherwise."""
    if history_dtype is not None and not isinstance(history_dtype, torch.dtype):
        raise TypeError(f"history_dtype must be a torch.dtype or None, got {history_dtype!r}")
    if history_dtype is not None and history_dtype not in NARROW_HISTORY + (state_dtype,):
        raise ValueError(f"history_dtype must be torch.bfloat16, torch.float16, the state dtype "
                         f"{state_dtype} (a wide history) or None (the default), got "
                         f"{history_dtype}")


def validate_positive(name: str, value, upper: Optional[float] = None) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and value > 0 and (upper is None or value <= upper)
    if not ok:
        bound = f" and <= {upper}" if upper is not None else ""
        raise ValueError(f"{name} must be a positive finite number{bound}, got {value!r}")


@dataclass(frozen=True)
class SolveOptions:
    """The options every method takes, as keyword arguments of :func:`deq_ext.broyden`,
    :func:`deq_ext.anderson` and :func:`deq_ext.fixed_point` (documented on ``broyden``)."""

    inputs: tuple = ()
    compact: Union[bool, str, None] = "auto"
    max_iter: int = 50
    tol: float = 1e-3
    stop_mode: str = "abs"
    per_sample: bool = True
    return_final: bool = False
    stall_patience: int = 30
    diverge_ratio: float = 1e6
    trace: bool = False
    stop_early: bool = True
    check_every: Optional[int] = None
    return_state: bool = False
    use_reference: bool = False
    record: Optional[tuple] = None
    graph: bool = False

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
        if not isinstance(opts.graph, bool):
            raise TypeError(f"graph must be True or False, got {opts.graph!r}")
        if opts.graph and z0.device.type != "cuda":
            raise ValueError(f"graph=True replays the solver loop as a CUDA graph and needs z0 on a "
                             f"CUDA device, got {z0.device} (leave graph=False elsewhere)")
        # With a graph the host reads the counts between replays of check_every iterations.
        check_every = opts.check_every if opts.check_every is not None else (
            DEFAULT_GRAPH_ITERATIONS if opts.graph else 1)
        validate_positive_int("check_every", check_every)
        record = _checked_record(opts.record, opts.max_iter)
        compact = "auto" if opts.compact is None else opts.compact
        if compact not in (True, False, "auto"):
            raise ValueError(f"compact must be True, False or 'auto', got {compact!r}")
        # An f that closes over batched tensors cannot be handed a subset of the rows: "auto"
        # compacts only an f with inputs to gather.
        if compact == "auto" and not opts.inputs:
            compact = False
        return replace(opts, inputs=tuple(opts.inputs), record=record, compact=compact,
                       check_every=check_every)


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


def scratch_partials(B: int, D: int, per_chunk: int, per_sample: int = 0) -> int:
    """float64 elements of the CUDA kernels' partial sums: ``per_chunk`` per (sample, block of
    CUDA_CHUNK values) plus ``per_sample`` per sample (csrc/cuda; the CPU kernels use none)."""
    return B * (math.ceil(D / CUDA_CHUNK) * per_chunk + per_sample)


# Values of D per CUDA block (kChunk in csrc/cuda/launch.cuh): sizes the kernels' scratch.
CUDA_CHUNK = 1024


class MaskedSolve:
    """State and loop of one batched solve; subclasses implement :meth:`step`.

    The loop body is :meth:`iterate`: every state update is in place (no tensor is rebound
    inside the loop), traces and recorded iterates go into preallocated buffers, and the scratch
    of the ops lives here, so the body allocates nothing of its own and a CUDA graph of it
    (``graph=True``, :mod:`._graph`) always reads and writes the live buffers. :meth:`run` only
    decides when to read the counts (:mod:`._counts`) and when to change f's bucket
    (:mod:`._buckets`).
    """

    def partials_layout(self) -> tuple[int, int]:
        """float64 partial sums the CUDA kernels need per (sample, block) and per sample: the
        residual op's two; a method with larger passes says more."""
        return 2, 0

    def __init__(self, f: Func, z0: torch.Tensor, opts: SolveOptions) -> None:
        self.f, self.inputs = f, opts.inputs
        # Compaction needs the active count on the host, which only stop_early reads.
        self.compact = opts.compact if opts.stop_early else False
        self.shape, self.dtype, self.device = z0.shape, z0.dtype, z0.device
        self.max_iter, self.tol = opts.max_iter, float(opts.tol)
        self.use_rel = opts.stop_mode == "rel"
        self.per_sample, self.stall_patience = opts.per_sample, opts.stall_patience
        self.diverge_ratio = float(opts.diverge_ratio)
        assert opts.check_every is not None  # (resolved by SolveOptions.of)
        self.trace, self.stop_early = opts.trace, opts.stop_early
        self.check_every: int = opts.check_every
        self.graph = opts.graph
        self.ops = self._pick_ops(opts.use_reference)

        B = z0.shape[0]
        self.B, self.D = B, z0.numel() // B
        self.state_dtype = torch.float64 if z0.dtype == torch.float64 else torch.float32
        self.state_nbytes = self.state_bytes(B, self.D, self.state_dtype)
        # Any strided z0 is accepted: the state is a fresh contiguous copy.
        self.z = z0.detach().reshape(B, self.D).to(self.state_dtype).clone(
            memory_format=torch.contiguous_format)
        # Compacted evaluations are scattered into this buffer (rows of finished samples go stale).
        self.fz_rows = torch.empty(self.shape, dtype=z0.dtype, device=self.device) \
            if self.compact else None
        self.g, self.dg = self.zeros(self.D), self.zeros(self.D)
        self.z_best = self.z.clone()
        self.best_abs, self.best_rel = self.full(math.inf), self.full(math.inf)
        self.res_abs, self.res_rel = self.full(math.inf), self.full(math.inf)
        self.status = self.full(int(Status.ACTIVE), torch.int64)
        self.nstep, self.nfev, self.stall = (self.full(0, torch.int64) for _ in range(3))
        # (pending, active) after every update, and the kernels' scratch (zero between launches).
        self.counts = torch.zeros(NUM_COUNTS, dtype=torch.int64, device=self.device)
        self.partials = torch.zeros(scratch_partials(B, self.D, *self.partials_layout()),
                                    dtype=torch.float64, device=self.device)
        self.tickets = torch.zeros(B + 1, dtype=torch.int32, device=self.device)
        # Residuals after every evaluation (trace=True): one column per evaluation, the next one
        # a device counter, so that a replayed graph writes the next column.
        self.n_records = 0
        if self.trace:
            self.abs_trace = torch.empty(B, self.max_iter + 1, dtype=self.state_dtype,
                                         device=self.device)
            self.rel_trace = torch.empty_like(self.abs_trace)
            self.trace_at = torch.zeros(1, dtype=torch.int64, device=self.device)
        # record=[k, ...]: copies of the iterate the solve would return after step k, only those.
        self.return_final = opts.return_final
        self.record_steps = opts.record or ()
        self.snapshot_slot = {k: i for i, k in enumerate(sorted(set(self.record_steps)))}
        if self.snapshot_slot:
            self.snapshots = torch.empty(len(self.snapshot_slot), B, self.D,
                                         dtype=self.state_dtype, device=self.device)
        self.snapshot_taken: set[int] = set()
        self.timer: Optional[CompactionTimer] = None
        if self.compact == "auto" and self.device.type == "cuda":
            self.timer = CompactionTimer()
        self.compacting = bool(self.compact)
        self.capturing = False  # set while a CUDA graph of the loop body is being captured
        self.f_rows = 0  # rows f was evaluated on, over the solve

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

    # -- f, its buckets and the fused ops --------------------------------------------------------
    def bucket(self, rows: Optional[torch.Tensor]) -> Bucket:
        """The bucket of ``rows`` (None: the whole batch): f's inputs gathered once, and the
        buffers every evaluation of the bucket reuses."""
        if rows is None:
            shape = tuple(self.shape)
            z_view = self.z.view(shape)
            cast = self.dtype != self.state_dtype
            z_in = torch.empty(shape, dtype=self.dtype, device=self.device) if cast else z_view
            return Bucket(None, self.B, self.inputs, shape, None, z_in, cast)
        n = rows.numel()
        shape = (n,) + tuple(self.shape[1:])
        gathered = torch.empty(n, self.D, dtype=self.state_dtype, device=self.device)
        cast = self.dtype != self.state_dtype
        z_in = torch.empty(shape, dtype=self.dtype, device=self.device) if cast \
            else gathered.view(shape)
        inputs = tuple(take_rows(x, rows, self.B) for x in self.inputs)
        return Bucket(rows, n, inputs, shape, gathered, z_in, cast)

    def evaluate(self, z: torch.Tensor, bucket: Bucket) -> torch.Tensor:
        """f at ``z`` on the bucket's rows, checked. Returns f's output for the whole batch, or
        (compacted) the buffer its rows were scattered into, whose other rows are stale and must
        not be read (the masked ops don't)."""
        timer = self.timer if self.timer is not None and not self.capturing \
            and self.timer.wants(bucket) else None
        begin = timer.start() if timer is not None else None
        if bucket.rows is None:
            if z is not self.z:  # (the line search's trial points)
                z_in = z.view(bucket.shape).to(self.dtype)
            else:
                z_in = bucket.z_in
                if bucket.cast:
                    z_in.copy_(self.z.view(bucket.shape))
            out = self._checked(self.f(z_in, *bucket.inputs), bucket.shape)
        else:
            assert bucket.gathered is not None and self.fz_rows is not None  # (compaction)
            torch.index_select(z, 0, bucket.rows, out=bucket.gathered)
            if bucket.cast:
                bucket.z_in.copy_(bucket.gathered.view(bucket.shape))
            out = self._checked(self.f(bucket.z_in, *bucket.inputs), bucket.shape)
            self.fz_rows.index_copy_(0, bucket.rows, out)
            out = self.fz_rows
        if timer is not None and begin is not None:
            timer.stop(bucket, begin)
        bucket.evaluations += 1
        self.f_rows += bucket.size
        return out

    def _checked(self, out, shape) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"f must return a torch.Tensor, got {type(out).__name__}")
        if tuple(out.shape) != tuple(shape):
            raise ValueError(f"f must return a tensor of its input's shape {tuple(shape)}, "
                             f"got {tuple(out.shape)}")
        if out.dtype != self.dtype:
            # Under torch.autocast f returns autocast's dtype (or float32): cast, don't refuse.
            cast = autocast_output(out, self.dtype)
            if cast is None:
                raise TypeError(f"f must return z0's dtype {self.dtype}, got {out.dtype} (outside "
                                "torch.autocast; under it, also autocast's dtype or float32)")
            out = cast
        if out.device != self.device:
            raise ValueError(f"f must return a tensor on z0's device {self.device}, got {out.device}")
        return out if out.is_contiguous() else out.contiguous()

    def rows_of(self, mask: torch.Tensor, count: int) -> Optional[torch.Tensor]:
        """Indices of the ``count`` samples in ``mask`` (None: all of them), without a sync."""
        if not self.compacting or count == self.B:
            return None
        return rows_first(mask, count)

    def narrow(self, rows: Optional[torch.Tensor]) -> None:
        """Tell an f that defines ``on_compact(rows)`` that every later call, until the next
        one, gets a subset of ``rows`` (the samples of a new bucket; None: no compaction).
        The layer's adjoint uses it to re-record f's graph on fewer rows."""
        hook = getattr(self.f, "on_compact", None)
        if rows is not None and hook is not None:
            hook(rows)

    def rebucket(self, bucket: Bucket, n_active: int) -> Bucket:
        """The bucket for ``n_active`` active samples: a new, smaller one when the count has
        fallen to the next lower power of two (gathering rows and inputs once), else ``bucket``."""
        if self.timer is not None and self.timer.decide() is False:
            self.compacting, self.timer = False, None  # measured: compacting does not pay here
            return self.bucket(None) if bucket.rows is not None else bucket
        if not self.compacting:
            return bucket
        size = bucket_size(n_active, self.B)
        if size >= bucket.size:
            return bucket
        rows = rows_first(self.status == Status.ACTIVE, size)
        self.narrow(rows)
        return self.bucket(rows)

    def record(self, fz: torch.Tensor, count_step: bool) -> None:
        self.ops.residual_status_(
            fz, self.z, self.g, self.dg, self.z_best, self.best_abs, self.best_rel,
            self.res_abs, self.res_rel, self.status, self.nstep, self.nfev, self.stall,
            self.counts, self.partials, self.tickets, self.tol, self.use_rel,
            self.stall_patience, self.diverge_ratio, count_step, self.per_sample)
        if not self.per_sample:
            # Batch-wide stopping ends the solve when no sample is pending. Deciding it here, on
            # the device, freezes the batch at that very evaluation whenever the host looks.
            done = self.counts[PENDING_COUNT] == 0
            self.status.copy_(torch.where(done, self.final_status(), self.status))
        if self.trace:
            self.abs_trace.index_copy_(1, self.trace_at, self.res_abs.view(self.B, 1))
            self.rel_trace.index_copy_(1, self.trace_at, self.res_rel.view(self.B, 1))
            self.trace_at += 1
        self.n_records += 1

    def step(self) -> None:
        """Move z for the active samples (one solver step)."""
        raise NotImplementedError

    def prepare(self, it: int) -> bool:
        """Before step ``it`` (0-based): allocate what the step may use (the history); True when
        buffers the loop body uses were added or moved."""
        return False

    def after_evaluation(self, fz: torch.Tensor, bucket: Bucket) -> torch.Tensor:
        """Hook between evaluating f at the new z and recording it (Broyden's line search)."""
        return fz

    def iterate(self, bucket: Bucket) -> None:
        """One iteration: a step, f at the new z on the bucket's rows, the residual update."""
        self.step()
        fz = self.after_evaluation(self.evaluate(self.z, bucket), bucket)
        self.record(fz, count_step=True)

    def snapshot(self, step: int) -> None:
        """Keep the iterate the solve would return now, if ``record`` asks for ``step``."""
        slot = self.snapshot_slot.get(step)
        if slot is not None:
            self.snapshots[slot].copy_(self.z if self.return_final else self.z_best)
            self.snapshot_taken.add(step)

    # -- the loop -------------------------------------------------------------------------------------
    def run(self) -> None:
        bucket = self.bucket(None)
        self.record(self.evaluate(self.z, bucket), count_step=False)
        self.snapshot(0)
        reader = CountReader(self.counts) if self.stop_early else None
        if reader is not None:
            reader.push()
        runner = GraphRunner(self) if self.graph else None
        it = 0
        while it < self.max_iter:
            if reader is not None and (runner is not None or it % self.check_every == 0):
                counts = reader.read()
                if counts is not None:
                    n_pending, n_active = counts
                    if n_pending == 0:
                        break
                    bucket = self.rebucket(bucket, n_active)
            done = runner.advance(bucket, it) if runner is not None else 0
            if done == 0:  # eagerly, one iteration
                self.prepare(it)
                self.iterate(bucket)
                self.snapshot(it + 1)
                done = 1
            it += done
            if reader is not None and (runner is not None or it % self.check_every == 0):
                reader.push()
        if runner is not None:
            runner.close()
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
        self.status.copy_(self.final_status())

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The internal tensors attached with ``return_state=True``."""
        names = ("z", "g", "dg", "z_best", "best_abs", "best_rel")
        return {n: getattr(self, n) for n in names}

    # (B, D) vectors of the state besides the history: z, g, dg, z_best, compaction's fz buffer
    # and a bucket's gathered rows (an estimate for the memory check, made before allocating).
    state_vectors = 6

    @classmethod
    def state_bytes(cls, B: int, D: int, dtype: torch.dtype) -> int:
        """Bytes of the state besides the history, about (for the memory check)."""
        return cls.state_vectors * B * D * dtype.itemsize

    def history_of(self):
        """The method's :class:`~._history.History`, if it keeps one."""
        return None

    def workspace(self) -> dict[str, int]:
        """Bytes of the state now, the history counted as a full ring (see workspace_bytes)."""
        tensors = {id(t): t for t in vars(self).values() if isinstance(t, torch.Tensor)}
        state = sum(t.nbytes for t in tensors.values())
        if self.compact:  # a bucket's gathered rows: at most half the batch, once
            state += (self.B // 2) * self.D * self.z.element_size()
        history = self.history_of()
        full = history.bytes_at(history.m) if history is not None else 0
        chunk = history.bytes_of(history.C) if history is not None else 0
        return {"total": state + full, "history": full, "history_chunk": chunk,
                "B": self.B, "D": self.D}

    def result(self, return_final: bool, return_state: bool) -> SolverResult:
        z = self.z if return_final else self.z_best
        res_abs = self.res_abs if return_final else self.best_abs
        res_rel = self.res_rel if return_final else self.best_rel
        n = self.n_records
        return SolverResult(
            z=z.view(self.shape).to(self.dtype),
            abs_residual=res_abs.clone(), rel_residual=res_rel.clone(),
            nstep=self.nstep, nfev=self.nfev, status=self.status,
            abs_trace=self.abs_trace[:, :n].clone() if self.trace else None,
            rel_trace=self.rel_trace[:, :n].clone() if self.trace else None,
            state=self.state_tensors() if return_state else None,
            recorded=self.recorded(z) if self.record_steps else None, f_rows=self.f_rows)

    def recorded(self, final: torch.Tensor) -> list[torch.Tensor]:
        """The requested snapshots as z0-shaped tensors; steps never reached (every sample had
        stopped) are the final iterate, which frozen samples would have repeated."""
        out = []
        for k in self.record_steps:
            z = self.snapshots[self.snapshot_slot[k]] if k in self.snapshot_taken else final
            out.append(z.view(self.shape).to(self.dtype, copy=True))
        return out


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
        if opts.stop_early and z0.device.type == "meta":
            raise ValueError("a solve on the meta device cannot read from it: pass stop_early=False "
                             "(a sync-free solve of exactly max_iter steps)")
        if opts.stop_early and not bool(torch.isfinite(z0).all()):
            raise ValueError("z0 contains NaN or inf values")
        B = z0.shape[0]
        state_dtype = torch.float64 if z0.dtype == torch.float64 else torch.float32
        ensure_fits(solve_cls.state_bytes(B, z0.numel() // B, state_dtype), z0.device,
                    "the solver state")
        solve = solve_cls(f, z0, opts, **method_options)
        solve.run()
        return solve.result(opts.return_final, opts.return_state)


def workspace_bytes(solve_cls, z0: torch.Tensor, opts: SolveOptions,
                    **method_options) -> dict[str, int]:
    """Bytes of the state a solve of ``z0`` allocates, without running it (z0 may be on the
    meta device): ``total`` (everything, the history as if the ring were full: the most the solve
    can hold), ``history`` (the method's ring buffers when full), ``history_chunk`` (what one
    growth of the history adds), ``B`` and ``D``."""
    with torch.no_grad():
        solve = solve_cls(None, z0, opts, **method_options)
    return solve.workspace()


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
