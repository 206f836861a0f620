"""``semantics="official"`` against the locuslab/deq algorithm written out in tests/compat_reference.py:
same iterates (every point f is evaluated at), result, lowest, nstep, prot_break and traces, in
float64, on problems that converge, converge at very different rates across the batch, stall,
break, diverge and produce NaN."""

from __future__ import annotations

import math

import pytest
import torch

from deq_ext import compat

from .compat_reference import reference_anderson, reference_broyden

B, C, L = 4, 6, 5
TOL = 1e-12


def _lin(A, z):
    return torch.einsum("ij,bjl->bil", A, z)


def _problem(name: str, gen: torch.Generator):
    """A fresh f for the named case (stateless unless scripted), and its x0."""
    W = torch.randn(C, C, generator=gen, dtype=torch.float64)
    W = W / torch.linalg.matrix_norm(W, ord=2)
    x = torch.randn(B, C, L, generator=gen, dtype=torch.float64)
    z0 = 0.1 * torch.randn(B, C, L, generator=gen, dtype=torch.float64)
    if name == "contractive":
        return (lambda z: torch.tanh(_lin(0.7 * W, z) + x)), z0
    if name == "rates":   # per-sample contraction factors from 0.1 to 0.999
        rate = torch.tensor([0.1, 0.5, 0.9, 0.999], dtype=torch.float64).view(B, 1, 1)
        return (lambda z: rate * torch.tanh(_lin(W, z)) + x), z0
    if name == "diverges":   # an expansive cubic: the residual explodes
        return (lambda z: _lin(3.0 * W, z) ** 3 + x), z0
    if name == "nan":   # one entry of f is NaN everywhere
        def f_nan(z):
            out = torch.tanh(_lin(0.5 * W, z)) + x
            out[1, 2, 3] = math.nan
            return out
        return f_nan, z0
    if name == "stalls":
        # A contraction plus deterministic high-frequency noise of size 1e-4 per entry: no
        # solver gets below the noise floor (about 2.4e-3 over 1200 entries, tol = 1e-3).
        xl = torch.randn(B, C, 10 * L, generator=gen, dtype=torch.float64)
        return (lambda z: torch.tanh(_lin(0.5 * W, z)) + xl + 1e-4 * torch.sin(1e5 * z)), 0 * xl
    if name == "stalls_at_once":   # the same, started at the noiseless fixed point: flat from step 1
        xl = torch.randn(B, C, 10 * L, generator=gen, dtype=torch.float64)
        z_star = torch.zeros_like(xl)
        for _ in range(100):
            z_star = torch.tanh(_lin(0.5 * W, z_star)) + xl
        return (lambda z: torch.tanh(_lin(0.5 * W, z)) + xl + 1e-4 * torch.sin(1e5 * z)), z_star
    if name == "breaks":
        # f(z) = z + r_k e with a scripted r_k at the k-th call, jumping 1e9 x up at call 6.
        e = torch.randn(B, C, L, generator=gen, dtype=torch.float64)
        e = e / e.norm()
        calls = [0]

        def f_scripted(z):
            calls[0] += 1
            return z + (1e8 if calls[0] == 6 else 0.5 / calls[0]) * e
        return f_scripted, z0
    raise ValueError(name)


def _recording(f, log):
    def g(z):
        log.append(z.clone())
        return f(z)
    return g


def _assert_same(ours, ref, ours_calls, ref_calls):
    assert len(ours_calls) == len(ref_calls)   # the same number of evaluations of f ...
    for a, b in zip(ours_calls, ref_calls):   # ... at the same points
        torch.testing.assert_close(a, b, rtol=TOL, atol=TOL, equal_nan=True)
    torch.testing.assert_close(ours["result"], ref["result"], rtol=TOL, atol=TOL, equal_nan=True)
    assert ours["nstep"] == ref["nstep"] and ours["prot_break"] == ref["prot_break"]
    assert ours["eps"] == ref["eps"] and ours["threshold"] == ref["threshold"]
    for key in ("lowest", "abs_trace", "rel_trace"):
        want = torch.tensor(ref[key], dtype=torch.float64)
        got = torch.tensor(ours[key], dtype=torch.float64)
        assert got.shape == want.shape, key
        torch.testing.assert_close(got, want, rtol=TOL, atol=0.0, equal_nan=True, msg=key)


def _run_pair(solver, reference, case, seed, **kwargs):
    f, z0 = _problem(case, torch.Generator().manual_seed(seed))
    ours_calls: list = []
    ours = solver(_recording(f, ours_calls), z0, semantics="official", **kwargs)
    f, z0 = _problem(case, torch.Generator().manual_seed(seed))   # fresh script state
    ref_calls: list = []
    ref = reference(_recording(f, ref_calls), z0, **kwargs)
    _assert_same(ours, ref, ours_calls, ref_calls)
    return ours, len(ours_calls)


