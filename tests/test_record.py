"""Recorded trajectories (``record=[k, ...]``) and the layer's ``n_states`` (fixed-point correction)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deq_ext
from deq_ext import DEQ, state_steps

from .helpers import same_bits

pytestmark = pytest.mark.usefixtures("compiled")

METHODS = [("broyden", {}), ("broyden", {"line_search": True}), ("anderson", {}),
           ("fixed_point", {"tau": 0.8})]


class Cell(nn.Module):
    """f(z, x, s) = tanh(s W z + x): the per-sample scale s makes samples converge at different
    steps; ||W|| = 0.9."""

    def __init__(self, d: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        W = torch.randn(d, d, generator=gen, dtype=torch.float64)
        self.W = nn.Parameter(0.9 * W / torch.linalg.matrix_norm(W, ord=2))

    def forward(self, z: torch.Tensor, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return torch.tanh(s[:, None] * (z @ self.W.T) + x)


def _problem(seed: int, B: int = 5, d: int = 6):
    gen = torch.Generator().manual_seed(seed)
    cell = Cell(d, seed)
    x = torch.randn(B, d, generator=gen, dtype=torch.float64)
    s = torch.linspace(0.1, 1.0, B, dtype=torch.float64)
    z0 = 0.1 * torch.randn(B, d, generator=gen, dtype=torch.float64)
    return cell, x, s, z0


@pytest.mark.parametrize("return_final", [False, True])
@pytest.mark.parametrize("method,own", METHODS, ids=[m + ("_ls" if o.get("line_search") else "")
                                                     for m, o in METHODS])
def test_recorded_iterate_is_the_solve_stopped_at_that_step(method, own, return_final) -> None:
    cell, x, s, z0 = _problem(3)
    steps = [0, 1, 5, 10, 18, 25]
    with torch.no_grad():
        kw = dict(inputs=(x, s), tol=1e-9, return_final=return_final, **own)
        res = deq_ext.solve(cell, z0, method=method, max_iter=25, record=steps, **kw)
        plain = deq_ext.solve(cell, z0, method=method, max_iter=25, **kw)
        assert same_bits(res.z, plain.z)  # recording changes nothing
        assert len(res.recorded) == len(steps)
        assert same_bits(res.recorded[0], z0)
        for k, rec in zip(steps[1:], res.recorded[1:]):
            stopped = deq_ext.solve(cell, z0, method=method, max_iter=k, **kw)
            assert same_bits(rec, stopped.z), k
        # Samples that stopped before a recorded step repeat their final iterate there.
        mixed = 0
        for k, rec in zip(steps, res.recorded):
            early = res.nstep < k
            assert same_bits(rec[early], res.z[early])
            mixed += bool(early.any()) and not bool(early.all())
        assert mixed > 0  # some step was recorded after some samples stopped and before others


@pytest.mark.parametrize("method", ["fixed_point", "anderson"])
def test_recorded_iterate_is_the_lowest_residual_one_unless_return_final(method: str) -> None:
    """A non-normal J makes sample 0's residual grow for a while: after 3 steps its best iterate
    is an earlier one, which is what is recorded (the 3rd iterate with ``return_final``)."""
    J = torch.tensor([[0.5, 4.0], [0.0, 0.5]], dtype=torch.float64)
    f = lambda z: z @ J.T + 1.0  # noqa: E731
    z0 = torch.tensor([[0.0, -3.0], [1.0, 1.0]], dtype=torch.float64)
    kw = dict(method=method, max_iter=40, tol=1e-10, record=[3])
    if method == "anderson":
        kw["memory"] = 1  # no mixing history: plain iteration, whose residual grows
    best = deq_ext.solve(f, z0, **kw)
    last = deq_ext.solve(f, z0, return_final=True, **kw)
    assert same_bits(best.recorded[0], deq_ext.solve(f, z0, **{**kw, "max_iter": 3}).z)
    assert same_bits(last.recorded[0], deq_ext.solve(f, z0, return_final=True, **{**kw, "max_iter": 3}).z)
    assert not torch.equal(best.recorded[0][0], last.recorded[0][0])


def test_recorded_steps_keep_their_order_and_repeats() -> None:
    cell, x, s, z0 = _problem(4)
    res = deq_ext.broyden(cell, z0, inputs=(x, s), max_iter=10, tol=1e-9, record=[5, 2, 5])
    want = [deq_ext.broyden(cell, z0, inputs=(x, s), max_iter=k, tol=1e-9).z for k in (5, 2, 5)]
    for got, w in zip(res.recorded, want):
        assert same_bits(got, w)


def test_record_matches_torchdeq_fixed_point_indexing() -> None:
    """Where the semantics agree (plain iteration, last iterate): torchdeq's ``indexing``."""
    from torchdeq.solver import get_solver

    cell, x, s, z0 = _problem(5)
    f = lambda z: cell(z, x, s)  # noqa: E731
    steps = [2, 5, 12]
    with torch.no_grad():
        _, traj, _ = get_solver("fixed_point_iter")(f, z0, max_iter=12, tol=1e-300, indexing=steps,
                                                     return_final=True)
        res = deq_ext.fixed_point(f, z0, max_iter=12, tol=1e-300, record=steps, return_final=True)
    assert len(traj) == len(res.recorded) == 3
    for ours, theirs in zip(res.recorded, traj):
        torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-15)
    assert not torch.allclose(res.recorded[0], res.recorded[2])


