"""The benchmark problems: a contractive f whose samples converge at very different rates.

Two problems share the per-sample contraction factor ``rho_b`` (spread over the batch) and differ
in what one evaluation of f costs:

* ``mlp`` (the default, the headline): a position-wise two-layer MLP over tokens of ``width``
  values, hidden ``hidden``, like a transformer's feed-forward sublayer. f costs what a DEQ layer
  costs relative to the solver (at the default sizes about half of torchdeq's solve time or more),
  which is what a user of the solver meets.
* ``block`` ("solver-bound", a secondary row): ``tanh`` of a block-diagonal orthogonal matmul.
  f is nearly free, so the figure isolates the solver's own cost; it flatters a faster solver.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch

from .config import BLOCK, Config

PROBLEMS = {
    "mlp": "rho_b * tanh(tokens(z) @ W1) @ W2 + x_b, tokens of `width` values, hidden `hidden`; "
           "W1 with orthonormal rows, W2 = W1^T Q with Q orthogonal",
    "block": "rho_b * tanh(reshape(z, (B, D/block, block)) @ W) + x_b, W orthogonal "
             "(solver-bound: f nearly free)",
}


def _largest_divisor(dim: int, limit: int) -> int:
    return max(d for d in range(1, min(dim, limit) + 1) if dim % d == 0)


def _block_size(dim: int) -> int:
    """Width of W: the largest divisor of dim up to BLOCK; dense W for awkward small dims."""
    block = _largest_divisor(dim, BLOCK)
    if block < 16 and dim <= 4096:
        return dim  # a dense (D, D) W keeps f mixing for small awkward D
    return block


def _orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    """A random orthogonal (n, n) matrix in float64 (QR of a Gaussian, signs fixed by R's diagonal)."""
    return _orthonormal_columns(n, n, gen)


def _orthonormal_columns(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """A random (rows, cols) float64 matrix with orthonormal columns (rows >= cols)."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


class Problem:
    """``f(z) = rho_b * g(z) + x_b`` with g 1-Lipschitz and, near 0, of modulus-1 eigenvalues.

    tanh is 1-Lipschitz and every weight has spectral norm 1, so sample b is a contraction with
    factor at most rho_b: the samples converge at very different rates, which is what separates
    per-sample stopping from whole-batch stopping. The weights are orthogonal (not Gaussians
    scaled to norm 1) so that the linearisation's eigenvalues have modulus 1 and each sample's
    rate really tracks rho_b (a scaled Gaussian's eigenvalues fill a disk of about half its
    norm, which squeezed the iteration counts into a factor of two). For ``mlp``, W2 = W1^T Q
    makes the linearisation at 0 exactly rho_b Q.
    """

    def __init__(self, cfg: Config) -> None:
        gen = torch.Generator().manual_seed(cfg.seed)
        dev, dt = cfg.torch_device, cfg.torch_dtype
        B, D = cfg.batch, cfg.dim
        self.kind = cfg.problem
        if self.kind == "block":
            self.block = _block_size(D)
            self.W = _orthogonal(self.block, gen).to(device=dev, dtype=dt)
        elif self.kind == "mlp":
            self.width = _largest_divisor(D, cfg.width)
            self.hidden = max(cfg.hidden, self.width)
            w1 = _orthonormal_columns(self.hidden, self.width, gen).T  # (width, hidden)
            q = _orthogonal(self.width, gen)
            self.W1 = w1.contiguous().to(device=dev, dtype=dt)
            self.W2 = (w1.T @ q).contiguous().to(device=dev, dtype=dt)  # (hidden, width)
        else:
            raise ValueError(f"unknown problem {self.kind!r}; expected one of {sorted(PROBLEMS)}")
        self.x = torch.randn(B, D, generator=gen, dtype=torch.float64).to(device=dev, dtype=dt)
        self.rho = torch.linspace(cfg.rho_min, cfg.rho_max, B, dtype=torch.float64).to(device=dev, dtype=dt)
        self.z0 = torch.zeros(B, D, device=dev, dtype=dt)

    def describe(self) -> dict[str, object]:
        """What f is, for the results record."""
        sizes = ({"block": self.block} if self.kind == "block"
                 else {"width": self.width, "hidden": self.hidden})
        return {"kind": self.kind, "f": PROBLEMS[self.kind], **sizes}

    def f(self, z: torch.Tensor, x: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
        """f on any subset of rows (x, rho are that subset's rows)."""
        n = z.shape[0]
        if self.kind == "block":
            y = torch.tanh(z.reshape(n, -1, self.block) @ self.W)
        else:
            y = torch.tanh(z.reshape(n, -1, self.width) @ self.W1) @ self.W2
        return rho[:, None] * y.reshape(n, -1) + x

    def f_batch(self, z: torch.Tensor) -> torch.Tensor:
        """f on the whole batch (closes over the inputs, as torchdeq's f must)."""
        return self.f(z, self.x, self.rho)

    def residual(self, z: torch.Tensor) -> torch.Tensor:
        """``||f(z) - z||`` per sample, in float64 (untimed, not counted as an evaluation)."""
        z = z.reshape(self.z0.shape)
        return (self.f_batch(z) - z).double().norm(dim=1)


class TimedF:
    """Wraps f: accumulates the time spent inside it, its calls and the rows it evaluated.

    ``clock``: how f is timed.

    * ``"host"`` (the CPU): a host clock around each call.
    * ``"events"`` (CUDA): a pair of CUDA events recorded around each call and read after the
      solve (:attr:`seconds` synchronizes once). Nothing waits inside the timed solve, so the
      solver's launches overlap f's kernels as they would in a user's solve; a host clock would
      need a blocking wait before and after every call, a cost no real solve pays.
    * ``"none"``: calls and rows are counted, nothing is timed (a solve replayed from a CUDA
      graph calls f only while it captures, so neither a time nor a count would be its own).
    """

    CLOCKS = ("host", "events", "none")

    def __init__(self, f: Callable[..., torch.Tensor], device: torch.device,
                 clock: Optional[str] = None) -> None:
        if clock is None:
            clock = "events" if device.type == "cuda" else "host"
        if clock not in self.CLOCKS:
            raise ValueError(f"clock must be one of {self.CLOCKS}, got {clock!r}")
        if clock == "events" and device.type != "cuda":
            raise ValueError(f"clock='events' needs a CUDA device, got {device}")
        self.f, self.device, self.clock = f, device, clock
        self.reset()

    def reset(self) -> None:
        self._host_s, self.calls, self.rows = 0.0, 0, 0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @property
    def seconds(self) -> float:
        """Seconds spent in f so far (NaN with ``clock="none"``); with events, waits for them."""
        if self.clock == "none":
            return math.nan
        if self.clock == "host":
            return self._host_s
        if self._events:
            self._events[-1][1].synchronize()
        return sum(start.elapsed_time(end) for start, end in self._events) / 1e3

    def __call__(self, z: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        if self.clock == "events":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.f(z, *args)
            end.record()
            self._events.append((start, end))
        elif self.clock == "host":
            t0 = time.perf_counter()
            out = self.f(z, *args)
            self._host_s += time.perf_counter() - t0
        else:
            out = self.f(z, *args)
        self.calls += 1
        self.rows += int(z.shape[0])
        return out
