"""Broyden's history stored in bfloat16/float16 (``history_dtype``) under a float32/float64 state.

The ops against the twin on awkward sizes, the solver and the layer end to end, and the errors.
"""

from __future__ import annotations

import pytest
import torch

import deq_ext
from deq_ext import reference
from deq_ext.status import VALID, Status

from .helpers import TOL, clone_state, history_state, with_reduced_scalars
from .test_broyden_ops import _seed

NARROW = (torch.bfloat16, torch.float16)
STATES = (torch.float64, torch.float32)
SIZES = [(3, 129, 5), (2, 4096 + 32, 3), (1, 7, 1)]
REDUCE_ARGS = ("U", "V", "dz", "dg", "g", "status", "npairs", "proj", "scal")
EXPAND_ARGS = ("U", "V", "dz", "dg", "g", "z", "proj", "scal", "status", "npairs")


def _narrow_state(st: dict, hist: torch.dtype) -> dict:
    st = clone_state(st)
    st["U"], st["V"] = st["U"].to(hist), st["V"].to(hist)
    return st


def _assert_match(got: dict, want: dict, before: dict, state: torch.dtype,
                  hist: torch.dtype) -> None:
    """State tensors to the state dtype's tolerance, the history to one rounding of its dtype;
    finished samples untouched bit for bit."""
    active = before["status"] == Status.ACTIVE
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype, f"{name}: dtype {g.dtype} != {w.dtype}"
        if g.dtype == torch.int64:
            assert torch.equal(g, w), name
            continue
        if (~active).any():
            assert torch.equal(g[~active], before[name][~active]), f"{name}: a finished sample moved"
        tol = TOL[state] if g.dtype == state else dict(rtol=torch.finfo(hist).eps, atol=1e-6)
        scale = max(1.0, float(w.abs().max()))
        torch.testing.assert_close(g, w, rtol=tol["rtol"], atol=tol["atol"] * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("hist", NARROW, ids=str)
@pytest.mark.parametrize("state", STATES, ids=str)
@pytest.mark.parametrize("B,D,m", SIZES)
def test_reduce_reads_a_narrow_history(ext, device, state, hist, B, D, m):
    st = _narrow_state(history_state(B, m, D, state, device, _seed("h-reduce", B, D, m, state)), hist)
    before, want = clone_state(st), clone_state(st)
    ext.broyden_reduce(*(st[a] for a in REDUCE_ARGS))
    reference.broyden_reduce(*(want[a] for a in REDUCE_ARGS))
    _assert_match(st, want, before, state, hist)
    # The products are of the stored (rounded) pairs: the full-precision history gives others.
    full = clone_state(before)
    full["U"], full["V"] = before["U"].to(state), before["V"].to(state)
    reference.broyden_reduce(*(full[a] for a in REDUCE_ARGS))
    torch.testing.assert_close(st["proj"], full["proj"], rtol=TOL[state]["rtol"],
                               atol=TOL[state]["atol"])


@pytest.mark.parametrize("hist", NARROW, ids=str)
@pytest.mark.parametrize("state", STATES, ids=str)
@pytest.mark.parametrize("B,D,m", SIZES)
def test_expand_writes_a_narrow_history(ext, device, state, hist, B, D, m):
    st = history_state(B, m, D, state, device, _seed("h-expand", B, D, m, state))
    st = with_reduced_scalars(_narrow_state(st, hist), gen_seed=B * D + m)
    before, want = clone_state(st), clone_state(st)
    ext.broyden_expand_(*(st[a] for a in EXPAND_ARGS))
    reference.broyden_expand_(*(want[a] for a in EXPAND_ARGS))
    _assert_match(st, want, before, state, hist)
    stored = (before["status"] == Status.ACTIVE) & (before["scal"][:, VALID] != 0)
    assert torch.equal(st["npairs"], before["npairs"] + stored.long())


def test_a_history_of_another_wide_dtype_is_rejected(ext):
    st = history_state(2, 3, 9, torch.float64, "cpu", seed=5)
    st["U"], st["V"] = st["U"].float(), st["V"].float()
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        ext.broyden_reduce(*(st[a] for a in REDUCE_ARGS))


def _contraction(B: int, D: int, dtype: torch.dtype, seed: int):
    """f(z) = tanh(z W_b) * rho_b + x_b: a contraction whose rate differs per sample."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.linalg.qr(torch.randn(B, D, D, generator=gen, dtype=torch.float64))[0]
    rho = torch.linspace(0.3, 0.9, B, dtype=torch.float64)
    x = torch.randn(B, D, generator=gen, dtype=torch.float64)
    W, rho, x = W.to(dtype), rho.to(dtype), x.to(dtype)
    return lambda z: torch.tanh(torch.einsum("bd,bde->be", z, W)) * rho[:, None] + x


@pytest.mark.parametrize("hist", NARROW, ids=str)
def test_solver_converges_with_a_narrow_history(device, hist):
    B, D = 6, 48
    f = _contraction(B, D, torch.float32, seed=11)
    z0 = torch.zeros(B, D, device=device)
    kw = dict(max_iter=60, tol=1e-5, stop_mode="rel")
    fdev = (lambda z: f(z.cpu()).to(device)) if device.type != "cpu" else f
    wide = deq_ext.broyden(fdev, z0, **kw)
    narrow = deq_ext.broyden(fdev, z0, history_dtype=hist, return_state=True, **kw)
    assert narrow.state["U"].dtype == hist and narrow.state["V"].dtype == hist
    assert narrow.z.dtype == torch.float32
    assert (narrow.status == Status.CONVERGED).all(), narrow.status
    assert (narrow.rel_residual < 1e-5).all()
    # An inexact Broyden: a few more steps at most, never a different answer.
    assert int(narrow.nstep.max()) <= int(wide.nstep.max()) + 6
    torch.testing.assert_close(narrow.z, wide.z, rtol=1e-4, atol=1e-4)


def test_workspace_halves_the_history_bytes():
    z0 = torch.empty(4, 1000, device="meta")
    wide = deq_ext.solvers.broyden_workspace(z0, max_iter=20)
    narrow = deq_ext.solvers.broyden_workspace(z0, max_iter=20, history_dtype=torch.bfloat16)
    assert wide["history"] == 2 * 4 * 20 * 1000 * 4
    assert narrow["history"] == wide["history"] // 2


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


@pytest.mark.parametrize("bad,err", [(torch.float32, ValueError), (torch.int8, ValueError),
                                     ("bfloat16", TypeError)])
def test_history_dtype_is_validated(bad, err):
    with pytest.raises(err, match="history_dtype"):
        deq_ext.broyden(lambda z: 0.5 * z, torch.ones(2, 3), history_dtype=bad)
