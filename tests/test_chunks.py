"""A DEQ solved and differentiated in chunks of samples (``chunk=N``, :mod:`deq_ext.chunks`):
the same fixed points, gradients and statistics as the whole batch, a smaller peak, and clear
errors for what it cannot do."""

from __future__ import annotations

import warnings

import pytest
import torch

import deq_ext
import deq_ext.layer as layer_module
from benchmarks.peak_memory import PeakTracker
from deq_ext.chunks import AUTO_CHUNKS, AUTO_MIN_VALUES, auto_chunk, chunk_bounds, graph_leaves

pytestmark = pytest.mark.usefixtures("compiled")

TIGHT = dict(forward=dict(tol=1e-11, max_iter=120), backward=dict(tol=1e-11, max_iter=120))
LOOSE = dict(forward=dict(tol=1e-6, max_iter=80), backward=dict(tol=1e-6, max_iter=80))


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return dict(rtol=1e-8, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-3, atol=2e-4)


class Cell(torch.nn.Module):
    """``tanh(z W^T + x + c * s) * scale``: a batched input x, a nested input
    ``{"s": s, "c": c}`` whose unbatched c needs grad, and a weight ``scale`` computed outside f
    (captured, with its own graph)."""

    def __init__(self, D: int, dtype: torch.dtype, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.lin = torch.nn.Linear(D, D, dtype=dtype)
        with torch.no_grad():
            self.lin.weight.copy_(0.6 * torch.linalg.qr(torch.randn(D, D, generator=gen,
                                                                    dtype=dtype))[0])
        self.raw_scale = torch.nn.Parameter(torch.rand(D, generator=gen, dtype=dtype) + 0.5)
        self.scale = None  # set per pass to a tensor computed from raw_scale

    def forward(self, z, x, extra):
        return torch.tanh(self.lin(z) + x + extra["c"] * extra["s"]) * self.scale


def _problem(dtype: torch.dtype, B: int, D: int, seed: int):
    gen = torch.Generator().manual_seed(seed + 100)
    cell = Cell(D, dtype, seed)
    x = torch.randn(B, D, generator=gen, dtype=dtype, requires_grad=True)
    c = torch.randn(D, generator=gen, dtype=dtype, requires_grad=True)
    s = torch.randn(B, D, generator=gen, dtype=dtype)
    w = torch.randn(B, D, generator=gen, dtype=dtype)
    return cell, x, c, s, w


def _step(cell: Cell, x, c, s, w, chunk, settings=TIGHT, **kw):
    """One training step; returns z*, the gradients of every leaf, and the stats."""
    cell.zero_grad()
    x.grad = c.grad = None
    cell.scale = 0.9 * torch.sigmoid(cell.raw_scale)  # a non-leaf weight f captures
    stats: dict = {}
    z = deq_ext.deq_fixed_point(cell, torch.zeros_like(x), x, {"s": s, "c": c}, chunk=chunk,
                                stats=stats, **settings, **kw)
    (z * w).sum().backward()
    grads = [x.grad.clone(), c.grad.clone(), cell.lin.weight.grad.clone(),
             cell.lin.bias.grad.clone(), cell.raw_scale.grad.clone()]
    return z.detach(), grads, stats


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,D,chunk", [(7, 13, 3), (5, 9, 2), (6, 11, 1), (4, 10, 4)])
def test_chunks_give_the_whole_batch_results(dtype, B, D, chunk):
    seed = B * 31 + chunk
    cell, x, c, s, w = _problem(dtype, B, D, seed)
    z_full, g_full, st_full = _step(cell, x, c, s, w, None)
    z_chunk, g_chunk, st_chunk = _step(cell, x, c, s, w, chunk)
    tol = _tol(dtype)
    torch.testing.assert_close(z_chunk, z_full, **tol)
    for name, a, b in zip(("x", "c", "W", "b", "scale"), g_chunk, g_full):
        assert a.abs().max() > 0, name
        torch.testing.assert_close(a, b, **tol, msg=lambda m, n=name: f"{n}: {m}")
    # Per-sample statistics in the batch's order; the VJP rows add up over the chunks.
    for part in ("forward", "backward"):
        assert st_chunk[part].nstep.shape == (B,)
        if dtype == torch.float64:
            assert torch.equal(st_chunk[part].nstep, st_full[part].nstep), part
    assert st_chunk["backward"].vjp_rows >= int(st_chunk["backward"].nfev.sum())


def test_chunk_of_the_batch_size_or_more_is_the_whole_batch():
    cell, x, c, s, w = _problem(torch.float64, 5, 8, 3)
    z_full, g_full, _ = _step(cell, x, c, s, w, None)
    for chunk in (5, 50):
        z, g, _ = _step(cell, x, c, s, w, chunk)
        assert torch.equal(z, z_full)
        assert all(torch.equal(a, b) for a, b in zip(g, g_full))


def test_autograd_grad_and_no_grad_evaluation():
    """``torch.autograd.grad`` reaches the parameters (they are explicit inputs of the chunked
    backward), and without grad the chunked solve returns the whole batch's z*."""
    cell, x, c, s, w = _problem(torch.float64, 6, 8, 5)
    cell.scale = cell.raw_scale * 1.0
    params = [cell.lin.weight, x]
    z = deq_ext.deq_fixed_point(cell, torch.zeros_like(x), x, {"s": s, "c": c}, chunk=4, **TIGHT)
    got = torch.autograd.grad((z * w).sum(), params)
    z = deq_ext.deq_fixed_point(cell, torch.zeros_like(x), x, {"s": s, "c": c}, **TIGHT)
    want = torch.autograd.grad((z * w).sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)
    with torch.no_grad():
        a = deq_ext.deq_fixed_point(cell, torch.zeros_like(x), x, {"s": s, "c": c}, chunk=4, **TIGHT)
        b = deq_ext.deq_fixed_point(cell, torch.zeros_like(x), x, {"s": s, "c": c}, **TIGHT)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_frozen_f_without_grad_inputs_needs_no_backward():
    cell, x, c, s, _ = _problem(torch.float64, 5, 8, 6)
    for p in cell.parameters():
        p.requires_grad_(False)
    cell.scale = cell.raw_scale.detach()
    z = deq_ext.deq_fixed_point(cell, torch.zeros_like(x), x.detach(), {"s": s, "c": c.detach()},
                                chunk=2, **LOOSE)
    assert not z.requires_grad


def test_the_layer_and_structured_states_take_chunks():
    gen = torch.Generator().manual_seed(8)
    lin = torch.nn.Linear(6, 6, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.mul_(0.4)

    def f(z, x):
        a, b = z
        return (torch.tanh(lin(b) + x), 0.5 * torch.tanh(a) + x)

    x = torch.randn(5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    results = []
    for chunk in (None, 2):
        lin.zero_grad()
        x.grad = None
        a, b = deq_ext.deq_fixed_point(f, (torch.zeros_like(x), torch.zeros_like(x)), x,
                                       chunk=chunk, **TIGHT)
        (a.sum() + (b * b).sum()).backward()
        results.append((a.detach(), b.detach(), x.grad.clone(), lin.weight.grad.clone()))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)
    cell, x, c, s, _ = _problem(torch.float64, 7, 5, 12)
    cell.scale = cell.raw_scale * 1.0
    deq = deq_ext.DEQ(cell, chunk=3, **LOOSE)
    assert "chunk=3" in repr(deq)
    deq(x, {"s": s, "c": c}).sum().backward()
    assert cell.lin.weight.grad is not None and deq.backward_stats.nstep.shape == (7,)


def test_chunked_peak_is_smaller():
    """The peak of a training step whose samples are wide (many tokens, a small weight shared
    by them): chunks of a quarter of the batch hold about a quarter of the solvers' workspace
    and of f's graph. (Only the parameters' gradients are not per sample: chunks hold two
    copies of them, one being summed into.)"""
    B, T, d = 16, 512, 32
    gen = torch.Generator().manual_seed(9)
    lin = torch.nn.Linear(d, d)
    with torch.no_grad():
        lin.weight.copy_(0.5 * torch.linalg.qr(torch.randn(d, d, generator=gen))[0])

    def f(z, x):  # a few wide intermediate tensors, as a real layer has
        h = torch.tanh(lin(z) + x)
        return 0.5 * h + 0.5 * torch.sigmoid(h) * torch.tanh(x)

    x = torch.randn(B, T, d, generator=gen, requires_grad=True)
    settings = dict(forward=dict(max_iter=30, tol=1e-12), backward=dict(max_iter=30, tol=1e-12))
    peaks = {}
    for chunk in (None, 4):
        with PeakTracker() as tracker:
            deq_ext.deq_fixed_point(f, torch.zeros_like(x), x, chunk=chunk, **settings).sum() \
                .backward()
        peaks[chunk] = tracker.peak
    assert peaks[4] < 0.4 * peaks[None], peaks


def test_a_nonfinite_sample_is_named_by_its_batch_index():
    """Warnings and flags of the chunked adjoint solves name samples by their place in the
    batch, not in their chunk; the other samples' gradients stay finite."""
    cell, x, c, s, _ = _problem(torch.float64, 7, 8, 10)
    cell.scale = cell.raw_scale * 1.0
    stats: dict = {}
    z = deq_ext.deq_fixed_point(cell, torch.zeros_like(x), x, {"s": s, "c": c}, chunk=3,
                                stats=stats, **LOOSE)
    weight = torch.ones_like(z)
    weight[5, 2] = float("inf")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (z * weight).sum().backward()
    messages = [str(m.message) for m in caught if "diverged" in str(m.message)]
    assert messages and "samples [5]" in messages[0], messages
    assert stats["backward"].nonfinite_grad.tolist() == [i == 5 for i in range(7)]
    assert torch.isfinite(x.grad[[0, 1, 2, 3, 4, 6]]).all()


def test_phantom_and_n_states_take_chunks():
    cell, x, c, s, w = _problem(torch.float64, 6, 8, 11)
    for kw in (dict(grad_mode="phantom"), dict(n_states=2)):
        outs = []
        for chunk in (None, 4):
            cell.zero_grad()
            cell.scale = cell.raw_scale * 1.0
            out = deq_ext.deq_fixed_point(cell, torch.zeros_like(x), x, {"s": s, "c": c},
                                          chunk=chunk, **TIGHT, **kw)
            last = out[-1] if isinstance(out, list) else out
            (last * w).sum().backward()
            outs.append((last.detach(), cell.lin.weight.grad.clone()))
        for got, want in zip(*outs):
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("chunk", [0, -2, 2.0, True, "4"])
def test_bad_chunk_is_refused(chunk):
    with pytest.raises(ValueError, match="chunk must be"):
        deq_ext.deq_fixed_point(lambda z, x: 0.5 * z + x, torch.zeros(3, 2), torch.ones(3, 2),
                                chunk=chunk)
    with pytest.raises(ValueError, match="chunk must be"):
        deq_ext.DEQ(torch.nn.Linear(2, 2), chunk=chunk)


@pytest.mark.parametrize("kw,match", [
    (dict(grad_mode="shine"), "Broyden pairs"),
    (dict(backward=dict(init="shine")), "Broyden pairs"),
    (dict(jac_reg_samples=1, stats={}), "graph at z"),
    (dict(spectral_radius_steps=2, stats={}), "graph at z"),
])
def test_what_chunks_cannot_do_is_refused(kw, match):
    """A number of samples is refused; "auto" keeps the whole batch instead."""
    x = torch.ones(4, 3, requires_grad=True)
    with pytest.raises(ValueError, match=match):
        deq_ext.deq_fixed_point(lambda z, x: 0.5 * z + x, torch.zeros(4, 3), x, chunk=2, **kw)
    deq_ext.deq_fixed_point(lambda z, x: 0.5 * z + x, torch.zeros(4, 3), x, chunk="auto", **kw)


def test_an_f_that_mixes_samples_is_refused():
    class Mixing(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = torch.nn.BatchNorm1d(3)

        def forward(self, z, x):
            return 0.5 * self.norm(z) + x

    with pytest.raises(ValueError, match="mixes samples.*chunk=None"):
        deq_ext.deq_fixed_point(Mixing(), torch.zeros(4, 3), torch.ones(4, 3), chunk=2,
                                compact=False)


def test_higher_order_gradients_are_refused():
    x = torch.randn(4, 3, requires_grad=True)
    lin = torch.nn.Linear(3, 3)
    z = deq_ext.deq_fixed_point(lambda z, x: 0.3 * torch.tanh(lin(z)) + x, torch.zeros(4, 3), x,
                                chunk=2)
    with pytest.raises(RuntimeError, match="higher-order"):
        torch.autograd.grad(z.sum(), x, create_graph=True)


def test_chunk_bounds_and_graph_leaves():
    assert chunk_bounds(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert chunk_bounds(4, 4) == [(0, 4)]
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    known = torch.randn(3, requires_grad=True)
    out = (a * 2 + b.exp() + known).sum() + (a * 3).sum()
    assert [id(t) for t in graph_leaves(out, [known])] in ([id(a), id(b)], [id(b), id(a)])


class _CountBackward(torch.autograd.Function):
    """Identity that counts how many times its backward runs."""
    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        _CountBackward.calls += 1
        return g


def test_a_captured_weight_is_differentiated_once_for_all_chunks():
    """A weight computed before the layer and used by f: the chunks' gradients are summed at
    it and sent through its graph once, not once per chunk, with the same result."""
    cell, x, c, s, w = _problem(torch.float64, 7, 8, 13)
    grads = []
    for chunk in (None, 2):
        cell.zero_grad()
        cell.scale = _CountBackward.apply(0.9 * torch.sigmoid(cell.raw_scale))
        _CountBackward.calls = 0
        z = deq_ext.deq_fixed_point(cell, torch.zeros_like(x), x, {"s": s, "c": c}, chunk=chunk,
                                    **TIGHT)
        (z * w).sum().backward()
        assert _CountBackward.calls == 1, chunk
        grads.append(cell.raw_scale.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-8, atol=1e-9)


def test_a_leaf_used_directly_and_through_a_captured_weight():
    """f uses a parameter itself and a weight computed from it before the call: the graph is
    then differentiated whole per chunk, and the gradient still matches the whole batch's."""
    gen = torch.Generator().manual_seed(14)
    lin = torch.nn.Linear(6, 6, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.mul_(0.3)
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    grads = []
    for chunk in (None, 2):
        lin.zero_grad()
        doubled = lin.weight * 0.5  # captured: made before f is called

        def f(z, x):
            return torch.tanh(z @ lin.weight.T + z @ doubled.T + x)

        deq_ext.deq_fixed_point(f, torch.zeros_like(x), x, chunk=chunk, **TIGHT).sum().backward()
        grads.append(lin.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-8, atol=1e-9)


def _forward_solves(monkeypatch) -> list[int]:
    """The batch size of every solve the layer runs (forward and adjoint)."""
    sizes: list[int] = []
    solve = layer_module.solve

    def spy(f, z0, **kw):
        sizes.append(z0.shape[0])
        return solve(f, z0, **kw)

    monkeypatch.setattr(layer_module, "solve", spy)
    return sizes


def test_auto_chunks_a_large_cpu_batch(monkeypatch):
    """The default ``chunk="auto"``: a CPU batch of at least AUTO_MIN_VALUES state values is
    solved in AUTO_CHUNKS chunks (forward and backward), a smaller one whole."""
    B = 10
    D = AUTO_MIN_VALUES // B + 1
    sizes = _forward_solves(monkeypatch)
    x = torch.randn(B, D, requires_grad=True)
    z = deq_ext.deq_fixed_point(lambda z, x: 0.5 * torch.tanh(z) + x, torch.zeros_like(x), x,
                                forward=dict(max_iter=3), backward=dict(max_iter=3))
    z.sum().backward()
    per_chunk = -(-B // AUTO_CHUNKS)  # 3, 3, 3, 1
    assert sizes == [per_chunk] * 3 + [B - 3 * per_chunk] + [per_chunk] * 3 + [B - 3 * per_chunk]
    sizes.clear()
    small = torch.randn(B, D // 2, requires_grad=True)
    deq_ext.deq_fixed_point(lambda z, x: 0.5 * torch.tanh(z) + x, torch.zeros_like(small), small,
                            forward=dict(max_iter=3), backward=dict(max_iter=3)).sum().backward()
    assert sizes == [B, B], sizes


def test_auto_keeps_the_whole_batch_off_the_cpu_and_for_mixing_cells():
    assert auto_chunk(16, AUTO_MIN_VALUES, torch.device("cuda")) is None
    assert auto_chunk(16, AUTO_MIN_VALUES, torch.device("meta")) is None
    assert auto_chunk(16, AUTO_MIN_VALUES // 16, torch.device("cpu")) == 4
    assert auto_chunk(16, AUTO_MIN_VALUES // 16 - 1, torch.device("cpu")) is None
    assert layer_module._settle_chunk("auto", lambda z: z, "implicit", deq_ext.SolverSettings(),
                                      0, 0, False) is None  # compact=False: f may mix samples
    norm = torch.nn.BatchNorm1d(3)
    assert layer_module._settle_chunk("auto", norm, "implicit", deq_ext.SolverSettings(),
                                      0, 0, "auto") is None
