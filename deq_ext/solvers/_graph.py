"""``graph=True``: the solver loop replayed as CUDA graphs.

An eager iteration issues a dozen launches (the method's ops, f's own kernels, the gathers of a
compacted bucket) from Python; with a small f the GPU waits on the host. A CUDA graph records
``check_every`` iterations of the loop body (:meth:`MaskedSolve.iterate`: f, or the adjoint's
vector-Jacobian product, included) once and replays them with one launch. The host reads the
asynchronous counts between replays (:mod:`._counts`) and captures again only when the rows f
sees change (a new bucket, :mod:`._buckets`), after one eager warm-up iteration of that bucket
on a side stream (f's lazy initialisations happen outside the capture). The whole history is
allocated before the first capture, so its chunks never move under a captured graph. Iterations
whose iterate ``record`` asks for, and the last few that do not fill a replay, run eagerly.

Replays run the same kernels on the same buffers as the eager loop: results are the same bits.

What f must satisfy to be captured (else capture fails with :class:`GraphCaptureError`):
static shapes for a given number of rows; no reads from the device (``.item()``, ``.tolist()``,
printing a tensor, data-dependent control flow); only CUDA tensors; random numbers drawn on the
GPU (a dropout mask drawn outside f and passed as an input is the same at every replay, as the
adjoint needs anyway); parameters updated in place by the optimizer (the usual case), never
rebound between steps of the same solve.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from ._base import MaskedSolve
    from ._buckets import Bucket


class GraphCaptureError(RuntimeError):
    """Capturing the solver loop as a CUDA graph failed (graph=True)."""


REQUIREMENTS = ("static shapes for a given number of rows, no device-to-host reads (.item(), "
                ".tolist(), printing, data-dependent Python control flow), only CUDA tensors, "
                "random masks drawn outside f and passed as inputs, parameters updated in place")


class GraphRunner:
    """Runs a solve's iterations as replays of a captured graph of ``check_every`` iterations."""

    def __init__(self, solve: "MaskedSolve") -> None:
        self.solve = solve
        self.iterations = solve.check_every
        self.bucket: Optional["Bucket"] = None
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.pool = torch.cuda.graph_pool_handle()
        self.side = torch.cuda.Stream(device=solve.device)
        self.captures = self.replays = 0
        self.records = self.rows = 0  # residual updates and f rows of one replay
        solve.prepare(solve.max_iter)  # the whole history: its addresses never change

    def advance(self, bucket: "Bucket", it: int) -> int:
        """Run the iterations from ``it`` on: a replay (with a warm-up iteration and a capture
        first when the bucket is new). Returns how many ran; 0 when the next iteration must run
        eagerly (a recorded step, or fewer than a replay's iterations left)."""
        s = self.solve
        fresh = bucket is not self.bucket
        first = it + (1 if fresh else 0)
        last = first + self.iterations
        if last > s.max_iter or any(k in s.snapshot_slot for k in range(it + 1, last + 1)):
            return 0
        if fresh:
            self._warm_up(bucket)
            self._capture(bucket)
        assert self.graph is not None
        self.graph.replay()
        self.replays += 1
        s.n_records += self.records
        s.f_rows += self.rows
        hook = getattr(s.f, "on_replay", None)
        if hook is not None:
            hook(self.iterations)
        return last - it

    def _warm_up(self, bucket: "Bucket") -> None:
        """One eager iteration of a new bucket on a side stream, as CUDA graphs require."""
        s = self.solve
        self.side.wait_stream(torch.cuda.current_stream(s.device))
        with torch.cuda.stream(self.side):
            s.iterate(bucket)
        torch.cuda.current_stream(s.device).wait_stream(self.side)

    def _capture(self, bucket: "Bucket") -> None:
        s = self.solve
        self.graph, self.bucket = None, None  # the old bucket's graph is not replayed again
        graph = torch.cuda.CUDAGraph()
        records, rows = s.n_records, s.f_rows
        s.capturing = True
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                for _ in range(self.iterations):
                    s.iterate(bucket)
        except Exception as exc:
            raise GraphCaptureError(
                f"deq_ext: capturing the solver loop as a CUDA graph failed ({type(exc).__name__}: "
                f"{exc}). graph=True needs an f with {REQUIREMENTS}; pass graph=False to run "
                f"this f eagerly") from exc
        finally:
            s.capturing = False
            # Capturing runs nothing: what the captured Python counted, each replay does.
            self.records, self.rows = s.n_records - records, s.f_rows - rows
            s.n_records, s.f_rows = records, rows
        self.graph, self.bucket = graph, bucket
        self.captures += 1

    def close(self) -> None:
        """Drop the captured graph (its private memory goes back to the caching allocator)."""
        self.graph, self.bucket = None, None
