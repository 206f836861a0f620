"""The training loop both scripts share.

A :class:`Task` supplies the model, one training batch per step and an evaluation; :func:`train`
does the rest: seeds, device, DistributedDataParallel under ``torchrun``, the optimizer (AdamW,
Adam or SGD), learning-rate warmup and schedule, the shallow pretrain warm-up followed by the DEQ
(or unrolled) mode, gradient clipping, bf16 autocast on GPU, checkpoints with resume, a JSON-lines
metrics log (with the mean solver iterations and relative residuals of DEQ steps, and the last
layer's relative change of unrolled ones) and a progress bar with the loss and the mean solver
iterations.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import asdict
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from deq_ext._tree import map_tensors

from .config import TrainConfig


class Task(ABC):
    """What a training script defines. ``model`` must have ``set_mode`` and a ``core``."""

    model: nn.Module

    @abstractmethod
    def train_loss(self, model: nn.Module, step: int, rank: int, world: int) -> torch.Tensor:
        """The loss of training step ``step`` on this process's share of the batch.

        ``model`` is what to call (the DDP wrapper when distributed). The batch must depend only
        on ``(step, rank, world)`` and the task's state, so that a resumed run sees the same data.
        """

    @abstractmethod
    def evaluate(self, split: str, final: bool) -> dict[str, float]:
        """Metrics on a held-out split (``self.model`` is in eval mode, no grad).

        ``final`` marks the run's last evaluation (a task may evaluate a subset before it).
        """

    eval_splits: tuple[str, ...] = ("test",)

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint beyond the model (e.g. a language model's memory)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


# -- distributed setup -------------------------------------------------------------------------
def init_distributed(device_pref: str) -> tuple[int, int, torch.device]:
    """``(rank, world, device)``; joins the process group when started by ``torchrun``.

    nccl on GPU, gloo on CPU. Each process uses the GPU ``LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref == "cuda"
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        # Once a loss is tiny, softmax gradients underflow into denormals, which make x86 float
        # arithmetic many times slower; flushing them to zero changes nothing measurable.
        torch.set_flush_denormal(True)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return rank, world, device


