"""SHINE in the DEQ layer: the forward Broyden estimate as the gradient (grad_mode="shine") and
as the adjoint solve's start (backward init="shine")."""

from __future__ import annotations

import math

import pytest
import torch

import deq_ext
from deq_ext import DEQ, Status, deq_fixed_point
from deq_ext.shine import ForwardPairs, ShineFallback, fallback_codes

from .helpers import bytes_kept_for_backward
from .test_layer import Cell

pytestmark = pytest.mark.usefixtures("compiled")

F64 = torch.float64


def _linear(A: torch.Tensor):
    """f(z, x) = z A + x: J_f = A^T for every sample, the adjoint solution (I - A)^{-1} grad."""
    return lambda z, x: z @ A + x


def _dense_h(pairs: ForwardPairs, b: int) -> torch.Tensor:
    """Sample b's H = -I + sum_j u_j v_j^T, formed densely from its live pairs."""
    k = min(int(pairs.npairs[b]), pairs.U.shape[1])
    U, V = pairs.U[b, :k].to(F64), pairs.V[b, :k].to(F64)
    return -torch.eye(U.shape[1], dtype=F64) + U.T @ V


def _forward_pairs(f, z0, x, **options) -> tuple[deq_ext.SolverResult, ForwardPairs]:
    res = deq_ext.broyden(f, z0, inputs=(x,), return_state=True, **options)
    return res, ForwardPairs.of(res)


def test_estimate_is_minus_h_transpose_applied_per_sample():
    gen = torch.Generator().manual_seed(0)
    B, D = 3, 6
    A = 0.3 * torch.randn(D, D, generator=gen, dtype=F64)
    x = torch.randn(B, D, generator=gen, dtype=F64)
    _, pairs = _forward_pairs(_linear(A), torch.zeros(B, D, dtype=F64), x, tol=1e-10, max_iter=4)
    assert (pairs.npairs > 1).all()
    grad = torch.randn(B, D, generator=gen, dtype=F64)
    got = pairs.minus_h_transpose(grad)
    for b in range(B):
        H = _dense_h(pairs, b)
        torch.testing.assert_close(got[b], -H.T @ grad[b], rtol=1e-12, atol=1e-12)
        # H is not symmetric here, so applying H instead of H^T would be told apart.
        assert float((H @ grad[b] - H.T @ grad[b]).norm()) > 1e-3 * float(grad[b].norm())


def test_estimate_of_a_bfloat16_history_is_accumulated_in_float32():
    gen = torch.Generator().manual_seed(1)
    B, D = 4, 40
    A = 0.4 * torch.randn(D, D, generator=gen) / math.sqrt(D)
    x = torch.randn(B, D, generator=gen)
    _, pairs = _forward_pairs(_linear(A), torch.zeros(B, D), x, tol=1e-5, max_iter=30,
                              history_dtype=torch.bfloat16)
    assert pairs.U.dtype == torch.bfloat16
    grad = torch.randn(B, D, generator=gen)
    got = pairs.minus_h_transpose(grad)
    wide = ForwardPairs(pairs.U.double(), pairs.V.double(), pairs.npairs, pairs.status)
    want = wide.minus_h_transpose(grad.double())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def _scalar_problem(B: int = 5, seed: int = 2):
    """One value per sample, f(z, a, c) = a z + c: Broyden's secant estimate is exact after one
    pair, so SHINE is the exact gradient."""
    gen = torch.Generator().manual_seed(seed)
    a = (0.9 * torch.rand(B, 1, generator=gen, dtype=F64) - 0.45).requires_grad_()
    c = torch.randn(B, 1, generator=gen, dtype=F64).requires_grad_()
    w = torch.randn(B, 1, generator=gen, dtype=F64)
    return a, c, w


def _scalar_grads(**layer) -> tuple[torch.Tensor, torch.Tensor, dict]:
    a, c, w = _scalar_problem()
    stats: dict = {}
    z = deq_fixed_point(lambda z, a, c: a * z + c, torch.zeros_like(c), a, c,
                        forward=dict(tol=1e-12, max_iter=30), stats=stats, **layer)
    (z * w).sum().backward()
    return a.grad, c.grad, stats


