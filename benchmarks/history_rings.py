"""Bounded Broyden histories in a DEQ training step of the trained models of this repository.

``python -m benchmarks.history_rings [--quick] [--copy-dir D] [--digits-dir D] [--lm-dir D]
[--batches N] [--out PATH]``

The DEQ layer's default history (``SolverSettings.memory=None``: a ring of 16 pairs forward and 8
backward that restarts when full, bfloat16 under a float32 state) is chosen from this record. For
each trained model (the copy-memory DEQ-Transformer, the digits MDEQ, the CPU language model; each
trained into its run directory first when it holds no finished run) and ``--batches`` training
batches, one training step (forward solve, ``loss.backward()`` with its adjoint solve) runs per
variant of one solve's history, the other solve kept at the whole float32 history:

* the whole history (``memory = max_iter``), float32 (the old default) and bfloat16;
* rings of 4, 8 and 16 pairs that replace their oldest pair when full, and the same rings
  restarting (``restart=True``: a full ring starts over from H = -I);
* backward only: the fixed-point iteration (no history at all);
* the layer's default.

Per variant: the solve's mean and largest step count and the fraction of samples converged, and
for the backward variants the relative error of the parameters' gradient against a reference
adjoint solve (whole float32 history, 300 steps, tolerance 1000x tighter); the forward variants
move z* within the forward tolerance, so their gradients differ by that much and only their
steps are compared. Step counts do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Optional

import torch

from deq_ext import SolverSettings, Status
from deq_ext.bench import progress, provenance, write_json

RINGS = (4, 8, 16)
QUICK_RINGS = (2,)
DEFAULT_DIRS = {"copy_memory": os.path.join("out", "bench-copy-memory"),
                "digits": os.path.join("out", "bench-digits"),
                "language_model": os.path.join("out", "bench-cpu-lm")}


@dataclass
class Trained:
    """A trained model in DEQ training mode and the loss of its i-th training batch."""

    name: str
    model: torch.nn.Module
    loss: Callable[[int], torch.Tensor]
    step: int
    train_command: str


def _checkpoint(run_dir: str) -> Optional[dict[str, Any]]:
    path = os.path.join(run_dir, "last.pt")
    if not os.path.exists(path):
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return ckpt if int(ckpt["step"]) >= int(ckpt["config"]["steps"]) else None


def _config(cls: Any, ckpt: dict[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in ckpt["config"].items() if k in known})


def _load(name: str, run_dir: str, quick: bool) -> Trained:
    """Train (when ``run_dir`` holds no finished run) and load one of the three models."""
    from train import copy_memory, digits, language_model

    module: Any = {"copy_memory": copy_memory, "digits": digits,
                   "language_model": language_model}[name]
    args = ["--out-dir", run_dir, "--progress", "false"]
    if name == "language_model":
        args += ["--config", os.path.join("configs", "cpu_lm.json")]
    elif quick:
        args += ["--preset", "tiny"]
    ckpt = _checkpoint(run_dir)
    if ckpt is None:
        progress(f"training {name} into {run_dir} (python -m train.{name} {' '.join(args)})")
        module.main(args)
        ckpt = _checkpoint(run_dir)
    assert ckpt is not None, f"training wrote no finished checkpoint to {run_dir}"
    device = torch.device("cpu")
    if name == "copy_memory":
        task: Any = copy_memory.CopyTask(_config(copy_memory.CopyConfig, ckpt), device)
    elif name == "digits":
        task = digits.DigitsTask(_config(digits.DigitsConfig, ckpt), device)
    else:
        from train.data_lm import Corpus

        cfg = _config(language_model.LMRunConfig, ckpt)
        task = language_model.LMTask(cfg, Corpus(cfg.data), device, 0, 1)
    task.model.load_state_dict(ckpt["model"])
    task.model.set_mode("deq")
    task.model.train()

    def loss(i: int) -> torch.Tensor:
        if hasattr(task, "memory"):
            task.memory = None  # every batch from an empty Transformer-XL memory
        torch.manual_seed(i)  # the same dropout draws in every variant
        return task.train_loss(task.model, i, 0, 1)

    return Trained(name, task.model, loss, int(ckpt["step"]),
                   f"python -m train.{name} {' '.join(args)}")


def _settings(base: SolverSettings, variant: dict[str, Any]) -> SolverSettings:
    """``base`` with a variant's history: ``memory`` None is the layer's default."""
    if variant.get("method") == "fixed_point":
        return replace(base, method="fixed_point", memory=None, options={})
    opts = {k: v for k, v in base.options.items() if k not in ("restart", "history_dtype")}
    if variant["memory"] is None:
        return replace(base, memory=None, options=opts)
    opts["restart"] = variant.get("restart", False)
    opts["history_dtype"] = variant.get("history_dtype", torch.float32)
    return replace(base, memory=min(variant["memory"], base.max_iter), options=opts)


def variants(rings: tuple[int, ...], backward: bool) -> list[dict[str, Any]]:
    """The histories compared for one solve (``memory`` None: the layer's default)."""
    out: list[dict[str, Any]] = [{"label": "whole, float32", "memory": 10**6},
                                 {"label": "whole, bfloat16", "memory": 10**6,
                                  "history_dtype": torch.bfloat16}]
    for m in rings:
        out.append({"label": f"ring {m}", "memory": m})
        out.append({"label": f"ring {m}, restart", "memory": m, "restart": True})
    if backward:
        out.append({"label": "fixed point (no history)", "method": "fixed_point"})
    out.append({"label": "layer default", "memory": None})
    return out


def _stats(model: torch.nn.Module, key: str) -> tuple[list[int], list[bool]]:
    core: Any = model.core  # type: ignore[attr-defined]
    steps: list[int] = []
    conv: list[bool] = []
    for chunk in core.solver_stats:
        st = chunk[key]
        steps += st.nstep.tolist()
        conv += (st.status == Status.CONVERGED).tolist()
    return steps, conv


def _step(trained: Trained, fwd: SolverSettings, bwd: SolverSettings,
          i: int) -> tuple[torch.Tensor, dict[str, tuple[list[int], list[bool]]]]:
    """One training step on batch ``i``: the flat gradient and both solves' steps."""
    model: Any = trained.model
    model.set_mode("deq", forward=fwd, backward=bwd)
    for p in model.parameters():
        p.grad = None
    trained.loss(i).backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return grad, {k: _stats(model, k) for k in ("forward", "backward")}


def sweep_model(trained: Trained, rings: tuple[int, ...], batches: int) -> dict[str, Any]:
    """Every variant of both solves on ``batches`` training batches."""
    core: Any = trained.model.core  # type: ignore[attr-defined]
    fwd0, bwd0 = core.modes.forward, core.modes.backward
    whole = {"memory": 10**6}
    fwd_whole, bwd_whole = _settings(fwd0, whole), _settings(bwd0, whole)
    ref_bwd = replace(bwd_whole, max_iter=300, memory=300, tol=bwd0.tol * 1e-3)
    refs = [_step(trained, fwd_whole, ref_bwd, i)[0] for i in range(batches)]
    out: dict[str, Any] = {"model": trained.name, "weights": f"trained ({trained.step} steps)",
                           "train_command": trained.train_command,
                           "forward": repr(fwd0), "backward": repr(bwd0),
                           "reference_backward": repr(ref_bwd), "batches": batches, "rows": []}
    for direction in ("forward", "backward"):
        for v in variants(rings, direction == "backward"):
            t0 = time.perf_counter()
            fwd = _settings(fwd0, v) if direction == "forward" else fwd_whole
            bwd = _settings(bwd0, v) if direction == "backward" else bwd_whole
            steps: list[int] = []
            conv: list[bool] = []
            errors = []
            for i in range(batches):
                grad, st = _step(trained, fwd, bwd, i)
                steps += st[direction][0]
                conv += st[direction][1]
                errors.append(float((grad - refs[i]).norm() / refs[i].norm()))
            row = {"solve": direction, "history": v["label"],
                   "settings": repr((fwd if direction == "forward" else bwd).resolved(direction)),
                   "max_iter": (fwd0 if direction == "forward" else bwd0).max_iter,
                   "nstep_mean": sum(steps) / len(steps), "nstep_max": max(steps),
                   "converged": sum(conv) / len(conv), "samples": len(conv),
                   "seconds": time.perf_counter() - t0}
            if direction == "backward":
                row["grad_error_max"], row["grad_error_mean"] = max(errors), \
                    sum(errors) / len(errors)
            out["rows"].append(row)
            progress(f"{trained.name} {direction} {v['label']}: steps {row['nstep_mean']:.2f} "
                     f"mean, {row['nstep_max']} max, {row['converged']:.1%} converged"
                     + (f", grad error {row['grad_error_max']:.2e}" if "grad_error_max" in row
                        else ""))
    return out


def format_table(results: dict[str, Any]) -> str:
    lines = [f"Broyden histories in a training step of the trained models ({results['device']})"]
    for m in results["models"]:
        lines.append(f"\n{m['model']} ({m['weights']}, {m['batches']} batches): forward "
                     f"{m['forward']}; backward {m['backward']}")
        lines.append(f"  {'solve':<9}{'history':<26}{'steps mean':>11}{'max':>5}{'converged':>11}"
                     f"{'grad error':>12}")
        for r in m["rows"]:
            err = f"{r['grad_error_max']:>12.2e}" if "grad_error_max" in r else f"{'':>12}"
            lines.append(f"  {r['solve']:<9}{r['history']:<26}{r['nstep_mean']:>11.2f}"
                         f"{r['nstep_max']:>5}{r['converged']:>11.1%}{err}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args_list = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.history_rings",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny presets (trained in seconds), one ring, the language model left out")
    p.add_argument("--copy-dir", default=DEFAULT_DIRS["copy_memory"])
    p.add_argument("--digits-dir", default=DEFAULT_DIRS["digits"])
    p.add_argument("--lm-dir", default=DEFAULT_DIRS["language_model"],
                   help="run directory of the CPU language model (configs/cpu_lm.json; needs "
                        "its corpus: python -m train.synthetic_corpus data/synthetic_ptb)")
    p.add_argument("--models", nargs="+", default=list(DEFAULT_DIRS), choices=list(DEFAULT_DIRS),
                   help="which trained models (default: all three)")
    p.add_argument("--batches", type=int, default=3, help="training batches per variant")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(args_list)
    torch.set_num_threads(args.threads)
    results = provenance(torch.device("cpu"), "python -m benchmarks.history_rings", args_list)
    t0 = time.perf_counter()
    dirs = {"copy_memory": args.copy_dir, "digits": args.digits_dir,
            "language_model": args.lm_dir}
    dirs = {k: v for k, v in dirs.items() if k in args.models
            and not (args.quick and k == "language_model")}
    rings = QUICK_RINGS if args.quick else RINGS
    results["models"] = [sweep_model(_load(name, d, args.quick), rings,
                                     1 if args.quick else args.batches)
                         for name, d in dirs.items()]
    results["wall_s"] = time.perf_counter() - t0
    print(format_table(results), flush=True)
    if args.out:
        write_json(results, args.out)
    return results


if __name__ == "__main__":
    main()
