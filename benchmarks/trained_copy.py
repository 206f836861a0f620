"""A DEQ that converges as trained DEQs do: the copy-memory DEQ-Transformer, trained here.

Timing tables on random weights measure a DEQ whose solves never converge (every solve runs to
its iteration limit), which no trained model does. The runtime table therefore also times this
model: the project's main job (``python -m train.copy_memory``, about 3 minutes on 2 cores),
trained once into a run directory and loaded from its checkpoint on later runs, on real test
sequences. ``quick`` trains the ``tiny`` preset instead (seconds; for smoke tests).
"""

from __future__ import annotations

import os
from dataclasses import fields
from typing import Any, Optional

import torch

from deq_ext.bench import progress

DEFAULT_DIR = os.path.join("out", "bench-copy-memory")  # /out/ is ignored by git


def train_args(run_dir: str, quick: bool) -> list[str]:
    """The training command's arguments (recorded with the results)."""
    args = ["--out-dir", run_dir, "--progress", "false",
            "--results", os.path.join(run_dir, "results.json")]
    return args + (["--preset", "tiny"] if quick else [])


def load(run_dir: str = DEFAULT_DIR, quick: bool = False) -> dict[str, Any]:
    """The trained model in DEQ mode, its config, test sequences and how it was obtained.

    Trains first when ``run_dir`` holds no finished run (no ``last.pt`` at the final step).
    """
    from train import copy_memory

    path = os.path.join(run_dir, "last.pt")
    ckpt = _checkpoint(path)
    trained_now = ckpt is None or int(ckpt["step"]) < int(ckpt["config"]["steps"])
    if trained_now:
        progress(f"training the copy-memory model into {run_dir} (python -m train.copy_memory "
                 f"{' '.join(train_args(run_dir, quick))})")
        copy_memory.main(train_args(run_dir, quick))
        ckpt = _checkpoint(path)
    assert ckpt is not None, f"training wrote no checkpoint to {path}"
    known = {f.name for f in fields(copy_memory.CopyConfig)}
    cfg = copy_memory.CopyConfig(**{k: v for k, v in ckpt["config"].items() if k in known})
    model = copy_memory.CopyModel(cfg)
    model.load_state_dict(ckpt["model"])
    model.set_mode("deq")
    data = copy_memory.copy_memory_splits(cfg.T, cfg.data_seed, cfg.train_size, cfg.test_size)
    return {"model": model, "config": cfg, "test_x": data["test"][0], "step": ckpt["step"],
            "run_dir": run_dir, "trained_now": trained_now,
            "train_command": "python -m train.copy_memory " + " ".join(train_args(run_dir, quick))}


def _checkpoint(path: str) -> Optional[dict[str, Any]]:
    """The run's last checkpoint, or None when there is none yet."""
    if not os.path.exists(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=False)
