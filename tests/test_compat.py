"""Drop-in adapters: the locuslab/deq dict (deq_ext semantics), the torchdeq solver registry, and
the keyword arguments the adapters refuse."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deq_ext import compat


def test_locuslab_dict_has_every_key_with_the_right_shapes():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5)  # (bsz, hidden, seq_len), as locuslab/deq lays it out
    out = compat.broyden(lambda z: 0.5 * torch.tanh(z) + x, torch.zeros_like(x), threshold=30,
                         eps=1e-6, stop_mode="abs", name="forward", semantics="deq_ext")
    for key in ("result", "lowest", "nstep", "prot_break", "abs_trace", "rel_trace", "eps", "threshold"):
        assert key in out, key
    assert out["result"].shape == x.shape
    assert isinstance(out["lowest"], float) and out["lowest"] < 1e-6
    assert isinstance(out["nstep"], int) and 0 < out["nstep"] <= 30
    assert out["prot_break"] is False
    assert len(out["abs_trace"]) == len(out["rel_trace"]) == out["nstep"] + 1
    assert out["abs_trace"][-1] <= out["abs_trace"][0]
    assert out["eps"] == 1e-6 and out["threshold"] == 30 and out["name"] == "forward"
    z = out["result"]
    assert float((0.5 * torch.tanh(z) + x - z).norm()) == pytest.approx(out["lowest"], rel=1e-3)


def test_locuslab_prot_break_on_divergence():
    x = torch.randn(2, 3)

    def f(z):
        out = 0.5 * torch.tanh(z) + x
        out[0] = torch.nan
        return out

    out = compat.broyden(f, torch.zeros_like(x), threshold=10, eps=1e-8, semantics="deq_ext")
    assert out["prot_break"] is True


def test_torchdeq_solver_signature_and_info():
    x = torch.randn(3, 4)
    z, traj, info = compat.torchdeq_broyden(lambda z: 0.5 * torch.tanh(z) + x, torch.zeros_like(x),
                                            max_iter=30, tol=1e-6, indexing=[5, 10])
    assert z.shape == x.shape and len(traj) == 2
    for key in ("abs_lowest", "rel_lowest", "abs_trace", "rel_trace", "nstep"):
        assert info[key].shape[0] == 3, key
    assert float(info["abs_lowest"].max()) < 1e-6


@pytest.mark.parametrize("adapter", ["torchdeq_broyden", "torchdeq_anderson", "torchdeq_fixed_point"])
def test_torchdeq_indexing_returns_the_solve_stopped_at_each_step(adapter):
    gen = torch.Generator().manual_seed(3)
    rho = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)[:, None]
    x = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    f = lambda z: rho * torch.tanh(z) + x  # noqa: E731
    solver = getattr(compat, adapter)
    z, traj, _ = solver(f, torch.zeros_like(x), max_iter=30, tol=1e-12, indexing=[3, 7, 500])
    assert len(traj) == 3
    for k, got in zip((3, 7), traj):
        stopped, _, _ = solver(f, torch.zeros_like(x), max_iter=k, tol=1e-12)
        torch.testing.assert_close(got, stopped, rtol=0, atol=0)
    assert not torch.equal(traj[0], traj[1])
    torch.testing.assert_close(traj[2], z, rtol=0, atol=0)  # past the end: the solution
    with pytest.raises(ValueError, match="non-negative"):
        solver(f, torch.zeros_like(x), max_iter=5, indexing=[-1])


def test_torchdeq_fixed_point_indexing_matches_torchdeq():
    td = pytest.importorskip("torchdeq.solver")
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    f = lambda z: 0.5 * torch.tanh(z) + x  # noqa: E731
    _, ours, _ = compat.torchdeq_fixed_point(f, torch.zeros_like(x), max_iter=20, tol=1e-14,
                                             indexing=[2, 5], return_final=True)
    _, theirs, _ = td.fixed_point_iter(f, torch.zeros_like(x), max_iter=20, tol=1e-14,
                                       indexing=[2, 5], return_final=True)
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


class _Cell(nn.Module):
    def __init__(self, d):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.lin = nn.Linear(d, d).double()
        with torch.no_grad():
            W = torch.randn(d, d, generator=gen, dtype=torch.float64)
            self.lin.weight.copy_(0.5 * W / torch.linalg.matrix_norm(W, ord=2))

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


def test_torchdeq_model_gives_the_same_gradients_with_deq_ext():
    torchdeq = pytest.importorskip("torchdeq")
    name = compat.register_torchdeq()
    torch.manual_seed(1)
    d = 8
    cell = _Cell(d)
    x = torch.randn(5, d, dtype=torch.float64, requires_grad=True)
    grads = []
    for solver in (name, "broyden"):
        deq = torchdeq.get_deq(f_solver=solver, b_solver=solver, f_max_iter=60, b_max_iter=60,
                               f_tol=1e-11, b_tol=1e-11, ift=True)
        x.grad = None
        cell.zero_grad()
        z_out, info = deq(lambda z: cell(z, x), torch.zeros(5, d, dtype=torch.float64))
        (z_out[-1] ** 2).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in cell.parameters()])
        assert float(info["abs_lowest"].max()) < 1e-10
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-10)
    assert name in torchdeq.solver._solvers



def test_locuslab_rel_residual_with_an_exactly_solved_sample():
    """A sample whose map is constant lands on its fixed point (both residuals 0): its ||f(z)|| is
    ||z||, not 0, in the batch's relative residual."""
    c = torch.full((4,), 50.0, dtype=torch.float64)

    def f(z):
        return torch.stack([c.expand_as(z[0]), 0.999 * torch.tanh(z[1]) + 1.0])

    out = compat.broyden(f, torch.zeros(2, 4, dtype=torch.float64), threshold=3, eps=1e-12,
                         stop_mode="rel", semantics="deq_ext")
    z = out["result"]
    fz = f(z)
    want = float((fz - z).norm() / (fz.norm() + 1e-9))  # locuslab/deq's batch-wide definition
    assert out["lowest"] == pytest.approx(want, rel=1e-9)
    assert out["rel_trace"][-1] == pytest.approx(want, rel=1e-9)


