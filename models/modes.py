"""Three ways to run one weight-tied cell f over a segment, with the same parameters.

* ``deq``: the fixed point z* = f(z*; x) solved with deq_ext (Broyden forward, implicit gradient
  by Theorem 1 backward). Memory is one application of f, whatever the number of iterations.
* ``unrolled``: f applied L times from z = 0 with ordinary backprop: the deep weight-tied
  baseline of the paper's Tables 2-4. ``checkpoint=True`` recomputes each layer in the backward
  pass instead of storing its activations (Chen et al. 2016).
* ``pretrain``: the same unroll with a shallow depth (2 by default), used to warm up a DEQ before
  switching it to ``deq`` (paper, Appendix E).

:class:`SequenceCore` is the part the DEQ-Transformer and the DEQ-TrellisNet share: memory carried
between segments, dropout masks drawn once per forward pass, the mode dispatch, and subsequence
solving (paper, Appendix E): a long segment is solved in chunks, each chunk's equilibrium (still
attached to the graph) serving as history for the next, so the gradient of the whole segment is
still given by Theorem 1, one chunk at a time. Which history a chunk sees is
``ModeConfig.subseq_history``: ``'previous'`` (the authors' code, which produced the published
numbers: the first chunk sees the memory, every later chunk only the chunk before it) or ``'all'``
(the memory and every earlier chunk, which makes the chunked solve equal to the whole one).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Callable, NamedTuple, Optional, Union, cast

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from deq_ext import SolverSettings, SolverStats, deq_fixed_point
from deq_ext.layer import GRAD_MODES
from deq_ext.shine import BACKWARD_INITS

from .regularization import Shared

MODES = ("deq", "unrolled", "pretrain")
SUBSEQ_HISTORIES = ("previous", "all")

Memory = tuple[torch.Tensor, ...]
History = tuple[torch.Tensor, ...]
# Per-sample masks (batched tensors) and batch-wide draws (in a Shared), or None when off.
Masks = tuple[Union[torch.Tensor, Shared, None], ...]


@dataclass(frozen=True)
class ModeConfig:
    """How a core runs its cell f. The defaults are small enough for quick CPU runs.

    Attributes:
        mode: ``'deq'``, ``'unrolled'`` or ``'pretrain'``.
        unrolled_depth: L, the number of applications of f in ``unrolled`` mode.
        pretrain_depth: the number of applications of f in ``pretrain`` mode.
        checkpoint: in the unrolled modes, recompute every application of f in the backward pass.
        forward, backward: deq_ext settings of the fixed-point solve and of the adjoint solve.
        eval_forward: forward settings in eval mode (the paper relaxes the tolerance at
            inference); None: same as ``forward``.
        grad_mode, phantom_steps: passed to :func:`deq_ext.deq_fixed_point`: ``'implicit'``
            (exact), ``'shine'`` (the forward Broyden estimate, checked; the exact solve where it fails) or
            ``'phantom'`` (backprop through ``phantom_steps`` steps of f from z*; 1: one-step).
        backward_init: where the adjoint solve starts (the backward settings' option ``init``):
            ``'grad'`` (dL/dz*) or ``'shine'`` (the forward Broyden estimate; same gradient, keeps
            the forward's pairs until backward); None: as the backward settings say (``'grad'``
            unless their options set it). docs/backward.md says which to use when.
        subseq_len: in ``deq`` mode, solve segments in chunks of this many positions (None: whole).
        subseq_history: what a chunk after the first sees as history: ``'previous'`` (only the
            chunk before it, as the authors' code does) or ``'all'`` (the memory and every
            earlier chunk of the segment).
        compile_cell: in ``deq`` mode, the solver evaluates ``torch.compile(cell, **compile_cell)``
            (e.g. ``{"dynamic": True}``); None: the cell as it is. The solve itself is a graph
            break for torch.compile, so this is how f gets compiled in a compiled model.
        jac_reg_samples: in ``deq`` mode and training, probes of the Jacobian regularizer per
            solve (0: off); the estimates are read with :meth:`SequenceCore.jac_loss`.
        chunk: in ``deq`` mode, :func:`deq_ext.deq_fixed_point`'s ``chunk``: ``"auto"`` (large
            CPU batches in 4 chunks), None (the whole batch) or at most this many samples per
            solve (less memory, one more application of f per step).
    """

    mode: str = "deq"
    unrolled_depth: int = 8
    pretrain_depth: int = 2
    checkpoint: bool = False
    forward: SolverSettings = field(
        default_factory=lambda: SolverSettings(max_iter=20, tol=1e-4, stop_mode="rel"))
    backward: SolverSettings = field(
        default_factory=lambda: SolverSettings(max_iter=20, tol=1e-6, stop_mode="rel"))
    eval_forward: Optional[SolverSettings] = None
    grad_mode: str = "implicit"
    phantom_steps: int = 1
    backward_init: Optional[str] = None
    subseq_len: Optional[int] = None
    subseq_history: str = "previous"
    compile_cell: Optional[dict] = None
    jac_reg_samples: int = 0
    chunk: Union[int, str, None] = "auto"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.unrolled_depth < 1 or self.pretrain_depth < 1:
            raise ValueError("unrolled_depth and pretrain_depth must be >= 1")
        if self.subseq_len is not None and self.subseq_len < 1:
            raise ValueError(f"subseq_len must be None or >= 1, got {self.subseq_len}")
        if self.subseq_history not in SUBSEQ_HISTORIES:
            raise ValueError(f"subseq_history must be one of {SUBSEQ_HISTORIES}, "
                             f"got {self.subseq_history!r}")
        if self.grad_mode not in GRAD_MODES:
            raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {self.grad_mode!r}")
        if self.backward_init is not None and self.backward_init not in BACKWARD_INITS:
            raise ValueError(f"backward_init must be None or one of {BACKWARD_INITS}, "
                             f"got {self.backward_init!r}")
        if self.phantom_steps < 1:
            raise ValueError(f"phantom_steps must be >= 1, got {self.phantom_steps}")

    def adjoint_settings(self) -> SolverSettings:
        """The backward settings, with ``backward_init`` (when set) as their option ``init``."""
        if self.backward_init is None:
            return self.backward
        return replace(self.backward, options={**self.backward.options, "init": self.backward_init})

    @property
    def depth(self) -> int:
        """Applications of f in the current unrolled mode."""
        return self.pretrain_depth if self.mode == "pretrain" else self.unrolled_depth


class CoreOutput(NamedTuple):
    """What a core returns for one segment."""

    state: torch.Tensor     # z (or z*) in the cell's own layout
    features: torch.Tensor  # (B, T, d_out): what the decoder reads
    memory: Memory          # detached history for the next segment


def keep_last(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """The last ``n`` entries of ``x`` along ``dim`` (none when n == 0)."""
    size = x.shape[dim]
    return x.narrow(dim, size - min(n, size), min(n, size))


class SequenceCore(nn.Module, ABC):
    """A causal sequence model z = f(z; x, history) run as a DEQ or unrolled.

    Subclasses define the cell ``f(z, inj, *history, *masks)`` and how the input injection,
    history and memory are formed. ``time_dim`` is the dimension of z that runs over positions.
    The last forward pass's solver statistics are in :attr:`solver_stats` (one dict per solved
    chunk, with ``'forward'`` and, after backward, ``'backward'`` :class:`deq_ext.SolverStats`).
    """

    time_dim: int

    def __init__(self, cell: nn.Module, modes: ModeConfig) -> None:
        super().__init__()
        self.cell = cell
        self.modes = modes
        self.solver_stats: list[dict[str, SolverStats]] = []

    def set_mode(self, mode: str, **changes) -> None:
        """Switch mode (and other :class:`ModeConfig` fields if given); parameters are untouched."""
        self.modes = replace(self.modes, mode=mode, **changes)

    # -- what a concrete core defines ----------------------------------------------------------
    @abstractmethod
    def init_memory(self, batch: int, device: torch.device) -> Memory:
        """The memory before the first segment (empty or zero history)."""

    @abstractmethod
    def inject(self, x: torch.Tensor, memory: Memory) -> torch.Tensor:
        """The input injection of a segment, ``x`` being ``(B, T, d_input)``."""

    @abstractmethod
    def history(self, memory: Memory) -> History:
        """The history inputs of f at the start of a segment."""

    @abstractmethod
    def extend_history(self, history: History, z: torch.Tensor, inj: torch.Tensor) -> History:
        """History for the next chunk of the same segment (kept attached to the graph)."""

    def chunk_history(self, history: History, z: torch.Tensor, inj: torch.Tensor) -> History:
        """History of the chunk after the one solved to ``z`` (``inj`` its injection).

        ``'all'``: :meth:`extend_history` of the history so far. ``'previous'``: built from the
        solved chunk alone, as if it had come with an empty memory.
        """
        if self.modes.subseq_history == "all":
            return self.extend_history(history, z, inj)
        empty = self.history(self.init_memory(z.shape[0], z.device))
        return self.extend_history(empty, z, inj)

    @abstractmethod
    def next_memory(self, memory: Memory, x: torch.Tensor, z: torch.Tensor,
                    inj: torch.Tensor) -> Memory:
        """Detached memory for the next segment."""

    @abstractmethod
    def draw_masks(self, batch: int, device: torch.device) -> Masks:
        """Variational dropout masks of f for one forward pass (None entries when off)."""

    @abstractmethod
    def state_shape(self, batch: int, length: int) -> tuple[int, ...]:
        """Shape of z for ``length`` positions."""

    @property
    @abstractmethod
    def d_out(self) -> int:
        """Width of :meth:`features`."""

    @abstractmethod
    def features(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's view of z: ``(B, T, d_out)``."""

    # -- shared machinery ------------------------------------------------------------------------
    def state_dtype(self) -> torch.dtype:
        """z is kept in the parameters' dtype, also under autocast (the DEQ layer casts f's
        output to it, :mod:`deq_ext.precision`)."""
        return next(self.cell.parameters()).dtype

    def cell_inputs(self, x: torch.Tensor,
                    memory: Optional[Memory] = None) -> tuple[torch.Tensor, tuple]:
        """``(z0, inputs)`` such that the segment's equilibrium solves z = f(z, *inputs).

        Dropout masks are drawn as in :meth:`forward` (None in eval mode).
        """
        _, inj, history, masks = self._prepare(x, memory)
        return self.zero_state(x.shape[0], x.shape[1], x.device), (inj, *history, *masks)

    def forward(self, x: torch.Tensor, memory: Optional[Memory] = None) -> CoreOutput:
        """Run one segment ``x`` ``(B, T, d_input)``, with the memory of the previous segment."""
        memory, inj, history, masks = self._prepare(x, memory)
        self.solver_stats = []
        B, T = x.shape[:2]
        chunk = T
        if self.modes.mode == "deq" and self.modes.subseq_len is not None:
            chunk = self.modes.subseq_len
        pieces = []
        for start in range(0, T, chunk):
            n = min(chunk, T - start)
            inj_c = inj.narrow(self.time_dim, start, n)
            z_c = self._run(self.zero_state(B, n, x.device), (inj_c, *history, *masks))
            pieces.append(z_c)
            if start + n < T:
                history = self.chunk_history(history, z_c, inj_c)
        z = pieces[0] if len(pieces) == 1 else torch.cat(pieces, self.time_dim)
        return CoreOutput(z, self.features(z), self.next_memory(memory, x, z, inj))

    def _prepare(self, x: torch.Tensor,
                 memory: Optional[Memory]) -> tuple[Memory, torch.Tensor, History, Masks]:
        if x.dim() != 3 or x.shape[1] < 1:
            raise ValueError(f"x must be (batch, length >= 1, features), got {tuple(x.shape)}")
        B = x.shape[0]
        memory = self.init_memory(B, x.device) if memory is None else memory
        return memory, self.inject(x, memory), self.history(memory), self.draw_masks(B, x.device)

    def zero_state(self, batch: int, length: int, device: torch.device) -> torch.Tensor:
        """z0 = 0, as in the paper."""
        return torch.zeros(self.state_shape(batch, length), dtype=self.state_dtype(), device=device)

    def _run(self, z0: torch.Tensor, inputs: tuple) -> torch.Tensor:
        m = self.modes
        if m.mode == "deq":
            return self._solve(z0, inputs)
        z = z0
        for _ in range(m.depth):
            if m.checkpoint and torch.is_grad_enabled():
                z = checkpoint(self.cell, z, *inputs, use_reentrant=False)
            else:
                z = self.cell(z, *inputs)
        return z

    # Run eagerly under torch.compile (the solver is a graph break anyway): traced code would
    # hand deq_fixed_point the cell behind a compiled cell, not the compiled one.
    @torch.compiler.disable
    def _solve(self, z0: torch.Tensor, inputs: tuple) -> torch.Tensor:
        m = self.modes
        stats: dict[str, SolverStats] = {}
        self.solver_stats.append(stats)
        fwd = m.forward if self.training or m.eval_forward is None else m.eval_forward
        return deq_fixed_point(self.solver_cell(), z0, *inputs, forward=fwd,
                               backward=m.adjoint_settings(), grad_mode=m.grad_mode,
                               phantom_steps=m.phantom_steps, chunk=m.chunk, stats=stats,
                               jac_reg_samples=m.jac_reg_samples if self.training else 0)

    def jac_loss(self) -> Optional[torch.Tensor]:
        """The last forward pass's Jacobian regularizer, the mean of its per-sample estimates
        over the solved chunks; None when none was computed (off, unrolled, or eval)."""
        losses = [cast(torch.Tensor, s["jac_loss"]).mean() for s in self.solver_stats if "jac_loss" in s]
        return torch.stack(losses).mean() if losses else None

    def solver_cell(self) -> Callable[..., torch.Tensor]:
        """The f the solver evaluates: the cell, or its compiled form (``compile_cell``)."""
        options = self.modes.compile_cell
        if options is None:
            return self.cell
        key = repr(sorted(options.items()))
        # A plain dict: an nn.Module attribute would register the compiled cell as a submodule.
        cache = self.__dict__.setdefault("_compiled_cells", {})
        if key not in cache:
            cache[key] = torch.compile(self.cell, **options)
        return cache[key]
