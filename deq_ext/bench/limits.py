"""What a solve could take at best: the bandwidth floor of its passes and the Amdahl limit.

* **Bandwidth floor.** A Broyden iteration of an active sample moves its history through the
  two fused passes (:func:`.bandwidth.fused_bytes`); at the device's measured copy bandwidth those
  bytes take a time no implementation of the passes can beat out of memory. The solver's own time
  per iteration (total minus f) against that floor says how much is launch, bookkeeping and
  compaction cost rather than data movement. (A history that fits in a CPU cache can beat a floor
  taken from a copy that does not.)
* **Amdahl limit.** torchdeq's total time over deq_ext's time inside f: the speedup over torchdeq
  if deq_ext's solver cost nothing but its f evaluations.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .env import ratio


def passes_bytes(nstep: torch.Tensor, dim: int, memory: int, elem: int) -> int:
    """Bytes the two fused passes move over a whole solve, from each sample's step count.

    Sample b's step i (1-based) works on a ring holding ``min(i - 1, memory)`` pairs, so it moves
    ``elem * dim * (4 * k + 11)`` bytes (reduce: 2k history rows + dz, dg, g; expand: 2k rows +
    dz, dg, g, z, writes u, v, dz, z); converged samples are masked out and move nothing.
    """
    total = 0
    for n in nstep.tolist():
        n = int(n)
        full = max(n - memory, 0)  # steps at a full ring (k = memory)
        filling = n - full  # steps with k = 0, 1, ..., filling - 1 pairs
        pairs = filling * (filling - 1) // 2 + full * memory
        total += elem * dim * (4 * pairs + 11 * n)
    return total


def add_limits(solves: dict[str, dict[str, Any]], ratios: dict[str, Optional[float]],
               bandwidth: Optional[dict[str, Any]], ext: str, td: str) -> None:
    """Adds the floor figures to every solve with passes bytes (in place) and the Amdahl limit
    of row ``ext`` against row ``td`` to ``ratios``.

    Per solve: ``floor_s`` (its passes' bytes at the copy bandwidth of ``bandwidth``, when that
    section ran), ``floor_ms_per_iter`` and ``solver_over_floor`` (solver time / floor).
    """
    gbps = ((bandwidth or {}).get("copy") or {}).get("gbps")
    for s in solves.values():
        moved = s.get("passes_bytes")
        if not gbps or moved is None:
            continue
        s["floor_s"] = moved / (gbps * 1e9)
        if s.get("iterations"):
            s["floor_ms_per_iter"] = s["floor_s"] / s["iterations"] * 1e3
        s["solver_over_floor"] = ratio(s.get("solver_s"), s["floor_s"])
    if ext in solves and td in solves:
        ratios["amdahl_speedup_limit"] = ratio(solves[td]["total_s"], solves[ext]["f_s"])
    if ext in solves and "solver_over_floor" in solves[ext]:
        ratios["solver_over_floor"] = solves[ext]["solver_over_floor"]
