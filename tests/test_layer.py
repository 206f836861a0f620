"""The DEQ layer: implicit gradients, memory, compaction, statistics, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import deq_ext
from deq_ext import DEQ, SolverSettings, deq_fixed_point

from .helpers import bytes_kept_for_backward

# Every test here runs its solves on the compiled ops.
pytestmark = pytest.mark.usefixtures("compiled")

TIGHT = dict(forward=dict(tol=1e-13, max_iter=200), backward=dict(tol=1e-13, max_iter=200))


class Cell(nn.Module):
    """f(z, x) = tanh(W z + U x + b), contractive (||W|| = 0.5)."""

    def __init__(self, d: int, seed: int = 0, dtype=torch.float64):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        W = torch.randn(d, d, generator=gen, dtype=torch.float64)
        self.W = nn.Parameter((0.5 * W / torch.linalg.matrix_norm(W, ord=2)).to(dtype))
        self.U = nn.Parameter(torch.randn(d, d, generator=gen, dtype=torch.float64).to(dtype) / d)
        self.b = nn.Parameter(0.1 * torch.randn(d, generator=gen, dtype=torch.float64).to(dtype))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


def _unrolled(cell, x, steps=250):
    z = torch.zeros_like(x)
    for _ in range(steps):
        z = cell(z, x)
    return z


def test_gradcheck_inputs_and_parameters():
    torch.manual_seed(0)
    B, d = 3, 4
    cell = Cell(d)
    x = torch.randn(B, d, dtype=torch.float64, requires_grad=True)
    W = cell.W.detach().clone().requires_grad_()
    b = cell.b.detach().clone().requires_grad_()

    def fn(x, W, b):
        f = lambda z, x: torch.tanh(z @ W.T + x @ cell.U.detach().T + b)  # noqa: E731
        return deq_fixed_point(f, torch.zeros(B, d, dtype=torch.float64), x, **TIGHT)

    assert torch.autograd.gradcheck(fn, (x, W, b), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradients_match_unrolled_differentiation():
    torch.manual_seed(1)
    B, d = 5, 8
    cell = Cell(d, seed=1)
    x = torch.randn(B, d, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(B, d, dtype=torch.float64)

    deq = DEQ(cell, **TIGHT)
    (deq(x) * weights).sum().backward()
    implicit = [x.grad.clone()] + [p.grad.clone() for p in cell.parameters()]
    x.grad = None
    cell.zero_grad()
    (_unrolled(cell, x) * weights).sum().backward()
    unrolled = [x.grad] + [p.grad for p in cell.parameters()]
    for a, b in zip(implicit, unrolled):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def _saved_bytes(run) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return total


def test_memory_kept_for_backward_does_not_grow_with_iterations():
    torch.manual_seed(2)
    B, d = 4, 16
    cell = Cell(d, seed=2)
    x = torch.randn(B, d, dtype=torch.float64, requires_grad=True)

    def deq_run(max_iter):
        deq = DEQ(cell, forward=dict(max_iter=max_iter, tol=1e-14))
        return lambda: deq(x)

    few, many = _saved_bytes(deq_run(5)), _saved_bytes(deq_run(50))
    assert few == many > 0
    # The same measurement does grow for an unrolled net, so it can tell.
    assert _saved_bytes(lambda: _unrolled(cell, x, 50)) > 5 * _saved_bytes(lambda: _unrolled(cell, x, 5)) / 2


def test_bytes_kept_alive_until_backward_do_not_grow_with_iterations():
    """Not only what autograd saves: everything the graph and the backward closure reach."""
    torch.manual_seed(2)
    B, d = 4, 64
    cell = Cell(d, seed=2)
    x = torch.randn(B, d, dtype=torch.float64, requires_grad=True)

    def kept(max_iter: int) -> int:
        deq = DEQ(cell, forward=dict(max_iter=max_iter, tol=1e-300, stall_patience=0))
        out = deq(x)
        assert int(deq.forward_stats.nstep.max()) == max_iter  # the history grew to max_iter
        return bytes_kept_for_backward(out, cell.parameters())

    few, many = kept(5), kept(50)
    assert few == many > 0
    # The same walk does grow for an unrolled net, so it can tell.
    unrolled = {n: bytes_kept_for_backward(_unrolled(cell, x, n), cell.parameters()) for n in (5, 50)}
    assert unrolled[50] > 5 * unrolled[5]


def test_eval_mode_with_gradients_enabled():
    cell = Cell(6, seed=3)
    deq = DEQ(cell, **TIGHT).eval()
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    deq(x).sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    assert deq.backward_stats is not None
    with torch.no_grad():
        z = deq(x)
    assert not z.requires_grad


def test_phantom_one_step_gradient_is_the_gradient_of_one_application():
    torch.manual_seed(4)
    cell = Cell(6, seed=4)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    deq = DEQ(cell, grad_mode="phantom", **TIGHT)
    deq(x).sum().backward()
    phantom = x.grad.clone()
    x.grad = None
    with torch.no_grad():
        z_star = deq_fixed_point(cell, torch.zeros_like(x), x, **TIGHT)
    cell(z_star, x).sum().backward()
    torch.testing.assert_close(phantom, x.grad)


@pytest.mark.parametrize("steps,damping", [(3, 0.7), (2, 1.0), (4, 0.4)])
def test_phantom_gradient_is_the_gradient_of_damped_steps_from_the_fixed_point(steps, damping):
    torch.manual_seed(4)
    cell = Cell(6, seed=4)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    deq = DEQ(cell, grad_mode="phantom", phantom_steps=steps, phantom_damping=damping, **TIGHT)
    out = deq(x)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    phantom = [x.grad.clone()] + [p.grad.clone() for p in cell.parameters()]
    x.grad = None
    cell.zero_grad()
    with torch.no_grad():
        z = deq_fixed_point(cell, torch.zeros_like(x), x, **TIGHT)
    for _ in range(steps):  # by hand: z <- (1 - d) z + d f(z), z* itself held constant
        z = (1 - damping) * z + damping * cell(z, x)
    torch.testing.assert_close(out, z)
    (z * weights).sum().backward()
    for got, want in zip(phantom, [x.grad] + [p.grad for p in cell.parameters()]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_statistics_of_both_solves_are_per_sample():
    cell = Cell(5, seed=5)
    deq = DEQ(cell, forward=dict(tol=1e-10, max_iter=60), backward=dict(tol=1e-10, max_iter=60))
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    z = deq(x)
    fs = deq.forward_stats
    assert fs.nstep.shape == fs.nfev.shape == fs.status.shape == fs.abs_residual.shape == (7,)
    assert deq.backward_stats is None
    z.sum().backward()
    bs = deq.backward_stats
    assert bs.nstep.shape == (7,) and bool((bs.status == deq_ext.Status.CONVERGED).all())
    assert set(fs.summary()) == {"nstep", "nfev", "abs_residual", "rel_residual", "converged"}


def test_compaction_does_not_change_outputs_or_gradients():
    torch.manual_seed(6)
    cell = Cell(6, seed=6)
    x = torch.randn(6, 6, dtype=torch.float64) * torch.linspace(0.1, 3, 6, dtype=torch.float64)[:, None]
    x.requires_grad_()
    outs = []
    for compact in (True, False):
        x.grad = None
        z = DEQ(cell, compact=compact, forward=dict(tol=1e-11, max_iter=80))(x)
        z.sum().backward()
        outs.append((z.detach(), x.grad.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-9, atol=1e-12)


def test_compact_in_the_settings_options_overrides_the_argument():
    cell = Cell(5, seed=8)
    x = torch.randn(7, 5, dtype=torch.float64) * torch.linspace(0.1, 3, 7, dtype=torch.float64)[:, None]
    rows: list[int] = []

    def f(z, x):
        rows.append(z.shape[0])
        return cell(z, x)

    def forward_rows(**settings) -> list[int]:
        rows.clear()
        with torch.no_grad():
            deq_fixed_point(f, torch.zeros_like(x), x, **settings)
        return list(rows)

    compacted = forward_rows(forward=dict(tol=1e-10, max_iter=60))
    assert min(compacted) < 7, "the samples converge at different steps"
    assert forward_rows(forward=dict(tol=1e-10, max_iter=60, compact=False)) == [7] * len(compacted)
    assert forward_rows(forward=dict(tol=1e-10, max_iter=60, compact=True), compact=False) == compacted
    # The adjoint solve is never compacted, whatever its options say.
    x.requires_grad_()
    deq_fixed_point(cell, torch.zeros_like(x), x, backward=dict(compact=True)).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_settings_accept_dicts_with_solver_options():
    deq = DEQ(Cell(3), forward=dict(tol=1e-5, line_search=True), backward=SolverSettings(tol=1e-7))
    assert deq.forward_settings.tol == 1e-5 and deq.forward_settings.options == {"line_search": True}
    assert deq.backward_settings.tol == 1e-7
    fwd, bwd = deq_ext.paper_settings(seq_len=100)
    assert math.isclose(fwd.tol, 1e-4) and math.isclose(bwd.tol, 1e-7)


def test_non_tensor_and_integer_inputs_pass_through():
    emb = nn.Embedding(10, 4).double()
    tokens = torch.randint(0, 10, (3,))

    def f(z, tokens, scale):
        return scale * torch.tanh(z) + emb(tokens)

    z = deq_fixed_point(f, torch.zeros(3, 4, dtype=torch.float64), tokens, 0.5, **TIGHT)
    z.sum().backward()
    assert emb.weight.grad is not None


def test_bad_input_gives_clear_errors():
    cell = Cell(4)
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="shape"):
        DEQ(lambda z, x: z[:, :2])(x)
    with pytest.raises(TypeError, match="dtype"):
        DEQ(lambda z, x: cell(z, x).float())(x)
    with pytest.raises(ValueError, match="batch size"):
        DEQ(cell)(x, z0=torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="grad_mode"):
        DEQ(cell, grad_mode="exact")(x)
    with pytest.raises(TypeError, match="settings"):
        DEQ(cell, forward=3)


def test_non_finite_gradient_is_flagged_and_other_samples_unaffected():
    torch.manual_seed(7)
    cell = Cell(5, seed=7)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    deq = DEQ(cell, **TIGHT)
    z = deq(x)
    weights = torch.ones_like(z)
    weights[1, 0] = math.nan
    with pytest.warns(RuntimeWarning, match=r"diverged for samples \[1\]; dL/dz\* is not finite"):
        (z * weights).sum().backward()
    assert int(deq.backward_stats.status[1]) == deq_ext.Status.DIVERGED
    assert deq.backward_stats.nonfinite_grad.tolist() == [False, True, False, False]
    # The non-finite dL/dz* goes on as autograd would pass it: the parameters show it (so a
    # GradScaler skips the step), and sample 1's own input gradient.
    assert not torch.isfinite(cell.W.grad).all() and not torch.isfinite(x.grad[1]).all()
    bad_grad = x.grad.clone()
    x.grad = None
    deq(x).sum().backward()
    keep = [0, 2, 3]
    torch.testing.assert_close(bad_grad[keep], x.grad[keep], rtol=1e-10, atol=1e-12)


def test_tiny_upstream_gradient_is_not_zeroed():
    """dL/dz* below the backward's absolute tolerance: the adjoint solve starts from dL/dz*, not 0,
    so the gradient is at worst the one-step estimate rather than exactly zero."""
    cell = Cell(16)
    x = torch.randn(4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    # The absolute stop (the default "grad" stop is relative to dL/dz* and would go on).
    deq = DEQ(cell, forward=dict(tol=1e-12, max_iter=100), backward=dict(stop_mode="abs"))
    (1e-7 * deq(x).sum()).backward()
    got = cell.W.grad.clone()
    cell.zero_grad()
    (1e-7 * _unrolled(cell, x).sum()).backward()
    want = cell.W.grad
    assert float(got.norm()) > 0
    assert float((got - want).norm() / want.norm()) < 0.5


def test_higher_order_gradients_raise():
    cell = Cell(5)
    x = torch.randn(3, 5, dtype=torch.float64)
    z = DEQ(cell, **TIGHT)(x)
    with pytest.raises(RuntimeError, match="higher-order gradients"):
        torch.autograd.grad(z.pow(2).sum(), cell.W, create_graph=True)


def test_frozen_deq_needs_no_adjoint_solve_but_inputs_still_get_gradients():
    cell = Cell(8).requires_grad_(False)
    deq = DEQ(cell, **TIGHT)
    x = torch.randn(4, 8, dtype=torch.float64)
    assert not deq(x).requires_grad  # nothing to differentiate: no graph kept, no adjoint solve
    x_leaf = x.clone().requires_grad_()
    z = deq(2 * x_leaf)  # a non-leaf input that requires grad
    assert z.requires_grad
    z.sum().backward()
    want_leaf = x.clone().requires_grad_()
    _unrolled(cell, 2 * want_leaf).sum().backward()
    torch.testing.assert_close(x_leaf.grad, want_leaf.grad, rtol=1e-8, atol=1e-10)


def test_backward_statistics_survive_a_later_forward():
    """The stats dict is cleared in place: a backward after another (no-grad) forward still
    reports its adjoint solve."""
    deq = DEQ(Cell(8))
    x = torch.randn(4, 8, dtype=torch.float64)
    z = deq(x)
    with torch.no_grad():
        deq(x)
    z.sum().backward()
    assert deq.backward_stats is not None
    assert bool((deq.backward_stats.status == deq_ext.Status.CONVERGED).all())
