"""The JSON record a training script writes at the end of a run (``--results`` / ``--out``)."""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict
from typing import Any, Optional, Sequence

import torch


def run_record(program: str, cfg: Any, summary: dict[str, Any], device: torch.device,
               argv: Optional[Sequence[str]], **figures: Any) -> dict[str, Any]:
    """Command, device, versions, configuration, parameters, final test figures, first and last
    training loss and wall time of a run, then the script's own ``figures``."""
    losses = summary["losses"]
    return {
        "command": f"python -m {program} " + " ".join(sys.argv[1:] if argv is None else list(argv)),
        "device": {"type": device.type, "cpu": platform.processor() or platform.machine(),
                   "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                   "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "config": asdict(cfg),
        "params": summary["params"],
        "final_test": summary["final"],
        **figures,
        "first_train_loss": losses[0] if losses else None,
        "last_train_loss": losses[-1] if losses else None,
        "wall_s": summary["wall_s"],
    }


def write_record(path: str, record: dict[str, Any]) -> None:
    """Write ``record`` as indented JSON, creating the parent directory."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(record, fh, indent=2)
