"""Whole solves: extension vs reference step by step, vs torchdeq, masks, counts, divergence."""

from __future__ import annotations

import math

import pytest
import torch

import deq_ext
from deq_ext import Status

from .problems import CountingF, contraction, contraction_inputs, mixed_line_search

# Every test here runs the compiled ops (some against the reference twin).
pytestmark = pytest.mark.usefixtures("compiled")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_solution_matches_torchdeq(dtype):
    torchdeq_broyden = pytest.importorskip("torchdeq.solver.broyden").broyden_solver
    B, D = 8, 64
    f = contraction(B, D, dtype=dtype, seed=2)
    z0 = torch.zeros(B, D, dtype=dtype)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    ours = deq_ext.broyden(f, z0, max_iter=80, tol=tol)
    theirs, _, info = torchdeq_broyden(f, z0, max_iter=80, tol=tol, stop_mode="abs")
    assert bool(ours.converged.all())
    assert float(info["abs_lowest"].max()) < tol
    # Both are within tol of the same fixed point of a contraction (Lipschitz < 0.95).
    gap = (ours.z - theirs).double().norm(dim=1)
    assert float(gap.max()) < 2 * tol / (1 - 0.95)
    assert float((f(ours.z) - ours.z).double().norm(dim=1).max()) < tol * 1.01


def test_heterogeneous_batch_stops_each_sample_on_its_own(device):
    B, D = 8, 40
    f = contraction(B, D, device=device, seed=3, rho_min=0.05, rho_max=0.97)
    res = deq_ext.broyden(f, torch.zeros(B, D, dtype=torch.float64, device=device),
                          max_iter=100, tol=1e-10)
    assert bool(res.converged.all())
    assert int(res.nstep.min()) < int(res.nstep.max())
    assert torch.equal(res.nfev, res.nstep + 1)


@pytest.mark.parametrize("compact", [True, False], ids=["compact", "whole_batch"])
def test_line_search_is_per_sample_and_batch_invariant(device, compact):
    """Some samples backtrack and some do not; each gets the same bits alone, in the batch
    and in a shuffled batch (one sample's backtracking must not make another backtrack)."""
    B, D = 8, 16
    f, (x, s) = mixed_line_search(B, D, device=device, seed=3)
    z0 = torch.zeros(B, D, dtype=torch.float64, device=device)
    opts = dict(max_iter=80, tol=1e-10, memory=8, line_search=True, compact=compact)
    batch = deq_ext.broyden(f, z0, inputs=(x, s), **opts)
    backtracks = batch.nfev - batch.nstep - 1
    assert bool((backtracks > 0).any()) and bool((backtracks == 0).any()), backtracks
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(1)).to(device)
    shuffled = deq_ext.broyden(f, z0[perm], inputs=(x[perm], s[perm]), **opts)
    for name in ("z", "nstep", "nfev", "status"):
        assert torch.equal(getattr(shuffled, name), getattr(batch, name)[perm]), name
    for b in range(B):
        alone = deq_ext.broyden(f, z0[b:b + 1], inputs=(x[b:b + 1], s[b:b + 1]), **opts)
        for name in ("z", "nstep", "nfev", "status"):
            assert torch.equal(getattr(alone, name)[0], getattr(batch, name)[b]), (b, name)


@pytest.mark.parametrize("line_search", [False, True])
def test_nfev_counts_every_evaluation_exactly(line_search):
    f = CountingF(contraction(1, 30, seed=6, rho_min=0.9, rho_max=0.9))
    res = deq_ext.broyden(f, torch.zeros(1, 30, dtype=torch.float64), max_iter=50, tol=1e-10,
                          line_search=line_search)
    assert int(res.nfev[0]) == f.calls
    if not line_search:
        assert f.calls == int(res.nstep[0]) + 1


