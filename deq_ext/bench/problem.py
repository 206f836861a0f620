"""The benchmark problem: a contractive f whose samples converge at very different rates."""

from __future__ import annotations

import time
from typing import Callable

import torch

from .config import BLOCK, Config
from .env import sync


def _block_size(dim: int) -> int:
    """Width of W: the largest divisor of dim up to BLOCK; dense W for awkward small dims."""
    block = max(d for d in range(1, min(dim, BLOCK) + 1) if dim % d == 0)
    if block < 16 and dim <= 4096:
        return dim  # a dense (D, D) W keeps f mixing for small awkward D
    return block


def _orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    """A random orthogonal (n, n) matrix in float64 (QR of a Gaussian, signs fixed by R's diagonal)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


class Problem:
    """``f(z) = rho_b * tanh(z_blocks @ W) + x_b`` with W orthogonal.

    tanh is 1-Lipschitz and W has spectral norm 1, so sample b is a
    contraction with factor at most rho_b: the samples converge at very
    different rates, which is what separates per-sample stopping from
    whole-batch stopping. W is orthogonal rather than a Gaussian scaled to
    norm 1 because then every eigenvalue of W has modulus 1 and the rate
    really tracks rho_b (a scaled Gaussian's eigenvalues fill a disk of about
    half its norm, which squeezed the iteration counts into a factor of two).
    """

    def __init__(self, cfg: Config) -> None:
        gen = torch.Generator().manual_seed(cfg.seed)
        dev, dt = cfg.torch_device, cfg.torch_dtype
        B, D = cfg.batch, cfg.dim
        self.block = _block_size(D)
        self.W = _orthogonal(self.block, gen).to(device=dev, dtype=dt)
        self.x = torch.randn(B, D, generator=gen, dtype=torch.float64).to(device=dev, dtype=dt)
        self.rho = torch.linspace(cfg.rho_min, cfg.rho_max, B, dtype=torch.float64).to(device=dev, dtype=dt)
        self.z0 = torch.zeros(B, D, device=dev, dtype=dt)

    def f(self, z: torch.Tensor, x: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
        """f on any subset of rows (x, rho are that subset's rows)."""
        n = z.shape[0]
        y = torch.tanh(z.reshape(n, -1, self.block) @ self.W).reshape(n, -1)
        return rho[:, None] * y + x

    def f_batch(self, z: torch.Tensor) -> torch.Tensor:
        """f on the whole batch (closes over the inputs, as torchdeq's f must)."""
        return self.f(z, self.x, self.rho)

    def residual(self, z: torch.Tensor) -> torch.Tensor:
        """``||f(z) - z||`` per sample, in float64 (untimed, not counted as an evaluation)."""
        z = z.reshape(self.z0.shape)
        return (self.f_batch(z) - z).double().norm(dim=1)


class TimedF:
    """Wraps f: accumulates the time spent inside it, its calls and the rows it evaluated."""

    def __init__(self, f: Callable[..., torch.Tensor], device: torch.device) -> None:
        self.f, self.device = f, device
        self.reset()

    def reset(self) -> None:
        self.seconds, self.calls, self.rows = 0.0, 0, 0

    def __call__(self, z: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        # Synchronize on both sides so that queued solver kernels are not billed to f.
        sync(self.device)
        t0 = time.perf_counter()
        out = self.f(z, *args)
        sync(self.device)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        self.rows += int(z.shape[0])
        return out

