"""A DEQ solved and differentiated a few samples at a time (the layer's ``chunk=N``).

What a DEQ training step holds at its peak grows with the rows a solve works on at once: the
solver's workspace (Broyden's history above all), f's transients, and in the backward pass the
application of f at z* that the adjoint solve's vector-Jacobian products go through, kept from
the forward pass. With ``chunk=N`` none of them holds more than N samples:

* forward: the samples are solved N at a time (each solve's workspace is freed before the next
  starts), and f is applied at z* without keeping a graph;
* backward: chunk after chunk, f is applied again at that chunk's z* with grad (recomputed, as
  gradient checkpointing does), the chunk's adjoint system is solved through it, and the
  solution is sent to the inputs and the parameters before the next chunk is recorded.

Every sample's fixed point and adjoint iterates only depend on its own rows (f must be row-wise,
as compaction already requires), so the results are those of the whole-batch solve up to
rounding. The cost is one more application of f per step (the recomputation) and, on a GPU,
smaller batches per kernel.

The backward pass differentiates f's output explicitly with respect to f's inputs, the leaves
f's own operations reach (its parameters), and the tensors f uses that were computed before it
was called (a weight normalized or dropped once per pass): their gradients are summed over the
chunks and sent through their graph once (:class:`FGraph`). All are found on the first chunk's
application of f in the forward pass, so ``torch.autograd.grad`` reaches them as it would
without chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch.autograd.graph import GradientEdge

from ._tree import map_tensors
from .adjoint import reusable_backward
from .result import SolverResult

AUTO = "auto"
# chunk="auto" splits a batch in AUTO_CHUNKS chunks on the CPU when its state holds at least
# AUTO_MIN_VALUES values. Measured on the paper-sized transformer and TrellisNet, batch 15
# (python -m benchmarks.memory_table and benchmarks.chunk_cost): 0.50x and 0.73x the whole
# batch's peak, at 1.02x and 0.96x its step time. Smaller states are left whole: their memory
# is no concern, and each chunk's solve pays the loop's fixed costs again. On CUDA the whole
# batch until the cost of smaller kernels is measured there (tools/gpu_check.sh records it).
AUTO_CHUNKS = 4
AUTO_MIN_VALUES = 2**20


def check_chunk(chunk: Any) -> Union[int, str, None]:
    """``chunk`` as the layer takes it: ``"auto"``, None (the whole batch) or an integer >= 1."""
    if chunk is None or chunk == AUTO:
        return chunk
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk must be 'auto', None (the whole batch at once) or an integer "
                         f">= 1 (samples per solve), got {chunk!r}")
    return chunk


def auto_chunk(batch: int, values_per_sample: int, device: torch.device) -> Optional[int]:
    """Samples per solve under ``chunk="auto"`` (None: the whole batch)."""
    if device.type != "cpu" or batch * values_per_sample < AUTO_MIN_VALUES:
        return None
    return math.ceil(batch / AUTO_CHUNKS)


def chunk_bounds(batch: int, chunk: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each chunk of at most ``chunk`` samples, in order."""
    return [(s, min(s + chunk, batch)) for s in range(0, batch, chunk)]


def _batched(t: torch.Tensor, batch: int) -> bool:
    return t.dim() >= 1 and t.shape[0] == batch


def rows_of(x: Any, start: int, stop: int, batch: int) -> Any:
    """Rows ``start:stop`` of every tensor in ``x`` batched on dim 0 (views, no copy)."""
    return map_tensors(lambda t: t[start:stop] if _batched(t, batch) else t, x)


def _cat_padded(traces: list[torch.Tensor]) -> torch.Tensor:
    """``(b, T_i)`` traces concatenated on dim 0, the shorter ones repeating their last column
    (as a finished sample's trace does)."""
    width = max(t.shape[1] for t in traces)
    padded = [t if t.shape[1] == width else
              torch.cat([t, t[:, -1:].expand(-1, width - t.shape[1])], dim=1) for t in traces]
    return torch.cat(padded)