def _contraction(gen):
    x = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    return (lambda z: 0.5 * torch.tanh(z) + x), torch.zeros_like(x)


@pytest.mark.parametrize("semantics", ["official", "deq_ext"])
def test_locuslab_adapters_accept_what_the_official_callers_pass(semantics):
    """DEQ-Sequence passes threshold and stop_mode; MDEQ-Vision also passes name, to both."""
    f, z0 = _contraction(torch.Generator().manual_seed(3))
    for solver in (compat.broyden, compat.anderson):
        out = solver(f, z0, threshold=30, stop_mode="rel", name="backward", semantics=semantics)
        assert out["name"] == "backward" and out["semantics"] == semantics
        assert out["lowest"] < 1e-3


@pytest.mark.parametrize("adapter, kwargs, unknown", [
    (compat.broyden, dict(threshold=10, tol=1e-6), "tol"),
    (compat.anderson, dict(threshold=10, max_iter=5), "max_iter"),
    (compat.anderson, dict(threshold=10, tau=0.5), "tau"),
    (compat.torchdeq_broyden, dict(max_iter=5, m=3), "m"),
    (compat.torchdeq_anderson, dict(max_iter=5, LBFGS_thres=3), "LBFGS_thres"),
    (compat.torchdeq_fixed_point, dict(max_iter=5, ls=True), "ls"),
])
def test_adapters_refuse_keywords_they_do_not_implement(adapter, kwargs, unknown):
    f, z0 = _contraction(torch.Generator().manual_seed(4))
    with pytest.raises(TypeError, match=rf"compat\.{adapter.__name__} does not implement .*'{unknown}'"):
        adapter(f, z0, **kwargs)


def test_semantics_switch_function_environment_and_argument(monkeypatch):
    f, z0 = _contraction(torch.Generator().manual_seed(5))
    monkeypatch.delenv(compat.SEMANTICS_ENV, raising=False)
    previous = compat.set_semantics(None)
    try:
        assert compat.get_semantics() == compat.DEFAULT_SEMANTICS == "official"
        assert compat.broyden(f, z0, 20)["semantics"] == "official"
        monkeypatch.setenv(compat.SEMANTICS_ENV, "deq_ext")
        assert compat.anderson(f, z0, threshold=20)["semantics"] == "deq_ext"
        assert compat.set_semantics("official") is None   # a call beats the environment
        assert compat.broyden(f, z0, 20)["semantics"] == "official"
        assert compat.broyden(f, z0, 20, semantics="deq_ext")["semantics"] == "deq_ext"
        with pytest.raises(ValueError, match="semantics must be one of"):
            compat.set_semantics("torchdeq")
        with pytest.raises(ValueError, match="semantics must be one of"):
            compat.anderson(f, z0, semantics="Official")
        compat.set_semantics(None)
        monkeypatch.setenv(compat.SEMANTICS_ENV, "per_sample")
        with pytest.raises(ValueError, match=compat.SEMANTICS_ENV):
            compat.broyden(f, z0, 20)
    finally:
        compat.set_semantics(previous)


def test_graph_needs_deq_ext_semantics_and_cuda():
    """graph=True replays deq_ext's loop: refused with the official algorithm, and (as in the
    solvers) without a CUDA device."""
    x0 = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="official algorithm has none"):
        compat.broyden(lambda z: 0.5 * z, x0, 5, semantics="official", graph=True)
    with pytest.raises(ValueError, match="official algorithm has none"):
        compat.anderson(lambda z: 0.5 * z, x0, semantics="official", graph=True)
    for adapter in (compat.torchdeq_broyden, compat.torchdeq_anderson, compat.torchdeq_fixed_point):
        with pytest.raises(ValueError, match="needs z0 on a CUDA device"):
            adapter(lambda z: 0.5 * z, x0, graph=True)
