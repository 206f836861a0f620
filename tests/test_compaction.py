"""Active-set compaction: f sees only the samples still active, results are unchanged."""

from __future__ import annotations

import pytest
import torch

import deq_ext

from .problems import RowCountingF, contraction_inputs

# Every test here runs its solves on the compiled ops.
pytestmark = pytest.mark.usefixtures("compiled")


@pytest.mark.parametrize("line_search", [False, True])
def test_compaction_gives_identical_results(device, line_search):
    B, D = 7, 20
    f, inputs = contraction_inputs(B, D, device=device, seed=1)
    z0 = torch.zeros(B, D, dtype=torch.float64, device=device)
    opts = dict(inputs=inputs, max_iter=60, tol=1e-10, line_search=line_search)
    on = deq_ext.broyden(f, z0, compact=True, **opts)
    off = deq_ext.broyden(f, z0, compact=False, **opts)
    assert bool(on.converged.all())
    torch.testing.assert_close(on.z, off.z, rtol=1e-12, atol=1e-12)
    assert torch.equal(on.nstep, off.nstep) and torch.equal(on.nfev, off.nfev)


def test_compaction_evaluates_each_sample_only_while_active():
    """f sees the active rows in power-of-two buckets: at most twice the active rows (padded with
    finished ones), and the solver reports the rows it evaluated."""
    B, D = 8, 16
    f, inputs = contraction_inputs(B, D, seed=2)
    counted = RowCountingF(f)
    res = deq_ext.broyden(counted, torch.zeros(B, D, dtype=torch.float64), inputs=inputs,
                          max_iter=80, tol=1e-10)
    assert int(res.nfev.sum()) <= counted.rows <= 2 * int(res.nfev.sum())
    assert res.f_rows == counted.rows
    assert int(res.nfev.sum()) == int((res.nstep + 1).sum())
    # Without compaction every call sees the whole batch.
    full = RowCountingF(f)
    deq_ext.broyden(full, torch.zeros(B, D, dtype=torch.float64), inputs=inputs, max_iter=80,
                    tol=1e-10, compact=False)
    assert full.rows == B * full.calls == B * (int(res.nstep.max()) + 1)
    assert counted.rows < full.rows


def test_compaction_is_default_only_with_inputs():
    B, D = 4, 8
    f, inputs = contraction_inputs(B, D, seed=3)
    x, rho, W, scale = inputs
    closure = RowCountingF(lambda z: f(z, x, rho, W, scale))
    res = deq_ext.broyden(closure, torch.zeros(B, D, dtype=torch.float64), tol=1e-10)
    assert closure.rows == B * closure.calls
    assert bool(res.converged.all())


def test_inputs_that_are_not_batched_pass_unchanged():
    B, D = 5, 6
    f, (x, rho, W, scale) = contraction_inputs(B, D, seed=4)
    seen = []

    def spy(z, x_, rho_, W_, scale_, tag):
        seen.append((z.shape[0], x_.shape[0], rho_.shape[0], W_.shape, scale_, tag))
        return f(z, x_, rho_, W_, scale_)

    res = deq_ext.broyden(spy, torch.zeros(B, D, dtype=torch.float64),
                          inputs=(x, rho, W, scale, "tag"), tol=1e-10, max_iter=50)
    assert bool(res.converged.all())
    for n_z, n_x, n_rho, w_shape, s, tag in seen:
        assert n_z == n_x == n_rho and w_shape == (D, D) and s == 1.0 and tag == "tag"
    assert min(n for n, *_ in seen) < B  # compaction did shrink the batch


def test_f_returning_wrong_rows_under_compaction_is_an_error():
    B, D = 3, 4
    f, inputs = contraction_inputs(B, D, seed=5)

    def bad(z, *args):
        out = f(z, *args)
        return out if z.shape[0] == B else out[:1].expand(z.shape[0] + 1, D)

    with pytest.raises(ValueError, match="shape"):
        deq_ext.broyden(bad, torch.zeros(B, D, dtype=torch.float64), inputs=inputs, tol=1e-12,
                        max_iter=50)


def test_batched_tensors_inside_containers_are_compacted_too():
    """Tensors in lists, tuples, named tuples and dicts are gathered with z's rows."""
    from collections import namedtuple

    B, D = 6, 5
    f, (x, rho, W, scale) = contraction_inputs(B, D, seed=6)
    Pair = namedtuple("Pair", "rho W")

    def nested(z, parts):
        return f(z, parts["x"], parts["pair"].rho, parts["pair"].W, parts["more"][0])

    parts = {"x": x, "pair": Pair(rho, W), "more": [scale]}
    counted = RowCountingF(nested)
    z0 = torch.zeros(B, D, dtype=torch.float64)
    on = deq_ext.broyden(counted, z0, inputs=(parts,), max_iter=80, tol=1e-10)
    off = deq_ext.broyden(nested, z0, inputs=(parts,), max_iter=80, tol=1e-10, compact=False)
    flat = deq_ext.broyden(f, z0, inputs=(x, rho, W, scale), max_iter=80, tol=1e-10)
    assert bool(on.converged.all()) and counted.rows < B * counted.calls
    torch.testing.assert_close(on.z, off.z, rtol=1e-12, atol=1e-12)
    assert torch.equal(on.z, flat.z) and torch.equal(on.nstep, flat.nstep)