def seed_everything(seed: int) -> None:
    """Python and torch (all devices) RNGs."""
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- schedule ----------------------------------------------------------------------------------
def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` at ``step``: linear warmup, then the schedule."""
    if step < cfg.lr_warmup:
        return (step + 1) / cfg.lr_warmup
    if cfg.schedule in ("constant", "plateau"):  # plateau: PlateauAnnealing's factor on top
        return 1.0
    if cfg.schedule == "step":
        return cfg.lr_decay ** sum(step >= m for m in cfg.milestones)
    done = (step - cfg.lr_warmup) / max(1, cfg.steps - cfg.lr_warmup)
    done = min(1.0, done)
    if cfg.schedule == "linear":
        return 1.0 - (1.0 - cfg.min_lr_ratio) * done
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * done))


class PlateauAnnealing:
    """The ``plateau`` schedule's factor, moved by evaluations (TrellisNet's PTB rule): an
    evaluation whose loss is above the best of those before the last ``plateau_patience`` ones
    multiplies the rate by ``lr_decay``, while the rate is above ``plateau_min_lr``. Other
    schedules keep the factor at 1. Its state goes into checkpoints."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.factor = 1.0
        self.losses: list[float] = []

    def observe(self, loss: float) -> bool:
        """Record an evaluation's loss; True when it annealed the rate."""
        cfg, past = self.cfg, self.losses[:len(self.losses) - self.cfg.plateau_patience]
        anneal = (cfg.schedule == "plateau" and len(self.losses) > cfg.plateau_patience
                  and loss > min(past) and cfg.lr * self.factor > cfg.plateau_min_lr)
        if anneal:
            self.factor *= cfg.lr_decay
        self.losses.append(loss)
        return anneal

    def state_dict(self) -> dict[str, Any]:
        return {"factor": self.factor, "losses": list(self.losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.factor, self.losses = float(state["factor"]), list(state["losses"])


def make_optimizer(cfg: TrainConfig, params: Any) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over ``params``: AdamW, Adam (L2 weight decay, as the authors' scripts) or
    plain SGD (TrellisNet's PTB recipe)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    kind = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


# -- metrics -----------------------------------------------------------------------------------
def solver_iterations(model: nn.Module) -> dict[str, float]:
    """Mean forward/backward Broyden steps of the last pass (nothing outside ``deq`` mode)."""
    stats = getattr(model.core, "solver_stats", [])
    out: dict[str, float] = {}
    for key, name in (("forward", "fwd_iter"), ("backward", "bwd_iter")):
        steps = [s[key].nstep.double().mean() for s in stats if key in s]
        if steps:
            out[name] = float(torch.stack(steps).mean())
    return out


def solver_residuals(model: nn.Module) -> dict[str, float]:
    """Mean relative residuals ``||f(z) - z|| / ||f(z)||`` of the last pass's forward and
    backward solves (``fwd_res``, ``bwd_res``; nothing outside ``deq`` mode). Reads the device."""
    stats = getattr(model.core, "solver_stats", [])
    out: dict[str, float] = {}
    for key, name in (("forward", "fwd_res"), ("backward", "bwd_res")):
        res = [s[key].rel_residual.double().mean() for s in stats if key in s]
        if res:
            out[name] = float(torch.stack(res).mean())
    return out


class LayerChange:
    """The unrolled model's change at its last layer, ``||z[L] - z[L-1]|| / ||z[L-1]||`` (per
    sample, batch mean): the deep weight-tied counterpart of the DEQ's residual.

    While entered, a forward hook on ``cell`` keeps the input and output of its latest call, so
    enter it around the forward pass only: a checkpointed backward calls the cell again.
    """

    def __init__(self, cell: nn.Module) -> None:
        self.cell = cell
        self.last: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.handle: Any = None

    def __enter__(self) -> "LayerChange":
        self.handle = self.cell.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.last = (args[0], output)

    def value(self) -> Optional[float]:
        """The change of the latest call; None before any call, or when that call started from
        z = 0 (a depth-1 unroll has no layer-to-layer change)."""
        if self.last is None:
            return None
        z, fz = (t.detach().double().flatten(1) for t in self.last)
        norm = z.norm(dim=1)
        if not bool((norm > 0).all()):
            return None
        return float(((fz - z).norm(dim=1) / norm).mean())


def forward_f_rows(model: nn.Module) -> tuple[int, int]:
    """Rows f was evaluated on in the last pass's forward solves: (with compaction, without).

    With compaction f sees the solver's buckets (counted by the solver: ``f_rows``); without,
    every call evaluates the whole batch, and there are as many calls as the busiest sample's
    nfev. (0, 0) outside ``deq`` mode. Reads from the device.
    """
    stats = [s["forward"] for s in getattr(model.core, "solver_stats", []) if "forward" in s]
    used = sum(s.f_rows if s.f_rows is not None else int(s.nfev.sum()) for s in stats)
    whole_batch = sum(int(s.nfev.max()) * s.nfev.numel() for s in stats if s.nfev.numel())
    return used, whole_batch


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated (cuda), or the process's peak resident size (cpu), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class MetricsLog:
    """Appends one JSON object per line to ``path`` (nothing when None), and the same scalars
    to TensorBoard when ``tensorboard_dir`` is given."""

    def __init__(self, path: Optional[str], tensorboard_dir: Optional[str] = None) -> None:
        self.path = path
        self.tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise RuntimeError("--tensorboard needs the tensorboard package "
                                   "(pip install tensorboard)") from exc
            self.tb = SummaryWriter(tensorboard_dir)

    def write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.tb is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and key not in ("step", "time"):
                    self.tb.add_scalar(f"{record.get('event', 'train')}/{key}", value,
                                       record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Progress:
    """A progress bar on a terminal (when ``bar``); otherwise one plain line every ``every``
    steps. Messages (evaluations, mode changes) are printed either way."""

    def __init__(self, total: int, every: int, bar: bool, enabled: bool = True) -> None:
        self.total, self.every, self.enabled = total, max(1, every), enabled
        self.tty = bar and sys.stdout.isatty()
        self.start = time.time()

    def update(self, step: int, fields: dict[str, float]) -> None:
        done = step + 1
        if not self.enabled or (not self.tty and done % self.every and done != self.total):
            return
        rate = done / max(1e-9, time.time() - self.start)
        text = " ".join(f"{k} {v:.4g}" for k, v in fields.items())
        if not self.tty:
            print(f"step {done}/{self.total} {text} {rate:.2f} it/s", flush=True)
            return
        width = 30
        filled = int(width * done / self.total)
        line = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {text} {rate:.2f} it/s"
        print("\r" + line, end="", flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(("\n" if self.tty else "") + text, flush=True)


# -- checkpoints -------------------------------------------------------------------------------
def save_checkpoint(path: str, **state: Any) -> None:
    """Write atomically (a crash mid-write leaves the previous checkpoint intact)."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def resolve_resume(cfg: TrainConfig) -> Optional[str]:
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        if cfg.out_dir is None:
            return None
        path = os.path.join(cfg.out_dir, "last.pt")
        return path if os.path.exists(path) else None
    if not os.path.exists(cfg.resume):
        raise FileNotFoundError(f"checkpoint {cfg.resume} not found")
    return cfg.resume


# -- the loop ----------------------------------------------------------------------------------
def train(cfg: TrainConfig, task: Task, rank: int, world: int, device: torch.device,
          stop_at: Optional[int] = None) -> dict[str, Any]:
    """Train ``task.model`` for ``cfg.steps`` steps (or until ``stop_at``); returns a summary.

    The summary has ``losses`` (training loss per step run here), the last evaluation under
    ``final`` and ``wall_s``.
    """
    raw: Any = task.model.to(device)  # a model with .core and .set_mode (see Task)
    model: nn.Module = raw
    if world > 1:
        # Every parameter takes part in every loss (the adaptive softmax gives clusters without
        # targets a zero-weighted term), so no unused-parameter search is needed.
        model = DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda"
                                        else None)
    opt = make_optimizer(cfg, raw.parameters())
    plateau = PlateauAnnealing(cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg) * plateau.factor)
    start = 0
    main = rank == 0
    resume = resolve_resume(cfg)
    if resume is not None:
        ckpt = torch.load(resume, map_location=device, weights_only=False)
        raw.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if "plateau" in ckpt:  # absent in checkpoints from before the plateau schedule
            plateau.load_state_dict(ckpt["plateau"])
        task_state = ckpt["task"]  # one per rank (a single dict in older checkpoints)
        if isinstance(task_state, list):
            task_state = task_state[min(rank, len(task_state) - 1)]
        task.load_state_dict(task_state)
        set_rng_state(ckpt["rng"][min(rank, len(ckpt["rng"]) - 1)])
        start = ckpt["step"]
    if cfg.out_dir is not None and main:
        os.makedirs(cfg.out_dir, exist_ok=True)
    log = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl")
                     if cfg.out_dir is not None and main else None,
                     cfg.tensorboard if main else None)
    use_amp = device.type == "cuda" and cfg.amp != "off"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp \
        else contextlib.nullcontext
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    bar = Progress(cfg.steps, cfg.log_every, bar=cfg.progress, enabled=main)
    t0 = time.time()
    losses: list[float] = []
    final: dict[str, Any] = {}

    def checkpoint(step: int) -> None:
        # Every rank's RNG and task state (a language model's memory of its own rows) are
        # gathered, so that each rank resumes its own dropout stream and memory.
        mine = (rng_state(), map_tensors(lambda t: t.detach().cpu(), task.state_dict()))
        states: list[Any] = [mine]
        if world > 1:
            states = [None] * world
            dist.all_gather_object(states, mine)
        if cfg.out_dir is not None and main:
            save_checkpoint(os.path.join(cfg.out_dir, "last.pt"), model=raw.state_dict(),
                            optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                            plateau=plateau.state_dict(), step=step,
                            rng=[s[0] for s in states], task=[s[1] for s in states],
                            config=asdict(cfg))

    def evaluate(step: int, final: bool) -> dict[str, Any]:
        raw.eval()
        record: dict[str, Any] = {"step": step}
        with torch.no_grad(), autocast():
            for split in task.eval_splits:
                for key, value in task.evaluate(split, final).items():
                    record[f"{split}_{key}"] = value
        raw.train()
        watched = record.get(f"{task.eval_splits[0]}_loss")  # the plateau schedule's signal
        if watched is not None and plateau.observe(float(watched)):
            # The scheduler already set the next step's rate: anneal it too.
            for group in opt.param_groups:
                group["lr"] *= cfg.lr_decay
            record["lr_annealed_to"] = opt.param_groups[0]["lr"]
        record.update(time=time.time() - t0, peak_mem_mb=peak_memory_mb(device))
        log.write({"event": "eval", **record})
        bar.message("eval " + " ".join(f"{k} {v:.4g}" for k, v in record.items()
                                       if isinstance(v, float)))
        return record

    raw.train()
    for step in range(start, end):
        mode = "pretrain" if step < cfg.pretrain_steps else cfg.mode
        if raw.core.modes.mode != mode:
            raw.set_mode(mode)
            bar.message(f"step {step}: mode {mode}")
        logged = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
        # On logged steps of the unrolled modes, the last layer's change (a hook on f).
        change = LayerChange(raw.core.cell) if logged and mode != "deq" else None
        hook: Any = change if change is not None else contextlib.nullcontext()
        with autocast(), hook:
            loss = task.train_loss(model, step, rank, world)
        layer_change = change.value() if change is not None else None
        del change, hook  # the hook's z and f(z) are not kept past the forward pass
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = (nn.utils.clip_grad_norm_(raw.parameters(), cfg.clip) if cfg.clip > 0
                     else None)
        opt.step()
        lr = opt.param_groups[0]["lr"]  # the rate this step used, before the schedule moves on
        sched.step()
        value = float(loss.detach())
        losses.append(value)
        iters = solver_iterations(raw)
        bar.update(step, {"loss": value, **iters})
        if logged:
            extra: dict[str, float] = solver_residuals(raw)
            if layer_change is not None:
                extra["layer_change"] = layer_change
            log.write({"event": "train", "step": step + 1, "loss": value,
                       "ppl": math.exp(min(value, 50.0)), "mode": mode,
                       "lr": lr,
                       "grad_norm": None if grad_norm is None else float(grad_norm),
                       **iters, **extra, "time": time.time() - t0,
                       "peak_mem_mb": peak_memory_mb(device)})
        if cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0:
            checkpoint(step + 1)
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.steps:
            final = evaluate(step + 1, step + 1 == cfg.steps)
    if end > start:
        checkpoint(end)
    log.close()
    return {"losses": losses, "final": final, "wall_s": time.time() - t0, "start": start}
