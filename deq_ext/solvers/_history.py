"""A method's history (Broyden's U, V; Anderson's X, G), allocated as the steps need it.

The history is a ring of ``m`` slots per sample (``m``: the method's ``memory``). Allocating all
``m`` slots up front makes every solve pay for ``max_iter`` steps, also the ones that converge in
a few. Here the ring lives in *chunks*: ``(B, C, D)`` tensors of ``C`` more slots each (the last
one fewer when C does not divide m, so a full ring holds exactly m), added when the loop is about
to use a slot beyond them (:meth:`History.reserve`). A chunk is never
moved, so growing copies nothing and never holds two versions of the history at once; a solve
that takes k steps holds ``ceil(k / C)`` chunks, whatever ``max_iter`` is. Slot ``j`` of the ring
is row ``j % C`` of chunk ``j // C`` (``csrc/common/history.h``). The kernels take the list of
chunks and ``m``; the capacity is only what is allocated so far.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ._memory import ensure_fits

# Slots per chunk by default: small enough that memory follows the steps, large enough that a
# long solve needs few chunks. A ring longer than MAX_CHUNKS * this gets longer chunks.
DEFAULT_CHUNK = 8
# The kernels' limit on the number of chunks (kMaxHistoryChunks in csrc/common/history.h).
MAX_CHUNKS = 64


def chunk_size(m: int, chunk: Optional[int] = None) -> int:
    """Slots per chunk for a ring of ``m``: ``chunk`` (default :data:`DEFAULT_CHUNK`), at most m,
    and large enough that m fits in :data:`MAX_CHUNKS` chunks."""
    c = DEFAULT_CHUNK if chunk is None else chunk
    return max(min(c, m), math.ceil(m / MAX_CHUNKS))


class History:
    """Named ring buffers of ``m`` slots of ``(B, D)`` rows, allocated in chunks of ``C`` slots.

    Args:
        names: the buffers (e.g. ``("U", "V")``), grown together.
        B, D: batch size and values per row.
        m: ring length (the method's ``memory``).
        dtype, device: of every chunk.
        chunk: slots per chunk (see :func:`chunk_size`).
    """

    def __init__(self, names: tuple[str, ...], B: int, D: int, m: int, dtype: torch.dtype,
                 device: torch.device, chunk: Optional[int] = None) -> None:
        self.names, self.B, self.D, self.m = names, B, D, m
        self.dtype, self.device = dtype, device
        self.C = chunk_size(m, chunk)
        self.chunks: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    @property
    def capacity(self) -> int:
        """Slots allocated so far (at most m)."""
        return sum(t.shape[1] for t in self.chunks[self.names[0]])

    def reserve(self, slots: int, held: int = 0) -> bool:
        """Allocate chunks until ``min(m, slots)`` slots exist; True when any was added (the
        chunks' addresses changed: a captured CUDA graph must be captured again). ``held``: the
        bytes the solve holds besides the history (for the memory check)."""
        need = min(self.m, slots)
        if self.capacity >= need:
            return False
        sizes = []  # slots of each new chunk
        capacity = self.capacity
        while capacity < need:
            sizes.append(min(self.C, self.m - capacity))
            capacity += sizes[-1]
        ensure_fits(self.bytes_of(capacity - self.capacity), self.device,
                    f"{len(sizes)} more history chunk(s)", held=held + self.nbytes(),
                    worst=self.bytes_at(self.m))
        for slots in sizes:
            for name in self.names:
                self.chunks[name].append(torch.zeros(self.B, slots, self.D, dtype=self.dtype,
                                                     device=self.device))
        return True

    def __getitem__(self, name: str) -> list[torch.Tensor]:
        return self.chunks[name]

    def full(self, name: str) -> torch.Tensor:
        """The allocated slots of ``name`` as one ``(B, min(capacity, m), D)`` tensor (a copy)."""
        rows = self.chunks[name]
        if not rows:
            return torch.zeros(self.B, 0, self.D, dtype=self.dtype, device=self.device)
        return torch.cat(rows, dim=1)[:, :self.m]

    def nbytes(self) -> int:
        """Bytes allocated now, over every buffer."""
        return sum(t.nbytes for rows in self.chunks.values() for t in rows)

    def bytes_of(self, slots: int) -> int:
        """Bytes of ``slots`` ring slots over every buffer."""
        per_slot = self.B * self.D * self.dtype.itemsize
        return len(self.names) * slots * per_slot

    def bytes_at(self, slots: int) -> int:
        """Bytes the buffers hold once ``slots`` slots are in use (``m`` for a full ring)."""
        return self.bytes_of(min(self.m, math.ceil(slots / self.C) * self.C))
