"""Mixed precision: a plain cell (no casts) under torch.autocast, and a backward stop that a loss
scale (torch.amp.GradScaler) does not change.

The CPU cases run everywhere (bfloat16 autocast); the CUDA cases (float16 with a GradScaler,
bfloat16) are marked ``cuda`` and skipped without a GPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deq_ext
from deq_ext import DEQ, Status, compat


class Cell(nn.Module):
    """The cell users write: tanh(lin(z) + inj(x)), no dtype handling at all."""

    def __init__(self, d: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin, self.inj = nn.Linear(d, d), nn.Linear(d, d)
        with torch.no_grad():  # contractive enough that every solve converges in float32
            self.lin.weight.mul_(0.6 / torch.linalg.matrix_norm(self.lin.weight, ord=2))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(z) + self.inj(x))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def _run(cell: nn.Module, x: torch.Tensor, autocast: bool, dtype=torch.bfloat16, scale=1.0, **kw):
    """(z*, parameter gradients times 1/scale, the layer) of one step of loss mean(z*^2)."""
    cell.zero_grad()
    deq = DEQ(cell, **kw)
    with torch.autocast(x.device.type, dtype=dtype, enabled=autocast):
        z = deq(x)
        loss = z.pow(2).mean()
    (loss * scale).backward()
    return z, [p.grad.clone() / scale for p in cell.parameters()], deq


# -- the plain cell under CPU autocast ----------------------------------------------------------------
def test_plain_cell_under_cpu_autocast_matches_float32_at_bf16_tolerance():
    cell, x = Cell(16), torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    seen = []
    hook = cell.lin.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    z32, g32, _ = _run(cell, x, autocast=False)
    seen.clear()
    z, grads, _ = _run(cell, x, autocast=True)
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}, "f should have run under autocast"
    assert z.dtype == torch.float32 and z.shape == x.shape
    assert all(g.dtype == torch.float32 for g in grads)
    assert _rel(z, z32) < 2e-2
    for g, want in zip(grads, g32):
        assert torch.isfinite(g).all() and _rel(g, want) < 5e-2


def test_plain_cell_trains_under_cpu_autocast_without_casts():
    torch.manual_seed(0)
    cell = Cell(8, seed=3)
    head = nn.Linear(8, 1)
    deq = DEQ(cell, forward=dict(tol=1e-2, stop_mode="rel"), backward=dict(tol=1e-2))
    opt = torch.optim.Adam([*cell.parameters(), *head.parameters()], lr=3e-2)
    x = torch.randn(16, 8)
    y = x[:, :1].sin()
    losses = []
    for _ in range(25):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (head(deq(x)).float() - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("method", ["broyden", "anderson", "fixed_point"])
def test_solvers_cast_fs_autocast_output_to_z0s_dtype(method):
    cell, x = Cell(8), torch.randn(4, 8)
    with torch.no_grad():
        want = deq_ext.solve(cell, torch.zeros(4, 8), method=method, inputs=(x,), tol=1e-5).z
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert cell(torch.zeros(4, 8), x).dtype == torch.bfloat16
            res = deq_ext.solve(cell, torch.zeros(4, 8), method=method, inputs=(x,), tol=1e-2,
                                return_state=True)
    assert res.z.dtype == torch.float32 and res.state["z"].dtype == torch.float32
    assert _rel(res.z, want) < 2e-2


def test_other_dtype_mismatches_are_still_errors():
    z0 = torch.zeros(3, 4)
    with pytest.raises(TypeError, match="dtype"):  # outside autocast
        deq_ext.broyden(lambda z: z.bfloat16(), z0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="dtype"):  # not autocast's dtype
            deq_ext.broyden(lambda z: z.half(), z0)
        with pytest.raises(TypeError, match="dtype"):  # not floating point
            deq_ext.broyden(lambda z: z.int(), z0)


def test_bf16_z0_under_autocast_gives_a_bf16_fixed_point_from_a_float32_state():
    cell, x = Cell(8), torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = deq_ext.broyden(cell, torch.zeros(4, 8, dtype=torch.bfloat16), inputs=(x,),
                              tol=1e-2, return_state=True)
        z = DEQ(cell, forward=dict(tol=1e-2))(x, z0=torch.zeros(4, 8, dtype=torch.bfloat16))
    assert res.z.dtype == torch.bfloat16 and res.state["z"].dtype == torch.float32
    assert z.dtype == torch.bfloat16
    z.float().pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in cell.parameters())


def test_structured_state_under_autocast():
    cell, x = Cell(8), torch.randn(4, 8)

    def f(state, x):
        a, b = state
        return cell(a, x), torch.tanh(cell.lin(b))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = deq_ext.deq_fixed_point(f, (torch.zeros(4, 8), torch.zeros(4, 8)), x,
                                       forward=dict(tol=1e-2))
    assert a.dtype == b.dtype == torch.float32
    (a.sum() + b.sum()).backward()
    assert cell.lin.weight.grad.dtype == torch.float32


def test_phantom_and_jacobian_estimates_under_autocast():
    cell, x = Cell(8), torch.randn(4, 8)
    stats: dict = {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = deq_ext.deq_fixed_point(cell, torch.zeros(4, 8), x, grad_mode="phantom",
                                    phantom_steps=2, stats=stats, jac_reg_samples=1,
                                    spectral_radius_steps=3)
    assert z.dtype == torch.float32 and stats["jac_loss"].shape == (4,)
    (z.sum() + stats["jac_loss"].mean()).backward()
    assert torch.isfinite(cell.lin.weight.grad).all()


def test_adjoint_re_recording_under_autocast_matches_the_uncompacted_backward():
    """Samples that converge unevenly make the adjoint solve re-record f on fewer rows, under
    the autocast of the forward pass; each row's gradient stays the uncompacted one's."""
    lin = Cell(8).lin
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(4))
    rho = torch.linspace(0.05, 0.95, 8)

    def f(z, x, rho):
        return rho[:, None] * torch.tanh(lin(z)) + x

    def grads(compact):
        lin.zero_grad()
        stats: dict = {}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = deq_ext.deq_fixed_point(f, torch.zeros(8, 8), x, rho, stats=stats,
                                        forward=dict(tol=1e-3, max_iter=60),
                                        backward=dict(tol=1e-3, max_iter=60, compact=compact))
        z.pow(2).sum().backward()
        return lin.weight.grad.clone(), stats["backward"]

    on, s_on = grads(True)
    off, _ = grads(False)
    assert s_on.rerecord_rows > 0
    assert _rel(on, off) < 2e-2


def test_adjoint_map_re_records_f_in_the_state_dtype():
    """An f the layer did not wrap (AdjointMap used directly): the re-recording under the saved
    autocast casts its output back to z*'s dtype."""
    from deq_ext.adjoint import AdjointMap, autocast_state
    cell, x = Cell(8), torch.randn(4, 8)
    z = torch.zeros(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = autocast_state(z.device)
        fz = cell(z, x).float()
    adjoint = AdjointMap(cell, (x,), fz, z, torch.ones(4, 8), 0.5, state)
    adjoint.on_compact(torch.tensor([0, 1]))
    assert adjoint.rerecord_rows == 2
    assert adjoint.fz.dtype == torch.float32 and adjoint.fz.shape == (2, 8)
    assert adjoint(torch.ones(2, 8), torch.tensor([0, 1])).dtype == torch.float32


# -- the adapters under autocast --------------------------------------------------------------------
def _official_shaped():
    lin = Cell(6).lin
    x = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(2))

    def f(z):  # (bsz, hidden, seq_len), as locuslab/deq lays it out
        return torch.tanh(lin(z.transpose(1, 2)).transpose(1, 2) + x)
    return f, torch.zeros(3, 6, 5)


