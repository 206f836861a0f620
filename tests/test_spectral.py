"""Spectral radius of J_f(z*) by power iteration, against torch.linalg.eigvals."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deq_ext import DEQ, spectral_radius

pytestmark = pytest.mark.usefixtures("compiled")


class RankOneCell(nn.Module):
    """f(z, x) = tanh(W z + x) with W = 0.8 u v^T / (v.u) + small noise: J = diag(sech^2) W has one
    dominant real eigenvalue, well separated from the rest."""

    def __init__(self, d: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        u = torch.randn(d, generator=gen, dtype=torch.float64)
        v = u + 0.3 * torch.randn(d, generator=gen, dtype=torch.float64)  # v.u near |u|^2 > 0
        noise = 0.04 * torch.randn(d, d, generator=gen, dtype=torch.float64) / d ** 0.5
        self.W = nn.Parameter(0.8 * torch.outer(u, v) / (v @ u) + noise)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + x)


def _eigvals(cell: nn.Module, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Each sample's eigenvalues of J_f(z), sorted by decreasing modulus: (B, d) complex."""
    out = []
    for b in range(z.shape[0]):
        J = torch.autograd.functional.jacobian(lambda zb: cell(zb[None], x[b:b + 1])[0], z[b])
        ev = torch.linalg.eigvals(J)
        out.append(ev[ev.abs().argsort(descending=True)])
    return torch.stack(out)


def _dominant_real(ev: torch.Tensor) -> torch.Tensor:
    """The spectral radius, after checking the problem suits power iteration."""
    assert bool((ev[:, 0].imag.abs() < 1e-12).all()), "dominant eigenvalue not real"
    assert bool((ev[:, 1].abs() < 0.5 * ev[:, 0].abs()).all()), "dominant eigenvalue not separated"
    return ev[:, 0].abs()


def test_power_iteration_matches_the_dominant_eigenvalue() -> None:
    gen = torch.Generator().manual_seed(5)
    B, d = 4, 6
    cell = RankOneCell(d, seed=1)
    x = 0.5 * torch.randn(B, d, generator=gen, dtype=torch.float64)
    z = 0.5 * torch.randn(B, d, generator=gen, dtype=torch.float64)
    rho = _dominant_real(_eigvals(cell, z, x))
    zg = z.clone().requires_grad_()
    est = spectral_radius(cell(zg, x), zg, steps=40, generator=gen)
    assert est.shape == (B,) and not est.requires_grad
    torch.testing.assert_close(est, rho, rtol=1e-8, atol=0)
    # A few steps are already close, but not exact: the estimate converges.
    few = spectral_radius(cell(zg, x), zg, steps=2, generator=gen)
    assert bool(((few - rho).abs() > 1e-10).any())


def test_a_scaled_rotation_gives_its_modulus() -> None:
    """A complex pair on a normal J (r times a rotation): the gain is r for every vector, so the
    estimate is exact even though v does not converge."""
    r, theta = 0.7, 0.9
    R = r * torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]],
                         dtype=torch.float64)
    z = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    est = spectral_radius(z @ R.T, z, steps=5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(est, torch.full((3,), r, dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("training", [True, False])
def test_layer_reports_the_spectral_radius_at_the_equilibrium(training: bool) -> None:
    gen = torch.Generator().manual_seed(9)
    B, d = 3, 5
    cell = RankOneCell(d, seed=2)
    x = 0.5 * torch.randn(B, d, generator=gen, dtype=torch.float64)
    deq = DEQ(cell, spectral_radius_steps=40, forward=dict(tol=1e-12, max_iter=100))
    deq.train(training)
    z_star = deq(x)
    # At z*, f(z*) = z*: the Jacobian of the returned point is the one at the equilibrium.
    rho = _dominant_real(_eigvals(cell, z_star.detach(), x))
    stats = deq.forward_stats
    assert stats is not None and stats.spectral_radius is not None
    torch.testing.assert_close(stats.spectral_radius, rho, rtol=1e-8, atol=0)
    assert stats.summary()["spectral_radius"] == pytest.approx(float(rho.mean()), rel=1e-8)
    off = DEQ(cell, forward=dict(tol=1e-12, max_iter=100))
    off(x)
    assert off.forward_stats.spectral_radius is None and "spectral_radius" not in off.forward_stats.summary()


def test_bad_steps_are_rejected() -> None:
    z = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        spectral_radius(z * 2, z, steps=0)
    with pytest.raises(ValueError, match="spectral_radius_steps must be an integer >= 0"):
        DEQ(nn.Identity(), spectral_radius_steps=1.5)
