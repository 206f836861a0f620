"""Configuration of ``python -m deq_ext.bench``: the command line and the resolved run settings."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .env import last_level_cache_bytes

RHO_MIN, RHO_MAX = 0.3, 0.95  # defaults of --rho-min/--rho-max
BLOCK = 128  # width of the block-diagonal weight of the solver-bound f
WIDTH, HIDDEN = 1024, 4096  # token width and hidden width of the MLP f (a transformer's 4x)
REPEAT = 5  # interleaved timed rounds by default

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
    problem: str
    width: int
    hidden: int
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
    sweep: bool
    out: Optional[str]
    plot: Optional[str]
    bw: BandwidthSizes

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


def _bandwidth_sizes(device: str, quick: bool) -> BandwidthSizes:
    """Sizes from the issue on CUDA; on CPU a history at least twice the last-level cache.

    A history that fits in the cache would measure the cache, not the memory the passes stream
    from in a real solve. The copy reference moves as many bytes as the history holds.
    """
    if quick:
        return BandwidthSizes(batch=2, dim=1024, m=8, copy_mib=4, reps=5)
    if device.startswith("cuda"):
        return BandwidthSizes(batch=16, dim=150 * 700, m=30, copy_mib=256, reps=30)
    batch, m, elem = 16, 30, 4
    per_dim = 2 * batch * m * elem  # U and V bytes per unit of D
    dim = max(32768, -(-2 * last_level_cache_bytes() // per_dim))
    dim = -(-dim // 1024) * 1024
    return BandwidthSizes(batch=batch, dim=dim, m=m, copy_mib=-(-dim * per_dim // 2**20), reps=9)


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
    p.add_argument("--problem", choices=("mlp", "block"), default="mlp",
                   help="f: 'mlp' a position-wise MLP whose cost is that of a DEQ layer (the "
                        "headline), 'block' a nearly free block-diagonal tanh (solver-bound)")
    p.add_argument("--width", type=int, default=WIDTH,
                   help="mlp: values per token (the largest divisor of --dim up to this)")
    p.add_argument("--hidden", type=int, default=HIDDEN, help="mlp: hidden width of the MLP")
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
                   help="timed rounds, solvers interleaved in each round; each solver's median "
                        f"round is reported with the spread (default {REPEAT}; --quick: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the problem and bandwidth tensors")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes for a CI smoke run (seconds, not minutes)")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="write the results as JSON to PATH (parent directories are created)")
    p.add_argument("--no-torchdeq", action="store_true", help="skip torchdeq (no ratios then)")
    p.add_argument("--no-reference", action="store_true", help="skip the reference-twin solver")
    p.add_argument("--no-bandwidth", action="store_true", help="skip the bandwidth section")
    p.add_argument("--no-sweep", action="store_true",
                   help="skip the time-per-iteration against active-fraction section")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="PNG of time per iteration against the fraction of active samples "
                        "(default: --out with .png when --out is given)")
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
    repeat = ns.repeat if ns.repeat is not None else (1 if quick else REPEAT)
    width = 64 if quick and ns.width == WIDTH else ns.width
    hidden = 256 if quick and ns.hidden == HIDDEN else ns.hidden
    for name, value in (("batch", batch), ("dim", dim), ("max-iter", max_iter),
                        ("memory", memory), ("repeat", repeat), ("width", width),
                        ("hidden", hidden)):
        if value < 1:
            raise SystemExit(f"--{name} must be >= 1, got {value}")
    if not (ns.tol > 0 and math.isfinite(ns.tol)):
        raise SystemExit(f"--tol must be a positive number, got {ns.tol}")
    if not 0 < ns.rho_min <= ns.rho_max < 1:
        raise SystemExit(f"need 0 < --rho-min <= --rho-max < 1, got {ns.rho_min}, {ns.rho_max}")
    plot = ns.plot
    if plot is None and ns.out:
        plot = str(Path(ns.out).with_suffix(".png"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but no CUDA device is available")
    return Config(device=device, method=ns.method, problem=ns.problem, width=width,
                  hidden=hidden, dtype=ns.dtype, batch=batch, dim=dim, max_iter=max_iter,
                  tol=float(ns.tol), rho_min=ns.rho_min, rho_max=ns.rho_max, memory=memory,
                  repeat=repeat, quick=quick,
                  compact=not ns.no_compact, seed=ns.seed, torchdeq=not ns.no_torchdeq,
                  reference=not ns.no_reference,
                  bandwidth=not ns.no_bandwidth and ns.method == "broyden",
                  sweep=not ns.no_sweep and ns.method == "broyden", out=ns.out, plot=plot,
                  bw=_bandwidth_sizes(device, quick))

