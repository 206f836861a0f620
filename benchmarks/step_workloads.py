"""The three DEQ training steps that ``python -m benchmarks.training_step`` times.

Each :class:`Workload` is one step's ingredients, shared by both DEQ implementations: the cell
``f(z, *inputs)``, the module holding every trainable parameter, ``prepare()`` (the step's own
work before the solve: embeddings, the input injection, dropout masks; it returns z0 and f's
batched inputs), the loss on z*, and the forward and backward solver settings.

* ``hetero_mlp``: the MLP problem of ``python -m deq_ext.bench`` (:class:`deq_ext.bench.Problem`,
  per-sample contraction factors rho_b spread over the batch, so samples converge at very
  different steps) with its two weights made trainable parameters.
* ``copy_memory``: the trained copy-memory DEQ-Transformer (:mod:`benchmarks.trained_copy`) on
  its test sequences, with its own loss (cross-entropy of the 10-way head) and solver settings.
* ``tiny_lm``: the core of the ``deq_transformer_tiny`` language-model preset (random weights,
  random embedding-sized inputs, a full Transformer-XL memory, a random linear readout as the
  loss; as :mod:`benchmarks.runtime_table` builds it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from deq_ext import SolverSettings
from deq_ext.bench import Problem, resolve_config
from deq_ext.bench import build_parser as bench_parser

from . import model_setup as ms
from . import trained_copy

WORKLOADS = ("hetero_mlp", "copy_memory", "tiny_lm")
TINY_PRESET = "deq_transformer_tiny"


@dataclass
class Workload:
    """One training step's ingredients (see the module docstring)."""

    name: str
    description: str
    cell: Callable[..., torch.Tensor]
    module: nn.Module
    prepare: Callable[[], tuple[torch.Tensor, tuple]]
    loss: Callable[[torch.Tensor], torch.Tensor]
    forward: SolverSettings
    backward: SolverSettings
    seed: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return int(self.info["batch"])


@dataclass(frozen=True)
class MLPSizes:
    """Sizes and solver limits of the ``hetero_mlp`` workload."""

    batch: int
    dim: int
    width: int
    hidden: int
    max_iter: int
    forward_tol: float
    backward_tol: float
    rho_min: float = 0.3
    rho_max: float = 0.95


MLP_SIZES = {
    "quick": MLPSizes(batch=8, dim=256, width=64, hidden=256, max_iter=30, forward_tol=1e-4,
                      backward_tol=1e-6),
    "cpu": MLPSizes(batch=32, dim=2048, width=256, hidden=1024, max_iter=60, forward_tol=1e-4,
                    backward_tol=1e-6),
    # python -m deq_ext.bench's default sizes (its GPU headline).
    "cuda": MLPSizes(batch=32, dim=8192, width=1024, hidden=4096, max_iter=60, forward_tol=1e-4,
                     backward_tol=1e-6),
}


