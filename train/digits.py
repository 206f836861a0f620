"""Image DEQ on handwritten digits: ``python -m train.digits``.

A small multiscale DEQ (:class:`models.mdeq.MDEQClassifier`: 8x8 and 4x4 resolutions) classifies
scikit-learn's 8x8 digits (1797 images, shipped inside scikit-learn: no download), trained on the
CPU in a few minutes. ``--jac-reg-weight W`` adds W times the DEQ layer's Jacobian-regularization
estimate (Bai, Koltun, Kolter 2021) to the loss, where deq_ext provides it. ``--out FILE`` writes
a JSON record: test accuracy, the solver's forward/backward steps and residuals, wall time.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deq_ext import SolverSettings, Status
from models.mdeq import MDEQClassifier, MDEQConfig, deq_supports_jac_reg
from models.modes import ModeConfig

from .config import TrainConfig, parse_config
from .data_digits import IMAGE_SIZE, N_CLASSES, digits_splits
from .loop import Task, init_distributed, seed_everything, train
from .records import run_record, write_record


@dataclass
class DigitsConfig(TrainConfig):
    """Digits run. Defaults: the recorded CPU run (a few minutes on 2 cores).

    Attributes (beyond :class:`TrainConfig`):
        test_size: images held out for testing (of 1797).
        train_size: training images used (0: all the others).
        data_seed: seed of the train/test split.
        width: channels of the 8x8 resolution; each coarser resolution has twice as many.
        resolutions: resolutions in the state (8x8, 4x4, ...; at most 4).
        groups: GroupNorm groups.
        solver: the DEQ's solver method (``broyden``, ``anderson`` or ``fixed_point``), forward
            and backward.
        fwd_iter, fwd_tol, bwd_iter, bwd_tol: solver limits and relative tolerances in training.
        eval_tol: forward relative tolerance at evaluation.
        unrolled_depth: applications of f in ``--mode unrolled``.
        jac_reg_weight: weight of the Jacobian-regularization term in the loss (0: off); needs a
            deq_ext whose DEQ layer takes jac_reg_samples.
        jac_reg_samples: Hutchinson samples of the Jacobian-regularization estimate.
        out: write a JSON record of the run here (command, seed, accuracy, solver steps,
            residuals, wall time).
    """

    steps: int = 300
    batch_size: int = 64
    lr: float = 5e-3
    lr_warmup: int = 20
    weight_decay: float = 1e-4
    eval_every: int = 100
    log_every: int = 25
    threads: int = 1  # these small convolutions gain little from a second thread, and lose much on a busy CPU
    test_size: int = 360
    train_size: int = 0
    data_seed: int = 1234
    width: int = 16
    resolutions: int = 2
    groups: int = 4
    solver: str = "broyden"
    fwd_iter: int = 20
    fwd_tol: float = 1e-3
    bwd_iter: int = 20
    bwd_tol: float = 1e-4
    eval_tol: float = 1e-3
    unrolled_depth: int = 6
    jac_reg_weight: float = 0.0
    jac_reg_samples: int = 1
    out: Optional[str] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.resolutions <= 4:
            raise ValueError(f"resolutions must be in 1..4 (8x8 down to 1x1), got {self.resolutions}")
        if self.width < 1:
            raise ValueError(f"width must be >= 1, got {self.width}")
        if self.jac_reg_weight < 0:
            raise ValueError(f"jac_reg_weight must be >= 0, got {self.jac_reg_weight}")
        if self.jac_reg_samples < 1:
            raise ValueError(f"jac_reg_samples must be >= 1, got {self.jac_reg_samples}")
        if self.jac_reg_weight > 0 and not deq_supports_jac_reg():
            raise ValueError("--jac-reg-weight > 0 needs Jacobian regularization in deq_ext "
                             "(DEQ(..., jac_reg_samples=k)); this version of deq_ext has none")


PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {},  # the defaults
    # Small and fast, for tests: a 256-image subset, a few seconds.
    "tiny": dict(train_size=256, test_size=200, width=8, steps=30, batch_size=32, lr=1e-2,
                 lr_warmup=5, eval_every=0, log_every=10, fwd_iter=12, bwd_iter=12,
                 progress=False),
}


def build_model(cfg: DigitsConfig) -> MDEQClassifier:
    """The classifier of a run (mode ``pretrain`` first when there are pretrain steps)."""
    channels = tuple(cfg.width * 2 ** i for i in range(cfg.resolutions))

    def settings(max_iter: int, tol: float) -> SolverSettings:
        return SolverSettings(method=cfg.solver, max_iter=max_iter, tol=tol, stop_mode="rel")

    modes = ModeConfig(mode="pretrain" if cfg.pretrain_steps > 0 else cfg.mode,
                       unrolled_depth=cfg.unrolled_depth,
                       forward=settings(cfg.fwd_iter, cfg.fwd_tol),
                       backward=settings(cfg.bwd_iter, cfg.bwd_tol),
                       eval_forward=settings(cfg.fwd_iter, cfg.eval_tol),
                       **cfg.gradient_changes())
    mdeq = MDEQConfig(channels=channels, groups=cfg.groups, in_channels=1, image_size=IMAGE_SIZE,
                      n_classes=N_CLASSES)
    return MDEQClassifier(mdeq, modes, cfg.jac_reg_samples if cfg.jac_reg_weight > 0 else 0)


class DigitsTask(Task):
    """Batches from a per-epoch permutation seeded by (seed, epoch): resumable by step.

    Also keeps the training solves' statistics (read after each step's backward) and the
    Jacobian-regularization term per DEQ step, for the run's record.
    """

    model: MDEQClassifier

    def __init__(self, cfg: DigitsConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        data = digits_splits(cfg.test_size, cfg.data_seed, cfg.train_size)
        self.train_x, self.train_y = (t.to(device) for t in data["train"])
        self.test_x, self.test_y = (t.to(device) for t in data["test"])
        self.model = build_model(cfg)
        self.train_solves: list[dict[str, float]] = []  # one per DEQ training step
        self._pending: Optional[dict[str, float]] = None

    def batch_indices(self, step: int, rank: int, world: int) -> torch.Tensor:
        """This rank's share of step ``step``'s global batch of ``batch_size * world``."""
        n = self.train_x.shape[0]
        B = min(self.cfg.batch_size * world, n)
        per_epoch = max(1, n // B)
        epoch, i = divmod(step, per_epoch)
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=gen)
        start = i * B + rank * self.cfg.batch_size
        return perm[start:start + self.cfg.batch_size]

    def _record_training_solves(self) -> None:
        """Files the previous training step's solver statistics (its backward has run by now)."""
        if self._pending is None:
            return
        record, self._pending = self._pending, None
        for stats in self.model.core.solver_stats:
            for key in ("forward", "backward"):
                if key in stats:
                    summary = stats[key].summary()
                    record[f"{key}_steps"] = summary["nstep"]
                    record[f"{key}_rel_residual"] = summary["rel_residual"]
                    if "shine_fallback" in summary:  # grad_mode shine: samples solved exactly
                        record["backward_shine_fallback"] = summary["shine_fallback"]
        self.train_solves.append(record)

    def train_loss(self, model: nn.Module, step: int, rank: int, world: int) -> torch.Tensor:
        self._record_training_solves()
        idx = self.batch_indices(step, rank, world).to(self.device)
        logits = model(self.train_x[idx])
        loss = F.cross_entropy(logits.float(), self.train_y[idx])
        core = self.model.core
        if core.modes.mode != "deq":
            return loss
        record = {"step": float(step + 1), "cross_entropy": float(loss.detach())}
        if self.cfg.jac_reg_weight > 0:
            jac = core.jac_loss
            if jac is None:
                raise RuntimeError("the DEQ layer computed no jac_loss in training although "
                                   "jac_reg_samples > 0")
            jac = jac.float().mean()
            record["jac_loss"] = float(jac.detach())
            loss = loss + self.cfg.jac_reg_weight * jac
        self._pending = record
        return loss

    def evaluate(self, split: str, final: bool) -> dict[str, float]:
        self._record_training_solves()
        x_all, y_all = (self.test_x, self.test_y) if split == "test" else (self.train_x, self.train_y)
        total, correct = 0.0, 0
        steps: list[torch.Tensor] = []
        rel: list[torch.Tensor] = []
        converged: list[torch.Tensor] = []
        for start in range(0, x_all.shape[0], 512):
            x, y = x_all[start:start + 512], y_all[start:start + 512]
            logits = self.model(x).float()
            total += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
            for stats in self.model.core.solver_stats:
                fwd = stats["forward"]
                steps.append(fwd.nstep.double())
                rel.append(fwd.rel_residual.double())
                converged.append((fwd.status == Status.CONVERGED).double())
        n = x_all.shape[0]
        out = {"loss": total / n, "accuracy": correct / n, "images": float(n)}
        if steps:
            nstep, res = torch.cat(steps), torch.cat(rel)
            out.update(fwd_steps_mean=float(nstep.mean()), fwd_steps_max=float(nstep.max()),
                       fwd_rel_residual_mean=float(res.mean()),
                       fwd_rel_residual_max=float(res.max()),
                       fwd_converged=float(torch.cat(converged).mean()))
        return out


