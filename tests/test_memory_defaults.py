"""The memory a DEQ's solves keep by default: a bounded, restarting Broyden ring per solve (16
pairs forward, 8 backward) in bfloat16 under a float32 state; restarted Broyden; the forward
history gone before the adjoint's is allocated."""

from __future__ import annotations

import pytest
import torch

import deq_ext
import deq_ext.layer as layer_module
from benchmarks.memory_table import history_label
from benchmarks.peak_memory import PeakTracker
from deq_ext import SolverSettings
from deq_ext.layer import DEFAULT_MEMORY

from .helpers import same_bits
from .problems import contraction_inputs

pytestmark = pytest.mark.usefixtures("compiled")


def _slow_contraction(dtype: torch.dtype, B: int = 6, D: int = 40):
    """``rho_b tanh(z W^T + b) + x_b``, W orthogonal, rho from 0.5 to 0.95: the adjoint solves
    of the slow samples take well over 8 steps."""
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(D, D, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=dtype))[0])
    rho = torch.linspace(0.5, 0.95, B, dtype=dtype)[:, None]
    x = torch.randn(B, D, generator=gen, dtype=dtype)
    return lin, (lambda z, x, rho: rho * torch.tanh(lin(z)) + x), x, rho


def test_settings_resolve_to_the_bounded_restarting_ring():
    fwd = SolverSettings(max_iter=40).resolved("forward")
    bwd = SolverSettings(max_iter=40).resolved("backward")
    assert (fwd.memory, bwd.memory) == (DEFAULT_MEMORY["forward"], DEFAULT_MEMORY["backward"])
    assert (fwd.memory, bwd.memory) == (16, 8)
    assert fwd.options == bwd.options == {"restart": True}
    # A limit below the ring keeps every pair; an explicit memory, another method, or the
    # user's own restart are left as they are.
    assert SolverSettings(max_iter=5).resolved("backward").memory == 5
    explicit = SolverSettings(max_iter=40, memory=30)
    assert explicit.resolved("forward") is explicit
    anderson = SolverSettings(method="anderson")
    assert anderson.resolved("backward") is anderson
    assert SolverSettings(options={"restart": False}).resolved("forward").options == \
        {"restart": False}


def test_the_layer_runs_its_solves_with_the_default_rings(monkeypatch):
    """What the DEQ layer hands the solver for each solve, with the default settings."""
    seen = []
    solve = layer_module.solve

    def spy(f, z0, **kw):
        seen.append({k: kw.get(k) for k in ("memory", "restart", "history_dtype", "max_iter")})
        return solve(f, z0, **kw)

    monkeypatch.setattr(layer_module, "solve", spy)
    lin, f, x, rho = _slow_contraction(torch.float32)
    deq_ext.DEQ(f)(x, rho, z0=torch.zeros_like(x)).sum().backward()
    assert seen == [{"memory": 16, "restart": True, "history_dtype": None, "max_iter": 40},
                    {"memory": 8, "restart": True, "history_dtype": None, "max_iter": 40}]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-8), (torch.float32, 1e-5)])
def test_bounded_adjoint_gradients_match_the_whole_history(dtype, tol):
    """The default backward (a ring of 8 that restarts; bfloat16 under float32) against the
    whole float32/float64 history, both to the same tolerance relative to ||dL/dz*||: each
    adjoint is within tol / (1 - rho) of the exact one, so the gradients agree to twice that."""
    lin, f, x, rho = _slow_contraction(dtype)
    wide = {"history_dtype": torch.float32} if dtype == torch.float32 else {}

    def grads(backward):
        deq = deq_ext.DEQ(f, forward=dict(max_iter=100, memory=100, tol=tol * 1e-2),
                          backward=backward)
        lin.zero_grad()
        deq(x, rho, z0=torch.zeros_like(x)).pow(2).sum().backward()
        return lin.weight.grad.clone(), deq.backward_stats

    whole, whole_stats = grads(dict(max_iter=100, memory=100, tol=tol, **wide))
    bounded, stats = grads(dict(max_iter=100, tol=tol))
    assert bool(whole_stats.status.eq(deq_ext.Status.CONVERGED).all())
    assert bool(stats.status.eq(deq_ext.Status.CONVERGED).all())
    assert int(stats.nstep.max()) > DEFAULT_MEMORY["backward"]  # the ring restarted
    bound = 2 * tol / (1 - float(rho.max()))
    assert float((bounded - whole).norm() / whole.norm()) <= bound