def test_line_search_backtracks_on_a_hard_problem():
    """On f(z) = 2.5 tanh(z) + x (not contractive) full Broyden steps overshoot."""
    torch.manual_seed(0)
    x = 3 * torch.randn(4, 20, dtype=torch.float64)
    f = CountingF(lambda z: 2.5 * torch.tanh(z) - z * 0.5 + x)
    res = deq_ext.broyden(f, torch.zeros_like(x), max_iter=100, tol=1e-9, line_search=True)
    assert bool(torch.isfinite(res.z).all())
    assert bool((res.nfev > res.nstep + 1).any()), "expected at least one backtracking step"
    ref = deq_ext.broyden(f, torch.zeros_like(x), max_iter=100, tol=1e-9, line_search=True,
                          use_reference=True)
    assert torch.equal(res.nfev, ref.nfev) and torch.equal(res.status, ref.status)


def test_nan_sample_is_flagged_and_others_unaffected(device):
    B, D = 4, 16
    f = contraction(B, D, device=device, seed=7)

    def poisoned(z):
        out = f(z)
        out[2] = math.nan
        return out

    z0 = torch.randn(B, D, dtype=torch.float64, device=device)
    clean = deq_ext.broyden(f, z0, max_iter=60, tol=1e-10)
    res = deq_ext.broyden(poisoned, z0, max_iter=60, tol=1e-10)
    assert int(res.status[2]) == Status.DIVERGED
    keep = [0, 1, 3]
    assert bool(res.converged[keep].all())
    torch.testing.assert_close(res.z[keep], clean.z[keep], rtol=1e-12, atol=1e-12)
    assert torch.equal(res.nstep[keep], clean.nstep[keep])
    assert int(res.nstep[2]) == 0 and bool(torch.isfinite(res.z).all())


def test_sample_that_turns_non_finite_later_keeps_its_best_iterate():
    x = torch.randn(3, 10, dtype=torch.float64)
    calls = {"n": 0}

    def f(z):
        calls["n"] += 1
        out = 0.5 * torch.tanh(z) + x
        if calls["n"] >= 4:
            out[1] = math.inf
        return out

    res = deq_ext.broyden(f, torch.zeros_like(x), max_iter=40, tol=1e-12)
    assert int(res.status[1]) == Status.DIVERGED and int(res.nstep[1]) == 3
    assert bool(torch.isfinite(res.z[1]).all()) and math.isfinite(float(res.abs_residual[1]))
    assert bool(res.converged[[0, 2]].all())


def test_stalled_sample_is_flagged():
    x = torch.randn(2, 8, dtype=torch.float64)
    no_root = torch.tensor([[0.0], [1.0]], dtype=torch.float64)

    def f(z):  # sample 1: f(z) = z + 1 has no fixed point, its residual never changes
        return torch.where(no_root.bool(), z + 1.0, 0.5 * torch.tanh(z) + x)

    res = deq_ext.broyden(f, torch.zeros_like(x), max_iter=200, tol=1e-10, stall_patience=10)
    assert int(res.status[0]) == Status.CONVERGED
    assert int(res.status[1]) == Status.STALLED
    assert int(res.nstep[1]) == 10
    off = deq_ext.broyden(f, torch.zeros_like(x), max_iter=50, tol=1e-10, stall_patience=0)
    assert int(off.status[1]) == Status.MAX_ITER and int(off.nstep[1]) == 50


def test_stop_early_false_runs_without_sync_and_same_answers(device):
    B, D = 5, 20
    f = CountingF(contraction(B, D, device=device, seed=8))
    z0 = torch.zeros(B, D, dtype=torch.float64, device=device)
    early = deq_ext.broyden(f, z0, max_iter=80, tol=1e-10)
    calls_early = f.calls
    f.calls = 0
    fixed = deq_ext.broyden(f, z0, max_iter=80, tol=1e-10, stop_early=False)
    assert f.calls == 81 and calls_early < 81
    assert torch.equal(fixed.z, early.z) and torch.equal(fixed.nstep, early.nstep)
    assert torch.equal(fixed.status, early.status)


