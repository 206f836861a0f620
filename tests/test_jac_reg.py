"""Jacobian regularization: the Hutchinson estimate, its gradient, the layer's jac_loss, training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deq_ext import DEQ, deq_fixed_point, jac_reg

pytestmark = pytest.mark.usefixtures("compiled")

TIGHT = dict(forward=dict(tol=1e-12, max_iter=100), backward=dict(tol=1e-12, max_iter=100))


class Cell(nn.Module):
    """f(z, x) = tanh(W z + x), W scaled to spectral norm 0.6; counts its calls."""

    def __init__(self, d: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        W = torch.randn(d, d, generator=gen, dtype=torch.float64)
        self.W = nn.Parameter(0.6 * W / torch.linalg.matrix_norm(W, ord=2))
        self.calls = 0

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.tanh(z @ self.W.T + x)


def _exact_frobenius(cell: Cell, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """||J_b||_F^2 / D per sample, from the full Jacobian of each sample."""
    out = []
    for b in range(z.shape[0]):
        J = torch.autograd.functional.jacobian(lambda zb: cell(zb[None], x[b:b + 1])[0], z[b])
        out.append(J.pow(2).sum() / z[b].numel())
    return torch.stack(out)


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_mean_over_draws_matches_the_exact_frobenius_norm(probe: str) -> None:
    gen = torch.Generator().manual_seed(11)
    B, d, draws = 3, 5, 400
    cell = Cell(d, seed=1)
    x = torch.randn(B, d, generator=gen, dtype=torch.float64)
    z = torch.randn(B, d, generator=gen, dtype=torch.float64).requires_grad_()
    fz = cell(z, x)
    est = torch.stack([jac_reg(fz, z, probe=probe, create_graph=False, generator=gen)
                       for _ in range(draws)])
    exact = _exact_frobenius(cell, z.detach(), x)
    mean, se = est.mean(0), est.std(0) / draws ** 0.5
    assert est.shape == (draws, B)
    assert bool((se > 0).all())
    assert bool(((mean - exact).abs() < 3 * se).all()), (mean, exact, se)


def test_samples_average_the_single_probe_estimates() -> None:
    gen = torch.Generator().manual_seed(3)
    cell = Cell(4, seed=2)
    x = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    z = torch.randn(2, 4, generator=gen, dtype=torch.float64).requires_grad_()
    fz = cell(z, x)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    singles = torch.stack([jac_reg(fz, z, generator=g1) for _ in range(4)]).mean(0)
    torch.testing.assert_close(jac_reg(fz, z, samples=4, generator=g2), singles, rtol=1e-14, atol=0)


def _diagonal_problem(seed: int):
    """f(z) = tanh(a * z + x) elementwise: J is diagonal, ||J||_F^2 / D = mean((a sech^2)^2), and a
    Rademacher probe estimates it exactly."""
    gen = torch.Generator().manual_seed(seed)
    B, d = 3, 6
    a = (0.5 * torch.randn(d, generator=gen, dtype=torch.float64)).requires_grad_()
    x = torch.randn(B, d, generator=gen, dtype=torch.float64)
    z = torch.randn(B, d, generator=gen, dtype=torch.float64).requires_grad_()
    exact = lambda a: (a / torch.cosh(a * z.detach() + x) ** 2).pow(2).mean(1)  # noqa: E731
    return a, x, z, exact


def test_rademacher_is_exact_on_a_diagonal_jacobian_and_its_gradient_reaches_parameters() -> None:
    a, x, z, exact = _diagonal_problem(7)
    est = jac_reg(torch.tanh(a * z + x), z, probe="rademacher", samples=2)
    torch.testing.assert_close(est, exact(a), rtol=1e-13, atol=0)
    (grad,) = torch.autograd.grad(est.sum(), a)
    (want,) = torch.autograd.grad(exact(a).sum(), a)
    assert grad.abs().max() > 0
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-14)


def test_structured_states_give_the_flat_estimate() -> None:
    a, x, z, exact = _diagonal_problem(8)
    zs = (z[:, :2], z[:, 2:].reshape(3, 2, 2))
    zs = tuple(t.detach().requires_grad_() for t in zs)
    fz = (torch.tanh(a[:2] * zs[0] + x[:, :2]), torch.tanh(a[2:].view(2, 2) * zs[1] + x[:, 2:].view(3, 2, 2)))
    torch.testing.assert_close(jac_reg(fz, zs, probe="rademacher"), exact(a), rtol=1e-13, atol=0)


def test_bad_arguments_are_rejected() -> None:
    cell = Cell(3, seed=0)
    z = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="z must require grad"):
        jac_reg(cell(z, z), z)
    zg = z.clone().requires_grad_()
    with pytest.raises(ValueError, match="samples must be an integer >= 1"):
        jac_reg(cell(zg, z), zg, samples=0)
    with pytest.raises(ValueError, match="probe must be"):
        jac_reg(cell(zg, z), zg, probe="uniform")
    with pytest.raises(ValueError, match="fz does not depend on z"):
        jac_reg(torch.zeros(2, 3, dtype=torch.float64), zg)
    with pytest.raises(ValueError, match="structure and shapes"):
        jac_reg(cell(zg, z)[:, :2], zg)
    with pytest.raises(ValueError, match="jac_reg_samples must be an integer >= 0"):
        DEQ(cell, jac_reg_samples=-1)
    with pytest.raises(ValueError, match="need a stats dict"):
        deq_fixed_point(cell, z, z, jac_reg_samples=1)


def test_layer_jac_loss_reuses_the_recorded_application_of_f() -> None:
    gen = torch.Generator().manual_seed(21)
    B, d = 4, 5
    cell = Cell(d, seed=3)
    x = torch.randn(B, d, generator=gen, dtype=torch.float64)
    plain = DEQ(cell, **TIGHT)
    cell.calls = 0
    plain(x)
    calls_plain = cell.calls
    deq = DEQ(cell, jac_reg_samples=3, **TIGHT)
    cell.calls = 0
    torch.manual_seed(0)
    z_star = deq(x)
    assert cell.calls == calls_plain  # no extra forward
    loss = deq.jac_loss
    assert loss is not None and loss.shape == (B,) and loss.requires_grad
    # The same probes (same RNG state) at z*, by hand.
    z = z_star.detach().requires_grad_()
    torch.manual_seed(0)
    want = jac_reg(cell(z, x), z, samples=3)
    torch.testing.assert_close(loss, want, rtol=1e-9, atol=1e-12)
    deq.eval()
    deq(x)
    assert deq.jac_loss is None
    deq.train()
    with torch.no_grad():
        deq(x)
    assert deq.jac_loss is None


@pytest.mark.parametrize("grad_mode", ["implicit", "phantom"])
def test_task_and_jacobian_gradients_add_up_in_one_backward(grad_mode: str) -> None:
    gen = torch.Generator().manual_seed(31)
    B, d, w = 3, 4, 0.7
    cell = Cell(d, seed=4)
    x = torch.randn(B, d, generator=gen, dtype=torch.float64)
    target = torch.randn(B, d, generator=gen, dtype=torch.float64)
    deq = DEQ(cell, jac_reg_samples=2, grad_mode=grad_mode, **TIGHT)

    def grads(task: float, jac: float) -> torch.Tensor:
        cell.zero_grad()
        torch.manual_seed(1)
        out = deq(x)
        (task * (out - target).pow(2).sum() + jac * w * deq.jac_loss.mean()).backward()
        return cell.W.grad.clone()

    both, task_only, jac_only = grads(1, 1), grads(1, 0), grads(0, 1)
    assert jac_only.abs().max() > 0
    torch.testing.assert_close(both, task_only + jac_only, rtol=1e-9, atol=1e-12)


def test_structured_state_layer_has_a_per_sample_jac_loss() -> None:
    gen = torch.Generator().manual_seed(41)
    cell = Cell(5, seed=5)
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64)

    def f(z, x):
        out = cell(torch.cat([z["a"], z["b"]], 1), x)
        return {"a": out[:, :2], "b": out[:, 2:]}

    deq = DEQ(f, jac_reg_samples=1, **TIGHT)
    z0 = {"a": torch.zeros(3, 2, dtype=torch.float64), "b": torch.zeros(3, 3, dtype=torch.float64)}
    torch.manual_seed(2)
    deq(x, z0=z0)
    flat = DEQ(cell, jac_reg_samples=1, **TIGHT)
    torch.manual_seed(2)
    flat(x)
    torch.testing.assert_close(deq.jac_loss, flat.jac_loss, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_copy_memory_trains_with_jacobian_regularization() -> None:
    from train.copy_memory import main

    args = ["--preset", "tiny", "--steps", "8", "--eval-every", "0"]
    off = main(args)
    on = main(args + ["--jac-reg-samples", "1", "--jac-loss-weight", "2.0"])
    assert len(on["losses"]) == 8
    assert all(torch.isfinite(torch.tensor(on["losses"])))
    # The pretrain steps (6 in the tiny preset) run no DEQ: identical; the DEQ steps add the
    # (positive) regularizer to the logged loss.
    assert on["losses"][:6] == off["losses"][:6]
    assert on["losses"][6] > off["losses"][6]
