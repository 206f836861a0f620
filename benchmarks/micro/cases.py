"""Sweep points, inputs, timed bodies and byte counts of the kernel microbenchmarks.

A :class:`Point` is one place of the sweep (device, B, D, m, dtype, converged fraction). A
:class:`Case` is what one benchmark times there: ``body()`` issues the op calls and nothing
else; ``reset()`` restores everything ``body()`` mutates and runs, untimed, before every
call, so that every timed call does the same work on the same values; ``nbytes`` is the
traffic of one call.

Bytes per call: ``s * B_active * D * rows``, with s the element size, B_active the samples
whose status is ACTIVE (converged samples must cost nothing) and ``rows`` the (B, D) rows
an op has to read or write per active sample with a full history ring (k = m pairs):

===================  ========  ===================================================
op                   rows      which
===================  ========  ===================================================
residual_status_     6         read fz, z, g; write g, dg, z_best (all improve here)
broyden_reduce       2m + 3    read U, V; dz, dg, g
broyden_expand_      2m + 8    read U, V; dz, dg, g, z; write u, v, dz, z
fixed_point_step_    3         read z, g; write z
anderson_store_      m + 4     read z, g; write X[slot], G[slot]; read G for the Gram row
anderson_mix_        2m + 1    read X, G; write z
broyden iteration    4m + 17   residual_status_ + reduce + expand (the last two:
                               ``deq_ext.bench.fused_bytes``)
anderson iteration   3m + 11   residual_status_ + store + mix
fixed_point iter.    9         residual_status_ + step
===================  ========  ===================================================

Per-sample terms of size O(m) or O(m^2) (proj, scal, Gram matrix, weights) are left out.
The copy bandwidth it is compared with counts 2 bytes moved per byte copied, as these rows do;
a copy also pays a write-allocate read of the destination, which in-place updates (z += step)
do not, so light in-place ops such as fixed_point_step_ can reach more than 1.0 of it.
The formula is the minimal traffic of the fused design and the same for every
implementation, so the GB/s of the reference twin and of torchdeq are effective figures
(bytes of the fused design / their time): ratios of GB/s are ratios of time. torchdeq has no
per-sample mask and works on all B samples whatever the fraction converged.

Inputs are fresh seeded random values (a seed per point), never all zeros, scaled so that
every dot product stays O(1) to O(sqrt(D)): U, V, G rows have norm about 1.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Optional, Sequence

import torch

import deq_ext
from deq_ext import Status, reference
from deq_ext.bench import BandwidthSizes, fused_bytes, torchdeq_matvecs, torchdeq_update
from deq_ext.solvers import scratch_partials

DEVICES = ("cpu", "cuda")
SIZE_SETS = ("tiny", "full")
IMPLS = ("compiled", "reference")

# Solver settings of the timed calls: nothing converges, stalls or diverges while timed.
TOL = 1e-30
STALL_PATIENCE = 0  # off
DIVERGE_RATIO = 1e6
TAU = 0.9  # fixed-point damping
BETA, LAM = 1.0, 1e-4  # Anderson mixing and ridge


# -- the sweep -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Point:
    """One place of the sweep; ``axis`` names the axis varied from the base point."""

    device: str
    batch: int
    dim: int
    m: int
    dtype: str
    converged: float  # fraction of samples with status CONVERGED
    axis: str = "base"

    @property
    def id(self) -> str:
        return (f"{self.device}-B{self.batch}-D{self.dim}-m{self.m}-{self.dtype}"
                f"-conv{self.converged:g}")

    @property
    def active(self) -> int:
        """Samples still iterating (ACTIVE)."""
        return self.batch - round(self.batch * self.converged)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


@dataclass(frozen=True)
class Sweep:
    """A base point and, per axis, the other values it takes (one axis at a time)."""

    base: dict
    axes: dict


# Full CPU sizes: the base history (U + V, 32 MiB in float32) is as big as the 32 MiB L3 of
# the development machine and the larger points spill out of it; the reference twin takes
# about 0.7 s per Broyden iteration at the base point, which bounds the sweep on 2 cores.
# Full CUDA sizes: docs/design.md's B=16, D=150*700, m=30. Tiny: awkward sizes (D=1, 129; m=1),
# seconds for every case on a CPU.
SWEEPS: dict[tuple[str, str], Sweep] = {
    ("full", "cpu"): Sweep(
        base=dict(batch=8, dim=32768, m=16, dtype="float32", converged=0.0),
        axes=dict(batch=(2, 16), dim=(4096, 65536), m=(4, 32), dtype=("float64",),
                  converged=(0.5, 0.875))),
    ("full", "cuda"): Sweep(
        base=dict(batch=16, dim=150 * 700, m=30, dtype="float32", converged=0.0),
        axes=dict(batch=(4, 64), dim=(8192, 4 * 150 * 700), m=(8, 60), dtype=("float64",),
                  converged=(0.5, 0.875))),
    ("tiny", "cpu"): Sweep(
        base=dict(batch=8, dim=96, m=4, dtype="float32", converged=0.0),
        axes=dict(batch=(1, 16), dim=(1, 129), m=(1, 6), dtype=("float64",),
                  converged=(0.5, 0.875))),
}
SWEEPS[("tiny", "cuda")] = SWEEPS[("tiny", "cpu")]


def points(sizes: str, device: str, uses_memory: bool) -> list[Point]:
    """The base point, then each axis varied alone (the m axis only where m matters)."""
    sweep = SWEEPS[(sizes, device)]
    out = [Point(device=device, **sweep.base)]
    for axis, values in sweep.axes.items():
        if axis == "m" and not uses_memory:
            continue
        out += [Point(device=device, **{**sweep.base, axis: v}, axis=axis) for v in values]
    return out


# -- what is timed -------------------------------------------------------------------------------

@dataclass
class Case:
    """One benchmark: the timed body, the untimed reset and the bytes of one call."""

    body: Callable[[], None]
    reset: Callable[[], None]
    nbytes: int
    rows: str  # the per-sample row count of the byte formula, e.g. "2m+3"


@dataclass(frozen=True)
class Kind:
    """A benchmarked op or iteration: how to build its case and whether m matters."""

    build: Callable[[Any, Point], Case]
    uses_memory: bool
    impls: tuple[str, ...] = IMPLS


def _seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def _restorer(views: Sequence[torch.Tensor]) -> Callable[[], None]:
    """A function that copies the current values of ``views`` back into them."""
    saved = [v.clone() for v in views]

    def reset() -> None:
        for v, s in zip(views, saved):
            v.copy_(s)

    return reset


def _chain(*resets: Callable[[], None]) -> Callable[[], None]:
    def reset() -> None:
        for r in resets:
            r()

    return reset


class _Inputs:
    """Seeded random tensors of one point, drawn on its device.

    On the device because the CUDA histories are hundreds of MiB: drawn on the host they
    would take seconds per case, far longer than the timing itself.
    """

    def __init__(self, p: Point, what: str) -> None:
        self.p = p
        self.gen = torch.Generator(p.torch_device).manual_seed(_seed(what, p))

    def randn(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        t = torch.randn(*shape, generator=self.gen, dtype=self.p.torch_dtype,
                        device=self.p.torch_device)
        return (t * scale).contiguous()

    def full(self, value: float, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return torch.full((self.p.batch,), value, dtype=dtype or self.p.torch_dtype,
                          device=self.p.torch_device)

    def status(self) -> torch.Tensor:
        """ACTIVE, except a seeded random choice of the converged fraction."""
        dev = self.p.torch_device
        st = torch.zeros(self.p.batch, dtype=torch.int64, device=dev)
        # The permutation on the generator's device: a CUDA generator cannot draw on the host.
        done = torch.randperm(self.p.batch, generator=self.gen, device=dev)
        st[done[: self.p.batch - self.p.active]] = int(Status.CONVERGED)
        return st


def residual_state(inp: _Inputs) -> dict[str, torch.Tensor]:
    """State of residual_status_: f(z) close to z, every best residual at inf (all improve)."""
    B, D = inp.p.batch, inp.p.dim
    z = inp.randn(B, D)
    dev = inp.p.torch_device
    m = inp.p.m
    return dict(
        z=z, fz=z + inp.randn(B, D, scale=0.1), g=inp.randn(B, D, scale=0.1),
        dg=inp.randn(B, D, scale=0.1), z_best=inp.randn(B, D),
        best_abs=inp.full(math.inf), best_rel=inp.full(math.inf),
        res_abs=inp.full(math.inf), res_rel=inp.full(math.inf), status=inp.status(),
        nstep=inp.full(0, torch.int64), nfev=inp.full(0, torch.int64),
        stall=inp.full(0, torch.int64), counts=torch.zeros(2, dtype=torch.int64, device=dev),
        # The CUDA kernels' scratch, sized for the largest op as a solve sizes it.
        partials=torch.zeros(scratch_partials(B, D, max(3 * m + 2, m), 2 * m * m + m),
                             dtype=torch.float64, device=dev),
        tickets=torch.zeros(B + 1, dtype=torch.int32, device=dev), m=m)


def broyden_state(inp: _Inputs) -> dict[str, torch.Tensor]:
    """Residual state plus a full ring of Broyden pairs and the reduction pass's output."""
    p = inp.p
    B, D, m = p.batch, p.dim, p.m
    st = residual_state(inp)
    # The history as one chunk of m slots (the list the ops take).
    st.update(U=[inp.randn(B, m, D, scale=D ** -0.5)], V=[inp.randn(B, m, D, scale=D ** -0.5)],
              dz=inp.randn(B, D, scale=0.1), npairs=inp.full(m, torch.int64))
    st["proj"], st["scal"] = reference.new_scratch(B, m, p.torch_dtype, p.torch_device)
    # expand_ reads what reduce wrote: fill proj/scal once, with the twin for every impl.
    reference.broyden_reduce(*(st[k] for k in REDUCE_ARGS))
    return st


