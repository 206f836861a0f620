"""Structured states: z as a tuple, list or dict of tensors (a two-resolution cell)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deq_ext
from deq_ext import DEQ, StateSpec, deq_fixed_point

pytestmark = pytest.mark.usefixtures("compiled")

TIGHT = dict(forward=dict(tol=1e-13, max_iter=200), backward=dict(tol=1e-13, max_iter=200))
C, L = 3, 4  # channels; the fine resolution has L positions, the coarse one L // 2


class TwoResolutionCell(nn.Module):
    """z = (fine (B, C, L), coarse (B, C, L/2)): each resolution mixes channels, and each sees the
    other (the coarse one pooled from the fine one, the fine one upsampled from the coarse one)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.Wf, self.Wc, self.Ufc, self.Ucf = (
            nn.Parameter(0.3 * torch.randn(C, C, generator=gen, dtype=torch.float64) / C ** 0.5)
            for _ in range(4))

    def step(self, fine: torch.Tensor, coarse: torch.Tensor, x: torch.Tensor):
        pooled = 0.5 * (fine[..., 0::2] + fine[..., 1::2])
        up = coarse.repeat_interleave(2, dim=-1)
        new_fine = torch.tanh(torch.einsum("ij,bjl->bil", self.Wf, fine)
                              + torch.einsum("ij,bjl->bil", self.Ucf, up) + x)
        new_coarse = torch.tanh(torch.einsum("ij,bjl->bil", self.Wc, coarse)
                                + torch.einsum("ij,bjl->bil", self.Ufc, pooled))
        return new_fine, new_coarse

    def forward(self, z, x):
        if isinstance(z, dict):
            fine, coarse = self.step(z["fine"], z["coarse"], x)
            return {"fine": fine, "coarse": coarse}
        out = self.step(z[0], z[1], x)
        return type(z)(out)


def _flat_reference(cell: TwoResolutionCell):
    """The same cell on a hand-flattened (B, C*L + C*L/2) state: the reference."""
    n_fine = C * L

    def f(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        B = z.shape[0]
        fine, coarse = cell.step(z[:, :n_fine].reshape(B, C, L), z[:, n_fine:].reshape(B, C, L // 2), x)
        return torch.cat([fine.reshape(B, -1), coarse.reshape(B, -1)], 1)
    return f


def _data(seed: int, B: int = 3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, L, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randn(B, C * L + C * L // 2, generator=gen, dtype=torch.float64)
    return x, target


@pytest.mark.parametrize("kind", ["tuple", "list", "dict"])
def test_gradients_match_the_flattened_reference(kind: str) -> None:
    cell = TwoResolutionCell(seed=1)
    x, target = _data(2)
    B = x.shape[0]
    zeros = (torch.zeros(B, C, L, dtype=torch.float64), torch.zeros(B, C, L // 2, dtype=torch.float64))
    z0 = {"tuple": zeros, "list": list(zeros), "dict": {"fine": zeros[0], "coarse": zeros[1]}}[kind]
    out = deq_fixed_point(cell, z0, x, **TIGHT)
    assert type(out) is type(z0)
    fine, coarse = (out["fine"], out["coarse"]) if kind == "dict" else out
    assert fine.shape == (B, C, L) and coarse.shape == (B, C, L // 2)
    flat_out = torch.cat([fine.reshape(B, -1), coarse.reshape(B, -1)], 1)
    loss = (flat_out - target).pow(2).sum()
    grads = torch.autograd.grad(loss, [x, *cell.parameters()])

    ref = deq_fixed_point(_flat_reference(cell), torch.zeros(B, C * L + C * L // 2, dtype=torch.float64),
                          x, **TIGHT)
    ref_grads = torch.autograd.grad((ref - target).pow(2).sum(), [x, *cell.parameters()])
    torch.testing.assert_close(flat_out, ref, rtol=1e-12, atol=1e-13)
    for g, r in zip(grads, ref_grads):
        assert r.abs().max() > 0
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("method", ["broyden", "anderson", "fixed_point"])
def test_every_solver_takes_a_structured_state(method: str) -> None:
    cell = TwoResolutionCell(seed=3)
    x, _ = _data(4)
    z0 = {"fine": torch.zeros(3, C, L, dtype=torch.float64),
          "coarse": torch.zeros(3, C, L // 2, dtype=torch.float64)}
    with torch.no_grad():
        res = deq_ext.solve(cell, z0, method=method, inputs=(x,), tol=1e-11, max_iter=100, record=[1])
        flat = deq_ext.solve(_flat_reference(cell), torch.zeros(3, C * L + C * L // 2, dtype=torch.float64),
                             method=method, inputs=(x,), tol=1e-11, max_iter=100, record=[1])
    assert set(res.z) == {"fine", "coarse"} and set(res.recorded[0]) == {"fine", "coarse"}
    spec = StateSpec(z0)
    assert torch.equal(spec.pack(res.z), flat.z)  # the same solve, bit for bit
    assert torch.equal(spec.pack(res.recorded[0]), flat.recorded[0])
    assert bool(res.converged.all())


def test_layer_with_structured_state_and_n_states() -> None:
    cell = TwoResolutionCell(seed=5)
    x, _ = _data(6)
    z0 = (torch.zeros(3, C, L, dtype=torch.float64), torch.zeros(3, C, L // 2, dtype=torch.float64))
    deq = DEQ(cell, n_states=2, jac_reg_samples=1, forward=dict(max_iter=10, tol=1e-12))
    states = deq(x, z0=z0)
    assert len(states) == 2 and all(isinstance(s, tuple) and len(s) == 2 for s in states)
    (sum(t.sum() for s in states for t in s) + deq.jac_loss.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in cell.parameters())


def test_bad_structured_states_are_rejected() -> None:
    z = torch.zeros(2, 3)
    f = lambda z: z  # noqa: E731
    with pytest.raises(TypeError, match="share one dtype"):
        deq_ext.broyden(f, (z, z.double()))
    with pytest.raises(ValueError, match="share the batch size"):
        deq_ext.broyden(f, (z, torch.zeros(3, 3)))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        deq_ext.broyden(f, (z, 1.0))
    with pytest.raises(ValueError, match="at least one tensor"):
        deq_ext.broyden(f, ())
    with pytest.raises(ValueError, match="f's output must have z0's structure"):
        deq_ext.broyden(lambda z: (z[0], z[1][:, :2]), (z, z))
    with pytest.raises(TypeError, match="f's output must be structured like z0"):
        deq_ext.broyden(lambda z: z[0], (z, z))
    with pytest.raises(TypeError, match="z0 must be a torch.Tensor or a tuple"):
        deq_fixed_point(f, "z")
