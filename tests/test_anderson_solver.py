"""Whole solves with Anderson and fixed-point iteration: reference twin, torchdeq, masks, adapters."""

from __future__ import annotations

import math

import pytest
import torch

import deq_ext
from deq_ext import Status, compat

from .problems import RowCountingF, contraction, contraction_inputs

# Every test here runs the compiled ops (some against the reference twin).
pytestmark = pytest.mark.usefixtures("compiled")

METHODS = [("anderson", dict(memory=4, beta=0.9)), ("fixed_point", dict(tau=0.9))]


def test_anderson_matches_torchdeq_and_beats_plain_iteration():
    torchdeq_anderson = pytest.importorskip("torchdeq.solver.anderson").anderson_solver
    B, D = 5, 48
    f = contraction(B, D, seed=2, rho_min=0.5, rho_max=0.95)
    z0 = torch.zeros(B, D, dtype=torch.float64)
    ours = deq_ext.anderson(f, z0, max_iter=200, tol=1e-9, memory=5)
    theirs, _, info = torchdeq_anderson(f, z0, max_iter=200, tol=1e-9, stop_mode="abs", m=5)
    assert bool(ours.converged.all()) and float(info["abs_lowest"].max()) < 1e-9
    assert float((ours.z - theirs).norm(dim=1).max()) < 2e-9 / (1 - 0.95)
    plain = deq_ext.fixed_point(f, z0, max_iter=400, tol=1e-9)
    assert int(ours.nstep.sum()) < int(plain.nstep.sum())


def test_fixed_point_matches_torchdeq():
    torchdeq_fp = pytest.importorskip("torchdeq.solver.fp_iter").fixed_point_iter
    B, D = 4, 24
    f = contraction(B, D, seed=3, rho_max=0.7)
    z0 = torch.zeros(B, D, dtype=torch.float64)
    ours = deq_ext.fixed_point(f, z0, max_iter=300, tol=1e-10)
    theirs, _, _ = torchdeq_fp(f, z0, max_iter=300, tol=1e-10, stop_mode="abs")
    assert bool(ours.converged.all())
    assert float((ours.z - theirs).norm(dim=1).max()) < 2e-10 / (1 - 0.7)


@pytest.mark.parametrize("method,opts", METHODS)
def test_nan_sample_is_flagged_others_converge(method, opts):
    f = contraction(4, 12, seed=6)

    def poisoned(z):
        out = f(z)
        out[1] = math.nan
        return out

    z0 = torch.zeros(4, 12, dtype=torch.float64)
    res = deq_ext.solve(poisoned, z0, method=method, max_iter=200, tol=1e-10, **opts)
    clean = deq_ext.solve(f, z0, method=method, max_iter=200, tol=1e-10, **opts)
    assert int(res.status[1]) == Status.DIVERGED
    keep = [0, 2, 3]
    assert bool(res.converged[keep].all())
    torch.testing.assert_close(res.z[keep], clean.z[keep], rtol=1e-12, atol=1e-12)


def test_compaction_and_counts_with_anderson():
    B, D = 6, 16
    f, inputs = contraction_inputs(B, D, seed=7)
    counted = RowCountingF(f)
    res = deq_ext.anderson(counted, torch.zeros(B, D, dtype=torch.float64), inputs=inputs,
                           max_iter=200, tol=1e-10)
    off = deq_ext.anderson(f, torch.zeros(B, D, dtype=torch.float64), inputs=inputs,
                           max_iter=200, tol=1e-10, compact=False)
    torch.testing.assert_close(res.z, off.z, rtol=1e-12, atol=1e-12)
    assert torch.equal(res.nfev, res.nstep + 1) and counted.calls == int(res.nstep.max()) + 1
    # f runs on power-of-two buckets: the active rows, padded with finished ones to at most twice.
    assert int(res.nfev.sum()) <= counted.rows <= 2 * int(res.nfev.sum())
    assert counted.rows < B * counted.calls


@pytest.mark.parametrize("option,value", [("beta", 0.0), ("beta", 1.5), ("lam", -1.0),
                                          ("lam", math.nan), ("memory", 0)])
def test_anderson_rejects_impossible_settings(option, value):
    with pytest.raises(ValueError, match=option):
        deq_ext.anderson(contraction(2, 4), torch.zeros(2, 4, dtype=torch.float64), **{option: value})


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5, math.inf])
def test_fixed_point_rejects_bad_tau(value):
    with pytest.raises(ValueError, match="tau"):
        deq_ext.fixed_point(contraction(2, 4), torch.zeros(2, 4, dtype=torch.float64), tau=value)


def test_deq_layer_gradients_agree_across_methods():
    torch.manual_seed(8)
    d = 6
    W = torch.randn(d, d, dtype=torch.float64)
    W = torch.nn.Parameter(0.5 * W / torch.linalg.matrix_norm(W, ord=2))
    x = torch.randn(3, d, dtype=torch.float64, requires_grad=True)
    grads = []
    for method in ("broyden", "anderson", "fixed_point"):
        settings = dict(method=method, tol=1e-12, max_iter=300)
        z = deq_ext.deq_fixed_point(lambda z, x: torch.tanh(z @ W.T + x), torch.zeros_like(x), x,
                                    forward=settings, backward=settings)
        x.grad, W.grad = None, None
        z.pow(2).sum().backward()
        grads.append((x.grad.clone(), W.grad.clone()))
    for gx, gw in grads[1:]:
        torch.testing.assert_close(gx, grads[0][0], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(gw, grads[0][1], rtol=1e-9, atol=1e-11)


def test_locuslab_anderson_dict_and_torchdeq_registry():
    x = torch.randn(3, 4, 5)
    out = compat.anderson(lambda z: 0.5 * torch.tanh(z) + x, torch.zeros_like(x), m=4,
                          threshold=60, eps=1e-6, stop_mode="abs", semantics="deq_ext")
    # "lowest" is the batch-level norm of the per-sample residuals (each below eps).
    assert out["result"].shape == x.shape and out["prot_break"] is False
    assert out["lowest"] < math.sqrt(3) * 1e-6 and bool(out["status"].eq(Status.CONVERGED).all())
    torchdeq = pytest.importorskip("torchdeq")
    names = compat.register_all_torchdeq()
    assert set(names) == {"deq_ext_broyden", "deq_ext_anderson", "deq_ext_fixed_point"}
    for name in names:
        z, _, info = torchdeq.solver.get_solver(name)(lambda z: 0.5 * torch.tanh(z) + x,
                                                      torch.zeros_like(x), max_iter=100, tol=1e-6)
        assert float(info["abs_lowest"].max()) < 1e-6, name
    with pytest.raises(ValueError, match="unknown method"):
        compat.register_torchdeq("x", method="newton")
