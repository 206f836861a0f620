"""Cells whose output mixes samples (batch statistics) are refused under compaction, with an
error that names the module; row-wise normalizations compact as before."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import deq_ext
from deq_ext import DEQ, mixes_samples, sample_mixers


class NormCell(nn.Module):
    """tanh(norm(lin(z) + inj(x))) with a normalization of the caller's choice."""

    def __init__(self, norm: nn.Module, d: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.inj, self.norm = nn.Linear(d, d), nn.Linear(d, d), norm
        with torch.no_grad():
            self.lin.weight.mul_(0.3 / torch.linalg.matrix_norm(self.lin.weight, ord=2))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.norm(self.lin(z) + self.inj(x)))


def _x(B: int = 6, d: int = 8) -> torch.Tensor:
    return torch.randn(B, d, generator=torch.Generator().manual_seed(1))


def test_batch_norm_cell_changes_under_compaction():
    """Why the check exists: the solver alone compacts a batch-norm cell and moves its fixed
    point away from the uncompacted one."""
    cell = NormCell(nn.BatchNorm1d(4)).train()  # over (B, 4, 2): one row is still a batch

    def f(z, x, rho):  # per-sample contraction rho: the samples converge at different steps
        h = cell.inj(x)
        return torch.tanh(rho[:, None] * cell.lin(z) + cell.norm(h.view(-1, 4, 2)).view_as(h))

    x, rho = _x(), torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8, 0.95])
    with torch.no_grad():
        res = {c: deq_ext.broyden(f, torch.zeros_like(x), inputs=(x, rho), tol=1e-6, max_iter=80,
                                  compact=c) for c in (True, False)}
    assert len(set(res[False].nstep.tolist())) > 1 and bool(res[False].converged.all())
    # f's batch statistics change with the rows it sees (the solver's buckets): the compacted
    # solve ends elsewhere, or does not converge at all.
    moved = float((res[True].z - res[False].z).abs().max()) > 1e-5
    assert moved or not bool(res[True].converged.all())


def test_batch_norm_cell_is_refused_under_compaction_with_a_clear_error():
    cell = NormCell(nn.BatchNorm1d(8)).train()
    with pytest.raises(ValueError, match=r"f\.norm \(BatchNorm1d\): batch statistics in training "
                                         r"mode.*compact=False"):
        DEQ(cell)(_x())
    # The functional form and a forward compact among the settings' options too.
    with pytest.raises(ValueError, match="compact=False"):
        deq_ext.deq_fixed_point(cell, torch.zeros(6, 8), _x())
    with pytest.raises(ValueError, match="compact=False"):
        DEQ(cell, compact=False, forward=dict(compact=True))(_x())


def test_batch_norm_cell_runs_uncompacted_and_in_eval_mode():
    cell = NormCell(nn.BatchNorm1d(8)).train()
    x = _x().requires_grad_()
    DEQ(cell, compact=False)(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    cell.eval()  # running statistics: row-wise, compacts
    with torch.no_grad():
        assert DEQ(cell)(_x()).shape == (6, 8)
    # Without running statistics a batch norm uses batch statistics in eval mode too.
    cell = NormCell(nn.BatchNorm1d(8, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match="track_running_stats=False"):
        DEQ(cell)(_x())


def test_adjoint_compaction_is_covered_by_the_same_rule():
    cell = NormCell(nn.BatchNorm1d(8)).train()
    x = _x().requires_grad_()
    with pytest.raises(ValueError, match=r"adjoint solve.*backward=dict\(compact=False\)"):
        DEQ(cell, forward=dict(compact=False), backward=dict(compact=True))(x)
    # Without grad there is no adjoint solve to compact.
    with torch.no_grad():
        DEQ(cell, forward=dict(compact=False), backward=dict(compact=True))(x)
    # An uncompacted forward makes the adjoint uncompacted by default.
    DEQ(cell, forward=dict(compact=False))(x).sum().backward()
    # SHINE's fallback is an adjoint solve too; phantom gradients solve nothing backward.
    with pytest.raises(ValueError, match="adjoint solve"):
        DEQ(cell, forward=dict(compact=False), backward=dict(compact=True), grad_mode="shine")(x)
    DEQ(cell, forward=dict(compact=False), backward=dict(compact=True), grad_mode="phantom")(x)


@pytest.mark.parametrize("norm", [nn.GroupNorm(2, 8), nn.LayerNorm(8), nn.Dropout(0.0),
                                  nn.utils.parametrizations.weight_norm(nn.Linear(8, 8))],
                         ids=["group_norm", "layer_norm", "dropout", "weight_norm"])
def test_row_wise_cells_compact(norm):
    cell = NormCell(norm).train()
    assert sample_mixers(cell) == []
    x = _x()
    x[:3] *= 0.01
    stats: dict = {}
    z = deq_ext.deq_fixed_point(cell, torch.zeros_like(x), x, stats=stats,
                                forward=dict(tol=1e-8, max_iter=60))
    with torch.no_grad():
        want = deq_ext.broyden(cell, torch.zeros_like(x), inputs=(x,), tol=1e-8, max_iter=60,
                               compact=False).z
    torch.testing.assert_close(z.detach(), want, rtol=0, atol=1e-6)
    z.sum().backward()


def test_marks():
    class BatchMean(nn.Module):  # a module that mixes samples in a way deq_ext cannot see
        def forward(self, h):
            return h - h.mean(dim=0, keepdim=True)

    cell = NormCell(mixes_samples(BatchMean()))
    with pytest.raises(ValueError, match=r"f\.norm \(BatchMean\): marked with deq_ext.mixes_samples"):
        DEQ(cell)(_x())
    mixes_samples(cell.norm, None)  # cleared: the built-in rule finds nothing
    assert sample_mixers(cell) == []
    # A batch norm the user knows to be row-wise (e.g. batch size 1 always) can be marked so.
    bn = NormCell(mixes_samples(nn.BatchNorm1d(8), False)).train()
    assert sample_mixers(bn) == []

    @mixes_samples
    def f(z, x):
        return torch.tanh(z - z.mean(dim=0) + x)

    with pytest.raises(ValueError, match=r"f \(f\): marked"):
        deq_ext.deq_fixed_point(f, torch.zeros(6, 8), _x())
    # f as a bound method or a partial: the module behind it is looked into.
    bn_cell = NormCell(nn.BatchNorm1d(8)).train()
    assert sample_mixers(bn_cell.forward) and sample_mixers(functools.partial(bn_cell))
    # Structured states: the user's f is checked, not the flattened one.
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = bn_cell

        def forward(self, state, x):
            return self.inner(state[0], x), state[1]

    with pytest.raises(ValueError, match=r"f\.inner\.norm \(BatchNorm1d\)"):
        deq_ext.deq_fixed_point(Pair(), (torch.zeros(6, 8), torch.zeros(6, 2)), _x())


def test_mark_arguments():
    with pytest.raises(TypeError, match="mixes must be"):
        mixes_samples(nn.Linear(2, 2), "yes")
    with pytest.raises(TypeError, match="nn.Module or a function"):
        mixes_samples(3)
    with pytest.raises(TypeError, match="bound method"):
        mixes_samples(nn.Linear(2, 2).forward)