def anderson_state(inp: _Inputs) -> dict[str, torch.Tensor]:
    """Residual state plus a full Anderson ring with its (consistent) Gram matrix."""
    p = inp.p
    B, D, m = p.batch, p.dim, p.m
    st = residual_state(inp)
    G = inp.randn(B, m, D, scale=D ** -0.5)
    gram = torch.bmm(G.double(), G.double().transpose(1, 2)).to(p.torch_dtype)
    st.update(X=[inp.randn(B, m, D)], G=[G], gram=gram.contiguous(),
              alpha=torch.full((B, m), 1.0 / m, dtype=p.torch_dtype, device=p.torch_device),
              fallback=inp.full(0, torch.int64), nhist=inp.full(m, torch.int64))
    return st


RESIDUAL_ARGS = ("fz", "z", "g", "dg", "z_best", "best_abs", "best_rel", "res_abs", "res_rel",
                 "status", "nstep", "nfev", "stall", "counts", "partials", "tickets")
RESIDUAL_MUTATES = RESIDUAL_ARGS[2:13]
REDUCE_ARGS = ("U", "V", "dz", "dg", "g", "status", "npairs", "proj", "scal", "partials",
               "tickets", "m")
EXPAND_ARGS = ("U", "V", "dz", "dg", "g", "z", "proj", "scal", "status", "npairs", "tickets", "m")
STORE_ARGS = ("X", "G", "gram", "z", "g", "alpha", "fallback", "status", "nhist", "partials",
              "tickets", "m")
