"""Anderson and fixed-point ops against their pure-PyTorch twins (float64/float32, awkward sizes)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from deq_ext import reference
from deq_ext.status import Status

from .helpers import (
    MIX_ARGS,
    STORE_ARGS,
    anderson_state,
    args_of,
    assert_states_match,
    chunked,
    clone_state,
    random_status,
    unchunked,
)
from .test_broyden_ops import BATCHES, DIMS, DTYPES, _seed

MEMORIES = (1, 5, 30)
SIZES = list(itertools.product(BATCHES, DIMS, MEMORIES))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,D,m", SIZES)
def test_anderson_store_matches_reference(ext, device, dtype, B, D, m):
    """The store and the next weights: the Gram row of the new entry, then a ridge-regularised
    solve whose two correct implementations agree to about eps * cond(K + ridge)."""
    st = anderson_state(B, m, D, dtype, device, _seed("store", B, D, m, dtype))
    before, want = clone_state(st), clone_state(st)
    ext.anderson_store_(*args_of(st, STORE_ARGS), 1e-4)
    reference.anderson_store_(*args_of(want, STORE_ARGS), 1e-4)
    assert_states_match(st, want, before, dtype,
                        amplification=_max_condition(want, m, 1e-4))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,D,m", SIZES)
def test_anderson_mix_matches_reference(ext, device, dtype, B, D, m):
    st = anderson_state(B, m, D, dtype, device, _seed("mix", B, D, m, dtype))
    st["nhist"].clamp_(min=1)  # mixing follows a store: at least one entry
    before, want = clone_state(st), clone_state(st)
    ext.anderson_mix_(*args_of(st, MIX_ARGS), 0.8)
    reference.anderson_mix_(*args_of(want, MIX_ARGS), 0.8)
    assert_states_match(st, want, before, dtype)


def _max_condition(st: dict, m: int, lam: float) -> float:
    worst = 1.0
    for b in torch.nonzero(st["status"] == Status.ACTIVE).flatten().tolist():
        n = min(int(st["nhist"][b]), m)
        K = st["gram"][b, :n, :n].double().cpu()
        diag = K.diagonal()
        ridge = lam * float(diag[diag > 0].min()) if bool((diag > 0).any()) else lam
        worst = max(worst, float(torch.linalg.cond(K + ridge * torch.eye(n, dtype=torch.float64))))
    return worst


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,D", list(itertools.product(BATCHES, DIMS)))
def test_fixed_point_step_matches_reference(ext, device, dtype, B, D):
    gen = torch.Generator().manual_seed(_seed("fp", B, D, dtype))
    st = dict(z=torch.randn(B, D, generator=gen, dtype=torch.float64).to(dtype),
              g=torch.randn(B, D, generator=gen, dtype=torch.float64).to(dtype),
              status=random_status(B, gen))
    st = {k: v.to(device) for k, v in st.items()}
    before, want = clone_state(st), clone_state(st)
    ext.fixed_point_step_(st["z"], st["g"], st["status"], 0.7)
    reference.fixed_point_step_(want["z"], want["g"], want["status"], 0.7)
    assert_states_match(st, want, before, dtype)


def _store(ext, st, lam):
    ext.anderson_store_(*args_of(st, STORE_ARGS), lam)


def test_singular_gram_falls_back_and_is_flagged(ext, device):
    """Identical residuals make the Gram matrix singular: with no ridge the solve must fall back."""
    B, m, D = 2, 3, 8
    st = anderson_state(B, m, D, torch.float64, device, seed=1)
    st["status"].zero_()
    G = unchunked(st["G"], m)
    G[:] = G[:, :1]  # every stored residual the same, the new one too
    st["G"], st["g"] = chunked(G), G[:, 0].clone()
    st["gram"] = (G @ G.transpose(1, 2)).contiguous()
    st["nhist"].fill_(m)  # the new entry replaces slot 0
    st["fallback"].zero_()
    before = clone_state(st)
    _store(ext, st, 0.0)
    newest = 0
    expected_alpha = torch.zeros(B, m, dtype=torch.float64, device=device)
    expected_alpha[:, newest] = 1
    assert torch.equal(st["alpha"], expected_alpha)
    assert torch.equal(st["fallback"], torch.ones(B, dtype=torch.int64, device=device))
    ext.anderson_mix_(*args_of(st, MIX_ARGS), 1.0)
    torch.testing.assert_close(st["z"], before["z"] + before["g"])  # the newest entry's step
    # With a ridge the same system is solvable: equal weights, no fallback.
    st = clone_state(before)
    _store(ext, st, 1e-4)
    assert int(st["fallback"].sum()) == 0
    torch.testing.assert_close(st["alpha"], torch.full((B, m), 1 / m, dtype=torch.float64, device=device))


def test_pivot_within_rounding_error_falls_back(ext, device):
    """A nearly rank-one Gram matrix whose last pivot is tiny but positive must fall back.

    K = [[1, 1], [1, 1 + 2^-50]] leaves a pivot of 2^-50 = 4u, inside the elimination's
    rounding error: an exact solve here is as arbitrary as one whose rounding made the pivot
    negative (which GPUs and CPUs decide differently), so every device treats it as singular.
    The residuals G_0 = (1, 0) and the new g = (1, 2^-25) give exactly that K (a float64 dot).
    """
    B, m, D = 3, 2, 2

    def state(tail: float) -> dict:
        st = anderson_state(B, m, D, torch.float64, device, seed=3)
        st["status"].zero_()
        st["nhist"].fill_(m + 1)  # the new entry goes into slot 1, entry 0 stays
        st["fallback"].zero_()
        G = torch.zeros(B, m, D, dtype=torch.float64, device=device)
        G[:, 0, 0] = 1
        st["G"] = chunked(G)
        st["g"] = torch.tensor([[1.0, tail]] * B, dtype=torch.float64, device=device)
        st["gram"].zero_()
        st["gram"][:, 0, 0] = 1
        return st

    st = state(2.0 ** -25)
    _store(ext, st, 0.0)
    assert st["gram"][0].tolist() == [[1.0, 1.0], [1.0, 1 + 2.0 ** -50]]
    expected_alpha = torch.zeros(B, m, dtype=torch.float64, device=device)
    expected_alpha[:, 1] = 1
    assert torch.equal(st["alpha"], expected_alpha)
    assert torch.equal(st["fallback"], torch.ones(B, dtype=torch.int64, device=device))
    # A pivot well above the rounding error (2^-30) is a genuine, solvable system.
    st = state(2.0 ** -15)
    _store(ext, st, 0.0)
    assert int(st["fallback"].sum()) == 0
    # The pure-PyTorch twin draws the same line.
    gram = torch.ones(m, m, dtype=torch.float64)
    gram[1, 1] = 1 + 2.0 ** -50
    assert not reference.anderson_weights(gram, m - 1, 0.0)[1]
    gram[1, 1] = 1 + 2.0 ** -30
    assert reference.anderson_weights(gram, m - 1, 0.0)[1]


def test_non_finite_gram_falls_back(ext, device):
    B, m, D = 2, 4, 5
    st = anderson_state(B, m, D, torch.float64, device, seed=2)
    st["status"].zero_()
    st["nhist"].fill_(m)  # the new entry replaces slot 0; entry 1's diagonal stays NaN
    st["gram"][0, 1, 1] = math.nan
    st["fallback"].zero_()
    _store(ext, st, 1e-4)
    assert st["fallback"].tolist() == [1, 0]
    ext.anderson_mix_(*args_of(st, MIX_ARGS), 1.0)
    assert bool(torch.isfinite(st["z"]).all())


def test_anderson_ops_reject_bad_settings(ext):
    st = anderson_state(2, 3, 4, torch.float64, "cpu", seed=3)
    with pytest.raises(RuntimeError, match="beta"):
        ext.anderson_mix_(*args_of(st, MIX_ARGS), 0.0)
    with pytest.raises(RuntimeError, match="lam"):
        _store(ext, st, -1.0)
    st["gram"] = st["gram"][:, :2].contiguous()
    with pytest.raises(RuntimeError, match="'gram'"):
        _store(ext, st, 1e-4)