def test_shine_is_the_exact_gradient_when_the_estimate_is_exact():
    a, c, w = _scalar_problem()
    z_star = c.detach() / (1 - a.detach())
    want_c = w / (1 - a.detach())  # dL/dc = w / (1 - a), dL/da = z* w / (1 - a)
    ga, gc, stats = _scalar_grads(grad_mode="shine")
    torch.testing.assert_close(gc, want_c, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ga, z_star * want_c, rtol=1e-10, atol=1e-12)
    bwd = stats["backward"]
    assert (bwd.fallback == ShineFallback.NONE).all() and (bwd.nstep == 0).all()
    assert bwd.vjp_rows == 5  # the estimate's check, one VJP over the batch
    assert float(bwd.rel_residual.max()) < 1e-12


def test_warm_start_from_an_exact_estimate_needs_no_adjoint_step():
    cold = _scalar_grads(backward=dict(tol=1e-12))
    warm = _scalar_grads(backward=dict(tol=1e-12, init="shine"))
    torch.testing.assert_close(warm[0], cold[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(warm[1], cold[1], rtol=1e-10, atol=1e-12)
    assert (cold[2]["backward"].nstep >= 1).all()
    assert (warm[2]["backward"].nstep == 0).all(), "the start is the solution: no step to take"


def _cell_grads(cell: Cell, x: torch.Tensor, weights: torch.Tensor, **layer):
    x = x.detach().clone().requires_grad_()
    cell.zero_grad()
    deq = DEQ(cell, **layer)
    (deq(x) * weights).sum().backward()
    return [x.grad.clone()] + [p.grad.clone() for p in cell.parameters()], deq


def test_warm_started_gradients_equal_the_cold_started_ones_to_the_backward_tolerance():
    gen = torch.Generator().manual_seed(3)
    B, d = 6, 24
    cell = Cell(d, seed=3)
    x, weights = (torch.randn(B, d, generator=gen, dtype=F64) for _ in range(2))
    forward = dict(tol=1e-6, max_iter=60)
    cold, deq_cold = _cell_grads(cell, x, weights, forward=forward, backward=dict(tol=1e-11))
    warm, deq_warm = _cell_grads(cell, x, weights, forward=forward,
                                 backward=dict(tol=1e-11, init="shine"))
    for a, b in zip(warm, cold):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    assert deq_warm.backward_stats.fallback is None
    assert (deq_warm.backward_stats.status == Status.CONVERGED).all()


def test_shine_gradient_of_a_linear_f_is_minus_h_transpose_of_dl_dz():
    """dL/dx of f(z, x) = z A + x is the adjoint solution itself: SHINE's is -H^T dL/dz*."""
    gen = torch.Generator().manual_seed(4)
    B, D = 3, 8
    A = 0.3 * torch.randn(D, D, generator=gen, dtype=F64)
    x = torch.randn(B, D, generator=gen, dtype=F64)
    weights = torch.randn(B, D, generator=gen, dtype=F64)
    forward = dict(tol=1e-9, max_iter=40)
    _, pairs = _forward_pairs(_linear(A), torch.zeros(B, D, dtype=F64), x, **forward)
    xg = x.clone().requires_grad_()
    stats: dict = {}
    z = deq_fixed_point(_linear(A), torch.zeros(B, D, dtype=F64), xg, forward=forward,
                        grad_mode="shine", backward=dict(shine_tol=math.inf), stats=stats)
    (z * weights).sum().backward()
    assert (stats["backward"].fallback == ShineFallback.NONE).all()
    assert stats["backward"].vjp_rows == 0  # no check: no VJP at all
    for b in range(B):
        torch.testing.assert_close(xg.grad[b], -_dense_h(pairs, b).T @ weights[b],
                                   rtol=1e-10, atol=1e-12)
    exact = torch.linalg.solve(torch.eye(D, dtype=F64) - A, weights.T).T
    err = (xg.grad - exact).norm() / exact.norm()
    assert 0 < float(err) < 1, "an estimate, not the exact gradient (H is not J_g^-1 here)"


def test_each_sample_falls_back_to_the_exact_adjoint_for_its_own_reason():
    """One value per sample, f = a z + c + s sin(3z): linear samples (s = 0) get an exact
    estimate; sample 1 starts at its fixed point (no pair), sample 2 is nonlinear (a secant, not
    the derivative at z*), sample 3 starts far away and runs out of iterations."""
    a = torch.tensor([0.3, 0.3, 0.3, 0.3, -0.2], dtype=F64)[:, None].requires_grad_()
    c = torch.tensor([1.0, 2.0, -1.0, 0.5, 0.7], dtype=F64)[:, None].requires_grad_()
    s = torch.tensor([0.0, 0.0, 0.3, 0.6, 0.0], dtype=F64)[:, None]
    w = torch.tensor([1.0, -2.0, 0.5, 1.5, 3.0], dtype=F64)[:, None]

    def f(z, a, c, s):
        return a * z + c + s * torch.sin(3 * z)

    z0 = torch.zeros(5, 1, dtype=F64)
    z0[1] = 2.0 / 0.7  # sample 1's fixed point
    z0[3] = 50.0
    forward = dict(tol=1e-10, max_iter=8)

    def grads(**layer):
        a.grad = c.grad = None
        stats: dict = {}
        z = deq_fixed_point(f, z0, a, c, s, forward=forward, stats=stats, **layer)
        (z * w).sum().backward()
        return torch.cat([a.grad, c.grad], 1), stats

    exact, _ = grads(backward=dict(tol=1e-13, max_iter=50))
    shine, stats = grads(grad_mode="shine", backward=dict(tol=1e-13, max_iter=50, shine_tol=1e-12))
    fwd, bwd = stats["forward"], stats["backward"]
    assert fwd.status.tolist() == [Status.CONVERGED] * 3 + [Status.MAX_ITER, Status.CONVERGED]
    assert bwd.fallback.tolist() == [ShineFallback.NONE, ShineFallback.NO_PAIRS,
                                     ShineFallback.RESIDUAL, ShineFallback.NOT_CONVERGED,
                                     ShineFallback.NONE]
    # Exact where the estimate is, solved exactly where it fell back: the implicit gradient.
    torch.testing.assert_close(shine, exact, rtol=1e-9, atol=1e-11)
    assert bwd.nstep.tolist()[0] == bwd.nstep.tolist()[4] == 0
    assert all(n > 0 for n in bwd.nstep.tolist()[1:4])
    # The check's VJP over the batch, then the fallback solve's on its three samples.
    assert bwd.vjp_rows > 5
    # Without the residual check sample 2 keeps its estimate, which is off; the other two
    # fall back all the same (those checks need no VJP).
    off, stats = grads(grad_mode="shine", backward=dict(tol=1e-13, shine_tol=math.inf))
    assert stats["backward"].fallback.tolist() == [0, 2, 0, 1, 0]
    assert not torch.allclose(off[2], exact[2], rtol=1e-6, atol=0)
    torch.testing.assert_close(off[[0, 1, 3, 4]], exact[[0, 1, 3, 4]], rtol=1e-9, atol=1e-11)
    # Sample 1's estimate would be dL/dz* itself (H = -I), not (1 - a)^-1 dL/dz*.
    assert not torch.allclose(w[1] * torch.stack([z0[1, 0], torch.tensor(1.0, dtype=F64)]),
                              exact[1], rtol=0.1, atol=0)


@pytest.mark.parametrize("compact", [True, False])
def test_fallback_samples_get_the_implicit_gradient_of_the_whole_batch_solve(compact):
    gen = torch.Generator().manual_seed(6)
    B, d = 8, 16
    cell = Cell(d, seed=6)
    x, weights = (torch.randn(B, d, generator=gen, dtype=F64) for _ in range(2))
    forward = dict(tol=1e-9, max_iter=60)
    implicit, _ = _cell_grads(cell, x, weights, forward=forward, compact=compact,
                              backward=dict(tol=1e-12, max_iter=100))
    # A tolerance some samples' estimates meet and others miss.
    _, probe = _cell_grads(cell, x, weights, forward=forward, grad_mode="shine",
                           backward=dict(shine_tol=math.inf))
    _, checked = _cell_grads(cell, x, weights, forward=forward, grad_mode="shine",
                             backward=dict(shine_tol=1e30))  # checked, and all accepted
    assert (checked.backward_stats.fallback == ShineFallback.NONE).all()
    torch.testing.assert_close(checked.backward_stats.estimate_rel_residual,
                               checked.backward_stats.rel_residual)
    assert probe.backward_stats.estimate_rel_residual is None
    rel = checked.backward_stats.rel_residual.sort().values
    tol = float(rel[B // 2 - 1] + rel[B // 2]) / 2
    shine, deq = _cell_grads(cell, x, weights, forward=forward, compact=compact,
                             grad_mode="shine", backward=dict(tol=1e-12, max_iter=100,
                                                              shine_tol=tol))
    fell = deq.backward_stats.fallback == ShineFallback.RESIDUAL
    assert 0 < int(fell.sum()) < B
    assert torch.equal(fell, deq.backward_stats.estimate_rel_residual > tol)
    assert (deq.backward_stats.fallback[~fell] == ShineFallback.NONE).all()
    # x's gradient is per sample: the exact one where it fell back, else the estimate's.
    torch.testing.assert_close(shine[0][fell], implicit[0][fell], rtol=1e-9, atol=1e-11)
    assert not torch.allclose(shine[0][~fell], implicit[0][~fell], rtol=1e-6, atol=0)
    assert probe.backward_stats.vjp_rows == 0


def test_non_finite_upstream_gradient_falls_back():
    pairs = ForwardPairs(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.tensor([1, 1]),
                         torch.full((2,), int(Status.CONVERGED)))
    grad = torch.tensor([[1.0, 2, 3, 4], [1, math.nan, 0, 0]])
    code = fallback_codes(pairs, grad, pairs.minus_h_transpose(grad))
    assert code.tolist() == [ShineFallback.NONE, ShineFallback.NON_FINITE]


def test_bad_modes_and_options_are_clear_errors():
    cell = Cell(4)
    with pytest.raises(ValueError, match="grad_mode"):
        DEQ(cell, grad_mode="shiny")
    with pytest.raises(ValueError, match="only Broyden"):
        DEQ(cell, grad_mode="shine", forward=dict(method="anderson"))
    with pytest.raises(ValueError, match="only Broyden"):
        DEQ(cell, forward=dict(method="fixed_point"), backward=dict(init="shine"))
    with pytest.raises(ValueError, match="init"):
        DEQ(cell, backward=dict(init="zero"))
    with pytest.raises(ValueError, match="shine_tol"):
        DEQ(cell, grad_mode="shine", backward=dict(shine_tol=0))
    x = torch.randn(2, 4, dtype=F64)
    with pytest.raises(ValueError, match="only Broyden"):
        deq_fixed_point(cell, torch.zeros_like(x), x, grad_mode="shine",
                        forward=dict(method="anderson"))
    # Without an adjoint solve (phantom) the start does not matter: no error.
    DEQ(cell, grad_mode="phantom", forward=dict(method="anderson"), backward=dict(init="shine"))


def test_only_the_shine_modes_keep_the_forward_pairs_alive_until_backward():
    B, d = 4, 64
    cell = Cell(d, seed=2)
    x = torch.randn(B, d, dtype=F64, requires_grad=True)

    def kept(max_iter: int, **layer) -> int:
        # memory=max_iter: every pair of the solve (the layer's default ring keeps 16).
        deq = DEQ(cell, forward=dict(max_iter=max_iter, tol=1e-300, stall_patience=0,
                                     memory=max_iter), **layer)
        return bytes_kept_for_backward(deq(x), cell.parameters())

    default = kept(30)
    assert kept(5) == default
    for layer in (dict(grad_mode="shine"), dict(backward=dict(init="shine"))):
        # At least the pairs of the 30 steps: U and V, (B, pairs, d) each.
        assert kept(30, **layer) - default >= 2 * B * 25 * d * 8, layer


def test_backward_stats_summary_reports_the_fallback_share():
    a, c, w = _scalar_problem(B=4)
    deq = DEQ(lambda z, a, c: a * z + c, grad_mode="shine", forward=dict(tol=1e-12))
    (deq(a, c, z0=torch.zeros_like(c)) * w).sum().backward()
    summary = deq.backward_stats.summary()
    assert summary["shine_fallback"] == 0.0 and summary["nstep"] == 0.0