def test_batch_wide_stopping_mode(device):
    B, D = 4, 20
    f = contraction(B, D, device=device, seed=9, rho_min=0.1, rho_max=0.9)
    z0 = torch.zeros(B, D, dtype=torch.float64, device=device)
    res = deq_ext.broyden(f, z0, max_iter=80, tol=1e-9, per_sample=False)
    assert bool(res.converged.all())
    assert int(res.nstep.min()) == int(res.nstep.max())  # everyone iterates until all are done
    per = deq_ext.broyden(f, z0, max_iter=80, tol=1e-9)
    assert int(per.nstep.max()) == int(res.nstep.max())
    assert bool((res.abs_residual <= per.abs_residual * (1 + 1e-9)).all())


@pytest.mark.parametrize("method", ["broyden", "anderson", "fixed_point"])
@pytest.mark.parametrize("use_reference", [False, True])
def test_batch_wide_stopping_never_flags_a_converged_sample_diverged(method, use_reference):
    """per_sample=False keeps converged samples iterating: rounding noise above an exact solution
    (best residual 0) must not count as a blow-up."""
    D = 8
    scale = torch.tensor([[0.0], [0.9]], dtype=torch.float64)  # sample 0: f(z) = x, solved in one step
    x = torch.ones(2, D, dtype=torch.float64)
    res = deq_ext.solve(lambda z, a, b: a * torch.tanh(z) + b, torch.zeros(2, D, dtype=torch.float64),
                        inputs=(scale, x), method=method, tol=1e-8, per_sample=False,
                        use_reference=use_reference)
    assert res.status.tolist() == [int(Status.CONVERGED)] * 2


def test_return_final_versus_best():
    f = contraction(3, 12, seed=10)
    z0 = torch.zeros(3, 12, dtype=torch.float64)
    best = deq_ext.broyden(f, z0, max_iter=3, tol=1e-14, trace=True)
    final = deq_ext.broyden(f, z0, max_iter=3, tol=1e-14, return_final=True, trace=True)
    assert torch.equal(final.abs_residual, final.abs_trace[:, -1])
    torch.testing.assert_close(best.abs_residual, best.abs_trace.min(dim=1).values)
    assert bool((best.status == Status.MAX_ITER).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_iterates(dtype):
    f64 = contraction(4, 32, seed=11)
    f = lambda z: f64(z.double()).to(z.dtype)  # noqa: E731
    res = deq_ext.broyden(f, torch.zeros(4, 32, dtype=dtype), max_iter=40, tol=5e-2)
    assert res.z.dtype == dtype and res.abs_residual.dtype == torch.float32
    assert bool(res.converged.all())


def test_solve_dispatches_by_method():
    f = contraction(2, 8, seed=12)
    z0 = torch.zeros(2, 8, dtype=torch.float64)
    a = deq_ext.solve(f, z0, method="broyden", tol=1e-10)
    b = deq_ext.broyden(f, z0, tol=1e-10)
    assert torch.equal(a.z, b.z)
    assert "converged" in a.summary()


def test_solver_is_deterministic(device):
    f = contraction(6, 50, device=device, seed=13)
    z0 = torch.randn(6, 50, dtype=torch.float32, device=device)
    r1 = deq_ext.broyden(f, z0.double(), max_iter=30, tol=1e-9, memory=7)
    r2 = deq_ext.broyden(f, z0.double(), max_iter=30, tol=1e-9, memory=7)
    assert torch.equal(r1.z, r2.z) and torch.equal(r1.nstep, r2.nstep)


@pytest.mark.parametrize("method", ["broyden", "anderson", "fixed_point"])
def test_any_strided_start_and_inputs_are_accepted(device, method):
    f, (x, rho, W, scale) = contraction_inputs(6, 10, device=device, seed=2)
    z0 = torch.randn(10, 6, dtype=torch.float64, device=device).t()  # (6, 10), transposed
    x_strided = torch.empty(6, 20, dtype=torch.float64, device=device)[:, ::2].copy_(x)
    assert not z0.is_contiguous() and not x_strided.is_contiguous()
    kw = dict(method=method, max_iter=60, tol=1e-10)
    got = deq_ext.solve(f, z0, inputs=(x_strided, rho, W, scale), **kw)
    want = deq_ext.solve(f, z0.contiguous(), inputs=(x, rho, W, scale), **kw)
    assert torch.equal(got.z, want.z) and torch.equal(got.nstep, want.nstep)
    assert bool(got.converged.all())