@pytest.mark.parametrize("semantics", ["official", "deq_ext"])
@pytest.mark.parametrize("solver", ["broyden", "anderson"])
def test_locuslab_adapters_under_autocast(solver, semantics):
    f, x0 = _official_shaped()
    run = (lambda g: compat.broyden(g, x0, 30, eps=1e-3, semantics=semantics)) if solver == "broyden" \
        else (lambda g: compat.anderson(g, x0, threshold=30, eps=1e-3, semantics=semantics))
    with torch.no_grad():
        want = run(f)["result"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = run(f)["result"]

            def f_cast(z):  # what the adapter runs: f under autocast, output cast to x0's dtype
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return f(z).float()
        # The adapter's own arithmetic ran with autocast off: the same as solving f_cast outside.
        same = run(f_cast)["result"]
    assert got.dtype == torch.float32
    assert _rel(got, want) < 2e-2
    assert torch.equal(got, same)


@pytest.mark.parametrize("adapter", [compat.torchdeq_broyden, compat.torchdeq_anderson,
                                     compat.torchdeq_fixed_point])
def test_torchdeq_adapters_under_autocast(adapter):
    cell, x = Cell(8), torch.randn(4, 8)
    with torch.no_grad():
        want, _, _ = adapter(lambda z: cell(z, x), torch.zeros(4, 8), max_iter=40, tol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, _, _ = adapter(lambda z: cell(z, x), torch.zeros(4, 8), max_iter=40, tol=1e-2)
    assert got.dtype == torch.float32 and _rel(got, want) < 2e-2


# -- the backward stop and loss scaling ---------------------------------------------------------------
def test_backward_stop_is_invariant_to_the_loss_scale():
    """Default backward (stop_mode 'grad'): a power-of-two loss scale changes no step count, and
    the gradients divided by it are the same bits."""
    cell, x = Cell(16), torch.randn(6, 16, generator=torch.Generator().manual_seed(5))
    _, ref, deq = _run(cell, x, autocast=False)
    steps = deq.backward_stats.nstep.tolist()
    for scale in (2.0 ** 16, 2.0 ** -10):
        _, got, deq = _run(cell, x, autocast=False, scale=scale)
        assert deq.backward_stats.nstep.tolist() == steps
        for g, want in zip(got, ref):
            assert torch.equal(g, want)


def test_absolute_backward_stop_keeps_its_meaning():
    """stop_mode='abs' stops on the absolute residual of the adjoint system, as documented:
    a loss scale makes it stricter (more steps), unlike the default."""
    cell, x = Cell(16), torch.randn(6, 16, generator=torch.Generator().manual_seed(5))
    bwd = dict(stop_mode="abs", tol=1e-6, max_iter=60)
    _, _, plain = _run(cell, x, autocast=False, backward=bwd)
    _, _, scaled = _run(cell, x, autocast=False, scale=2.0 ** 16, backward=bwd)
    for stats in (plain, scaled):
        s = stats.backward_stats
        assert bool((s.abs_residual[s.status == Status.CONVERGED] < 1e-6).all())
    assert scaled.backward_stats.nstep.sum() > plain.backward_stats.nstep.sum()


def test_grad_stop_is_relative_to_each_samples_upstream_gradient():
    """With stop_mode='grad' and tol t, the adjoint solution y of each converged sample has
    ||y - J_f(z*)^T y - dL/dz*|| < t ||dL/dz*||, whatever the size of dL/dz*."""
    cell = Cell(8).double()
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    captured = {}

    def f(z, x):
        out = cell(z, x)
        if out.requires_grad:  # the recorded application at z*: its gradient is y
            captured["z"] = z

            def keep(y):
                captured["y"] = y.detach()
            out.register_hook(keep)
        return out

    # Uncompacted: f is recorded once, at z* on the whole batch.
    z = DEQ(f, forward=dict(tol=1e-12, max_iter=100), backward=dict(tol=1e-4), compact=False)(x)
    weights = torch.tensor([1e-8, 1.0, 1e4, 1e8], dtype=torch.float64)[:, None]
    upstream = weights * torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    z.backward(upstream)
    z_star, y = captured["z"].detach(), captured["y"]
    _, jty = torch.autograd.functional.vjp(lambda v: cell(v, x), z_star, y)
    rel = (y - jty - upstream).norm(dim=1) / upstream.norm(dim=1)
    assert bool((rel < 1e-4).all()), rel
    assert bool((rel > 1e-12).any()), "the solve should stop at the tolerance, not far below"


def test_stop_mode_grad_is_a_backward_setting():
    cell, x = Cell(4), torch.randn(2, 4)
    with pytest.raises(ValueError, match="backward setting"):
        DEQ(cell, forward=dict(stop_mode="grad"))
    with pytest.raises(ValueError, match="backward stop_mode"):
        deq_ext.deq_fixed_point(cell, torch.zeros(2, 4), x, backward=dict(stop_mode="l2"))


def _scaler_steps(device: str, dtype: torch.dtype) -> None:
    """GradScaler end to end on ``device`` under autocast ``dtype``: the unscaled gradients are
    the unscaled run's, a few steps train, and a step that overflows is skipped."""
    cell = Cell(16).to(device)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(8)).to(device)
    fwd, bwd = dict(tol=1e-2, stop_mode="rel"), dict(tol=1e-3, max_iter=40)
    _, ref, _ = _run(cell, x, autocast=True, dtype=dtype, forward=fwd, backward=bwd)
    # 2^10: large enough to matter, small enough that the first float16 step does not overflow.
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 10)
    deq = DEQ(cell, forward=fwd, backward=bwd)
    opt = torch.optim.SGD(cell.parameters(), lr=0.5)

    def step(loss_of) -> float:
        opt.zero_grad()
        with torch.autocast(device, dtype=dtype):
            loss = loss_of(deq(x))
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        return loss.item()

    # 1. The first scaled step's unscaled gradients against the unscaled run's.
    opt.zero_grad()
    with torch.autocast(device, dtype=dtype):
        loss = deq(x).pow(2).mean()
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    for p, want in zip(cell.parameters(), ref):
        assert _rel(p.grad, want) < bwd["tol"]
    scaler.step(opt)
    scaler.update()
    # 2. It trains.
    losses = [step(lambda z: z.pow(2).mean()) for _ in range(8)]
    assert losses[-1] < losses[0]
    # 3. An overflowing step (one sample's dL/dz* is inf) is flagged and skipped.
    before = [p.detach().clone() for p in cell.parameters()]
    scale = scaler.get_scale()

    def overflow(z):
        w = torch.ones_like(z)
        w[1, 0] = float("inf")
        return (z * w).mean()

    with pytest.warns(RuntimeWarning, match=r"dL/dz\* is not finite for samples \[1\]"):
        step(overflow)
    assert deq.backward_stats.nonfinite_grad.tolist() == [i == 1 for i in range(8)]
    assert int(deq.backward_stats.status[1]) == Status.DIVERGED
    assert scaler.get_scale() == scale / 2
    assert all(torch.equal(p, b) for p, b in zip(cell.parameters(), before))
    if dtype != torch.float16:
        return
    # 4. A scale that float16 cannot hold: the adjoint solve (on dL/dz* / ||dL/dz*||) converges,
    # the pass through f's float16 graph overflows, and the scaler skips the step.
    scaler.update(new_scale=2.0 ** 24)
    step(lambda z: z.pow(2).sum())
    assert bool((deq.backward_stats.status == Status.CONVERGED).all())
    assert scaler.get_scale() == 2.0 ** 23
    assert all(torch.equal(p, b) for p, b in zip(cell.parameters(), before))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_grad_scaler_on_cpu_under_autocast(dtype):
    _scaler_steps("cpu", dtype)


# -- CUDA (run by tools/gpu_check.sh when a GPU is lent) --------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_autocast_plain_cell(dtype):
    cell, x = Cell(16).cuda(), torch.randn(6, 16, device="cuda")
    z32, g32, _ = _run(cell, x, autocast=False)
    z, grads, _ = _run(cell, x, autocast=True, dtype=dtype, backward=dict(tol=1e-3))
    assert z.dtype == torch.float32
    assert _rel(z, z32) < 2e-2
    for g, want in zip(grads, g32):
        assert g.dtype == torch.float32 and _rel(g, want) < 5e-2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_fp16_grad_scaler_end_to_end():
    _scaler_steps("cuda", torch.float16)
