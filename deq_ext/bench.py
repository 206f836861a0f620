"""Side-by-side benchmark of deq_ext's Broyden solver: ``python -m deq_ext.bench``.

Two parts, both measured in one run so that every ratio compares figures taken
on the same machine at the same time:

1. **Solves.** A batch with heterogeneous convergence (per-sample contraction
   rho_b from 0.3 to 0.95) is solved by deq_ext's compiled solver, by the same
   driver on the pure-PyTorch reference twin, and by torchdeq's
   ``broyden_solver``. f is wrapped in a timer, so each solve splits into the
   time spent inside f and the solver's own time (total minus f time).
2. **Bandwidth.** The device copy bandwidth is measured and compared with the
   bytes the two fused passes of one solver iteration move
   (``_C.broyden_reduce`` + ``_C.broyden_expand_``), and one iteration of those
   passes is timed against one torchdeq-style update (its matvec/rmatvec
   einsums) over the same history.

The targets from the issue are checked from the measured figures and reported
as pass/fail; which of them apply depends on the device (see ``TARGETS``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

import deq_ext

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

RHO_MIN, RHO_MAX = 0.3, 0.95  # defaults of --rho-min/--rho-max
BLOCK = 128  # width of the block-diagonal weight of f

SOLVER_EXT = "deq_ext"
SOLVER_REF = "deq_ext[reference]"
SOLVER_TD = "torchdeq"
SOLVER_FULL = "deq_ext[no compact]"


@dataclass(frozen=True)
class Target:
    """One performance target of the issue: ``value <op> threshold`` on ``devices``."""

    name: str
    description: str
    op: str  # "<=" or ">="
    threshold: float
    devices: tuple[str, ...]


TARGETS = (
    Target("solver_overhead_ratio", "deq_ext solver time / torchdeq solver time", "<=", 0.5, ("cpu",)),
    Target("total_speedup", "torchdeq total time / deq_ext total time", ">=", 2.0, ("cpu",)),
    Target("compaction_rows_saved", "1 - f rows with compaction / f rows without", ">=", 0.40,
           ("cpu", "cuda")),
    Target("fused_bandwidth_fraction", "fused passes GB/s / device copy GB/s", ">=", 0.70, ("cuda",)),
    Target("step_speedup", "torchdeq-style step time / fused passes time", ">=", 3.0, ("cuda",)),
)


@dataclass(frozen=True)
class BandwidthSizes:
    """Sizes of the bandwidth section: history ``(batch, m, dim)`` and the copy size."""

    batch: int
    dim: int
    m: int
    copy_mib: int
    reps: int


@dataclass(frozen=True)
class Config:
    """Everything that determines a run (resolved from the command line)."""

    device: str
    method: str
    dtype: str
    batch: int
    dim: int
    max_iter: int
    tol: float
    rho_min: float
    rho_max: float
    memory: int
    repeat: int
    quick: bool
    compact: bool
    seed: int
    torchdeq: bool
    reference: bool
    bandwidth: bool
    out: Optional[str]
    bw: BandwidthSizes

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


def _bandwidth_sizes(device: str, quick: bool) -> BandwidthSizes:
    """Sizes from the issue on CUDA; on CPU a history that still spills out of the caches."""
    if quick:
        return BandwidthSizes(batch=2, dim=1024, m=8, copy_mib=4, reps=5)
    if device.startswith("cuda"):
        return BandwidthSizes(batch=16, dim=150 * 700, m=30, copy_mib=256, reps=30)
    return BandwidthSizes(batch=8, dim=32768, m=30, copy_mib=64, reps=15)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        prog="python -m deq_ext.bench",
        description=(
            "Time deq_ext's batched Broyden solver against torchdeq's broyden_solver and the "
            "pure-PyTorch reference twin on a batch with heterogeneous convergence "
            f"(per-sample contraction {RHO_MIN}..{RHO_MAX} by default), and measure the fused passes "
            "against the device copy bandwidth. Ratios are taken within the same run."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto",
                   help="'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N'")
    p.add_argument("--method", choices=("broyden", "anderson", "fixed_point"), default="broyden",
                   help="deq_ext method, timed against torchdeq's counterpart (broyden_solver, "
                        "anderson_solver, fixed_point_iter); the bandwidth section is Broyden's")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="dtype of z and of the solver state")
    p.add_argument("--batch", type=int, default=None, help="batch size B (default 32; --quick: 4)")
    p.add_argument("--dim", type=int, default=None,
                   help="values per sample D (default 8192; --quick: 256)")
    p.add_argument("--max-iter", type=int, default=None,
                   help="solver steps at most (default 60; --quick: 30)")
    p.add_argument("--tol", type=float, default=1e-4, help="absolute-residual tolerance (stop_mode 'abs')")
    p.add_argument("--rho-min", type=float, default=RHO_MIN,
                   help="contraction factor of the fastest-converging sample")
    p.add_argument("--rho-max", type=float, default=RHO_MAX,
                   help="contraction factor of the slowest-converging sample (< 1)")
    p.add_argument("--memory", type=int, default=None,
                   help="history size m; torchdeq gets the same (LBFGS_thres / m) "
                        "(default: max-iter for broyden, 5 for anderson)")
    p.add_argument("--repeat", type=int, default=None,
                   help="timed rounds, solvers interleaved in each round; medians are reported "
                        "(default 3; --quick: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the problem and bandwidth tensors")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes for a CI smoke run (seconds, not minutes)")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="write the results as JSON to PATH (parent directories are created)")
    p.add_argument("--no-torchdeq", action="store_true", help="skip torchdeq (no ratios then)")
    p.add_argument("--no-reference", action="store_true", help="skip the reference-twin solver")
    p.add_argument("--no-bandwidth", action="store_true", help="skip the bandwidth section")
    p.add_argument("--no-compact", action="store_true",
                   help="let deq_ext evaluate f on the whole batch, as torchdeq does, instead of "
                        "only on the samples still active")
    return p


def resolve_config(ns: argparse.Namespace) -> Config:
    """Fill in the size defaults (which depend on --quick) and check the values."""
    device = ns.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    quick = bool(ns.quick)
    batch = ns.batch if ns.batch is not None else (4 if quick else 32)
    dim = ns.dim if ns.dim is not None else (256 if quick else 8192)
    max_iter = ns.max_iter if ns.max_iter is not None else (30 if quick else 60)
    memory = ns.memory if ns.memory is not None else (5 if ns.method == "anderson" else max_iter)
    repeat = ns.repeat if ns.repeat is not None else (1 if quick else 3)
    for name, value in (("batch", batch), ("dim", dim), ("max-iter", max_iter),
                        ("memory", memory), ("repeat", repeat)):
        if value < 1:
            raise SystemExit(f"--{name} must be >= 1, got {value}")
    if not (ns.tol > 0 and math.isfinite(ns.tol)):
        raise SystemExit(f"--tol must be a positive number, got {ns.tol}")
    if not 0 < ns.rho_min <= ns.rho_max < 1:
        raise SystemExit(f"need 0 < --rho-min <= --rho-max < 1, got {ns.rho_min}, {ns.rho_max}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but no CUDA device is available")
    return Config(device=device, method=ns.method, dtype=ns.dtype, batch=batch, dim=dim, max_iter=max_iter,
                  tol=float(ns.tol), rho_min=ns.rho_min, rho_max=ns.rho_max, memory=memory, repeat=repeat, quick=quick,
                  compact=not ns.no_compact, seed=ns.seed, torchdeq=not ns.no_torchdeq,
                  reference=not ns.no_reference,
                  bandwidth=not ns.no_bandwidth and ns.method == "broyden", out=ns.out,
                  bw=_bandwidth_sizes(device, quick))


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    """Wait for queued kernels, so that host clocks measure device work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def progress(msg: str) -> None:
    """A progress line on stderr (stdout carries only the table)."""
    print(f"[deq_ext.bench] {msg}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    if num is None or den is None or not den or math.isnan(num) or math.isnan(den):
        return None
    return num / den


# --------------------------------------------------------------------------------------------
# The problem: a contractive f with a per-sample contraction factor
# --------------------------------------------------------------------------------------------

def _block_size(dim: int) -> int:
    """Width of W: the largest divisor of dim up to BLOCK; dense W for awkward small dims."""
    block = max(d for d in range(1, min(dim, BLOCK) + 1) if dim % d == 0)
    if block < 16 and dim <= 4096:
        return dim  # a dense (D, D) W keeps f mixing for small awkward D
    return block


class Problem:
    """``f(z) = rho_b * tanh(z_blocks @ W) + x_b`` with ``||W||_2 = 1``.

    tanh is 1-Lipschitz and W has spectral norm 1, so sample b is a
    contraction with factor at most rho_b: the samples converge at very
    different rates, which is what separates per-sample stopping from
    whole-batch stopping.
    """

    def __init__(self, cfg: Config) -> None:
        gen = torch.Generator().manual_seed(cfg.seed)
        dev, dt = cfg.torch_device, cfg.torch_dtype
        B, D = cfg.batch, cfg.dim
        self.block = _block_size(D)
        w = torch.randn(self.block, self.block, generator=gen, dtype=torch.float64)
        w = w / torch.linalg.matrix_norm(w, ord=2)
        self.W = w.to(device=dev, dtype=dt)
        self.x = torch.randn(B, D, generator=gen, dtype=torch.float64).to(device=dev, dtype=dt)
        self.rho = torch.linspace(cfg.rho_min, cfg.rho_max, B, dtype=torch.float64).to(device=dev, dtype=dt)
        self.z0 = torch.zeros(B, D, device=dev, dtype=dt)

    def f(self, z: torch.Tensor, x: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
        """f on any subset of rows (x, rho are that subset's rows)."""
        n = z.shape[0]
        y = torch.tanh(z.reshape(n, -1, self.block) @ self.W).reshape(n, -1)
        return rho[:, None] * y + x

    def f_batch(self, z: torch.Tensor) -> torch.Tensor:
        """f on the whole batch (closes over the inputs, as torchdeq's f must)."""
        return self.f(z, self.x, self.rho)

    def residual(self, z: torch.Tensor) -> torch.Tensor:
        """``||f(z) - z||`` per sample, in float64 (untimed, not counted as an evaluation)."""
        z = z.reshape(self.z0.shape)
        return (self.f_batch(z) - z).double().norm(dim=1)


class TimedF:
    """Wraps f: accumulates the time spent inside it, its calls and the rows it evaluated."""

    def __init__(self, f: Callable[..., torch.Tensor], device: torch.device) -> None:
        self.f, self.device = f, device
        self.reset()

    def reset(self) -> None:
        self.seconds, self.calls, self.rows = 0.0, 0, 0

    def __call__(self, z: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        # Synchronize on both sides so that queued solver kernels are not billed to f.
        sync(self.device)
        t0 = time.perf_counter()
        out = self.f(z, *args)
        sync(self.device)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        self.rows += int(z.shape[0])
        return out


# --------------------------------------------------------------------------------------------
# The solvers under test
# --------------------------------------------------------------------------------------------

Runner = Callable[[Problem, Config, TimedF], tuple[torch.Tensor, torch.Tensor]]
"""Solves the problem with f = the timed wrapper; returns (z, iterations per sample)."""


def _method_options(cfg: Config) -> dict[str, Any]:
    return {} if cfg.method == "fixed_point" else {"memory": cfg.memory}


def _run_deq_ext(use_reference: bool, compact: bool) -> Runner:
    def run(problem: Problem, cfg: Config, timed: TimedF) -> tuple[torch.Tensor, torch.Tensor]:
        opts = dict(method=cfg.method, max_iter=cfg.max_iter, tol=cfg.tol, stop_mode="abs",
                    use_reference=use_reference, **_method_options(cfg))
        if compact:
            # x and rho as batched inputs: f is then only evaluated on the active samples.
            res = deq_ext.solve(timed, problem.z0, inputs=(problem.x, problem.rho), **opts)
        else:
            res = deq_ext.solve(lambda z: timed(z, problem.x, problem.rho), problem.z0,
                                compact=False, **opts)
        return res.z, res.nstep
    return run


def _run_torchdeq(problem: Problem, cfg: Config, timed: TimedF) -> tuple[torch.Tensor, torch.Tensor]:
    from torchdeq.solver import anderson_solver, broyden_solver, fixed_point_iter

    f = lambda z: timed(z, problem.x, problem.rho)  # noqa: E731
    common = dict(max_iter=cfg.max_iter, tol=cfg.tol, stop_mode="abs")
    if cfg.method == "broyden":
        z, _, _ = broyden_solver(f, problem.z0, LBFGS_thres=cfg.memory, **common)
    elif cfg.method == "anderson":
        z, _, _ = anderson_solver(f, problem.z0, m=cfg.memory, **common)
    else:
        z, _, _ = fixed_point_iter(f, problem.z0, **common)
    # The whole batch iterates together: every sample took the loop's step count
    # (one evaluation before the loop, one per step, no line search).
    steps = torch.full((cfg.batch,), timed.calls - 1, dtype=torch.int64)
    return z, steps


def torchdeq_available() -> bool:
    try:
        from torchdeq.solver import anderson_solver, broyden_solver, fixed_point_iter  # noqa: F401
    except ImportError:
        return False
    return True


def select_solvers(cfg: Config) -> dict[str, Runner]:
    """The solvers to run, in the order they are run in each round."""
    solvers: dict[str, Runner] = {SOLVER_EXT: _run_deq_ext(use_reference=False, compact=cfg.compact)}
    if cfg.compact:
        # The same solver evaluating f on the whole batch: what compaction saves.
        solvers[SOLVER_FULL] = _run_deq_ext(use_reference=False, compact=False)
    if cfg.reference:
        solvers[SOLVER_REF] = _run_deq_ext(use_reference=True, compact=cfg.compact)
    if cfg.torchdeq:
        if torchdeq_available():
            solvers[SOLVER_TD] = _run_torchdeq
        else:
            progress("torchdeq is not importable: skipping it (pip install torchdeq)")
    return solvers


def solve_once(runner: Runner, problem: Problem, cfg: Config) -> dict[str, float]:
    """One timed solve: total, f and solver time, f calls/rows, steps and the outcome."""
    device = cfg.torch_device
    timed = TimedF(problem.f, device)
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        z, steps = runner(problem, cfg, timed)
    sync(device)
    total = time.perf_counter() - t0
    with torch.no_grad():
        res = problem.residual(z)
    steps = steps.double()
    return {
        "total_s": total,
        "f_s": timed.seconds,
        "solver_s": total - timed.seconds,
        "f_calls": timed.calls,
        "f_rows": timed.rows,
        "nstep_mean": float(steps.mean()),
        "nstep_max": float(steps.max()),
        "converged": int((res < cfg.tol).sum()),
        "max_abs_residual": float(res.max()),
    }


def bench_solvers(cfg: Config, problem: Problem) -> dict[str, dict[str, Any]]:
    """Warm up every solver once, then run ``repeat`` interleaved rounds; medians per figure."""
    solvers = select_solvers(cfg)
    for name, runner in solvers.items():
        progress(f"warm-up {name}")
        solve_once(runner, problem, cfg)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in solvers}
    for r in range(cfg.repeat):
        for name, runner in solvers.items():
            fig = solve_once(runner, problem, cfg)
            runs[name].append(fig)
            progress(f"round {r + 1}/{cfg.repeat} {name:<18} total {fig['total_s']:.3f} s, "
                     f"f {fig['f_s']:.3f} s, {fig['f_calls']} calls, "
                     f"{fig['converged']}/{cfg.batch} converged")
    return {name: {**{k: median([run[k] for run in rs]) for k in rs[0]}, "runs": rs}
            for name, rs in runs.items()}


def solver_ratios(solves: dict[str, dict[str, Any]]) -> dict[str, Optional[float]]:
    """Every ratio relative to torchdeq, for the compiled solver and for the reference twin."""
    td = solves.get(SOLVER_TD)
    out: dict[str, Optional[float]] = {}
    for prefix, name in (("", SOLVER_EXT), ("reference_", SOLVER_REF)):
        mine = solves.get(name)
        if mine is None:
            continue
        get = (lambda k: td[k]) if td else (lambda k: None)
        out[prefix + "solver_overhead_ratio"] = _ratio(mine["solver_s"], get("solver_s"))
        out[prefix + "total_speedup"] = _ratio(get("total_s"), mine["total_s"])
        out[prefix + "f_calls_ratio"] = _ratio(mine["f_calls"], get("f_calls"))
        out[prefix + "f_rows_ratio"] = _ratio(mine["f_rows"], get("f_rows"))
        out[prefix + "f_time_ratio"] = _ratio(mine["f_s"], get("f_s"))
    full = solves.get(SOLVER_FULL)
    if full is not None:
        kept = _ratio(solves[SOLVER_EXT]["f_rows"], full["f_rows"])
        out["compaction_rows_saved"] = None if kept is None else 1 - kept
        out["compaction_total_speedup"] = _ratio(full["total_s"], solves[SOLVER_EXT]["total_s"])
    return out


# --------------------------------------------------------------------------------------------
# Bandwidth: device copy vs the two fused passes vs a torchdeq-style step
# --------------------------------------------------------------------------------------------

def time_calls(device: torch.device, body: Callable[[], None], reset: Callable[[], None],
               reps: int, warmup: int = 2) -> list[float]:
    """Seconds of ``body()`` per call (``reset()`` runs before each call, untimed)."""
    for _ in range(warmup):
        reset()
        body()
    if device.type == "cuda":
        # Events time the device work only; the host does not wait between calls.
        marks = []
        for _ in range(reps):
            reset()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            body()
            end.record()
            marks.append((start, end))
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) / 1e3 for s, e in marks]
    times = []
    for _ in range(reps):
        reset()
        t0 = time.perf_counter()
        body()
        times.append(time.perf_counter() - t0)
    return times


