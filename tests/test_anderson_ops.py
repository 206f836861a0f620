"""Anderson and fixed-point ops against their pure-PyTorch twins (float64/float32, awkward sizes)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from deq_ext import reference
from deq_ext.status import Status

from .helpers import anderson_state, assert_states_match, clone_state, random_status
from .test_broyden_ops import BATCHES, DIMS, DTYPES, _seed

MEMORIES = (1, 5, 30)
SIZES = list(itertools.product(BATCHES, DIMS, MEMORIES))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,D,m", SIZES)
def test_anderson_store_matches_reference(ext, device, dtype, B, D, m):
    st = anderson_state(B, m, D, dtype, device, _seed("store", B, D, m, dtype))
    before, want = clone_state(st), clone_state(st)
    args = ("X", "G", "gram", "z", "g", "status", "nhist")
    ext.anderson_store_(*(st[a] for a in args))
    reference.anderson_store_(*(want[a] for a in args))
    assert_states_match(st, want, before, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,D,m", SIZES)
def test_anderson_mix_matches_reference(ext, device, dtype, B, D, m):
    st = anderson_state(B, m, D, dtype, device, _seed("mix", B, D, m, dtype))
    st["nhist"].clamp_(min=1)  # mixing follows a store: at least one entry
    before, want = clone_state(st), clone_state(st)
    args = ("X", "G", "gram", "z", "alpha", "fallback", "status", "nhist")
    ext.anderson_mix_(*(st[a] for a in args), 0.8, 1e-4)
    reference.anderson_mix_(*(want[a] for a in args), 0.8, 1e-4)
    # The weights solve a ridge-regularised system: two correct implementations
    # agree to about eps * cond(K + ridge), which is large when n > D.
    assert_states_match(st, want, before, dtype, amplification=_max_condition(before, m, 1e-4))


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


def test_singular_gram_falls_back_and_is_flagged(ext, device):
    """Identical residuals make the Gram matrix singular: with no ridge the solve must fall back."""
    B, m, D = 2, 3, 8
    st = anderson_state(B, m, D, torch.float64, device, seed=1)
    st["status"].zero_()
    st["G"][:] = st["G"][:, :1]  # every stored residual the same
    st["gram"] = (st["G"] @ st["G"].transpose(1, 2)).contiguous()
    st["nhist"].fill_(m)
    st["fallback"].zero_()
    args = ("X", "G", "gram", "z", "alpha", "fallback", "status", "nhist")
    ext.anderson_mix_(*(st[a] for a in args), 1.0, 0.0)
    newest = (m - 1) % m
    expected_alpha = torch.zeros(B, m, dtype=torch.float64, device=device)
    expected_alpha[:, newest] = 1
    assert torch.equal(st["alpha"], expected_alpha)
    assert torch.equal(st["fallback"], torch.ones(B, dtype=torch.int64, device=device))
    torch.testing.assert_close(st["z"], st["X"][:, newest] + st["G"][:, newest])
    # With a ridge the same system is solvable: equal weights, no fallback.
    st["fallback"].zero_()
    ext.anderson_mix_(*(st[a] for a in args), 1.0, 1e-4)
    assert int(st["fallback"].sum()) == 0
    torch.testing.assert_close(st["alpha"], torch.full((B, m), 1 / m, dtype=torch.float64, device=device))


def test_pivot_within_rounding_error_falls_back(ext, device):
    """A nearly rank-one Gram matrix whose last pivot is tiny but positive must fall back.

    K = [[1, 1], [1, 1 + 2^-50]] leaves a pivot of 2^-50 = 4u, inside the elimination's
    rounding error: an exact solve here is as arbitrary as one whose rounding made the pivot
    negative (which GPUs and CPUs decide differently), so every device treats it as singular.
    """
    B, m, D = 3, 2, 6
    st = anderson_state(B, m, D, torch.float64, device, seed=3)
    st["status"].zero_()
    st["nhist"].fill_(m)
    st["fallback"].zero_()
    gram = torch.ones(B, m, m, dtype=torch.float64)
    gram[:, 1, 1] = 1 + 2.0 ** -50
    st["gram"] = gram.clone().to(device)
    args = ("X", "G", "gram", "z", "alpha", "fallback", "status", "nhist")
    ext.anderson_mix_(*(st[a] for a in args), 1.0, 0.0)
    expected_alpha = torch.zeros(B, m, dtype=torch.float64, device=device)
    expected_alpha[:, (m - 1) % m] = 1
    assert torch.equal(st["alpha"], expected_alpha)
    assert torch.equal(st["fallback"], torch.ones(B, dtype=torch.int64, device=device))
    # A pivot well above the rounding error (2^-30) is a genuine, solvable system.
    st["gram"][:, 1, 1] = 1 + 2.0 ** -30
    st["fallback"].zero_()
    ext.anderson_mix_(*(st[a] for a in args), 1.0, 0.0)
    assert int(st["fallback"].sum()) == 0
    # The pure-PyTorch twin draws the same line.
    assert not reference.anderson_weights(gram[0], m - 1, 0.0)[1]
    assert reference.anderson_weights(st["gram"][0].cpu(), m - 1, 0.0)[1]


def test_non_finite_gram_falls_back(ext, device):
    B, m, D = 2, 4, 5
    st = anderson_state(B, m, D, torch.float64, device, seed=2)
    st["status"].zero_()
    st["nhist"].fill_(m)
    st["gram"][0, 1, 1] = math.nan
    st["fallback"].zero_()
    args = ("X", "G", "gram", "z", "alpha", "fallback", "status", "nhist")
    ext.anderson_mix_(*(st[a] for a in args), 1.0, 1e-4)
    assert st["fallback"].tolist() == [1, 0]
    assert bool(torch.isfinite(st["z"]).all())


def test_mix_rejects_bad_settings(ext):
    st = anderson_state(2, 3, 4, torch.float64, "cpu", seed=3)
    args = ("X", "G", "gram", "z", "alpha", "fallback", "status", "nhist")
    with pytest.raises(RuntimeError, match="beta"):
        ext.anderson_mix_(*(st[a] for a in args), 0.0, 1e-4)
    with pytest.raises(RuntimeError, match="lam"):
        ext.anderson_mix_(*(st[a] for a in args), 1.0, -1.0)
    with pytest.raises(RuntimeError, match="'gram'"):
        ext.anderson_store_(st["X"], st["G"], st["gram"][:, :2].contiguous(), st["z"], st["g"],
                            st["status"], st["nhist"])
