"""Bandwidth: the device copy vs the two fused passes of one Broyden iteration vs a torchdeq-style step."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Callable, Optional

import torch

import deq_ext
from deq_ext import _extension
from deq_ext.solvers._base import scratch_partials
from deq_ext.status import Status

from .config import BandwidthSizes, Config
from .env import copy_bandwidth, last_level_cache_bytes, median, progress, time_calls


def _history(cfg: Config, sizes: BandwidthSizes,
             history_dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """Random solver state with a full ring (k = m), all samples active; U and V in
    ``history_dtype`` (default: the state dtype)."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    dev, dt = cfg.torch_device, cfg.torch_dtype
    B, D, m = sizes.batch, sizes.dim, sizes.m

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=dt) * scale).to(dev).contiguous()

    # Scales keep the dot products O(1), so no value drifts towards overflow or denormals.
    hist = history_dtype or dt
    return {
        "U": rnd(B, m, D, scale=D ** -0.5).to(hist), "V": rnd(B, m, D, scale=D ** -0.5).to(hist),
        "dz": rnd(B, D), "dg": rnd(B, D), "g": rnd(B, D), "z": rnd(B, D),
    }


def fused_passes_time(cfg: Config, sizes: BandwidthSizes, active: Optional[int] = None,
                      ops: Any = None, history_dtype: Optional[torch.dtype] = None) -> float:
    """Median seconds of one ``broyden_reduce`` + ``broyden_expand_`` at a full ring.

    ``active``: how many samples are still iterating (the first ones; the others are
    CONVERGED and must cost nothing); all by default. ``ops``: what holds the two passes,
    the compiled ops (``torch.ops.deq_ext``) by default (``deq_ext.reference`` for its twin).
    ``history_dtype``: U and V stored narrower than the state (bfloat16, float16).
    """
    if ops is None:
        ops = _extension.ops()

    st = _history(cfg, sizes, history_dtype)
    dev, dt = cfg.torch_device, cfg.torch_dtype
    B, m = sizes.batch, sizes.m
    status = torch.zeros(B, dtype=torch.int64, device=dev)  # ACTIVE
    status[(B if active is None else active):] = int(Status.CONVERGED)
    npairs = torch.full((B,), m, dtype=torch.int64, device=dev)
    proj = torch.zeros(B, 3, m, dtype=dt, device=dev)
    scal = torch.zeros(B, 5, dtype=dt, device=dev)
    # The CUDA kernels' scratch, sized as a solve sizes it; the history is one chunk of m slots.
    partials = torch.zeros(scratch_partials(B, sizes.dim, 3 * m + 2), dtype=torch.float64,
                           device=dev)
    tickets = torch.zeros(B + 1, dtype=torch.int32, device=dev)
    U, V = [st["U"]], [st["V"]]
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
        ops.broyden_reduce(U, V, st["dz"], st["dg"], st["g"], status, npairs, proj, scal, partials,
                           tickets, m)
        # expand_ reads the valid flag reduce just wrote into scal.
        ops.broyden_expand_(U, V, st["dz"], st["dg"], st["g"], st["z"], proj, scal, status,
                            npairs, tickets, m)

    return median(time_calls(dev, body, reset, sizes.reps))


def torchdeq_matvecs() -> tuple[Callable, Callable, str]:
    """torchdeq's own matvec/rmatvec if importable, else the same einsums written here."""
    try:
        from torchdeq.solver.broyden import matvec, rmatvec
        return matvec, rmatvec, "torchdeq.solver.broyden.matvec/rmatvec"
    except ImportError:
        pass

    def own_matvec(Us: torch.Tensor, VTs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # (-I + U V^T) x with U (B, D, L), V^T (B, L, D)
        return -x + torch.einsum("bdl,bl->bd", Us, torch.einsum("bld,bd->bl", VTs, x))

    def own_rmatvec(Us: torch.Tensor, VTs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # x^T (-I + U V^T)
        return -x + torch.einsum("bl,bld->bd", torch.einsum("bd,bdl->bl", x, Us), VTs)

    return own_matvec, own_rmatvec, "einsum equivalent in deq_ext.bench"


def torchdeq_update(matvec: Callable, rmatvec: Callable, Us: torch.Tensor, VTs: torch.Tensor,
                    dx: torch.Tensor, dgx: torch.Tensor, gx: torch.Tensor, slot: int) -> torch.Tensor:
    """torchdeq's Broyden update: the new rank-1 pair into ring ``slot``, then the next step.

    Layout ``Us (B, D, m)``, ``VTs (B, m, D)``; returns ``-matvec(Us, VTs, gx)``.
    """
    vT = rmatvec(Us, VTs, dx)
    u = (dx - matvec(Us, VTs, dgx)) / torch.einsum("bd,bd->b", vT, dgx)[:, None]
    # torchdeq zeroes NaNs with boolean-mask assignment; keep that cost.
    vT[torch.isnan(vT)] = 0
    u[torch.isnan(u)] = 0
    VTs[:, slot] = vT
    Us[:, :, slot] = u
    return -matvec(Us, VTs, gx)


def torchdeq_step_time(cfg: Config, sizes: BandwidthSizes) -> tuple[float, str]:
    """Median seconds of one torchdeq-style Broyden update + move at a full ring.

    Same work as the two fused passes: new pair (rmatvec, matvec, denominator,
    NaN guards, store), next step (matvec) and ``z += step``, with torchdeq's
    layout ``Us (B, D, L)``, ``VTs (B, L, D)``.
    """
    matvec, rmatvec, source = torchdeq_matvecs()
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
        x.add_(torchdeq_update(matvec, rmatvec, Us, VTs, dx, dgx, gx, slot))

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
    history = 2 * sizes.batch * sizes.m * sizes.dim * cfg.torch_dtype.itemsize
    out["history_bytes"] = history
    if dev.type == "cpu":
        # A fraction measured on a history that fits in the cache says nothing about a solve.
        out["cache_bytes"] = last_level_cache_bytes()
        out["history_fits_in_cache"] = history <= out["cache_bytes"]
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