def training_solve_summary(solves: list[dict[str, float]], last: int = 50) -> dict[str, Any]:
    """Means of the training steps' solver figures over all DEQ steps and over the last ones."""
    if not solves:
        return {}
    keys = [k for k in solves[-1] if k != "step"]

    def means(rows: list[dict[str, float]]) -> dict[str, float]:
        return {k: statistics.fmean(r[k] for r in rows if k in r) for k in keys
                if any(k in r for r in rows)}

    return {"deq_steps": len(solves), "mean": means(solves),
            f"mean_last_{min(last, len(solves))}": means(solves[-last:])}


def main(argv: Optional[Sequence[str]] = None, stop_at: Optional[int] = None) -> dict[str, Any]:
    """Run from command-line arguments; returns the loop's summary with ``params`` and
    ``train_solves`` (the training solves' figures)."""
    cfg = parse_config(DigitsConfig, argv, __doc__.splitlines()[0], PRESETS)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world, device = init_distributed(cfg.device)
    seed_everything(cfg.seed)
    task = DigitsTask(cfg, device)
    n_params = sum(p.numel() for p in task.model.parameters())
    if rank == 0:
        print(f"digits: {task.train_x.shape[0]} train / {task.test_x.shape[0]} test images, "
              f"MDEQ channels {task.model.cfg.channels}, params={n_params}, mode={cfg.mode}, "
              f"solver={cfg.solver}, jac_reg_weight={cfg.jac_reg_weight}, device={device} "
              f"world={world}", flush=True)
    seed_everything(cfg.seed + rank)
    cpu0 = time.process_time()
    summary = train(cfg, task, rank, world, device, stop_at=stop_at)
    # CPU time next to the wall time: on a shared machine the wall time depends on the load.
    summary.update(params=n_params, train_solves=training_solve_summary(task.train_solves),
                   cpu_s=time.process_time() - cpu0)
    final = summary["final"]
    if rank == 0 and final:
        steps = (f", forward steps {final['test_fwd_steps_mean']:.2f} (mean)"
                 if "test_fwd_steps_mean" in final else "")
        print(f"final test accuracy {final['test_accuracy']:.4f}, loss {final['test_loss']:.4f}"
              f"{steps}, wall {summary['wall_s']:.1f}s (CPU {summary['cpu_s']:.1f}s)", flush=True)
        if cfg.out is not None:
            write_results(cfg.out, cfg, summary, device, argv)
    return summary


def write_results(path: str, cfg: DigitsConfig, summary: dict[str, Any], device: torch.device,
                  argv: Optional[Sequence[str]]) -> None:
    """A JSON record of the run: command, seed, device, versions, configuration and figures."""
    write_record(path, run_record("train.digits", cfg, summary, device, argv, seed=cfg.seed,
                                  train_solves=summary["train_solves"], cpu_s=summary["cpu_s"]))


if __name__ == "__main__":
    main()