MIX_ARGS = ("X", "G", "z", "alpha", "status", "nhist", "m")


def _bytes(p: Point, rows: int) -> int:
    return p.torch_dtype.itemsize * p.active * p.dim * rows


def _residual(ops: Any, st: dict) -> None:
    ops.residual_status_(*(st[k] for k in RESIDUAL_ARGS), TOL, False, STALL_PATIENCE,
                         DIVERGE_RATIO, True, True)


def _reduce(ops: Any, st: dict) -> None:
    ops.broyden_reduce(*(st[k] for k in REDUCE_ARGS))


def _expand(ops: Any, st: dict) -> None:
    ops.broyden_expand_(*(st[k] for k in EXPAND_ARGS))


def _store(ops: Any, st: dict) -> None:
    ops.anderson_store_(*(st[k] for k in STORE_ARGS), LAM)


def _mix(ops: Any, st: dict) -> None:
    ops.anderson_mix_(*(st[k] for k in MIX_ARGS), BETA)


def _fixed_point(ops: Any, st: dict) -> None:
    ops.fixed_point_step_(st["z"], st["g"], st["status"], TAU)


# The ring slot a call writes: npairs % m = nhist % m = 0 with the full ring above.
_SLOT = 0


def _residual_reset(st: dict) -> Callable[[], None]:
    return _restorer([st[k] for k in RESIDUAL_MUTATES])