def test_bad_record_and_empty_batch() -> None:
    f = lambda z: 0.5 * z  # noqa: E731
    z0 = torch.ones(2, 3)
    for bad, err in (([-1], ValueError), ([11], ValueError), ([1.5], ValueError),
                     ("3", TypeError), (3, TypeError)):
        with pytest.raises(err, match="record"):
            deq_ext.broyden(f, z0, max_iter=10, record=bad)
    empty = deq_ext.anderson(f, torch.zeros(0, 3), record=[0, 3])
    assert [r.shape for r in empty.recorded] == [(0, 3), (0, 3)]
    assert deq_ext.broyden(f, z0).recorded is None


def test_state_steps_are_evenly_spaced_and_end_at_max_iter() -> None:
    assert state_steps(3, 12) == [4, 8, 12]
    assert state_steps(3, 10) == [4, 7, 10]
    assert state_steps(1, 10) == [10]
    assert state_steps(4, 4) == [1, 2, 3, 4]


TIGHT_BWD = dict(tol=1e-12, max_iter=100)


def _param_grads(out, target, cell) -> torch.Tensor:
    cell.zero_grad()
    sum((o - target).pow(2).sum() * (i + 1) for i, o in enumerate(out)).backward()
    return cell.W.grad.clone()


def test_n_states_match_torchdeq_indexing_core() -> None:
    """torchdeq's DEQIndexing with n_states, one-step phantom gradients and IFT on the last state,
    on the same f and the same (plain fixed-point, last-iterate) solver: same states, same
    parameter gradients. (torchdeq's adjoint takes J_f at f(z*), ours at z*: the same once the
    forward solve has converged, as it nearly has at 18 steps; the earlier states are far from it.)"""
    from torchdeq import get_deq

    cell, x, s, z0 = _problem(6)
    target = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    theirs = get_deq(core="indexing", ift=True, n_states=3, f_solver="fixed_point_iter",
                     b_solver="fixed_point_iter", f_max_iter=18, f_tol=1e-300, b_max_iter=500,
                     b_tol=1e-13)
    states_t, _ = theirs(lambda z: cell(z, x, s), z0, solver_kwargs={"return_final": True})
    grads_t = _param_grads(states_t, target, cell)

    ours = DEQ(cell, n_states=3, backward=TIGHT_BWD,
               forward=dict(method="fixed_point", max_iter=18, tol=1e-300, return_final=True))
    states_o = ours(x, s, z0=z0)
    grads_o = _param_grads(states_o, target, cell)
    assert len(states_o) == len(states_t) == 3
    for o, t in zip(states_o, states_t):
        torch.testing.assert_close(o, t, rtol=1e-12, atol=1e-14)
    assert (states_o[0] - states_o[2]).abs().max() > 1e-6
    torch.testing.assert_close(grads_o, grads_t, rtol=1e-8, atol=1e-10)


def test_n_states_are_phantom_steps_from_the_solves_stopped_there() -> None:
    """Invariance with the default Broyden (lowest-residual iterates): state i is the one-step
    phantom DEQ of the solve stopped at its step; the last is the plain implicit DEQ."""
    cell, x, s, z0 = _problem(7)
    target = torch.randn(z0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    fwd = dict(max_iter=12, tol=1e-10)
    deq = DEQ(cell, n_states=3, forward=fwd, backward=TIGHT_BWD)
    states = deq(x, s, z0=z0)
    assert [t.requires_grad for t in states] == [True] * 3
    steps = state_steps(3, 12)
    for i, (k, state) in enumerate(zip(steps, states)):
        last = i == len(steps) - 1
        ref = DEQ(cell, forward=dict(fwd, max_iter=k), backward=TIGHT_BWD,
                  grad_mode="implicit" if last else "phantom")
        want = ref(x, s, z0=z0)
        assert same_bits(state.detach(), want.detach())
        g_state = torch.autograd.grad((state - target).pow(2).sum(), cell.W)[0]
        g_want = torch.autograd.grad((want - target).pow(2).sum(), cell.W)[0]
        torch.testing.assert_close(g_state, g_want, rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        plain = deq(x, s, z0=z0)
    res = deq_ext.broyden(cell, z0, inputs=(x, s), record=steps[:-1], **fwd)
    assert [same_bits(a, b) for a, b in zip(plain, [*res.recorded, res.z])] == [True] * 3


def test_bad_n_states() -> None:
    cell, x, s, z0 = _problem(8)
    for bad in (0, 13, 2.0):
        with pytest.raises(ValueError, match="n_states must be None or an integer"):
            DEQ(cell, n_states=bad, forward=dict(max_iter=12))(x, s, z0=z0)
