"""Bad input gets a clear error, never a crash or a hang."""

from __future__ import annotations

import math

import pytest
import torch

import deq_ext
from deq_ext import Status, reference

from .problems import contraction


def _f():
    return contraction(3, 6, seed=0)


def _z0():
    return torch.zeros(3, 6, dtype=torch.float64)


@pytest.mark.parametrize("bad_f,match", [
    (lambda z: z[:, :3], "shape"),
    (lambda z: z.float(), "dtype"),
    (lambda z: z.to("meta"), "device"),
    (lambda z: (z, z), "torch.Tensor"),
])
def test_f_returning_the_wrong_thing(bad_f, match):
    with pytest.raises((ValueError, TypeError), match=match):
        deq_ext.broyden(bad_f, _z0())


def test_f_that_fails_later_still_raises_clearly():
    calls = {"n": 0}

    def f(z):
        calls["n"] += 1
        return z[:, :2] if calls["n"] == 3 else 0.5 * z

    with pytest.raises(ValueError, match="shape"):
        deq_ext.broyden(f, torch.ones(2, 4), tol=1e-12)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_z0(bad):
    z0 = _z0()
    z0[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        deq_ext.broyden(_f(), z0)


@pytest.mark.parametrize("option,value", [
    ("max_iter", 0), ("max_iter", -3), ("max_iter", 2.5),
    ("tol", 0.0), ("tol", -1e-3), ("tol", math.nan), ("tol", math.inf),
    ("memory", 0), ("memory", -1),
    ("stop_mode", "l2"),
    ("diverge_ratio", 0.5),
    ("ls_max_iter", 0),
])
def test_impossible_settings(option, value):
    with pytest.raises(ValueError, match=option):
        deq_ext.broyden(_f(), _z0(), **{option: value})


@pytest.mark.parametrize("z0,match", [
    (torch.zeros(3, 6, dtype=torch.int64), "float"),
    (torch.tensor(1.0), "batched"),
    ([[0.0]], "torch.Tensor"),
])
def test_bad_z0(z0, match):
    with pytest.raises((TypeError, ValueError), match=match):
        deq_ext.broyden(lambda z: z, z0)


def test_not_callable():
    with pytest.raises(TypeError, match="callable"):
        deq_ext.broyden("f", _z0())


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown method"):
        deq_ext.solve(_f(), _z0(), method="newton")


@pytest.mark.parametrize("shape", [(0, 6), (0, 2, 3), (4, 0)])
def test_empty_batch_is_handled(shape):
    calls = {"n": 0}

    def f(z):
        calls["n"] += 1
        return z

    res = deq_ext.broyden(f, torch.zeros(*shape))
    assert res.z.shape == shape
    assert res.status.shape == (shape[0],)
    assert calls["n"] == 0


def _reduce_args(B: int = 2, m: int = 3, D: int = 5) -> list:
    """Valid arguments of broyden_reduce (float64 state), to break one at a time."""
    U = [torch.zeros(B, m, D, dtype=torch.float64)]
    vec = torch.zeros(B, D, dtype=torch.float64)
    proj, scal = reference.new_scratch(B, m, torch.float64, "cpu")
    status = torch.zeros(B, dtype=torch.int64)
    partials = torch.zeros(B * (3 * m + 2), dtype=torch.float64)
    tickets = torch.zeros(B + 1, dtype=torch.int32)
    return [U, [U[0].clone()], vec, vec.clone(), vec.clone(), status, status.clone(), proj, scal,
            partials, tickets, m]


def test_ops_reject_mismatched_devices(ext):
    args = _reduce_args()
    args[3] = args[3].to("meta")
    with pytest.raises(RuntimeError, match="is on meta"):
        ext.broyden_reduce(*args)


def test_ops_reject_bad_shapes_and_dtypes(ext):
    args = _reduce_args()
    B, D = args[2].shape
    bad_shape = list(args)
    bad_shape[3] = torch.zeros(B, D + 1, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="'dg' has shape"):
        ext.broyden_reduce(*bad_shape)
    bad_dtype = list(args)
    bad_dtype[1] = [args[0][0].float()]
    with pytest.raises(RuntimeError, match="'V' has dtype"):
        ext.broyden_reduce(*bad_dtype)
    bad_status = list(args)
    bad_status[5] = args[5].int()
    with pytest.raises(RuntimeError, match="'status' must be Long"):
        ext.broyden_reduce(*bad_status)
    non_contig = list(args)
    non_contig[2] = torch.zeros(D, B, dtype=torch.float64).t()
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.broyden_reduce(*non_contig)
    bad_chunks = list(args)
    bad_chunks[0] = [torch.zeros(B, 2, D, dtype=torch.float64), torch.zeros(B, 3, D,
                                                                          dtype=torch.float64)]
    with pytest.raises(RuntimeError, match="the last one with at most C slots"):
        ext.broyden_reduce(*bad_chunks)
    no_chunks = list(args)
    no_chunks[0] = []
    with pytest.raises(RuntimeError, match="list of 1 to 64 history chunks"):
        ext.broyden_reduce(*no_chunks)
    bad_ring = list(args)
    bad_ring[-1] = 0
    with pytest.raises(RuntimeError, match="ring length m must be >= 1"):
        ext.broyden_reduce(*bad_ring)
    bad_scratch = list(args)
    bad_scratch[10] = args[10].long()
    with pytest.raises(RuntimeError, match="'tickets' must be a 1-d int32"):
        ext.broyden_reduce(*bad_scratch)


def test_residual_op_rejects_bad_tol(ext):
    B, D = 2, 4
    v = torch.zeros(B, D)
    s = torch.zeros(B)
    i = torch.zeros(B, dtype=torch.int64)
    counts = torch.zeros(2, dtype=torch.int64)
    partials, tickets = torch.zeros(2 * B, dtype=torch.float64), torch.zeros(B + 1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="tol"):
        ext.residual_status_(v, v, v.clone(), v.clone(), v.clone(), s, s.clone(), s.clone(),
                             s.clone(), i, i.clone(), i.clone(), i.clone(), counts, partials,
                             tickets, -1.0, False, 0, 10.0, True, True)


def test_diverging_sample_never_crashes_the_batch():
    x = torch.randn(3, 5, dtype=torch.float64)

    def f(z):  # sample 0 explodes exponentially
        out = 0.5 * torch.tanh(z) + x
        out[0] = torch.exp(z[0].abs() + 1) * 1e3
        return out

    res = deq_ext.broyden(f, torch.zeros_like(x), max_iter=50, tol=1e-10)
    assert int(res.status[0]) == Status.DIVERGED
    assert bool(res.converged[1:].all())


@pytest.mark.parametrize("method", ["broyden", "anderson", "fixed_point"])
def test_an_unknown_option_is_an_error_not_ignored(method):
    expected = rf"{method}\(\) got unexpected keyword argument\(s\) \['tolerance'\]"
    with pytest.raises(TypeError, match=expected):
        deq_ext.solve(lambda z: z, torch.zeros(2, 3), method=method, tolerance=1e-3)


def test_broyden_workspace_counts_the_state_a_solve_allocates():
    z0 = torch.empty(4, 3, 5, device="meta")
    ws = deq_ext.solvers.broyden_workspace(z0, max_iter=7)
    assert (ws["B"], ws["D"]) == (4, 15)
    # U and V, (B, m, D) bfloat16 (the default under float32), m = max_iter
    assert ws["history"] == 2 * 4 * 7 * 15 * 2
    assert ws["history_chunk"] == 2 * 4 * 7 * 15 * 2  # m = 7 fits in one chunk of 8
    assert ws["total"] > ws["history"]
    more = deq_ext.solvers.broyden_workspace(z0, max_iter=7, memory=3)
    assert ws["history"] - more["history"] == 2 * 4 * 4 * 15 * 2
    # proj (B, 3, m) and the kernels' partial sums (3m + 2 per sample and CUDA block)
    assert ws["total"] - more["total"] == ws["history"] - more["history"] + 4 * 3 * 4 * 4 \
        + 4 * 3 * 4 * 8