def copy_bandwidth(device: torch.device, mib: int, reps: int) -> dict[str, float]:
    """Bytes read + written per second by ``dst.copy_(src)`` of a ``mib`` MiB tensor."""
    n = mib * 2**20 // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    t = median(time_calls(device, lambda: dst.copy_(src), lambda: None, reps, warmup=3))
    moved = 2 * src.numel() * src.element_size()
    return {"bytes": moved, "seconds": t, "gbps": moved / t / 1e9}


def _history(cfg: Config, sizes: BandwidthSizes) -> dict[str, torch.Tensor]:
    """Random solver state with a full ring (k = m), all samples active."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    dev, dt = cfg.torch_device, cfg.torch_dtype
    B, D, m = sizes.batch, sizes.dim, sizes.m

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=dt) * scale).to(dev).contiguous()

    # Scales keep the dot products O(1), so no value drifts towards overflow or denormals.
    return {
        "U": rnd(B, m, D, scale=D ** -0.5), "V": rnd(B, m, D, scale=D ** -0.5),
        "dz": rnd(B, D), "dg": rnd(B, D), "g": rnd(B, D), "z": rnd(B, D),
    }


def fused_passes_time(cfg: Config, sizes: BandwidthSizes) -> Optional[float]:
    """Median seconds of one ``broyden_reduce`` + ``broyden_expand_`` at a full ring."""
    from deq_ext import _C

    st = _history(cfg, sizes)
    dev, dt = cfg.torch_device, cfg.torch_dtype
    B, m = sizes.batch, sizes.m
    status = torch.zeros(B, dtype=torch.int64, device=dev)  # all ACTIVE
    npairs = torch.full((B,), m, dtype=torch.int64, device=dev)
    proj = torch.zeros(B, 3, m, dtype=dt, device=dev)
    scal = torch.zeros(B, 5, dtype=dt, device=dev)
    # expand_ rewrites ring slot npairs % m = 0, dz and z, and bumps npairs: restore them
    # before each call so every timed call does the same full-ring work on the same values.
    keep = {"u0": st["U"][:, 0].clone(), "v0": st["V"][:, 0].clone(),
            "dz": st["dz"].clone(), "z": st["z"].clone()}

    def reset() -> None:
        st["U"][:, 0].copy_(keep["u0"])
        st["V"][:, 0].copy_(keep["v0"])
        st["dz"].copy_(keep["dz"])
        st["z"].copy_(keep["z"])
        npairs.fill_(m)

    def body() -> None:
        _C.broyden_reduce(st["U"], st["V"], st["dz"], st["dg"], st["g"], status, npairs, proj, scal)
        # expand_ reads the valid flag reduce just wrote into scal.
        _C.broyden_expand_(st["U"], st["V"], st["dz"], st["dg"], st["g"], st["z"], proj, scal,
                           status, npairs)

    return median(time_calls(dev, body, reset, sizes.reps))


def _torchdeq_matvecs() -> tuple[Callable, Callable, str]:
    """torchdeq's own matvec/rmatvec if importable, else the same einsums written here."""
    try:
        from torchdeq.solver.broyden import matvec, rmatvec
        return matvec, rmatvec, "torchdeq.solver.broyden.matvec/rmatvec"
    except ImportError:
        pass

    def matvec(Us: torch.Tensor, VTs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # (-I + U V^T) x with U (B, D, L), V^T (B, L, D)
        return -x + torch.einsum("bdl,bl->bd", Us, torch.einsum("bld,bd->bl", VTs, x))

    def rmatvec(Us: torch.Tensor, VTs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # x^T (-I + U V^T)
        return -x + torch.einsum("bl,bld->bd", torch.einsum("bd,bdl->bl", x, Us), VTs)

    return matvec, rmatvec, "einsum equivalent in deq_ext.bench"


def torchdeq_step_time(cfg: Config, sizes: BandwidthSizes) -> tuple[float, str]:
    """Median seconds of one torchdeq-style Broyden update + move at a full ring.

    Same work as the two fused passes: new pair (rmatvec, matvec, denominator,
    NaN guards, store), next step (matvec) and ``z += step``, with torchdeq's
    layout ``Us (B, D, L)``, ``VTs (B, L, D)``.
    """
    matvec, rmatvec, source = _torchdeq_matvecs()
    st = _history(cfg, sizes)
    Us = st["U"].transpose(1, 2).contiguous()
    VTs = st["V"]
    dx, dgx, gx, x = st["dz"], st["dg"], st["g"], st["z"]
    slot = 0
    keep = {"u": Us[:, :, slot].clone(), "v": VTs[:, slot].clone(), "x": x.clone()}

    def reset() -> None:
        Us[:, :, slot].copy_(keep["u"])
        VTs[:, slot].copy_(keep["v"])
        x.copy_(keep["x"])

    def body() -> None:
        vT = rmatvec(Us, VTs, dx)
        u = (dx - matvec(Us, VTs, dgx)) / torch.einsum("bd,bd->b", vT, dgx)[:, None]
        # torchdeq zeroes NaNs with boolean-mask assignment; keep that cost.
        vT[torch.isnan(vT)] = 0
        u[torch.isnan(u)] = 0
        VTs[:, slot] = vT
        Us[:, :, slot] = u
        x.add_(-matvec(Us, VTs, gx))

    return median(time_calls(cfg.torch_device, body, reset, sizes.reps)), source


def fused_bytes(sizes: BandwidthSizes, elem: int) -> int:
    """Bytes the two passes move per iteration at k = m: s * B * D * (4m + 11).

    reduce reads 2m history rows + dz, dg, g; expand reads 2m rows + dz, dg, g, z
    and writes u, v, dz, z.
    """
    return elem * sizes.batch * sizes.dim * (4 * sizes.m + 11)


def bench_bandwidth(cfg: Config) -> dict[str, Any]:
    """Copy bandwidth, fused-pass throughput and the torchdeq-style step, same sizes."""
    sizes = cfg.bw
    dev = cfg.torch_device
    out: dict[str, Any] = {"sizes": asdict(sizes)}
    progress(f"bandwidth: device copy of {sizes.copy_mib} MiB")
    out["copy"] = copy_bandwidth(dev, sizes.copy_mib, max(sizes.reps, 5))
    info = deq_ext.build_info()
    if not info.get("loaded"):
        out["fused_skipped"] = f"compiled extension not loaded: {info.get('error')}"
    elif dev.type == "cuda" and not info.get("cuda"):
        out["fused_skipped"] = "deq_ext was built without CUDA kernels"
    else:
        progress(f"bandwidth: fused passes B={sizes.batch} D={sizes.dim} m={sizes.m}")
        t = fused_passes_time(cfg, sizes)
        moved = fused_bytes(sizes, cfg.torch_dtype.itemsize)
        gbps = moved / t / 1e9
        out["fused"] = {"seconds": t, "bytes": moved, "gbps": gbps,
                        "fraction_of_copy": gbps / out["copy"]["gbps"]}
    progress("bandwidth: torchdeq-style step")
    t_td, source = torchdeq_step_time(cfg, sizes)
    out["torchdeq_step"] = {"seconds": t_td, "ops": source}
    if "fused" in out:
        out["step_speedup"] = t_td / out["fused"]["seconds"]
    return out


# --------------------------------------------------------------------------------------------
# Targets, environment, report
# --------------------------------------------------------------------------------------------

def check_targets(ratios: dict[str, Optional[float]], bandwidth: Optional[dict[str, Any]],
                  device: torch.device) -> list[dict[str, Any]]:
    """Every target with its measured value; ``passed`` is None when it could not be measured."""
    values: dict[str, Optional[float]] = {
        "solver_overhead_ratio": ratios.get("solver_overhead_ratio"),
        "total_speedup": ratios.get("total_speedup"),
        "compaction_rows_saved": ratios.get("compaction_rows_saved"),
        "fused_bandwidth_fraction": (bandwidth or {}).get("fused", {}).get("fraction_of_copy"),
        "step_speedup": (bandwidth or {}).get("step_speedup"),
    }
    checks = []
    for t in TARGETS:
        v = values[t.name]
        passed = None if v is None else (v <= t.threshold if t.op == "<=" else v >= t.threshold)
        checks.append({"name": t.name, "description": t.description, "value": v, "op": t.op,
                       "threshold": t.threshold, "devices": list(t.devices),
                       "applies": device.type in t.devices, "passed": passed})
    return checks


def targets_met(checks: list[dict[str, Any]]) -> Optional[bool]:
    """True when every target that applies on this device passed; None if one was not measured."""
    applicable = [c["passed"] for c in checks if c["applies"]]
    if any(p is None for p in applicable):
        return None
    return all(applicable)


def _load_average() -> Optional[list[float]]:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model with its core and torch thread counts."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 0
    return f"{_cpu_name()} ({cores} cores, {torch.get_num_threads()} torch threads)"


def versions() -> dict[str, Any]:
    """Versions of everything that shapes the figures."""
    try:
        from importlib.metadata import version
        td: Optional[str] = version("torchdeq")
    except Exception:  # not installed, or no metadata
        td = None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "deq_ext": deq_ext.__version__,
            "torchdeq": td, "deq_ext_build": deq_ext.build_info()}


def _fmt(v: Optional[float], spec: str = ".3f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_table(results: dict[str, Any]) -> str:
    """The human-readable report (ratios and target checks last)."""
    cfg = results["config"]
    lines = [
        f"deq_ext.bench  {results['timestamp']}",
        f"device: {results['device']}",
        f"torch {results['versions']['torch']} (cuda {results['versions']['torch_cuda']}), "
        f"deq_ext {results['versions']['deq_ext']}, torchdeq {results['versions']['torchdeq']}; "
        f"load average at start {results.get('load_average_start')}",
        f"problem: B={cfg['batch']} D={cfg['dim']} {cfg['dtype']} on {cfg['device']}, "
        f"f = rho_b*tanh(z@W)+x_b (W {results['problem']['block']}x{results['problem']['block']}, "
        f"||W||=1), rho {cfg['rho_min']}..{cfg['rho_max']}",
        f"solve: {cfg['method']} max_iter={cfg['max_iter']} tol={cfg['tol']:g} (abs) memory={cfg['memory']} "
        f"compact={cfg['compact']}; medians of {cfg['repeat']} interleaved round(s) after one warm-up",
        "",
    ]
    head = (f"{'solver':<20}{'total s':>9}{'f s':>9}{'solver s':>10}{'f calls':>9}"
            f"{'f rows':>8}{'nstep mean/max':>16}{'converged':>11}{'max |f(z)-z|':>14}")
    lines += [head, "-" * len(head)]
    for name, s in results["solves"].items():
        lines.append(
            f"{name:<20}{s['total_s']:>9.3f}{s['f_s']:>9.3f}{s['solver_s']:>10.3f}"
            f"{s['f_calls']:>9.0f}{s['f_rows']:>8.0f}"
            f"{s['nstep_mean']:>10.1f}/{s['nstep_max']:<5.0f}"
            f"{int(s['converged']):>6d}/{cfg['batch']:<4d}{s['max_abs_residual']:>14.2e}")
    bw = results.get("bandwidth")
    if bw:
        z = bw["sizes"]
        lines += ["", f"bandwidth (B={z['batch']} D={z['dim']} m={z['m']} {cfg['dtype']}, "
                      f"median of {z['reps']})"]
        c = bw["copy"]
        lines.append(f"  device copy ({z['copy_mib']} MiB)      {c['gbps']:>9.1f} GB/s")
        if "fused" in bw:
            fu = bw["fused"]
            lines.append(f"  fused reduce+expand_       {fu['gbps']:>9.1f} GB/s  "
                         f"{fu['seconds'] * 1e3:8.3f} ms/iter  ({fu['fraction_of_copy']:.0%} of copy; "
                         f"{fu['bytes'] / 2**20:.1f} MiB/iter)")
        else:
            lines.append(f"  fused passes skipped: {bw['fused_skipped']}")
        td = bw["torchdeq_step"]
        lines.append(f"  torchdeq-style step        {'':>14}  {td['seconds'] * 1e3:8.3f} ms/iter  "
                     f"({td['ops']})")
    r = results["ratios"]
    lines += ["", "ratios vs torchdeq (same run)"]
    rows = [
        ("deq_ext solver overhead (solver s / torchdeq's)", r.get("solver_overhead_ratio")),
        ("deq_ext total speedup (torchdeq total / deq_ext's)", r.get("total_speedup")),
        ("deq_ext f calls / torchdeq's", r.get("f_calls_ratio")),
        ("deq_ext f rows / torchdeq's", r.get("f_rows_ratio")),
        ("deq_ext f rows saved by compaction (vs no compact)", r.get("compaction_rows_saved")),
        ("deq_ext total speedup from compaction", r.get("compaction_total_speedup")),
        ("reference twin solver overhead", r.get("reference_solver_overhead_ratio")),
        ("reference twin total speedup", r.get("reference_total_speedup")),
        ("reference twin f rows / torchdeq's", r.get("reference_f_rows_ratio")),
        ("fused step speedup (torchdeq-style step / fused)", (bw or {}).get("step_speedup")),
    ]
    lines += [f"  {label:<52}{_fmt(v):>8}" for label, v in rows if label.startswith("deq") or v is not None]
    lines += ["", "targets"]
    for t in results["targets"]:
        verdict = "n/a" if t["passed"] is None else ("PASS" if t["passed"] else "FAIL")
        scope = "" if t["applies"] else f"  (informational: a target on {'/'.join(t['devices'])} only)"
        lines.append(f"  {t['name']:<26}{_fmt(t['value']):>8} {t['op']} {t['threshold']:<5g}"
                     f"{verdict:>6}{scope}")
    return "\n".join(lines)


def write_json(results: dict[str, Any], path: str) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(results, indent=2, default=str) + "\n")


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the benchmark, print the table, optionally write JSON; returns the results."""
    args = sys.argv[1:] if argv is None else list(argv)
    cfg = resolve_config(build_parser().parse_args(args))
    device = cfg.torch_device
    torch.manual_seed(cfg.seed)
    problem = Problem(cfg)
    results: dict[str, Any] = {
        "device": device_name(device),
        "versions": versions(),
        "command": " ".join(["python -m deq_ext.bench", *map(shlex.quote, args)]).strip(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": {k: v for k, v in asdict(cfg).items() if k != "bw"},
        "problem": {"block": problem.block, "rho_min": cfg.rho_min, "rho_max": cfg.rho_max,
                    "f": "rho_b * tanh(reshape(z, (B, D/block, block)) @ W) + x_b, ||W||_2 = 1"},
    }
    # Other processes on the machine skew every figure; record how busy it was.
    results["load_average_start"] = _load_average()
    t0 = time.perf_counter()
    results["solves"] = bench_solvers(cfg, problem)
    results["ratios"] = solver_ratios(results["solves"])
    results["bandwidth"] = bench_bandwidth(cfg) if cfg.bandwidth else None
    results["targets"] = check_targets(results["ratios"], results["bandwidth"], device)
    results["targets_met"] = targets_met(results["targets"])
    results["wall_s"] = time.perf_counter() - t0
    results["load_average_end"] = _load_average()
    print(format_table(results), flush=True)
    if cfg.out:
        write_json(results, cfg.out)
        progress(f"wrote {cfg.out}")
    return results


if __name__ == "__main__":
    main()
