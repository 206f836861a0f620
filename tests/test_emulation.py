"""The CUDA kernels on the CPU emulation (deq_ext._C_emu): schedules, whole solves, float32 sums.

The op-by-op comparisons with the reference run in test_broyden_ops.py and test_anderson_ops.py
(their ``cuda-emu`` cases). Here: every op gives the same bits under every thread
schedule (a race would show up as a difference), whole solves through the emulated
kernels agree with the CPU kernels, and float32 state takes the same per-sample
decisions as the CPU twin (both accumulate in double).
"""

from __future__ import annotations

import math

import pytest
import torch

import deq_ext
from deq_ext import _extension
from deq_ext.status import DEN, VALID, Status

from .conftest import emulation_or_skip
from .helpers import clone_state, history_state, states_equal
from .op_cases import OP_CASES, SIZES, make_state, run_op
from .problems import contraction

pytestmark = pytest.mark.cuda_emu

SIZE_IDS = [f"cuda-emu-B{b}-D{d}-m{m}" for b, d, m in SIZES]
SCHEDULES = [("forward", 0), ("reverse", 0), ("random", 1), ("random", 2)]


def _reduce(ops, st):
    run_op(ops, "broyden_reduce", st)


@pytest.fixture(scope="module")
def emu():
    return emulation_or_skip()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("op", sorted(OP_CASES))
@pytest.mark.parametrize("B,D,m", SIZES, ids=SIZE_IDS)
def test_every_op_gives_the_same_bits_under_every_schedule(emu, B, D, m, op, dtype):
    start = make_state(op, B, D, m, dtype, 7)
    results = []
    for name, seed in SCHEDULES:
        emu.set_schedule(name, seed)
        st = clone_state(start)
        launches = emu.stats()["launches"]
        run_op(_extension.emulated_ops(), op, st)
        assert emu.stats()["launches"] > launches, "no kernel was launched"
        results.append(st)
    for (name, seed), st in zip(SCHEDULES[1:], results[1:]):
        differ = states_equal(st, results[0])
        assert not differ, (f"{op}: {differ} differ between the forward schedule and {name} "
                            f"(seed {seed})")


def test_schedule_is_reported_and_checked(emu):
    emu.set_schedule("reverse", 3)
    assert emu.schedule() == ("reverse", 3)
    with pytest.raises(RuntimeError, match="schedule must be"):
        emu.set_schedule("sideways")


def _solve(method, ops, dtype, **options):
    f = contraction(6, 40, dtype=dtype, seed=4, rho_min=0.2, rho_max=0.97)
    z0 = torch.zeros(6, 40, dtype=dtype)
    with _extension.use_ops(ops):
        return deq_ext.solve(f, z0, method=method, max_iter=60, tol=1e-9 if dtype == torch.float64
                             else 1e-5, **options)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("method,options", [
    ("broyden", {}), ("broyden", {"memory": 4, "line_search": True}),
    ("anderson", {"memory": 5}), ("fixed_point", {"tau": 0.9})],
    ids=["cuda-emu-broyden", "cuda-emu-broyden-ring-ls", "cuda-emu-anderson", "cuda-emu-fixed_point"])
def test_whole_solve_through_emulated_kernels_matches_cpu_kernels(emu, method, options, dtype):
    emu.set_schedule("random", 11)
    launches = emu.stats()["launches"]
    got = _solve(method, _extension.emulated_ops(), dtype, **options)
    assert emu.stats()["launches"] > launches
    want = _solve(method, _extension.ops(), dtype, **options)
    assert torch.equal(got.status, want.status)
    assert torch.equal(got.nstep, want.nstep)
    assert torch.equal(got.nfev, want.nfev)
    assert (got.status == Status.CONVERGED).all()
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.z, want.z, **tol)


def test_float32_denominator_that_cancels_in_float_is_judged_in_double(emu):
    """v.dg = a.b - dz.dg is 2^-31 in exact (and double) arithmetic, 0 in float sums:
    the CPU twin stores the pair, and so must the CUDA kernels."""
    st = history_state(1, 2, 2, torch.float32, "cpu", seed=1)
    st["status"].fill_(int(Status.ACTIVE))
    st["npairs"].fill_(1)  # one stored pair: u_0, v_0
    for chunk in st["U"] + st["V"]:
        chunk.zero_()
    st["U"][0][0, 0] = torch.tensor([1.0, 0.0])
    st["V"][0][0, 0] = torch.tensor([1.0, 2.0 ** -30])
    st["dz"][0] = torch.tensor([1.0, 2.0 ** -31])
    st["dg"][0] = torch.tensor([1.0, 1.0])
    # a = u.dz = 1, b = v.dg = 1 + 2^-30, dz.dg = 1 + 2^-31: den = a b - dz.dg = 2^-31.
    cpu, emulated = clone_state(st), clone_state(st)
    _reduce(_extension.ops(), cpu)
    _reduce(_extension.emulated_ops(), emulated)
    assert float(cpu["scal"][0, VALID]) == 1.0
    assert float(emulated["scal"][0, VALID]) == 1.0
    assert float(emulated["scal"][0, DEN]) == float(cpu["scal"][0, DEN]) == 2.0 ** -31


def test_float32_denominator_below_float_range_is_judged_in_double(emu):
    """dz.dg = 1e-40 underflows float's normal range but not double's: the pair is usable."""
    st = history_state(1, 3, 4, torch.float32, "cpu", seed=2)
    st["status"].fill_(int(Status.ACTIVE))
    st["npairs"].zero_()
    st["dz"].fill_(1e-20)
    st["dg"].fill_(0.5e-20)
    cpu, emulated = clone_state(st), clone_state(st)
    _reduce(_extension.ops(), cpu)
    _reduce(_extension.emulated_ops(), emulated)
    assert float(cpu["scal"][0, VALID]) == float(emulated["scal"][0, VALID]) == 1.0
    assert math.isclose(float(emulated["scal"][0, DEN]), float(cpu["scal"][0, DEN]), rel_tol=1e-6)


@pytest.mark.parametrize("name,expected", [
    ("too_wide", r"kernel too_wide launched at \S*emu_bindings.cpp:\d+: block \(2048, 1, 1\) "
                 r"exceeds the CUDA limit"),
    ("return_before_barrier", r"kernel return_before_barrier launched at \S*emu_bindings.cpp:\d+: "
                              r"48 thread\(s\) of block \(0, 0, 0\) returned .* wait at "
                              r"__syncthreads \S*emu_bindings.cpp:\d+"),
])
def test_an_emulation_error_reaches_python_as_a_runtime_error(emu, name, expected):
    with pytest.raises(RuntimeError, match=expected):
        emu.launch_broken_kernel(name)
    # The runtime is usable again after an aborted launch.
    st = history_state(2, 3, 40, torch.float64, "cpu", seed=3)
    _reduce(_extension.emulated_ops(), st)
