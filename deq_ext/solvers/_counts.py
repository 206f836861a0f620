"""The loop's view of how many samples are pending and active, without waiting for the device.

The residual/status op writes the ``(pending, active)`` counts of the whole batch into a small
device tensor after every update. On a GPU, reading that tensor right away would block the host
until the GPU has finished everything queued so far, every iteration: the launch queue drains
and the GPU idles while the host issues the next iteration. Instead, after a check's update the
counts are copied without blocking into pinned host memory, and the host reads the copy made at
the *previous* check, which the GPU finished long ago in the steady state. Finished samples are
frozen, so deciding one check late changes no result: it costs at most one more check's worth of
masked iterations at the end (and rows that finished meanwhile stay in f's bucket until then).
On the CPU the op has finished when it returns, so the newest counts are read at once.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..status import ACTIVE_COUNT, PENDING_COUNT

# Checks by which the host's reads trail the device, per device type (others: 0).
LAG = {"cuda": 1}


class CountReader:
    """Reads the ``(pending, active)`` counts the residual op writes into ``counts``.

    Call :meth:`push` right after an update whose counts a later check will read, and
    :meth:`read` at the check: the counts of the push ``lag`` pushes back (None until there is
    one). On a GPU the copies go to pinned memory without blocking, and reading waits only for
    that (long finished) copy.
    """

    def __init__(self, counts: torch.Tensor) -> None:
        self.counts = counts
        self.lag = LAG.get(counts.device.type, 0)
        self.cuda = counts.device.type == "cuda"
        self.pushed = 0
        n = self.lag + 1
        self.slots = [torch.empty(counts.shape, dtype=counts.dtype, pin_memory=self.cuda)
                      for _ in range(n)] if self.lag else []
        self.events = [torch.cuda.Event() for _ in range(n)] if self.cuda and self.lag else []

    def push(self) -> None:
        """Start copying the counts just written (no wait)."""
        if self.lag:
            k = self.pushed % len(self.slots)
            self.slots[k].copy_(self.counts, non_blocking=self.cuda)
            if self.events:
                self.events[k].record()
        self.pushed += 1

    def read(self) -> Optional[tuple[int, int]]:
        """``(pending, active)`` as of the push ``lag`` pushes back, or None before it."""
        if self.pushed <= self.lag:
            return None
        if not self.lag:
            values = self.counts.tolist()
        else:
            k = (self.pushed - 1 - self.lag) % len(self.slots)
            if self.events:
                self.events[k].synchronize()  # long done in the steady state
            values = self.slots[k].tolist()
        return int(values[PENDING_COUNT]), int(values[ACTIVE_COUNT])