def _expand_reset(st: dict) -> Callable[[], None]:
    return _restorer([st["U"][0][:, _SLOT], st["V"][0][:, _SLOT], st["dz"], st["z"], st["npairs"]])


def _store_reset(st: dict) -> Callable[[], None]:
    return _restorer([st["X"][0][:, _SLOT], st["G"][0][:, _SLOT], st["gram"], st["nhist"],
                      st["alpha"], st["fallback"]])


def _mix_reset(st: dict) -> Callable[[], None]:
    return _restorer([st["z"]])


def residual_status_case(ops: Any, p: Point) -> Case:
    st = residual_state(_Inputs(p, "residual"))
    return Case(lambda: _residual(ops, st), _residual_reset(st), _bytes(p, 6), "6")


def broyden_reduce_case(ops: Any, p: Point) -> Case:
    st = broyden_state(_Inputs(p, "broyden"))
    # reduce only writes proj and scal, which it fully overwrites: nothing to restore.
    return Case(lambda: _reduce(ops, st), lambda: None, _bytes(p, 2 * p.m + 3), "2m+3")


def broyden_expand_case(ops: Any, p: Point) -> Case:
    st = broyden_state(_Inputs(p, "broyden"))
    return Case(lambda: _expand(ops, st), _expand_reset(st), _bytes(p, 2 * p.m + 8), "2m+8")


def fixed_point_step_case(ops: Any, p: Point) -> Case:
    st = residual_state(_Inputs(p, "fixed_point"))
    return Case(lambda: _fixed_point(ops, st), _restorer([st["z"]]), _bytes(p, 3), "3")


def anderson_store_case(ops: Any, p: Point) -> Case:
    st = anderson_state(_Inputs(p, "anderson"))
    return Case(lambda: _store(ops, st), _store_reset(st), _bytes(p, p.m + 4), "m+4")


def anderson_mix_case(ops: Any, p: Point) -> Case:
    st = anderson_state(_Inputs(p, "anderson"))
    return Case(lambda: _mix(ops, st), _mix_reset(st), _bytes(p, 2 * p.m + 1), "2m+1")


def broyden_iteration_bytes(p: Point) -> int:
    """residual_status_ plus the two fused passes (bandwidth.py's formula for the latter)."""
    sizes = BandwidthSizes(batch=p.active, dim=p.dim, m=p.m, copy_mib=0, reps=0)
    return _bytes(p, 6) + fused_bytes(sizes, p.torch_dtype.itemsize)


def broyden_iteration_case(ops: Any, p: Point) -> Case:
    """What the Broyden driver issues per iteration outside f (see solvers/broyden.py)."""
    st = broyden_state(_Inputs(p, "broyden"))

    def body() -> None:
        _residual(ops, st)
        _reduce(ops, st)
        _expand(ops, st)

    reset = _chain(_residual_reset(st), _expand_reset(st))
    return Case(body, reset, broyden_iteration_bytes(p), "4m+17")


def anderson_iteration_case(ops: Any, p: Point) -> Case:
    st = anderson_state(_Inputs(p, "anderson"))

    def body() -> None:
        _residual(ops, st)
        _store(ops, st)
        _mix(ops, st)

    reset = _chain(_residual_reset(st), _store_reset(st), _mix_reset(st))
    return Case(body, reset, _bytes(p, 3 * p.m + 11), "3m+11")


def fixed_point_iteration_case(ops: Any, p: Point) -> Case:
    st = residual_state(_Inputs(p, "fixed_point"))

    def body() -> None:
        _residual(ops, st)
        _fixed_point(ops, st)

    reset = _chain(_residual_reset(st), _restorer([st["z"]]))
    return Case(body, reset, _bytes(p, 9), "9")


