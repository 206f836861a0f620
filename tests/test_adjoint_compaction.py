"""The compacted adjoint solve: VJPs through f re-recorded on the active rows, same gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deq_ext import DEQ, SolverSettings, deq_fixed_point
from deq_ext.status import Status

pytestmark = pytest.mark.usefixtures("compiled")

B, D = 12, 10
TIGHT_FWD = dict(tol=1e-13, max_iter=200)
TIGHT_BWD = dict(tol=1e-13, max_iter=200)


class HeteroCell(nn.Module):
    """f(z, x, rho) = rho_b * tanh(W z) + x_b: one contraction factor per sample, passed as a
    batched input with x, so the samples' adjoint solves converge after very different counts.
    Row-independent arithmetic (elementwise product and sum, no batched matmul)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        W = torch.randn(D, D, generator=gen, dtype=torch.float64)
        self.W = nn.Parameter(W / torch.linalg.matrix_norm(W, ord=2))

    def forward(self, z: torch.Tensor, x: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
        return rho * torch.tanh((z[:, None, :] * self.W[None]).sum(-1)) + x


def _data(seed: int, batch: int = B):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, D, generator=gen, dtype=torch.float64)
    # Contraction factors spread from fast (0.02) to slow (0.95), shuffled over the batch.
    rho = torch.linspace(0.02, 0.95, batch, dtype=torch.float64)[torch.randperm(batch, generator=gen)]
    target = torch.randn(batch, D, generator=gen, dtype=torch.float64)
    return x, rho[:, None].contiguous(), target


def _grads(cell: HeteroCell, x: torch.Tensor, rho: torch.Tensor, target: torch.Tensor,
           method: str = "broyden", **backward) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DEQ]:
    """(dL/dx, dL/drho, dL/dW, the layer) for L = ||z* - target||^2."""
    deq = DEQ(cell, forward=TIGHT_FWD, backward=dict(TIGHT_BWD, method=method, **backward))
    x, rho = x.clone().requires_grad_(), rho.clone().requires_grad_()
    loss = (deq(x, rho, z0=torch.zeros_like(x)) - target).pow(2).sum()
    gx, grho, gW = torch.autograd.grad(loss, [x, rho, cell.W])
    return gx, grho, gW, deq


def _assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["broyden", "anderson", "fixed_point"])
def test_gradients_equal_the_uncompacted_solve_with_fewer_vjp_rows(method: str) -> None:
    cell = HeteroCell(seed=1)
    x, rho, target = _data(2)
    off = _grads(cell, x, rho, target, method, compact=False)
    on = _grads(cell, x, rho, target, method)
    for a, b in zip(on[:3], off[:3]):
        _assert_close(a, b)
    s_on, s_off = on[3].backward_stats, off[3].backward_stats
    assert s_on is not None and s_off is not None
    assert bool((s_on.status == Status.CONVERGED).all()) and torch.equal(s_on.nstep, s_off.nstep)
    # Uncompacted: one VJP through the whole batch per evaluation, nothing re-recorded.
    assert s_off.rerecord_rows == 0
    assert s_off.vjp_rows == B * (int(s_off.nstep.max()) + 1)
    assert s_on.rerecord_rows is not None and s_on.rerecord_rows > 0
    assert s_on.vjp_rows is not None and s_on.vjp_rows + s_on.rerecord_rows < s_off.vjp_rows
    summary = s_on.summary()
    assert summary["vjp_rows"] == s_on.vjp_rows and summary["rerecord_rows"] == s_on.rerecord_rows


def test_a_samples_gradient_does_not_depend_on_its_batch_mates() -> None:
    cell = HeteroCell(seed=3)
    x, rho, target = _data(4)
    batch = _grads(cell, x, rho, target)
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(5))
    shuffled = _grads(cell, x[perm], rho[perm], target[perm])
    _assert_close(shuffled[0], batch[0][perm])
    _assert_close(shuffled[1], batch[1][perm])
    for i in (0, 5, B - 1):  # alone: no compaction at all
        alone = _grads(cell, x[i:i + 1], rho[i:i + 1], target[i:i + 1])
        _assert_close(alone[0], batch[0][i:i + 1])
        _assert_close(alone[1], batch[1][i:i + 1])
    # A smaller batch than B, in another order: other re-recording points for every sample.
    some = torch.tensor([7, 2, 9, 0, 11])
    part = _grads(cell, x[some], rho[some], target[some])
    _assert_close(part[0], batch[0][some])


def test_reading_the_active_count_every_third_step_gives_the_same_gradients() -> None:
    # Between two reads finished samples stay among the rows handed to the adjoint map.
    cell = HeteroCell(seed=14)
    x, rho, target = _data(15)
    off = _grads(cell, x, rho, target, compact=False)
    on = _grads(cell, x, rho, target, check_every=3)
    for a, b in zip(on[:3], off[:3]):
        _assert_close(a, b)
    assert on[3].backward_stats.rerecord_rows > 0


def test_backward_line_search_evaluates_subsets_of_the_recorded_rows() -> None:
    cell = HeteroCell(seed=6)
    x, rho, target = _data(7)
    rho = rho * 1.5  # some samples need backtracking in the adjoint solve
    opts = dict(line_search=True)
    off = _grads(cell, x, rho, target, compact=False, **opts)
    on = _grads(cell, x, rho, target, **opts)
    for a, b in zip(on[:3], off[:3]):
        _assert_close(a, b)
    stats = on[3].backward_stats
    assert stats is not None and stats.rerecord_rows is not None and stats.rerecord_rows > 0


