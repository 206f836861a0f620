"""Which rows f is evaluated on: the whole batch, or a power-of-two bucket of the active rows.

Compaction evaluates f only on the samples still active. Gathering a new set of rows (of z and of
every batched input of f) at every check costs a handful of ops and changes the shape f sees each
time. Instead, f runs on a *bucket*: the active rows padded with finished ones to a power of two,
gathered only when the active count falls to the next lower power of two of the batch. f then
runs on at most twice the active rows; the finished rows among them are frozen and their results
ignored, as between two checks. Within a bucket every iteration reuses the same index, inputs
and buffers, so the loop allocates nothing and a CUDA graph captured for it stays valid.

``compact="auto"`` compacts where it pays: on the CPU (f's cost follows its rows) whenever f has
inputs to gather; on a GPU, where f on fewer rows may cost the same (launch-bound) while the
gathers add work, the first shrink is timed against a full evaluation (CUDA events, read once
complete, without blocking) and compaction is dropped for the rest of the solve unless it was at
least :data:`MIN_GAIN` faster.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .._tree import map_tensors

# A compacted evaluation must be at least this much cheaper than a full one to keep compacting.
MIN_GAIN = 0.03


def bucket_size(n_active: int, batch: int) -> int:
    """Rows f runs on for ``n_active`` active samples: the smallest power of two that holds them,
    or the whole batch when that is no smaller."""
    p = 1 << max(0, n_active - 1).bit_length()
    return batch if p >= batch else p


def take_rows(x, rows: torch.Tensor, batch: int):
    """The ``rows`` of every batched tensor in ``x`` (dim 0 of size ``batch``), also inside lists,
    tuples (named too) and dicts; everything else is returned unchanged."""
    return map_tensors(
        lambda t: t.index_select(0, rows) if t.dim() >= 1 and t.shape[0] == batch else t, x)


def rows_first(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the samples in ``mask`` (in order), then the others, ``count`` in all (no sync)."""
    return torch.argsort((~mask).to(torch.uint8), stable=True)[:count]


@dataclass
class Bucket:
    """The rows of one stretch of evaluations.

    ``rows`` (None: the whole batch, in order) are the samples f sees, ``inputs`` f's inputs for
    them; ``gathered`` is the ``(size, D)`` buffer z's rows are gathered into (state dtype) and
    ``z_in`` what f is called with (a view of it, or of z itself, or a cast copy)."""

    rows: Optional[torch.Tensor]
    size: int
    inputs: tuple
    shape: tuple
    gathered: Optional[torch.Tensor]
    z_in: torch.Tensor
    cast: bool = False
    evaluations: int = field(default=0, compare=False)


class CompactionTimer:
    """Times one full and one compacted evaluation with CUDA events and says whether compacting
    pays (``decision``: None until both timings are complete)."""

    def __init__(self) -> None:
        self.full: Optional[tuple[torch.cuda.Event, torch.cuda.Event]] = None
        self.compacted: Optional[tuple[torch.cuda.Event, torch.cuda.Event]] = None
        self.decision: Optional[bool] = None
        self.times: Optional[tuple[float, float]] = None

    def wants(self, bucket: Bucket) -> bool:
        """Whether to time this evaluation: the second of the full batch (the first may pay for
        one-time setup) and the second of the first compacted bucket."""
        if self.decision is not None or bucket.evaluations != 1:
            return False
        return self.full is None if bucket.rows is None else self.compacted is None

    def start(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, bucket: Bucket, begin: torch.cuda.Event) -> None:
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        if bucket.rows is None:
            self.full = (begin, end)
        else:
            self.compacted = (begin, end)

    def decide(self) -> Optional[bool]:
        """True/False once both timings are complete (queried, never waited for)."""
        if self.decision is None and self.full and self.compacted \
                and self.full[1].query() and self.compacted[1].query():
            t_full = self.full[0].elapsed_time(self.full[1])
            t_comp = self.compacted[0].elapsed_time(self.compacted[1])
            self.times = (t_full, t_comp)
            self.decision = t_comp < (1 - MIN_GAIN) * t_full
        return self.decision