def joined(values: list[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    """The chunks' per-sample tensors concatenated in order (None if a chunk has none)."""
    present = [v for v in values if v is not None]
    return torch.cat(present) if len(present) == len(values) else None


def summed(values: list[Optional[int]]) -> Optional[int]:
    """The chunks' counts added up (None if a chunk has none)."""
    present = [v for v in values if v is not None]
    return sum(present) if len(present) == len(values) else None


def cat_results(parts: list[SolverResult]) -> SolverResult:
    """The result of a batch solved in chunks, from the chunks' results (in order)."""
    def cat(name: str) -> torch.Tensor:
        return torch.cat([getattr(r, name) for r in parts])

    def trace(name: str) -> Optional[torch.Tensor]:
        traces = [getattr(r, name) for r in parts]
        return None if any(t is None for t in traces) else _cat_padded(traces)

    recorded = None
    if all(r.recorded is not None for r in parts):
        recorded = [torch.cat(states) for states in zip(*[r.recorded or [] for r in parts])]
    return SolverResult(
        z=cat("z"), abs_residual=cat("abs_residual"), rel_residual=cat("rel_residual"),
        nstep=cat("nstep"), nfev=cat("nfev"), status=cat("status"),
        abs_trace=trace("abs_trace"), rel_trace=trace("rel_trace"),
        fallbacks=joined([r.fallbacks for r in parts]), recorded=recorded,
        f_rows=summed([r.f_rows for r in parts]))


def solve_in_chunks(solve_rows: Callable[[torch.Tensor, tuple], SolverResult], z0: torch.Tensor,
                    inputs: tuple, chunk: int) -> SolverResult:
    """``solve_rows(z0_rows, input_rows)`` on each chunk in turn, the results concatenated."""
    B = z0.shape[0]
    return cat_results([solve_rows(z0[s:e], rows_of(inputs, s, e, B))
                        for s, e in chunk_bounds(B, chunk)])


def graph_leaves(out: Any, known: list[torch.Tensor]) -> list[torch.Tensor]:
    """The leaves that require grad which the graph of ``out`` (a tensor, or a node of a graph)
    reaches, other than ``known`` (found through their AccumulateGrad nodes), in a stable
    order."""
    skip = {id(t) for t in known}
    leaves: dict[int, torch.Tensor] = {}
    stack, seen = [out.grad_fn if isinstance(out, torch.Tensor) else out], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            if id(variable) not in skip:
                leaves.setdefault(id(variable), variable)
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return list(leaves.values())


def next_node_number() -> int:
    """The sequence number autograd gives the next node this thread creates: nodes numbered
    below it were made before (autograd numbers them in order, per thread)."""
    node = torch.zeros((), requires_grad=True).clone().grad_fn
    assert node is not None  # (called with grad enabled)
    return node._sequence_nr() + 1


@dataclass
class FGraph:
    """What the backward pass differentiates one application of f with respect to.

    ``params``: the leaves f's own operations reach (its parameters). ``edges``: where f's graph
    enters a graph made before f was called (a weight computed once per pass and captured by f,
    e.g. a weight-normalized or dropped one); the chunks' gradients are summed at these edges
    and sent through that graph once, to ``behind``, the leaves it reaches (instead of going
    through it once per chunk). Without edges, ``params`` holds every leaf."""

    params: list[torch.Tensor]
    edges: list[GradientEdge]
    behind: list[torch.Tensor]


def split_graph(out: torch.Tensor, known: list[torch.Tensor], first: int) -> FGraph:
    """``out``'s graph split at the nodes numbered below ``first`` (made before f was called);
    ``known`` leaves (z and f's inputs) are left out."""
    skip = {id(t) for t in known}
    params: dict[int, torch.Tensor] = {}
    edges: dict[tuple[int, int], GradientEdge] = {}
    stack, seen = [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for next_node, nr in node.next_functions:
            if next_node is None:
                continue
            variable = getattr(next_node, "variable", None)
            if variable is not None:
                if id(variable) not in skip:
                    params.setdefault(id(variable), variable)
            elif next_node._sequence_nr() < first:  # type: ignore[union-attr]
                edges.setdefault((id(next_node), nr), GradientEdge(next_node, nr))
            else:
                stack.append(next_node)
    behind: dict[int, torch.Tensor] = {}
    for edge in edges.values():
        for leaf in graph_leaves(edge.node, known):
            behind.setdefault(id(leaf), leaf)
    if behind.keys() & params.keys():  # a leaf on both sides: differentiate through it all
        return FGraph(graph_leaves(out, known), [], [])
    return FGraph(list(params.values()), list(edges.values()), list(behind.values()))


class _Detached:
    """The rows of f's inputs a chunk is recorded on: detached leaves (one per distinct input
    tensor, requiring grad where the input does), so the graph stops at them."""

    def __init__(self, inputs: tuple, start: int, stop: int, batch: int) -> None:
        self.by_id: dict[int, torch.Tensor] = {}

        def leaf(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in self.by_id:
                rows = t[start:stop] if _batched(t, batch) else t
                self.by_id[id(t)] = rows.detach().requires_grad_(t.requires_grad)
            return self.by_id[id(t)]

        self.inputs = map_tensors(leaf, inputs)


def _tensor_inputs(inputs: tuple) -> list[torch.Tensor]:
    """The distinct tensors among f's inputs that require grad, in order."""
    found: dict[int, torch.Tensor] = {}
    map_tensors(lambda t: found.setdefault(id(t), t) if t.requires_grad else None, inputs)
    return list(found.values())


def _accumulate(grads: list[Optional[torch.Tensor]], found: tuple[Optional[torch.Tensor], ...],
                batched: list[Optional[torch.Tensor]], start: int, stop: int) -> None:
    """Adds one chunk's gradients to ``grads``: rows ``start:stop`` of the batched inputs
    (``batched[k]``, None for the others), the whole of the parameters and unbatched inputs."""
    for k, g in enumerate(found):
        if g is None:
            continue
        x = batched[k] if k < len(batched) else None
        if x is not None:
            if grads[k] is None:
                grads[k] = torch.zeros_like(x)
            grads[k][start:stop] = g  # type: ignore[index]
        elif grads[k] is None:
            grads[k] = g
        else:
            grads[k].add_(g)  # type: ignore[union-attr]


# adjoint(fz, z_leaf, grad, inputs) -> (y, stats of the chunk's adjoint solve)
AdjointSolution = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, tuple], tuple[torch.Tensor, Any]]


class _ChunkedImplicitGrad(torch.autograd.Function):
    """Returns the precomputed ``f(z*)`` in the forward pass; its backward pass runs the
    chunked adjoint solves and returns the gradients of the leaves it was applied to."""

    @staticmethod
    def forward(ctx, holder: list, run_backward: Callable, *leaves: torch.Tensor) -> torch.Tensor:
        ctx.run_backward = run_backward
        return holder.pop()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if torch.is_grad_enabled():  # create_graph=True: the adjoint solves build no graph
            raise RuntimeError("deq_ext: higher-order gradients through a DEQ's implicit backward "
                               "are not supported (backward with create_graph=True)")
        return (None, None, *ctx.run_backward(grad))


def implicit_in_chunks(f: Callable[..., torch.Tensor], z_star: torch.Tensor, inputs: tuple,
                       chunk: int, adjoint: AdjointSolution,
                       finish: Callable[[list[Any]], None]) -> torch.Tensor:
    """``f(z*)``, differentiable by implicit differentiation one chunk of samples at a time.

    ``adjoint`` solves one chunk's adjoint system through the application of f it is given;
    ``finish`` receives the chunks' statistics, in order, once the last chunk is done."""
    B = z_star.shape[0]
    z_star = z_star.detach()
    bounds = chunk_bounds(B, chunk)
    input_leaves = _tensor_inputs(inputs)
    outs = []
    graph = FGraph([], [], [])
    for i, (s, e) in enumerate(bounds):
        rows = _Detached(inputs, s, e, B)
        if i == 0:  # recorded once, to find what f's graph reaches
            with torch.enable_grad(), reusable_backward():
                z_leaf = z_star[s:e].detach().requires_grad_()
                first = next_node_number()
                fz = f(z_leaf, *rows.inputs)
            graph = split_graph(fz, [z_leaf, *rows.by_id.values()], first)
            fz = fz.detach()
        else:
            with torch.no_grad():
                fz = f(z_star[s:e], *rows.inputs)
        outs.append(fz)
    out = torch.cat(outs)
    del outs
    leaves = [*input_leaves, *graph.params, *graph.behind]
    if not leaves:
        return out
    batched = [x if _batched(x, B) else None for x in input_leaves]
    n_direct = len(input_leaves) + len(graph.params)

    def run_backward(grad: torch.Tensor) -> list[Optional[torch.Tensor]]:
        # Gradients of the inputs and parameters, then of the edges (summed over the chunks).
        grads: list[Optional[torch.Tensor]] = [None] * (n_direct + len(graph.edges))
        stats = []
        for s, e in bounds:
            rows = _Detached(inputs, s, e, B)
            with torch.enable_grad(), reusable_backward():
                z_leaf = z_star[s:e].detach().requires_grad_()
                fz = f(z_leaf, *rows.inputs)
            y, chunk_stats = adjoint(fz, z_leaf, grad[s:e], rows.inputs)
            stats.append(chunk_stats)
            # (tensors and edges in one list: torch.autograd.grad takes both)
            targets: Any = [rows.by_id[id(x)] for x in input_leaves] + graph.params + graph.edges
            with torch.enable_grad():
                # retain_graph: without edges, the graph of a tensor f captured is gone through
                # by every chunk. Not named here: parameter-sized tensors, freed once added.
                _accumulate(grads, torch.autograd.grad(fz, targets, y, retain_graph=True,
                                                       allow_unused=True), batched, s, e)
            del fz, z_leaf, y
        finish(stats)
        edge_grads = grads[n_direct:]
        del grads[n_direct:]
        grads.extend(_through_edges(graph, edge_grads))
        return grads

    return _ChunkedImplicitGrad.apply([out], run_backward, *leaves)


def _through_edges(graph: FGraph, edge_grads: list[Optional[torch.Tensor]]
                   ) -> list[Optional[torch.Tensor]]:
    """The gradients of the leaves behind the edges, from the edges' summed gradients (one
    pass through the graph behind them, kept for whoever else goes through it)."""
    used = [(edge, g) for edge, g in zip(graph.edges, edge_grads) if g is not None]
    if not used or not graph.behind:
        return [None] * len(graph.behind)
    with torch.enable_grad():
        return list(torch.autograd.grad([edge for edge, _ in used], graph.behind,
                                        [g for _, g in used], retain_graph=True,
                                        allow_unused=True))