def test_rerecord_threshold_and_switches() -> None:
    cell = HeteroCell(seed=8)
    x, rho, target = _data(9)
    every = _grads(cell, x, rho, target)[3].backward_stats
    quarter = _grads(cell, x, rho, target, rerecord_below=0.25)[3].backward_stats
    assert every is not None and quarter is not None
    # A lower threshold re-records later: fewer rows re-recorded, more VJP rows.
    assert 0 < quarter.rerecord_rows < every.rerecord_rows
    assert quarter.vjp_rows > every.vjp_rows
    # An f that mixes samples (forward compact=False) keeps the whole-batch adjoint too.
    deq = DEQ(cell, forward=TIGHT_FWD, backward=TIGHT_BWD, compact=False)
    xg = x.clone().requires_grad_()
    deq(xg, rho).sum().backward()
    assert deq.backward_stats is not None and deq.backward_stats.rerecord_rows == 0
    # The sync-free solve cannot compact (no active count on the host): the whole batch.
    sync_free = _grads(cell, x, rho, target, stop_early=False, max_iter=60)
    assert sync_free[3].backward_stats.vjp_rows == B * 61
    assert sync_free[3].backward_stats.rerecord_rows == 0


@pytest.mark.parametrize("bad", [0, 1.01, 1.5, -0.1, "half", True])
def test_bad_rerecord_threshold_is_rejected(bad) -> None:
    cell = HeteroCell(seed=0)
    x, rho, _ = _data(0)
    with pytest.raises(ValueError, match="rerecord_below"):
        deq_fixed_point(cell, torch.zeros_like(x), x, rho, backward=dict(rerecord_below=bad))


def test_tuple_states_are_re_recorded_on_their_rows() -> None:
    cell = HeteroCell(seed=10)
    x, rho, target = _data(11)
    half = D // 2

    def pair_f(z, x, rho):
        out = cell(torch.cat(z, 1), x, rho)
        return out[:, :half], out[:, half:]

    def grads(**backward):
        xg = x.clone().requires_grad_()
        stats: dict = {}
        z0 = (torch.zeros(B, half, dtype=torch.float64), torch.zeros(B, D - half, dtype=torch.float64))
        a, b = deq_fixed_point(pair_f, z0, xg, rho, forward=TIGHT_FWD,
                               backward=dict(TIGHT_BWD, **backward), stats=stats)
        loss = (torch.cat([a, b], 1) - target).pow(2).sum()
        return torch.autograd.grad(loss, [xg, cell.W]), stats["backward"]

    (gx_on, gW_on), s_on = grads()
    (gx_off, gW_off), s_off = grads(compact=False)
    _assert_close(gx_on, gx_off)
    _assert_close(gW_on, gW_off)
    assert s_on.rerecord_rows > 0 and s_on.vjp_rows < s_off.vjp_rows


def test_model_with_dropout_in_train_mode_keeps_its_masks() -> None:
    """The tiny DEQ-Transformer with variational dropout: f's masks are inputs drawn once per
    forward pass, so re-recording f on fewer rows reuses them and the gradients are unchanged."""
    from tests.models.helpers import tiny_model, tokens

    seq = tokens(6, 5)

    def grads(compact: bool) -> tuple[dict, dict]:
        tight = SolverSettings(max_iter=100, tol=1e-11, stop_mode="rel")
        back = SolverSettings(max_iter=100, tol=1e-11, stop_mode="rel", options=dict(compact=compact))
        model = tiny_model("transformer", dropout=0.3, dtype=torch.float64,
                           forward=tight, backward=back).train()
        torch.manual_seed(123)  # the same masks in both runs
        model(seq[:, :-1], seq[:, 1:]).loss.backward()
        stats = model.core.solver_stats[0]["backward"]
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, stats

    on, s_on = grads(True)
    off, s_off = grads(False)
    assert on.keys() == off.keys() and on
    for name in on:
        torch.testing.assert_close(on[name], off[name], rtol=1e-10, atol=1e-12, msg=name)
    assert s_on.rerecord_rows > 0, "the batch should converge unevenly enough to re-record"
    assert s_on.vjp_rows < s_off.vjp_rows


def test_f_is_re_recorded_under_the_forward_passes_autocast() -> None:
    """The backward runs outside the forward's autocast block; the re-recorded f must not."""
    cell = HeteroCell(seed=12).float()
    x, rho, _ = _data(13)
    seen: list[tuple[int, bool]] = []

    def spy(z, x, rho):
        seen.append((z.shape[0], torch.is_autocast_enabled("cpu")))
        return cell(z, x, rho)

    xg = x.float().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        z = deq_fixed_point(spy, torch.zeros_like(xg), xg, rho.float(), forward=dict(tol=1e-5),
                            backward=dict(tol=1e-6, max_iter=100))
    seen.clear()  # the forward's calls; the backward's re-recordings follow
    z.float().pow(2).sum().backward()
    assert seen and all(row < B for row, _ in seen)
    assert all(enabled for _, enabled in seen)
