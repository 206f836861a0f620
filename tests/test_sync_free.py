"""Solves that read the device rarely (check_every) or never (stop_early=False), same bits.

A device-to-host read is any op that turns a tensor into a Python value: it shows up
as ``aten._local_scalar_dense`` (``bool()``, ``int()``, ``float()``, ``.item()``), as an
op whose output size depends on the data (``nonzero``, ``masked_select``, boolean
indexing), or as ``.tolist()``. :class:`HostReads` counts all of them.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import deq_ext
from deq_ext.status import Status

from .helpers import same_bits
from .problems import contraction_inputs

SYNCING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2",
               "repeat_interleave"}


class HostReads(TorchDispatchMode):
    """Counts device-to-host reads (see the module docstring) while active."""

    def __init__(self, monkeypatch) -> None:
        super().__init__()
        self.reads: list[str] = []
        tolist = torch.Tensor.tolist

        def counting_tolist(t):
            self.reads.append("tolist")
            return tolist(t)

        monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))
        if name in SYNCING_OPS or bool_index:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def _result_fields(res) -> dict[str, torch.Tensor]:
    return {k: getattr(res, k) for k in ("z", "status", "nstep", "nfev", "abs_residual",
                                          "rel_residual")}


def _assert_same(a, b, what: str) -> None:
    for name, x in _result_fields(a).items():
        assert same_bits(x, _result_fields(b)[name]), f"{what}: {name} differs"


METHODS = [
    ("broyden", {}),
    ("broyden", {"line_search": True, "memory": 6}),
    ("anderson", {"memory": 4}),
    ("fixed_point", {"tau": 0.8}),
]
METHOD_IDS = ["broyden", "broyden-ls", "anderson", "fixed_point"]


def _problem(device, dtype=torch.float64):
    B, D = 7, 24
    f, inputs = contraction_inputs(B, D, dtype=dtype, device=device, seed=5)
    return f, torch.zeros(B, D, dtype=dtype, device=device), inputs


@pytest.mark.parametrize("per_sample", [True, False], ids=["per_sample", "batch_wide"])
@pytest.mark.parametrize("method,options", METHODS, ids=METHOD_IDS)
def test_results_do_not_depend_on_check_every_or_on_syncing(device, method, options, per_sample):
    f, z0, inputs = _problem(device)
    kw = dict(method=method, inputs=inputs, max_iter=60, tol=1e-9, per_sample=per_sample,
              **options)
    base = deq_ext.solve(f, z0, **kw)
    assert bool((base.status == Status.CONVERGED).all()), base.status
    for k in (2, 4, 7):
        _assert_same(deq_ext.solve(f, z0, check_every=k, **kw), base, f"check_every={k}")
    _assert_same(deq_ext.solve(f, z0, stop_early=False, **kw), base, "stop_early=False")


def test_batch_wide_stopping_freezes_the_batch_when_all_have_converged(device):
    """Without the freeze, samples would keep iterating after the batch is done whenever
    the host looks late (check_every > 1, or never with stop_early=False)."""
    f, z0, inputs = _problem(device)
    base = deq_ext.broyden(f, z0, inputs=inputs, max_iter=60, tol=1e-9, per_sample=False)
    late = deq_ext.broyden(f, z0, inputs=inputs, max_iter=60, tol=1e-9, per_sample=False,
                           stop_early=False)
    assert int(late.nstep.max()) == int(base.nstep.max()) < 60


@pytest.mark.parametrize("method,options", METHODS, ids=METHOD_IDS)
def test_stop_early_false_reads_nothing_from_the_device(device, monkeypatch, method, options):
    f, z0, inputs = _problem(device)
    kw = dict(method=method, inputs=inputs, max_iter=30, tol=1e-9, **options)
    with HostReads(monkeypatch) as mode:
        deq_ext.solve(f, z0, stop_early=False, **kw)
    assert mode.reads == []
    with HostReads(monkeypatch) as mode:  # the counter does see the syncing path's reads
        deq_ext.solve(f, z0, check_every=4, **kw)
    assert "tolist" in mode.reads and "_local_scalar_dense" in mode.reads


def test_check_every_reads_the_count_once_every_k_iterations(device, monkeypatch):
    f, z0, inputs = _problem(device)
    with HostReads(monkeypatch) as mode:
        res = deq_ext.broyden(f, z0, inputs=inputs, max_iter=60, tol=1e-9, check_every=5)
    steps = int(res.nstep.max())
    # One read at iterations 0, 5, 10, ... up to the first after the last step (which finds
    # nothing pending), plus the finiteness check of z0.
    assert mode.reads.count("tolist") == math.ceil(steps / 5) + 1
    assert mode.reads.count("_local_scalar_dense") == 1


def test_non_finite_start_flags_its_sample_without_a_read(device, monkeypatch):
    f, z0, inputs = _problem(device)
    z0 = z0.clone()
    z0[2, 3] = math.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        deq_ext.broyden(f, z0, inputs=inputs, max_iter=40, tol=1e-9)
    with HostReads(monkeypatch) as mode:
        res = deq_ext.broyden(f, z0, inputs=inputs, max_iter=40, tol=1e-9, stop_early=False)
    assert mode.reads == []
    assert int(res.status[2]) == Status.DIVERGED
    clean = deq_ext.broyden(f, torch.zeros_like(z0), inputs=inputs, max_iter=40, tol=1e-9)
    others = [b for b in range(z0.shape[0]) if b != 2]
    assert same_bits(res.z[others], clean.z[others])
    assert torch.equal(res.status[others], clean.status[others])


@pytest.mark.parametrize("method", ["broyden", "anderson", "fixed_point"])
def test_check_every_is_validated(method):
    with pytest.raises(ValueError, match="check_every"):
        deq_ext.solve(lambda z: z, torch.zeros(2, 3), method=method, check_every=0)


class _Cell(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(d, d)

    def forward(self, z, x):
        return torch.tanh(0.5 * self.lin(z) + x)


def test_deq_training_step_without_a_read(device, monkeypatch):
    torch.manual_seed(0)
    cell = _Cell(12).double().to(device)
    x = torch.randn(6, 12, dtype=torch.float64, device=device, requires_grad=True)
    settings = dict(forward=dict(max_iter=40, tol=1e-10, stop_early=False),
                    backward=dict(max_iter=40, tol=1e-12, stop_early=False))
    deq = deq_ext.DEQ(cell, **settings)
    with HostReads(monkeypatch) as mode:
        deq(x).pow(2).sum().backward()
    assert mode.reads == []
    grads = [p.grad.clone() for p in cell.parameters()] + [x.grad.clone()]
    # The same bits as the reading path on the whole batch (a sync-free solve never compacts);
    # the default, compacted path evaluates f (an addmm) on fewer rows, whose rounding can
    # differ with the row count: equal to rounding.
    for compact in (False, True):
        cell.zero_grad()
        x.grad = None
        deq_ext.DEQ(cell, forward=dict(max_iter=40, tol=1e-10),
                    backward=dict(max_iter=40, tol=1e-12), compact=compact)(x).pow(2).sum().backward()
        for a, b in zip(grads, [p.grad for p in cell.parameters()] + [x.grad]):
            if compact:
                torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
            else:
                assert same_bits(a, b)


def test_sync_free_backward_defers_its_divergence_warning_to_the_stats(device):
    cell = _Cell(5).double().to(device)
    x = torch.randn(3, 5, dtype=torch.float64, device=device)
    deq = deq_ext.DEQ(cell, forward=dict(max_iter=30, tol=1e-10),
                      backward=dict(max_iter=30, tol=1e-12, stop_early=False))
    out = deq(x)
    grad = torch.ones_like(out)
    grad[1, 0] = math.inf  # a sample whose incoming gradient is not finite
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may be read (or warned) during backward
        out.backward(grad)
    assert int(deq.backward_stats.status[1]) == Status.DIVERGED
    with pytest.warns(RuntimeWarning, match=r"diverged for samples \[1\]"):
        deq.backward_stats.summary()
