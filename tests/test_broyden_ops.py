"""Every compiled op against its pure-PyTorch twin, float64 and float32, awkward sizes."""

from __future__ import annotations

import itertools
import math
import zlib

import pytest
import torch

from deq_ext import _extension, reference
from deq_ext.status import DEN, VALID, Status

from .helpers import (
    EXPAND_ARGS,
    REDUCE_ARGS,
    RESIDUAL_ARGS,
    RUN_SEED,
    args_of,
    assert_states_match,
    clone_state,
    history_state,
    residual_state,
    states_equal,
    unchunked,
    with_reduced_scalars,
)

BATCHES = (1, 3, 33)
DIMS = (1, 7, 129, 4096 + 32)
MEMORIES = (1, 5, 30)
DTYPES = (torch.float64, torch.float32)
SIZES = list(itertools.product(BATCHES, DIMS, MEMORIES))


def _seed(*parts) -> int:
    """A different seed per test case, and fresh ones each run unless DEQ_EXT_TEST_SEED is set
    (the run's seed is printed in the header of the pytest report)."""
    return zlib.crc32(repr(parts).encode()) ^ RUN_SEED


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,D,m", SIZES)
def test_reduce_matches_reference(ext, device, dtype, B, D, m):
    st = history_state(B, m, D, dtype, device, seed=_seed("reduce", B, D, m, dtype))
    before = clone_state(st)
    want = clone_state(st)
    ext.broyden_reduce(*args_of(st, REDUCE_ARGS))
    reference.broyden_reduce(*args_of(want, REDUCE_ARGS))
    assert_states_match(st, want, before, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,D,m", SIZES)
def test_expand_matches_reference(ext, device, dtype, B, D, m):
    st = with_reduced_scalars(history_state(B, m, D, dtype, device, seed=_seed("expand", B, D, m, dtype)),
                              gen_seed=B * D + m)
    before = clone_state(st)
    want = clone_state(st)
    ext.broyden_expand_(*args_of(st, EXPAND_ARGS))
    reference.broyden_expand_(*args_of(want, EXPAND_ARGS))
    assert_states_match(st, want, before, dtype)
    active = before["status"] == Status.ACTIVE
    stored = active & (before["scal"][:, VALID] != 0)
    assert torch.equal(st["npairs"], before["npairs"] + stored.long())
    # Only the ring slot of the new pair changed in the history.
    U, U0 = unchunked(st["U"], m), unchunked(before["U"], m)
    for b in torch.nonzero(stored).flatten().tolist():
        slot = int(before["npairs"][b]) % m
        others = [j for j in range(m) if j != slot]
        assert torch.equal(U[b, others], U0[b, others])


def _tol_between(r: torch.Tensor) -> float:
    """A tolerance halfway (geometrically) between two residuals: no sample sits on the boundary."""
    r = r.sort().values
    if r.numel() < 2:
        return float(r[0]) * 2 if r.numel() else 1.0
    i = r.numel() // 2
    return math.sqrt(float(r[i - 1]) * float(r[i]))


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
@pytest.mark.parametrize("dtype,fz_dtype", [
    (torch.float64, torch.float64), (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16), (torch.float32, torch.float16)], ids=str)
@pytest.mark.parametrize("B,D", list(itertools.product(BATCHES, DIMS)))
def test_residual_status_matches_reference(ext, device, dtype, fz_dtype, stop_mode, B, D):
    st = residual_state(B, D, dtype, fz_dtype, device, seed=_seed("res", B, D, dtype, fz_dtype))
    before = clone_state(st)
    want = clone_state(st)
    use_rel = stop_mode == "rel"
    # A tolerance between the samples' residuals, so some converge and some do not.
    r = (st["fz"].double() - st["z"].double()).norm(dim=1)
    if use_rel:
        r = r / st["fz"].double().norm(dim=1)
    tol = _tol_between(r[torch.isfinite(r)])
    params = (tol, use_rel, 3, 1e3, True, True)
    ext.residual_status_(*(st[a] for a in RESIDUAL_ARGS), *params)
    reference.residual_status_(*(want[a] for a in RESIDUAL_ARGS), *params)
    assert_states_match(st, want, before, dtype)
    if B > 2:
        assert int(st["status"][1]) == Status.DIVERGED
    active = before["status"] == Status.ACTIVE
    assert torch.equal(st["nfev"], before["nfev"] + active.long())


@pytest.mark.parametrize("flags", [(False, True), (True, False), (False, False)])
def test_residual_status_flags(ext, device, flags):
    """count_step and freeze_converged change exactly what they say."""
    count_step, freeze = flags
    st = residual_state(5, 64, torch.float64, torch.float64, device, seed=11)
    was_active = st["status"] == Status.ACTIVE
    want = clone_state(st)
    params = (1e30, False, 0, 1e3, count_step, freeze)  # every finite sample meets tol
    ext.residual_status_(*(st[a] for a in RESIDUAL_ARGS), *params)
    reference.residual_status_(*(want[a] for a in RESIDUAL_ARGS), *params)
    assert torch.equal(st["status"], want["status"])
    assert torch.equal(st["nstep"], want["nstep"])
    converged = was_active & (st["status"] == Status.CONVERGED)
    assert bool(converged.any()) == freeze


def test_residual_norms_of_huge_finite_values_stay_finite(ext, device):
    """|f(z) - z| of 1e18 per element is finite in float32, but its square sums overflow float32:
    the sums are taken in double, so the sample stays ACTIVE, as in the reference."""
    st = residual_state(2, 1024, torch.float32, torch.float32, device, seed=13)
    st["status"].fill_(int(Status.ACTIVE))
    st["best_abs"].fill_(math.inf)
    st["best_rel"].fill_(math.inf)
    st["z"].zero_()
    st["fz"].fill_(1e18)
    want = clone_state(st)
    params = (1e-3, False, 3, 1e6, True, True)
    ext.residual_status_(*(st[a] for a in RESIDUAL_ARGS), *params)
    reference.residual_status_(*(want[a] for a in RESIDUAL_ARGS), *params)
    assert torch.equal(st["status"], want["status"])
    assert bool((st["status"] == Status.ACTIVE).all())
    torch.testing.assert_close(st["res_abs"], want["res_abs"], rtol=1e-6, atol=0)
    assert bool(torch.isfinite(st["res_abs"]).all())
    assert torch.equal(st["z_best"], st["z"])


def test_reduce_marks_zero_denominator_invalid(ext, device):
    """A zero Sherman-Morrison denominator skips the update instead of storing inf/NaN."""
    B, m, D = 2, 3, 17
    st = history_state(B, m, D, torch.float64, device, seed=5)
    st["status"].zero_()
    st["npairs"].zero_()  # no stored pairs: den = -dz.dg
    st["dg"].zero_()
    ext.broyden_reduce(*args_of(st, REDUCE_ARGS))
    assert torch.all(st["scal"][:, VALID] == 0)
    assert torch.all(st["scal"][:, DEN] == 0)
    before = clone_state(st)
    ext.broyden_expand_(*args_of(st, EXPAND_ARGS))
    assert not states_equal({"U": st["U"], "npairs": st["npairs"]},
                            {"U": before["U"], "npairs": before["npairs"]})
    torch.testing.assert_close(st["dz"], before["g"], rtol=0, atol=0)  # step = -H g = g with H = -I


def test_ops_are_deterministic(ext, device):
    B, m, D = 4, 6, 9000
    st = with_reduced_scalars(history_state(B, m, D, torch.float32, device, seed=3), gen_seed=1)
    outs = []
    for _ in range(2):
        s = clone_state(st)
        ext.broyden_reduce(*args_of(s, REDUCE_ARGS))
        ext.broyden_expand_(*args_of(s, EXPAND_ARGS))
        outs.append(s)
    assert not states_equal(outs[0], outs[1])



@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_ops_do_not_depend_on_thread_count(ext, dtype):
    """Partial sums are combined in chunk order, so 1 and 2 threads give the same bits."""
    B, m, D = 5, 7, 3 * 4096 + 5
    st = with_reduced_scalars(history_state(B, m, D, dtype, "cpu", seed=_seed("threads", dtype)),
                              gen_seed=2)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            s = clone_state(st)
            ext.broyden_reduce(*args_of(s, REDUCE_ARGS))
            ext.broyden_expand_(*args_of(s, EXPAND_ARGS))
            outs.append(s)
    finally:
        torch.set_num_threads(threads)
    assert not states_equal(outs[0], outs[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,D,m", [(3, 7, 30), (4, 1024 + 5, 12)])
def test_passes_on_a_history_not_yet_full(ext, device, dtype, B, D, m):
    """A ring of m allocated only up to the pairs stored so far (fewer chunks than m needs):
    the passes read and write only the allocated chunks, as the twin does."""
    st = history_state(B, m, D, dtype, device, seed=_seed("partial", B, D, m, dtype))
    st["npairs"].copy_(torch.tensor([4, 0, 5, 2][:B]))
    st["status"][:] = int(Status.ACTIVE)
    st["U"], st["V"] = st["U"][:2], st["V"][:2]  # 2 chunks of 3: slots 0..5 (the next one too)
    for op, names in (("broyden_reduce", REDUCE_ARGS), ("broyden_expand_", EXPAND_ARGS)):
        before, want = clone_state(st), clone_state(st)
        getattr(ext, op)(*args_of(st, names))
        getattr(reference, op)(*args_of(want, names))
        assert_states_match(st, want, before, dtype)


@pytest.mark.parametrize("kernels", ["cpu", "cuda-emu"])
def test_passes_refuse_unallocated_slots(compiled, kernels):
    """A sample whose pairs reach past the allocated chunks is an error, not a stray write
    (checked where the counters live on the host: the CPU kernels and the emulation)."""
    ops = _extension.ops() if kernels == "cpu" else _extension.emulated_ops()
    if ops is None:
        pytest.skip("deq_ext._C_emu not built")
    B, m, D = 2, 12, 5
    st = history_state(B, m, D, torch.float64, "cpu", seed=21)
    st["status"][:] = int(Status.ACTIVE)
    st["npairs"].copy_(torch.tensor([6, 1]))  # reads 6 pairs, writes slot 6: 7 slots
    st["U"], st["V"] = st["U"][:2], st["V"][:2]  # only 6 allocated
    with pytest.raises(RuntimeError, match="history slots"):
        ops.broyden_expand_(*args_of(st, EXPAND_ARGS))
    with pytest.raises(RuntimeError, match="history slots"):
        reference.broyden_expand_(*args_of(st, EXPAND_ARGS))


def test_residual_counts_pending_and_active(ext, device):
    """counts = (pending, active) after the update; with batch-wide stopping (freeze_converged
    False) an active sample already below tol is not pending."""
    st = residual_state(6, 33, torch.float64, torch.float64, device, seed=17)
    r = (st["fz"].double() - st["z"].double()).norm(dim=1)
    tol = _tol_between(r[torch.isfinite(r)])
    for freeze in (True, False):
        s, want = clone_state(st), clone_state(st)
        params = (tol, False, 0, 1e3, True, freeze)
        ext.residual_status_(*args_of(s, RESIDUAL_ARGS), *params)
        reference.residual_status_(*args_of(want, RESIDUAL_ARGS), *params)
        active = s["status"] == Status.ACTIVE
        pending = active & ~(s["res_abs"] < tol) if not freeze else active
        assert s["counts"].tolist() == [int(pending.sum()), int(active.sum())]
        assert torch.equal(s["counts"], want["counts"])
        assert int(s["tickets"].abs().sum()) == 0  # every block counter is left at zero


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,D,m", [(5, 7, 3), (6, 129, 5), (5, 4096 + 32, 4)])
def test_restart_starts_a_full_ring_over(ext, device, dtype, B, D, m):
    """restart=True (restarted Broyden): an active sample whose ring is full steps as an empty
    one would (H = -I), stores its pair in slot 0 and counts 1; a finished sample keeps its
    count, and so its m pairs (SHINE reads them); a ring not yet full is unaffected."""
    st = history_state(B, m, D, dtype, device, seed=_seed("restart", B, D, m, dtype))
    counts = [m, m, m - 1, 0, 2 * m + 1][:B] + [m] * (B - 5)
    st["npairs"].copy_(torch.tensor(counts))
    status = [Status.ACTIVE, Status.CONVERGED, Status.ACTIVE, Status.ACTIVE, Status.ACTIVE]
    st["status"].copy_(torch.tensor([int(s) for s in status][:B] + [int(Status.ACTIVE)] * (B - 5)))
    # The same samples with empty rings and no restart: what a restarted sample must match.
    fresh = clone_state(st)
    full = (st["npairs"] >= m) & (st["status"] == Status.ACTIVE)
    fresh["npairs"][full] = 0
    before = clone_state(st)
    want, got = clone_state(st), st
    for op, names in (("broyden_reduce", REDUCE_ARGS), ("broyden_expand_", EXPAND_ARGS)):
        getattr(ext, op)(*args_of(got, names), True)
        getattr(reference, op)(*args_of(want, names), True)
        getattr(reference, op)(*args_of(fresh, names), False)
    assert_states_match(got, want, before, dtype)
    for key in ("z", "dz", "proj", "scal", "npairs"):
        torch.testing.assert_close(want[key], fresh[key], rtol=0, atol=0)
    stored = want["scal"][:, VALID] != 0  # as the reduce above left it
    active = before["status"] == Status.ACTIVE
    expected = torch.where(active & stored, torch.where(full, 1, before["npairs"] + 1),
                           before["npairs"])
    assert torch.equal(got["npairs"].cpu(), expected.cpu())
    assert int(got["npairs"][1]) == m  # finished with a full ring: its pairs stay countable
    # Without restart the full ring's oldest pair is replaced instead: different steps.
    plain = clone_state(before)
    for op, names in (("broyden_reduce", REDUCE_ARGS), ("broyden_expand_", EXPAND_ARGS)):
        getattr(reference, op)(*args_of(plain, names))
    assert not torch.equal(plain["z"][0], want["z"][0])