class MLPCell(nn.Module):
    """``f(z, x, rho) = rho_b * tanh(tokens(z) @ W1) @ W2 + x_b``: the MLP problem of
    :class:`deq_ext.bench.Problem` with W1 and W2 as trainable parameters (initialised
    to the problem's weights); x and rho are batched inputs, so f is row-wise."""

    def __init__(self, problem: Problem) -> None:
        super().__init__()
        if problem.kind != "mlp":
            raise ValueError(f"MLPCell needs the 'mlp' problem, got {problem.kind!r}")
        self.width = problem.width
        self.W1 = nn.Parameter(problem.W1.clone())
        self.W2 = nn.Parameter(problem.W2.clone())

    def forward(self, z: torch.Tensor, x: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
        n = z.shape[0]
        y = torch.tanh(z.reshape(n, -1, self.width) @ self.W1) @ self.W2
        return rho[:, None] * y.reshape(n, -1) + x


def mlp_problem(sizes: MLPSizes, device: torch.device, dtype: torch.dtype, seed: int) -> Problem:
    """The benchmark's MLP problem at ``sizes`` (built through its own configuration)."""
    args = ["--device", str(device), "--problem", "mlp", "--dtype", str(dtype).split(".")[-1],
            "--batch", str(sizes.batch), "--dim", str(sizes.dim), "--width", str(sizes.width),
            "--hidden", str(sizes.hidden), "--rho-min", str(sizes.rho_min),
            "--rho-max", str(sizes.rho_max), "--seed", str(seed)]
    return Problem(resolve_config(bench_parser().parse_args(args)))


def hetero_mlp(sizes: MLPSizes, device: torch.device, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> Workload:
    """The heterogeneous-convergence MLP cell as a trainable DEQ; loss ``||z* - t||^2 / B``."""
    problem = mlp_problem(sizes, device, dtype, seed)
    cell = MLPCell(problem)
    gen = torch.Generator().manual_seed(seed + 1)
    target = torch.randn(sizes.batch, sizes.dim, generator=gen, dtype=torch.float64)
    target = target.to(device=device, dtype=dtype)

    def prepare() -> tuple[torch.Tensor, tuple]:
        return torch.zeros_like(problem.x), (problem.x, problem.rho)

    def loss(z: torch.Tensor) -> torch.Tensor:
        return (z - target).pow(2).sum() / sizes.batch

    def settings(tol: float) -> SolverSettings:
        return SolverSettings(max_iter=sizes.max_iter, tol=tol, stop_mode="abs")

    info = {"f": problem.describe(), "batch": sizes.batch, "dim": sizes.dim,
            "rho": [sizes.rho_min, sizes.rho_max], "dtype": str(dtype).split(".")[-1],
            "weights": "the MLP problem's orthogonal init (deq_ext.bench.problem), trainable",
            "loss": "||z* - target||^2 / B, random target"}
    return Workload("hetero_mlp", "heterogeneous-convergence MLP cell (rho_b spread)", cell, cell,
                    prepare, loss, settings(sizes.forward_tol), settings(sizes.backward_tol),
                    seed, info)


def copy_memory(device: torch.device, batch: int, run_dir: str = trained_copy.DEFAULT_DIR,
                quick: bool = False, seed: int = 0) -> Workload:
    """The trained copy-memory DEQ-Transformer on its first ``batch`` test sequences: embedding,
    DEQ core and head, cross-entropy loss, the run's training solver settings."""
    from train.data_copy import copy_memory_splits

    trained = trained_copy.load(run_dir, quick)
    model, cfg = trained["model"].to(device).train(), trained["config"]
    core = model.core
    if core.modes.subseq_len is not None:
        raise ValueError("the copy-memory model solves in chunks; this benchmark solves whole "
                         "segments")
    tokens = trained["test_x"][:batch].to(device)
    targets = copy_memory_splits(cfg.T, cfg.data_seed, cfg.train_size,
                                 cfg.test_size)["test"][1][:batch].to(device)

    def prepare() -> tuple[torch.Tensor, tuple]:
        return core.cell_inputs(model.embedding(tokens))

    def loss(z: torch.Tensor) -> torch.Tensor:
        logits = model.head(core.features(z))
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    info = {"batch": int(tokens.shape[0]), "seq": int(tokens.shape[1]), "T": cfg.T,
            "weights": f"trained ({trained['step']} steps)", "run_dir": run_dir,
            "train_command": trained["train_command"],
            "loss": "cross-entropy of the 10-way head on the test targets"}
    return Workload("copy_memory", "trained copy-memory DEQ-Transformer, test sequences",
                    core.solver_cell(), model, prepare, loss, core.modes.forward,
                    core.modes.backward, seed, info)


def tiny_lm(device: torch.device, batch: int, seq: int, seed: int = 0) -> Workload:
    """The core of the tiny DEQ-Transformer LM preset (memory of ``seq`` positions) on random
    embedding-sized inputs; the loss reads its output along a random direction."""
    core = ms.make_core(TINY_PRESET, seq=seq, device=device, mem_len=seq, seed=seed).train()
    if core.modes.subseq_len is not None:
        raise ValueError(f"{TINY_PRESET} solves in chunks; this benchmark solves whole segments")
    x = ms.random_inputs(core, batch, seq, device)
    memory = ms.steady_memory(core, batch, device)
    w = ms.readout(core, device)

    def prepare() -> tuple[torch.Tensor, tuple]:
        return core.cell_inputs(x, memory)

    def loss(z: torch.Tensor) -> torch.Tensor:
        return ms.output_loss(core.features(z), w)

    info = {"preset": TINY_PRESET, "batch": batch, "seq": seq, "mem_len": ms.mem_len_of(core),
            "weights": ms.WEIGHTS, "loss": "random unit readout of the core's output, mean"}
    return Workload("tiny_lm", f"{TINY_PRESET} core, random inputs and memory", core.solver_cell(),
                    core, prepare, loss, core.modes.forward, core.modes.backward, seed, info)


def lm_sizes(device: torch.device, quick: bool) -> tuple[int, int]:
    """(batch, seq) of the ``tiny_lm`` workload."""
    if quick:
        return 4, 8
    return (64, 128) if device.type == "cuda" else (16, 32)


def copy_batch(device: torch.device, quick: bool, requested: Optional[int] = None) -> int:
    """Test sequences per step of the ``copy_memory`` workload."""
    if requested is not None:
        return requested
    return 4 if quick else (256 if device.type == "cuda" else 64)


def build(name: str, device: torch.device, quick: bool, seed: int = 0,
          copy_dir: str = trained_copy.DEFAULT_DIR, copy_batch_size: Optional[int] = None,
          dtype: torch.dtype = torch.float32) -> Workload:
    """The workload called ``name`` at the sizes of ``device`` (tiny ones with ``quick``)."""
    if name == "hetero_mlp":
        sizes = MLP_SIZES["quick" if quick else ("cuda" if device.type == "cuda" else "cpu")]
        return hetero_mlp(sizes, device, seed, dtype)
    if name == "copy_memory":
        return copy_memory(device, copy_batch(device, quick, copy_batch_size), copy_dir, quick,
                           seed)
    if name == "tiny_lm":
        return tiny_lm(device, *lm_sizes(device, quick), seed=seed)
    raise ValueError(f"unknown workload {name!r}; expected one of {WORKLOADS}")


def settings_record(s: SolverSettings, direction: str) -> dict[str, Any]:
    """A solver's settings for the results record, as the DEQ layer runs its ``direction``
    (``"forward"`` or ``"backward"``) solve: ``memory=None`` is the layer's restarting ring."""
    s = s.resolved(direction)
    return {"max_iter": s.max_iter, "tol": s.tol, "stop_mode": s.stop_mode,
            "memory": s.max_iter if s.memory is None else s.memory, "options": dict(s.options)}


def parameter_grads(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter gradient of ``module`` (missing ones as zeros)."""
    return {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in module.named_parameters() if p.requires_grad}


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """``||a - b|| / ||b||`` over all entries of two gradient dicts with the same keys."""
    if a.keys() != b.keys():
        raise ValueError(f"gradient sets differ: {sorted(a.keys() ^ b.keys())}")
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
    den = sum(float(b[k].double().pow(2).sum()) for k in b)
    return math.sqrt(num / den) if den else math.sqrt(num)