@pytest.mark.parametrize("case", ["contractive", "rates", "diverges", "nan", "stalls", "stalls_at_once",
                                  "breaks"])
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
@pytest.mark.parametrize("ls", [False, True])
def test_broyden_official_matches_the_reference(case, stop_mode, ls):
    eps = 1e-3 if case.startswith("stalls") else 1e-9
    out, calls = _run_pair(compat.broyden, reference_broyden, case, 11, threshold=50, eps=eps,
                           stop_mode=stop_mode, ls=ls)
    assert len(out["abs_trace"]) == len(out["rel_trace"]) == 51   # padded to threshold + 1
    if case == "contractive" and not ls:
        assert out["lowest"] < eps and calls < 51
    if case == "stalls" and stop_mode == "abs" and not ls:
        # Stopped early above tol without a break: the stall rule (more than 30 steps in).
        assert 32 < calls < 51 and out["lowest"] > eps and out["prot_break"] is False
    if case == "stalls_at_once" and stop_mode == "abs" and not ls:
        assert 32 <= calls < 51 and out["lowest"] > eps   # stalled, but not before step 31
    if case in ("breaks", "diverges") and stop_mode == "abs" and not ls:
        assert out["prot_break"] is True


@pytest.mark.parametrize("case", ["contractive", "rates", "stalls"])
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
@pytest.mark.parametrize("m, lam, beta", [(5, 1e-4, 1.0), (3, 1e-2, 0.8)])
def test_anderson_official_matches_the_reference(case, stop_mode, m, lam, beta):
    eps = 1e-3 if case == "stalls" else 1e-7
    out, calls = _run_pair(compat.anderson, reference_anderson, case, 12, m=m, lam=lam, threshold=40,
                           eps=eps, stop_mode=stop_mode, beta=beta)
    assert len(out["abs_trace"]) == len(out["rel_trace"]) == 38   # threshold - 2
    assert calls <= 40 and out["prot_break"] is False   # threshold counts evaluations of f
    if case == "contractive" and m == 5:
        assert out["lowest"] < eps and calls < 40
    if case == "stalls" and stop_mode == "abs":
        assert calls == 40 and out["lowest"] > eps   # no stall rule: every evaluation is spent


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_anderson_official_fails_like_the_reference_on_nan(stop_mode):
    """Every residual NaN: no lowest iterate, in the reference (and the original) as here."""
    for solver in (lambda f, z0: compat.anderson(f, z0, threshold=10, stop_mode=stop_mode,
                                                 semantics="official"),
                   lambda f, z0: reference_anderson(f, z0, threshold=10, stop_mode=stop_mode)):
        f, z0 = _problem("nan", torch.Generator().manual_seed(15))
        with pytest.raises(RuntimeError, match="no step"):
            solver(f, z0)


def test_anderson_official_fails_where_the_original_has_no_result():
    f, z0 = _problem("diverges", torch.Generator().manual_seed(13))
    with pytest.raises(RuntimeError, match="no step had a abs residual below"):
        compat.anderson(lambda z: 1e9 * f(z), z0, threshold=10, stop_mode="abs", semantics="official")
    with pytest.raises(ValueError, match="threshold >= 3"):
        compat.anderson(f, z0, threshold=2, semantics="official")


def test_official_mode_needs_the_original_layout():
    with pytest.raises(ValueError, match=r"\(bsz, hidden, seq_len\).*\(4, 30\)"):
        compat.broyden(lambda z: z, torch.zeros(4, 30), threshold=5, semantics="official")
    with pytest.raises(ValueError, match="stop_mode"):
        compat.anderson(lambda z: z, torch.zeros(2, 3, 4), stop_mode="max", semantics="official")


def test_semantics_differ_where_the_issue_says():
    """Per-sample stopping vs. the batch's: on the 'rates' batch the official solve keeps the
    fast samples iterating and reports the lowest step; deq_ext stops each one on its own."""
    f, z0 = _problem("rates", torch.Generator().manual_seed(14))
    off = compat.broyden(f, z0, threshold=40, eps=1e-6, stop_mode="abs", semantics="official")
    own = compat.broyden(f, z0, threshold=40, eps=1e-6, stop_mode="abs", semantics="deq_ext")
    assert len(off["abs_trace"]) == 41 and len(own["abs_trace"]) == own["nstep"] + 1
    steps = own["nstep_per_sample"]
    assert int(steps.min()) < int(steps.max())   # the fast samples stopped earlier
    assert not torch.equal(off["result"], own["result"])
