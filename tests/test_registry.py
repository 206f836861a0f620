"""The public solver registry: custom solvers through solve() and the DEQ layer; clear errors."""

from __future__ import annotations

import pytest
import torch

import deq_ext
from deq_ext import DEQ, SolverResult, Status, register_solver, unregister_solver

pytestmark = pytest.mark.usefixtures("compiled")


def picard(f, z0, *, inputs=(), max_iter=50, tol=1e-3, stop_mode="abs", compact=None, **ignored):
    """A plain Python fixed-point iteration for the whole batch: a user's custom solver."""
    z, calls = z0, 0
    for _ in range(max_iter):
        fz = f(z, *inputs)
        calls += 1
        res = (fz - z).reshape(z.shape[0], -1).norm(dim=1)
        z = fz
        if bool((res < tol).all()):
            break
    fz = f(z, *inputs)
    res = (fz - z).reshape(z.shape[0], -1).norm(dim=1)
    B = z.shape[0]
    n = torch.full((B,), calls, dtype=torch.int64)
    status = torch.where(res < tol, int(Status.CONVERGED), int(Status.MAX_ITER))
    return SolverResult(z=z, abs_residual=res, rel_residual=res / (fz.reshape(B, -1).norm(dim=1) + 1e-9),
                        nstep=n, nfev=n + 1, status=status)


@pytest.fixture
def registered():
    register_solver("picard", picard)
    yield "picard"
    unregister_solver("picard")


def _problem(seed: int):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    W = (0.5 * W / torch.linalg.matrix_norm(W, ord=2)).requires_grad_()
    x = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    return (lambda z, x: torch.tanh(z @ W.T + x)), W, x


def test_solve_uses_a_registered_solver(registered) -> None:
    f, _, x = _problem(1)
    z0 = torch.zeros(4, 5, dtype=torch.float64)
    with torch.no_grad():
        res = deq_ext.solve(f, z0, method=registered, inputs=(x,), max_iter=200, tol=1e-12)
        ref = deq_ext.broyden(f, z0, inputs=(x,), max_iter=100, tol=1e-12)
    assert int(res.nstep[0]) > int(ref.nstep.max())  # picard ran, not Broyden
    torch.testing.assert_close(res.z, ref.z, rtol=1e-10, atol=1e-11)
    # A structured state reaches the custom solver flattened, and comes back structured.
    zs = (torch.zeros(4, 2, dtype=torch.float64), torch.zeros(4, 3, dtype=torch.float64))
    g = lambda z, x: tuple(torch.split(f(torch.cat(z, 1), x), [2, 3], 1))  # noqa: E731
    with torch.no_grad():
        out = deq_ext.solve(g, zs, method=registered, inputs=(x,), max_iter=200, tol=1e-12)
    torch.testing.assert_close(torch.cat(out.z, 1), res.z, rtol=0, atol=0)


def test_the_layer_uses_a_registered_solver_both_ways(registered) -> None:
    f, W, x = _problem(2)
    settings = dict(method=registered, max_iter=300, tol=1e-12)
    custom = DEQ(f, forward=settings, backward=settings)
    builtin = DEQ(f, forward=dict(max_iter=100, tol=1e-12), backward=dict(max_iter=100, tol=1e-12))
    g_custom = torch.autograd.grad(custom(x).pow(2).sum(), W)[0]
    g_builtin = torch.autograd.grad(builtin(x).pow(2).sum(), W)[0]
    assert custom.forward_stats.nstep[0] > builtin.forward_stats.nstep.max()
    assert custom.backward_stats.nstep[0] > builtin.backward_stats.nstep.max()
    torch.testing.assert_close(g_custom, g_builtin, rtol=1e-9, atol=1e-11)
    # The solve builds no graph (no_grad), so a phantom gradient is one step, not the unroll.
    phantom = DEQ(f, forward=settings, grad_mode="phantom")
    z = phantom(x)
    z_star = deq_ext.solve(f, torch.zeros_like(x), inputs=(x,), **settings).z.detach()
    assert not deq_ext.solve(f, torch.zeros_like(x), inputs=(x,), **settings).z.requires_grad
    g_phantom = torch.autograd.grad(z.pow(2).sum(), W)[0]
    g_one_step = torch.autograd.grad(f(z_star, x).pow(2).sum(), W)[0]
    torch.testing.assert_close(g_phantom, g_one_step, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="n_states needs the forward solver to honour record"):
        DEQ(f, forward=settings, n_states=2)(x)


def test_registry_errors(registered) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_solver(registered, picard)
    assert register_solver(registered, picard, replace=True) == registered
    with pytest.raises(ValueError, match="built in"):
        register_solver("broyden", picard)
    with pytest.raises(ValueError, match="built in"):
        unregister_solver("anderson")
    with pytest.raises(ValueError, match="no solver named"):
        unregister_solver("nope")
    with pytest.raises(TypeError, match="must be callable"):
        register_solver("mine", 3)
    with pytest.raises(ValueError, match="non-empty"):
        register_solver("", picard)
    with pytest.raises(TypeError, match="must be a str"):
        register_solver(None, picard)
    with pytest.raises(ValueError, match=r"unknown method 'nope'; registered solvers: \[.*'picard'"):
        deq_ext.solve(lambda z: z, torch.zeros(1, 2), method="nope")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        DEQ(lambda z: z, forward=dict(method="nope"))
    assert "mine" not in deq_ext.SOLVERS


def test_a_solver_returning_the_wrong_thing_is_reported() -> None:
    register_solver("broken", lambda f, z0, **kw: {"z": z0})
    register_solver("misshapen", lambda f, z0, **kw: picard(f, z0[:1], **kw))
    try:
        with pytest.raises(TypeError, match="returned dict, not a deq_ext.SolverResult"):
            deq_ext.solve(lambda z: z, torch.zeros(2, 3), method="broken")
        with pytest.raises(ValueError, match=r"returned z of shape \(1, 3\)"):
            deq_ext.solve(lambda z: 0.5 * z, torch.zeros(2, 3), method="misshapen")
    finally:
        unregister_solver("broken")
        unregister_solver("misshapen")
