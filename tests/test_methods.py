"""What every method (Broyden with and without line search, Anderson, fixed point) promises."""

from __future__ import annotations

import pytest
import torch

import deq_ext
from deq_ext import Status

from .problems import contraction

pytestmark = pytest.mark.usefixtures("compiled")

METHODS = [
    ("broyden", {}),
    ("broyden", {"memory": 4}),
    ("broyden", {"line_search": True}),
    ("broyden", {"memory": 4, "line_search": True}),
    ("anderson", {"memory": 4, "beta": 0.9}),
    ("fixed_point", {"tau": 0.9}),
]
METHOD_IDS = ["broyden", "broyden-ring", "broyden-ls", "broyden-ring-ls", "anderson", "fixed_point"]


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
@pytest.mark.parametrize("method,opts", METHODS, ids=METHOD_IDS)
def test_extension_matches_reference_step_by_step(device, method, opts, stop_mode):
    B, D = 6, 40
    f = contraction(B, D, device=device, seed=1, rho_max=0.8)
    z0 = torch.randn(B, D, dtype=torch.float64, device=device)
    kw = dict(method=method, max_iter=150, tol=1e-10, stop_mode=stop_mode, trace=True, **opts)
    ext = deq_ext.solve(f, z0, **kw)
    ref = deq_ext.solve(f, z0, use_reference=True, **kw)
    assert bool((ext.status == Status.CONVERGED).all())
    assert torch.equal(ext.nstep, ref.nstep) and torch.equal(ext.nfev, ref.nfev)
    assert torch.equal(ext.status, ref.status)
    torch.testing.assert_close(ext.z, ref.z, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(ext.abs_trace, ref.abs_trace, rtol=1e-6, atol=1e-11)
    assert ext.abs_trace.shape == (B, int(ext.nfev.max()))


@pytest.mark.parametrize("method,opts", METHODS, ids=METHOD_IDS)
def test_sample_alone_equals_sample_in_any_batch(device, method, opts):
    """The same bits for a sample alone, in its batch and in a shuffled batch."""
    B, D = 6, 24
    f = contraction(B, D, device=device, seed=5)
    z0 = torch.randn(B, D, dtype=torch.float64, device=device)
    kw = dict(method=method, max_iter=200, tol=1e-11, **opts)
    batch = deq_ext.solve(f, z0, **kw)
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(0)).to(device)
    shuffled = deq_ext.solve(lambda z: f(z, rows=perm), z0[perm], **kw)
    for name in ("z", "nstep", "nfev", "status"):
        assert torch.equal(getattr(shuffled, name), getattr(batch, name)[perm]), name
    for b in range(B):
        alone = deq_ext.solve(lambda z, b=b: f(z, rows=torch.tensor([b], device=device)),
                              z0[b:b + 1], **kw)
        for name in ("z", "nstep", "nfev", "status"):
            assert torch.equal(getattr(alone, name)[0], getattr(batch, name)[b]), (b, name)


# The internal state of each method that must not move once a sample has converged.
FROZEN_STATE = {"broyden": ("z", "z_best", "U", "V", "g", "dz", "npairs"),
                "anderson": ("z", "z_best", "X", "G", "gram", "alpha", "nhist"),
                "fixed_point": ("z", "z_best", "g")}


@pytest.mark.parametrize("method,opts", METHODS, ids=METHOD_IDS)
def test_converged_sample_is_frozen_bit_for_bit(device, method, opts):
    B, D = 5, 32
    f = contraction(B, D, device=device, seed=4, rho_min=0.1, rho_max=0.9)
    z0 = torch.randn(B, D, dtype=torch.float64, device=device)
    if method == "broyden":  # a history size that does not follow max_iter (it differs below)
        opts = {"memory": 6, **opts}
    kw = dict(method=method, tol=1e-10, return_state=True, **opts)
    full = deq_ext.solve(f, z0, max_iter=300, **kw)
    first = int(full.nstep.argmin())
    n_first = int(full.nstep[first])
    assert n_first < int(full.nstep.max())
    # Stop the batch exactly when `first` converged: its state must be what it is at the end.
    early = deq_ext.solve(f, z0, max_iter=n_first, **kw)
    assert int(early.status[first]) == Status.CONVERGED
    for name in FROZEN_STATE[method]:
        assert torch.equal(early.state[name][first], full.state[name][first]), name
    assert torch.equal(early.z[first], full.z[first])
