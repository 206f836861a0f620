"""The adjoint map of the DEQ backward pass, ``y -> J_f(z*)^T y + dL/dz*``, on shrinking graphs.

The adjoint solve takes one vector-Jacobian product through a recorded application of f at z*
per iteration. Recorded once on the whole batch, every VJP would cost the whole batch until the
slowest sample converges. :class:`AdjointMap` is the solver's ``f(y, rows)``: ``rows`` (an index
per sample, a batched input) tells it which samples a (compacted) call holds, and the solver's
``on_compact`` hook (:meth:`~deq_ext.solvers._base.MaskedSolve.narrow`) tells it which samples are
still active: it calls it at every change of the solver's power-of-two bucket of rows. When their
number falls to ``rerecord_below`` times the rows of the recorded graph (by default at every
bucket change),
f is applied once more at z* on those rows only (their batched inputs gathered as the forward
compaction gathers them) and the following VJPs run through that smaller graph.

Every sample's rows of a VJP only depend on its own rows of z* and of the inputs (f is row-wise,
as compaction already requires), so a sample's adjoint iterates, and its gradient, are those of
the uncompacted solve up to rounding. The re-recorded f must be the same function as the one the
forward pass recorded: a pure function of ``(z, *inputs)``. Dropout masks drawn inside f at every
call would differ; masks drawn once per forward pass and passed to f as inputs (as the models of
this project do) are gathered with the rows and stay the same.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch

from .precision import AutocastState, to_state_dtype
from .solvers._base import take_rows


def reusable_backward() -> contextlib.AbstractContextManager:
    """The adjoint solve takes one VJP through the recorded f per iteration (retain_graph).
    A torch.compile'd f would otherwise donate its saved buffers to the first backward and
    refuse the second, so the recording is compiled without donated buffers."""
    config = torch._functorch.config
    if hasattr(config, "donated_buffer"):
        return config.patch(donated_buffer=False)
    return contextlib.nullcontext()


def autocast_state(device: torch.device) -> AutocastState:
    """The autocast setting f was recorded under, to re-record it under the same one (the
    backward pass usually runs outside the forward's ``autocast`` block)."""
    return AutocastState.now(device)


def check_rerecord_below(value: Any) -> float:
    """The backward option ``rerecord_below`` as a float in (0, 1] (ValueError otherwise)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1
    if not ok:
        raise ValueError(f"backward option rerecord_below must be a number in (0, 1] (re-record f "
                         f"when the active rows fall to this fraction of the recorded ones), "
                         f"got {value!r}")
    return float(value)


class AdjointMap:
    """``y -> J_f(z*)^T y + grad`` for the adjoint solve, called as ``adjoint(y, rows)``.

    Args:
        f: the layer's (flat) ``f(z, *inputs)``.
        inputs: f's inputs in the forward pass (batched tensors are gathered on re-recording).
        fz, z_leaf: the application ``fz = f(z_leaf, *inputs)`` recorded on the whole batch.
        grad: ``dL/dz*``, shaped like ``z_leaf``.
        rerecord_below: re-record when the active rows are at most this fraction of the
            recorded graph's rows.
        autocast: :func:`autocast_state` when ``fz`` was recorded (None: autocast off); a
            re-recorded output that autocast made narrower is cast to ``z_leaf``'s dtype.

    ``vjp_rows`` counts the rows of the graphs the VJPs went through, ``rerecord_rows`` the
    rows f was re-applied to.
    """

    def __init__(self, f: Callable[..., torch.Tensor], inputs: tuple, fz: torch.Tensor,
                 z_leaf: torch.Tensor, grad: torch.Tensor, rerecord_below: float,
                 autocast: Optional[AutocastState] = None) -> None:
        self.f, self.inputs, self.grad = f, inputs, grad
        kind = z_leaf.device.type
        self.autocast = autocast or AutocastState(kind, False, torch.get_autocast_dtype(kind))
        self.z_star = z_leaf.detach()
        self.B = z_leaf.shape[0]
        self.rerecord_below = rerecord_below
        # The index of each sample: the solver gathers it with the rows it hands to f.
        self.all_rows = torch.arange(self.B, device=z_leaf.device)
        self.fz, self.z_leaf = fz, z_leaf
        self.size = self.B  # rows of the recorded graph
        # Position of each sample in the recorded graph (None: the whole batch, in order), and
        # dL/dz* of the recorded rows.
        self.position: Optional[torch.Tensor] = None
        self.grad_rows = grad
        self.vjp_rows = 0
        self.rerecord_rows = 0

    def on_compact(self, rows: torch.Tensor) -> None:
        """The solver's hook: later calls only hold samples among ``rows``."""
        n = rows.numel()
        if n == 0 or n > self.rerecord_below * self.size:
            return
        with torch.enable_grad(), reusable_backward(), self.autocast.applied():
            z_leaf = self.z_star.index_select(0, rows).requires_grad_()
            fz = self.f(z_leaf, *[take_rows(x, rows, self.B) for x in self.inputs])
            fz = to_state_dtype(fz, z_leaf.dtype)  # autocast's dtype back to the state's
        if not isinstance(fz, torch.Tensor) or fz.shape != z_leaf.shape:
            raise ValueError(f"f re-applied at z* on {n} rows must return a tensor of shape "
                             f"{tuple(z_leaf.shape)}, got "
                             f"{tuple(fz.shape) if isinstance(fz, torch.Tensor) else type(fz).__name__}")
        position = torch.full((self.B,), -1, dtype=torch.int64, device=rows.device)
        position.index_copy_(0, rows, torch.arange(n, device=rows.device))
        self.fz, self.z_leaf, self.size, self.position = fz, z_leaf, n, position
        self.grad_rows = self.grad.index_select(0, rows)
        self.rerecord_rows += n

    def on_replay(self, calls: int) -> None:
        """The solver's hook: a replayed CUDA graph made ``calls`` more calls (Python did not)."""
        self.vjp_rows += calls * self.size

    def _vjp(self, y: torch.Tensor) -> Optional[torch.Tensor]:
        """``J^T y`` through the recorded graph (None: fz does not depend on z)."""
        if not (y.is_cuda and torch.cuda.is_current_stream_capturing()):  # replays count later
            self.vjp_rows += self.size
        if not self.fz.requires_grad:
            return None
        with torch.enable_grad():
            (vjp,) = torch.autograd.grad(self.fz, self.z_leaf, y, retain_graph=True,
                                         allow_unused=True)
        return vjp

    def __call__(self, y: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The adjoint map on the samples ``rows`` (None: a solver that passes no inputs, and so
        never compacts: the whole batch)."""
        if rows is None:
            rows = self.all_rows
        if rows is self.all_rows and self.position is None:  # the whole batch, uncompacted
            vjp = self._vjp(y)
            return self.grad if vjp is None else vjp + self.grad
        if self.position is not None and rows.numel() == self.size:
            # The solver's bucket is the one f was re-recorded on (buckets only shrink, and each
            # new one is re-recorded): its rows are the graph's rows, in order.
            vjp = self._vjp(y)
            return self.grad_rows if vjp is None else vjp + self.grad_rows
        grad = self.grad.index_select(0, rows)
        # Rows of y placed at their samples' positions in the recorded graph; the other rows
        # (finished samples) get a zero cotangent, which no sample's VJP rows depend on.
        at = rows if self.position is None else self.position.index_select(0, rows)
        y_rec = y.new_zeros((self.size, *y.shape[1:])).index_copy_(0, at, y)
        vjp = self._vjp(y_rec)
        return grad if vjp is None else vjp.index_select(0, at) + grad


class SampleSubset:
    """The adjoint map for a solve whose batch is some ``samples`` only (the SHINE fallback):
    calls go to ``adjoint`` (their ``rows`` are sample indices, gathered from the solve's input
    ``samples``), and the compaction hook's rows, positions in that batch, become sample indices."""

    def __init__(self, adjoint: AdjointMap, samples: torch.Tensor) -> None:
        self.adjoint, self.samples = adjoint, samples

    def __call__(self, y: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.adjoint(y, self.samples if rows is None else rows)

    def on_compact(self, rows: torch.Tensor) -> None:
        self.adjoint.on_compact(self.samples.index_select(0, rows))

    def on_replay(self, calls: int) -> None:
        self.adjoint.on_replay(calls)
