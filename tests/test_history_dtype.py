"""Histories stored in bfloat16/float16 (``history_dtype``) under a float32/float64 state:
Broyden's U, V and Anderson's X, G.

The ops against the twin on awkward sizes, the solvers and the layer end to end, and the errors.
"""

from __future__ import annotations

import pytest
import torch

import deq_ext
from deq_ext import reference
from deq_ext.status import VALID, Status

from .helpers import (
    EXPAND_ARGS,
    MIX_ARGS,
    REDUCE_ARGS,
    STORE_ARGS,
    TOL,
    anderson_state,
    args_of,
    clone_state,
    history_state,
    unchunked,
    with_reduced_scalars,
)
from .test_anderson_ops import _max_condition
from .test_broyden_ops import _seed

NARROW = (torch.bfloat16, torch.float16)
STATES = (torch.float64, torch.float32)
SIZES = [(3, 129, 5), (2, 4096 + 32, 3), (1, 7, 1)]


def _narrow_state(st: dict, hist: torch.dtype, names: tuple = ("U", "V")) -> dict:
    st = clone_state(st)
    for name in names:
        st[name] = [t.to(hist) for t in st[name]]
    return st


def _assert_match(got: dict, want: dict, before: dict, state: torch.dtype,
                  hist: torch.dtype, amplification: float = 1.0) -> None:
    """State tensors to the state dtype's tolerance, the history to one rounding of its dtype;
    finished samples untouched bit for bit."""
    active = before["status"] == Status.ACTIVE
    for name, w in want.items():
        g, b = got[name], before[name]
        if name == "partials" or not isinstance(w, (torch.Tensor, list)):
            continue  # the CUDA kernels' scratch, and the ring length
        if isinstance(w, list):
            g, w, b = (torch.cat(x, dim=1) for x in (g, w, b))
        assert g.dtype == w.dtype, f"{name}: dtype {g.dtype} != {w.dtype}"
        if g.dtype in (torch.int64, torch.int32):
            assert torch.equal(g, w), name
            continue
        if (~active).any() and g.dim() >= 1 and g.shape[0] == active.shape[0]:
            assert torch.equal(g[~active], b[~active]), f"{name}: a finished sample moved"
        tol = TOL[state] if g.dtype == state else dict(rtol=torch.finfo(hist).eps, atol=1e-6)
        tol = {k: max(v, 1e-15 * amplification) for k, v in tol.items()}
        scale = max(1.0, float(w.abs().max()))
        torch.testing.assert_close(g, w, rtol=tol["rtol"], atol=tol["atol"] * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("hist", NARROW, ids=str)
@pytest.mark.parametrize("state", STATES, ids=str)
@pytest.mark.parametrize("B,D,m", SIZES)
def test_reduce_reads_a_narrow_history(ext, device, state, hist, B, D, m):
    st = _narrow_state(history_state(B, m, D, state, device, _seed("h-reduce", B, D, m, state)), hist)
    before, want = clone_state(st), clone_state(st)
    ext.broyden_reduce(*args_of(st, REDUCE_ARGS))
    reference.broyden_reduce(*args_of(want, REDUCE_ARGS))
    _assert_match(st, want, before, state, hist)
    # The products are of the stored (rounded) pairs: the full-precision history gives others.
    full = _narrow_state(before, state)
    reference.broyden_reduce(*args_of(full, REDUCE_ARGS))
    torch.testing.assert_close(st["proj"], full["proj"], rtol=TOL[state]["rtol"],
                               atol=TOL[state]["atol"])


@pytest.mark.parametrize("hist", NARROW, ids=str)
@pytest.mark.parametrize("state", STATES, ids=str)
@pytest.mark.parametrize("B,D,m", SIZES)
def test_expand_writes_a_narrow_history(ext, device, state, hist, B, D, m):
    st = history_state(B, m, D, state, device, _seed("h-expand", B, D, m, state))
    st = with_reduced_scalars(_narrow_state(st, hist), gen_seed=B * D + m)
    before, want = clone_state(st), clone_state(st)
    ext.broyden_expand_(*args_of(st, EXPAND_ARGS))
    reference.broyden_expand_(*args_of(want, EXPAND_ARGS))
    _assert_match(st, want, before, state, hist)
    stored = (before["status"] == Status.ACTIVE) & (before["scal"][:, VALID] != 0)
    assert torch.equal(st["npairs"], before["npairs"] + stored.long())


@pytest.mark.parametrize("hist", NARROW, ids=str)
@pytest.mark.parametrize("state", STATES, ids=str)
@pytest.mark.parametrize("B,D,m", SIZES)
def test_anderson_store_writes_a_narrow_history(ext, device, state, hist, B, D, m):
    st = anderson_state(B, m, D, state, device, _seed("h-store", B, D, m, state))
    st = _narrow_state(st, hist, ("X", "G"))
    before, want = clone_state(st), clone_state(st)
    ext.anderson_store_(*args_of(st, STORE_ARGS), 1e-4)
    reference.anderson_store_(*args_of(want, STORE_ARGS), 1e-4)
    _assert_match(st, want, before, state, hist, _max_condition(want, m, 1e-4))
    # The new Gram entries are products of the stored rows: the diagonal is |G_slot|^2.
    G = unchunked(st["G"], m)
    for b in torch.nonzero(before["status"] == Status.ACTIVE).flatten().tolist():
        slot = int(before["nhist"][b]) % m
        g_stored = G[b, slot].double()
        torch.testing.assert_close(st["gram"][b, slot, slot].double(), g_stored @ g_stored,
                                   rtol=TOL[state]["rtol"], atol=0.0)


@pytest.mark.parametrize("hist", NARROW, ids=str)
@pytest.mark.parametrize("state", STATES, ids=str)
@pytest.mark.parametrize("B,D,m", SIZES)
def test_anderson_mix_reads_a_narrow_history(ext, device, state, hist, B, D, m):
    st = anderson_state(B, m, D, state, device, _seed("h-mix", B, D, m, state))
    st = _narrow_state(st, hist, ("X", "G"))
    st["nhist"].clamp_(min=1)
    before, want = clone_state(st), clone_state(st)
    ext.anderson_mix_(*args_of(st, MIX_ARGS), 0.8)
    reference.anderson_mix_(*args_of(want, MIX_ARGS), 0.8)
    _assert_match(st, want, before, state, hist)


def test_a_history_of_another_wide_dtype_is_rejected(ext):
    st = _narrow_state(history_state(2, 3, 9, torch.float64, "cpu", seed=5), torch.float32)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        ext.broyden_reduce(*args_of(st, REDUCE_ARGS))


def _contraction(B: int, D: int, dtype: torch.dtype, seed: int):
    """f(z) = tanh(z W_b) * rho_b + x_b: a contraction whose rate differs per sample."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.linalg.qr(torch.randn(B, D, D, generator=gen, dtype=torch.float64))[0]
    rho = torch.linspace(0.3, 0.9, B, dtype=torch.float64)
    x = torch.randn(B, D, generator=gen, dtype=torch.float64)
    W, rho, x = W.to(dtype), rho.to(dtype), x.to(dtype)
    return lambda z: torch.tanh(torch.einsum("bd,bde->be", z, W)) * rho[:, None] + x


def _solves(device, hist, **kw):
    """The contraction solved with the state-dtype history and with ``hist``."""
    B, D = 6, 48
    f = _contraction(B, D, torch.float32, seed=11)
    z0 = torch.zeros(B, D, device=device)
    kw = dict(max_iter=60, stop_mode="rel", **kw)
    fdev = (lambda z: f(z.cpu()).to(device)) if device.type != "cpu" else f
    return deq_ext.solve(fdev, z0, **kw), deq_ext.solve(fdev, z0, history_dtype=hist,
                                                        return_state=True, **kw)


@pytest.mark.parametrize("hist", NARROW, ids=str)
def test_anderson_with_a_narrow_history_converges_only_to_its_precision(device, hist):
    """Anderson stores the iterates themselves, so a narrow X bounds the reachable residual
    near the dtype's precision: loose tolerances are met in the same steps, a tight one stalls
    (flagged, finite), it never diverges."""
    wide, loose = _solves(device, hist, method="anderson", tol=1e-2)
    assert loose.state["X"].dtype == hist and loose.state["G"].dtype == hist
    assert (loose.status == Status.CONVERGED).all(), loose.status
    assert int(loose.nstep.max()) <= int(wide.nstep.max()) + 1
    _, tight = _solves(device, hist, method="anderson", tol=1e-6)
    assert not (tight.status == Status.CONVERGED).any(), tight.status
    assert ((tight.status == Status.STALLED) | (tight.status == Status.MAX_ITER)).all()
    assert torch.isfinite(tight.z).all() and (tight.rel_residual < 1e-2).all()


@pytest.mark.parametrize("hist", NARROW, ids=str)
def test_solver_converges_with_a_narrow_history(device, hist):
    wide, narrow = _solves(device, hist, method="broyden", tol=1e-5)
    assert narrow.state["U"].dtype == hist and narrow.state["V"].dtype == hist
    assert narrow.z.dtype == torch.float32
    assert (narrow.status == Status.CONVERGED).all(), narrow.status
    assert (narrow.rel_residual < 1e-5).all()
    # An inexact Broyden: a few more steps at most, never a different answer.
    assert int(narrow.nstep.max()) <= int(wide.nstep.max()) + 6
    torch.testing.assert_close(narrow.z, wide.z, rtol=1e-4, atol=1e-4)


def test_workspace_halves_the_history_bytes():
    z0 = torch.empty(4, 1000, device="meta")
    wide = deq_ext.solvers.broyden_workspace(z0, max_iter=20, history_dtype=torch.float32)
    narrow = deq_ext.solvers.broyden_workspace(z0, max_iter=20, history_dtype=torch.bfloat16)
    assert wide["history"] == 2 * 4 * 20 * 1000 * 4
    assert narrow["history"] == wide["history"] // 2


@pytest.mark.parametrize("dtype,default", [(torch.float32, torch.bfloat16),
                                           (torch.float16, torch.bfloat16),
                                           (torch.float64, torch.float64)])
def test_broyden_history_defaults_to_bfloat16_under_a_float32_state(dtype, default):
    """Broyden's default history is bfloat16 under a float32 state (float16 and bfloat16
    iterates have one), wide under float64; Anderson's stays wide; the state dtype spelled out
    asks for a wide history."""
    f = lambda z: 0.5 * z + 1  # noqa: E731
    z0 = torch.zeros(3, 10, dtype=dtype)
    res = deq_ext.broyden(f, z0, max_iter=20, return_state=True)
    assert res.state["U"].dtype == res.state["V"].dtype == default
    state = torch.float64 if dtype == torch.float64 else torch.float32
    wide = deq_ext.broyden(f, z0, max_iter=20, history_dtype=state, return_state=True)
    assert wide.state["U"].dtype == state
    assert deq_ext.anderson(f, z0, max_iter=20, return_state=True).state["X"].dtype == state
    bytes_ = deq_ext.solvers.broyden_workspace(z0.to("meta"), max_iter=20)["history"]
    assert bytes_ == 2 * 3 * 20 * 10 * default.itemsize


def test_layer_trains_with_a_narrow_history_in_both_solves():
    torch.manual_seed(0)
    D = 16
    lin = torch.nn.Linear(D, D, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.mul_(0.3)
    x = torch.randn(5, D, dtype=torch.float64)

    def grads(hist):
        layer = deq_ext.DEQ(lambda z, x: torch.tanh(lin(z)) + x,
                            forward=dict(tol=1e-9, max_iter=60, history_dtype=hist),
                            backward=dict(tol=1e-9, max_iter=60, history_dtype=hist))
        lin.zero_grad()
        layer(x, z0=torch.zeros_like(x)).pow(2).sum().backward()
        return lin.weight.grad.clone()

    wide, narrow = grads(None), grads(torch.bfloat16)
    assert torch.isfinite(narrow).all()
    # The fixed point and the adjoint converge to the same tolerance either way.
    torch.testing.assert_close(narrow, wide, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad,err", [(torch.float64, ValueError), (torch.int8, ValueError),
                                     ("bfloat16", TypeError)])
@pytest.mark.parametrize("method", ["broyden", "anderson"])
def test_history_dtype_is_validated(bad, err, method):
    with pytest.raises(err, match="history_dtype"):
        deq_ext.solve(lambda z: 0.5 * z, torch.ones(2, 3), method=method, history_dtype=bad)