def torchdeq_broyden_iteration_case(p: Point) -> Case:
    """One iteration of torchdeq 0.1.0's broyden_solver outside f, on the same values.

    From f(x) on: g = f(x) - x, delta_x, delta_g, both residual norms, torchdeq's own
    ``update_state`` (lowest residual and iterate), the rank-1 update with its
    matvec/rmatvec and NaN guards, the next step ``-matvec(Us, VTs, g)`` and the move
    (``line_search`` with ``ls=False``). Not timed: the host read of the stop test.
    Layout ``Us (B, D, m)``, ``VTs (B, m, D)``, a full ring, every sample processed.
    """
    from torchdeq.solver.utils import init_solver_info, update_state

    matvec, rmatvec, _ = torchdeq_matvecs()
    st = broyden_state(_Inputs(p, "broyden"))
    Us = st["U"][0].transpose(1, 2).contiguous()
    VTs = st["V"][0]
    x, fz, gx = st["z"], st["fz"], st["g"]
    x_prev = x - st["dz"]
    restore_ring = _restorer([Us[:, :, _SLOT], VTs[:, _SLOT]])
    info: dict = {}

    def reset() -> None:
        restore_ring()
        # torchdeq starts every solve with fresh bookkeeping; update_state appends to it.
        trace, lowest, lowest_step = init_solver_info(p.batch, x.device)
        info.update(trace=trace, lowest=lowest, lowest_step=lowest_step, lowest_x=x_prev)

    def body() -> None:
        gx_new = fz - x
        dx, dgx = x - x_prev, gx_new - gx
        abs_diff = gx_new.norm(dim=1)
        rel_diff = abs_diff / ((gx_new + x).norm(dim=1) + 1e-9)
        info["lowest_x"] = update_state(info["lowest_x"], x, 1, "abs", abs_diff, rel_diff,
                                        info["trace"], info["lowest"], info["lowest_step"])
        info["x_next"] = x + torchdeq_update(matvec, rmatvec, Us, VTs, dx, dgx, gx_new, _SLOT)

    # torchdeq moves every sample: its bytes are still those of the fused design (B_active).
    return Case(body, reset, broyden_iteration_bytes(p), "4m+17")


def _with_torchdeq(build: Callable[[Any, Point], Case]) -> Callable[[Any, Point], Case]:
    """``ops`` None selects torchdeq (used for the Broyden iteration only)."""

    def pick(ops: Optional[Any], p: Point) -> Case:
        return torchdeq_broyden_iteration_case(p) if ops is None else build(ops, p)

    return pick


OPS: dict[str, Kind] = {
    "residual_status_": Kind(residual_status_case, uses_memory=False),
    "broyden_reduce": Kind(broyden_reduce_case, uses_memory=True),
    "broyden_expand_": Kind(broyden_expand_case, uses_memory=True),
    "fixed_point_step_": Kind(fixed_point_step_case, uses_memory=False),
    "anderson_store_": Kind(anderson_store_case, uses_memory=True),
    "anderson_mix_": Kind(anderson_mix_case, uses_memory=True),
}

ITERATIONS: dict[str, Kind] = {
    "broyden": Kind(_with_torchdeq(broyden_iteration_case), uses_memory=True,
                    impls=IMPLS + ("torchdeq",)),
    "anderson": Kind(anderson_iteration_case, uses_memory=True),
    "fixed_point": Kind(fixed_point_iteration_case, uses_memory=False),
}


@dataclass(frozen=True)
class Spec:
    """One benchmark to generate: kind name, implementation, point."""

    name: str
    impl: str
    point: Point

    @property
    def id(self) -> str:
        return f"{self.name}-{self.impl}-{self.point.id}"


def specs(kinds: dict[str, Kind], sizes: str, device: str) -> list[Spec]:
    """Every benchmark of ``kinds`` at these sizes on this device."""
    return [Spec(name, impl, pt)
            for name, kind in kinds.items()
            for pt in points(sizes, device, kind.uses_memory)
            for impl in kind.impls]


def ops_module(impl: str, device: str) -> Any:
    """What holds the ops ``impl`` names (None: torchdeq); raises if it cannot run here."""
    if impl == "reference":
        return reference
    if impl == "torchdeq":
        return None
    info = deq_ext.build_info()
    if not info.get("loaded"):
        raise RuntimeError(f"deq_ext._C is not loaded: {info.get('error')}")
    if device == "cuda" and not info.get("cuda"):
        raise RuntimeError("a CUDA device is present but deq_ext was built without CUDA kernels")
    # The dispatcher ops' default overloads: the cheapest call, the one the solvers make.
    return SimpleNamespace(**{name: getattr(torch.ops.deq_ext, name).default for name in OPS})


__all__ = ["Case", "Kind", "ITERATIONS", "OPS", "Point", "Spec", "SWEEPS", "ops_module",
           "points", "specs", "broyden_iteration_bytes"]
