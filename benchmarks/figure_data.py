"""The numbers behind the paper's Figures 3 and 4, measured on models (plotted by
:mod:`benchmarks.figures`).

* :func:`inference_sweep`: a trained model's test loss when its forward solve at inference runs
  with another tolerance or iteration limit (Figure 3), set through ``ModeConfig.eval_forward``.
* :func:`depth_changes`: the relative change ``||z[i+1] - z[i]|| / ||z[i]||`` across the depth of
  the weight-tied model, the cell applied again and again from z = 0 (Figure 4).
* :func:`copy_memory_model` and :func:`tiny_lm_core`: the two models these run on, the trained
  copy-memory DEQ-Transformer (:mod:`benchmarks.trained_copy`) and the random-weight core of the
  tiny DEQ-Transformer language-model preset.
"""

from __future__ import annotations

import copy
import os
from dataclasses import replace
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from deq_ext.bench import progress
from models.modes import SequenceCore

from . import model_setup as ms
from . import trained_copy

TINY_PRESET = "deq_transformer_tiny"
EVAL_BATCH = 256  # test sequences per forward pass (as train.copy_memory evaluates)


def copy_memory_model(run_dir: str, sequences: int | None = None) -> dict[str, Any]:
    """The trained copy-memory model of ``run_dir`` in eval mode, with its first ``sequences``
    test inputs and targets (all when None) and how it was trained.

    A clear error when ``run_dir`` holds no checkpoint (this never trains one: see
    :func:`benchmarks.trained_copy.load`, or ``python -m train.copy_memory --out-dir DIR``).
    """
    from train.data_copy import copy_memory_splits

    if not os.path.isfile(os.path.join(run_dir, "last.pt")):
        raise FileNotFoundError(
            f"no copy-memory checkpoint (last.pt) in {run_dir!r}; train one with "
            f"python -m train.copy_memory --out-dir {run_dir}")
    if sequences is not None and sequences < 1:
        raise ValueError(f"sequences must be >= 1, got {sequences}")
    trained = trained_copy.load(run_dir)
    cfg = trained["config"]
    y = copy_memory_splits(cfg.T, cfg.data_seed, cfg.train_size, cfg.test_size)["test"][1]
    n = len(y) if sequences is None else min(sequences, len(y))
    return {**trained, "model": trained["model"].eval(), "test_x": trained["test_x"][:n],
            "test_y": y[:n]}


def tiny_lm_core(seq: int, seed: int = 0) -> SequenceCore:
    """The core of :data:`TINY_PRESET` with random weights (its init at ``seed``), in eval mode."""
    return ms.make_core(TINY_PRESET, seq=seq, seed=seed).eval()


@torch.no_grad()
def evaluate_copy(model: Any, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Test loss (cross-entropy per step), accuracy, and the forward solves' mean steps and
    relative residual over the sequences ``x`` with targets ``y``."""
    loss, correct, count, steps, residual, solves = 0.0, 0, 0, 0.0, 0.0, 0
    for start in range(0, len(x), EVAL_BATCH):
        xb, yb = x[start:start + EVAL_BATCH], y[start:start + EVAL_BATCH]
        logits = model(xb).float()
        loss += float(F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="sum"))
        correct += int((logits.argmax(-1) == yb).sum())
        count += yb.numel()
        for stats in model.core.solver_stats:
            steps += float(stats["forward"].nstep.double().sum())
            residual += float(stats["forward"].rel_residual.double().sum())
            solves += stats["forward"].nstep.numel()
    return {"loss": loss / count, "accuracy": correct / count,
            "nstep": steps / max(1, solves), "rel_residual": residual / max(1, solves)}


def inference_sweep(model: Any, x: torch.Tensor, y: torch.Tensor,
                    tols: Sequence[float], max_iters: Sequence[int], *, sweep_max_iter: int = 30,
                    sweep_tol: float = 1e-12) -> dict[str, Any]:
    """Figure 3: ``model`` (a copy-memory model in ``deq`` mode) evaluated on ``(x, y)`` with the
    forward solve at each tolerance of ``tols`` (iteration limit ``sweep_max_iter``) and at each
    iteration limit of ``max_iters`` (tolerance ``sweep_tol``, below float32's reach, so the
    limit is what stops the solve). The model's own settings are restored afterwards."""
    if not tols or not max_iters:
        raise ValueError("tols and max_iters must be non-empty")
    if any(t <= 0 for t in tols) or any(int(m) < 1 for m in max_iters):
        raise ValueError(f"tols must be > 0 and max_iters >= 1, got {list(tols)}, "
                         f"{list(max_iters)}")
    core: SequenceCore = model.core
    if core.modes.mode != "deq":
        raise ValueError(f"the model must be in 'deq' mode, got {core.modes.mode!r}")
    saved = core.modes
    base = saved.eval_forward or saved.forward
    was_training = model.training
    model.eval()  # eval_forward is what the solve uses in eval mode

    def run(tol: float, max_iter: int) -> dict[str, float]:
        core.modes = replace(saved, eval_forward=replace(base, tol=tol, max_iter=max_iter))
        row = evaluate_copy(model, x, y)
        progress(f"  tol {tol:g}, max_iter {max_iter}: loss {row['loss']:.4g}, "
                 f"{row['nstep']:.3g} steps")
        return row

    try:
        by_tol = [run(t, sweep_max_iter) for t in tols]
        by_iter = [run(sweep_tol, int(m)) for m in max_iters]
    finally:
        core.modes = saved
        model.train(was_training)

    def columns(rows: list[dict[str, float]]) -> dict[str, list[float]]:
        return {k: [r[k] for r in rows] for k in rows[0]}

    return {"stop_mode": base.stop_mode, "method": base.method,
            "tol_sweep": {"max_iter": sweep_max_iter, "tol": list(tols), **columns(by_tol)},
            "iter_sweep": {"tol": sweep_tol, "max_iter": [int(m) for m in max_iters],
                           **columns(by_iter)}}


@torch.no_grad()
def depth_changes(core: SequenceCore, x: torch.Tensor, depth: int) -> list[float]:
    """Figure 4: ``||z[i+1] - z[i]|| / ||z[i]||`` for i = 1 .. depth - 1 (z[0] = 0, z[i+1] =
    f(z[i]); per-sequence norms, mean over the batch) of ``core``'s cell on the segment ``x``
    ``(B, T, d_input)`` with an empty memory. Computed in float64 on a copy of the core, so the
    curve is the cell's, not float32 rounding's (which floors it near 1e-7)."""
    if depth < 2:
        raise ValueError(f"depth must be >= 2 (a change needs two layers), got {depth}")
    core64: SequenceCore = copy.deepcopy(core).double().eval()
    z, inputs = core64.cell_inputs(x.double())
    z = core64.cell(z, *inputs)
    out = []
    for _ in range(depth - 1):
        nxt = core64.cell(z, *inputs)
        change = (nxt - z).flatten(1).norm(dim=1) / z.flatten(1).norm(dim=1)
        out.append(float(change.mean()))
        z = nxt
    return out


@torch.no_grad()
def copy_embeddings(model: Any, T: int, seed: int, n: int) -> torch.Tensor:
    """The embedded symbols ``(n, T + 20, d)`` of ``n`` fresh copy-memory sequences of delay T."""
    from train.data_copy import copy_memory

    x, _ = copy_memory(n, T, seed)
    return model.embedding(x).detach()