def test_restart_starts_the_ring_over():
    """restart=True: after m pairs the count starts again (npairs < m at the end of a long
    solve), the ring holds exactly m slots, and the solve converges; a ring the solve never fills
    gives the same bits with and without it."""
    B, D = 4, 16
    f, inputs = contraction_inputs(B, D, seed=4)
    z0 = torch.zeros(B, D, dtype=torch.float64)
    kw = dict(inputs=inputs, max_iter=60, tol=1e-12, return_state=True)
    res = deq_ext.broyden(f, z0, memory=3, restart=True, **kw)
    assert bool(res.converged.all()) and int(res.nstep.min()) > 3
    assert res.state["U"].shape[1] == 3
    # The pairs since the last restart: the count restarts when the next step begins, so a
    # sample that ended on a full ring still counts (and keeps) its 3 pairs.
    updates = res.nstep - 1
    assert torch.equal(res.state["npairs"], (updates - 1) % 3 + 1)
    ring = deq_ext.broyden(f, z0, memory=3, **kw)
    assert int(ring.state["npairs"].min()) > 3  # the ring counts every pair
    long = deq_ext.broyden(f, z0, restart=True, **kw)
    plain = deq_ext.broyden(f, z0, **kw)
    for field in ("z", "nstep", "status"):
        assert same_bits(getattr(long, field), getattr(plain, field)), field
    with pytest.raises(TypeError, match="restart"):
        deq_ext.broyden(f, z0, inputs=inputs, restart=1)


def test_the_forward_history_is_gone_before_the_adjoint_allocates_its_own():
    """The most history a training step holds at any time is the larger solve's ring, never
    both: the forward solve's chunks are freed when it returns."""
    B, D = 3, 64
    lin, f, x, rho = _slow_contraction(torch.float32, B, D)
    deq = deq_ext.DEQ(f, forward=dict(max_iter=60, tol=1e-7), backward=dict(max_iter=60,
                                                                              tol=1e-7))
    with PeakTracker(history_label(B, D)) as tracker:
        deq(x, rho, z0=torch.zeros_like(x)).sum().backward()
    assert int(deq.forward_stats.nstep.max()) > 16 and int(deq.backward_stats.nstep.max()) > 8
    pair = 2 * B * D * 2  # U and V rows of one slot, bfloat16
    fwd_ring, bwd_ring = 16 * pair, 8 * pair
    assert tracker.label_peaks["history"] == max(fwd_ring, bwd_ring)
    assert tracker.peak_labelled.get("history", 0) <= max(fwd_ring, bwd_ring)


def test_shine_reads_the_pairs_of_a_sample_that_ended_on_a_full_restarting_ring():
    """Under the layer's restarting ring, a sample that finished right after storing its m-th
    pair keeps them (the kernels restart a ring only when the sample's next step begins): its
    SHINE estimate uses them instead of falling back for want of pairs."""
    lin, f, x, rho = _slow_contraction(torch.float64, B=24)
    m = 4
    stats: dict = {}
    fwd = SolverSettings(max_iter=60, tol=1e-10, memory=m, options={"restart": True})
    z = deq_ext.deq_fixed_point(f, torch.zeros_like(x), x, rho, forward=fwd, stats=stats,
                                grad_mode="shine", backward=dict(shine_tol=float("inf")))
    z.sum().backward()
    updates = stats["forward"].nstep - 1
    on_full_ring = (updates > 0) & (updates % m == 0)
    assert bool(on_full_ring.any()), "no sample ended on a full ring: the test shows nothing"
    fallback = stats["backward"].fallback
    assert not bool((fallback == deq_ext.ShineFallback.NO_PAIRS).any()), fallback
