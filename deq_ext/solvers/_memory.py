"""A clear error, before allocating, when a solve's workspace does not fit.

An out-of-memory failure in the middle of a training step names neither the solver nor what to
change. Before a solve allocates its state, and before its history grows by a chunk, the bytes
about to be allocated are compared with what is free: on CUDA the device's free memory plus what
PyTorch's caching allocator holds unused; on the CPU the memory the system reports available
(``MemAvailable``), or, when one is set (:func:`set_cpu_workspace_budget` or the environment
variable ``DEQ_EXT_CPU_WORKSPACE_BUDGET``, in bytes), a budget for everything the solve holds. A
request that does not fit raises :class:`WorkspaceError` (a ``MemoryError``) naming the bytes
and the options that shrink them.
"""

from __future__ import annotations

import os
from typing import Optional

import torch


class WorkspaceError(MemoryError):
    """A solver's workspace does not fit in the memory available to it."""


_cpu_budget: Optional[int] = None

SHRINK_HINTS = ("a smaller memory= (history ring length m; Broyden's restart=True keeps a short "
                "ring converging)", "history_dtype=torch.bfloat16 where the history is wide "
                "(half its bytes)", "a smaller max_iter", "a smaller batch")


def set_cpu_workspace_budget(nbytes: Optional[int]) -> None:
    """Bytes a CPU solve may allocate for its workspace (None: what the system reports
    available, or ``DEQ_EXT_CPU_WORKSPACE_BUDGET``)."""
    global _cpu_budget
    if nbytes is not None and (not isinstance(nbytes, int) or isinstance(nbytes, bool)
                               or nbytes <= 0):
        raise ValueError(f"the CPU workspace budget must be a positive number of bytes or None, "
                         f"got {nbytes!r}")
    _cpu_budget = nbytes


def _system_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_budget() -> Optional[int]:
    """The CPU workspace budget in bytes, if one is set."""
    if _cpu_budget is not None:
        return _cpu_budget
    env = os.environ.get("DEQ_EXT_CPU_WORKSPACE_BUDGET")
    return int(env) if env else None


def available_bytes(device: torch.device, held: int = 0) -> Optional[int]:
    """Bytes a workspace that holds ``held`` may still take on ``device`` (None: not checked)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached
    if device.type == "cpu":
        budget = cpu_budget()
        return budget - held if budget is not None else _system_available()
    return None  # meta and other devices: nothing to run out of here


def ensure_fits(nbytes: int, device: torch.device, what: str, held: int = 0,
                worst: Optional[int] = None) -> None:
    """Raise :class:`WorkspaceError` if ``nbytes`` more cannot be allocated on ``device``.

    ``what`` names the request; ``held`` is what the solve already holds (counted against a CPU
    budget), ``worst`` what it may need at most (for the message)."""
    available = available_bytes(device, held)
    if available is None or nbytes <= available:
        return
    where = "is in the budget" if device.type == "cpu" and cpu_budget() is not None else "is free"
    parts = [f"deq_ext: the solver needs {_size(nbytes)} more for {what} on {device}, but only "
             f"{_size(max(available, 0))} {where}"]
    if held:
        parts.append(f"it holds {_size(held)} already")
    if worst is not None:
        parts.append(f"a full history would take {_size(worst)}")
    hint = "; ".join(parts) + ". Options that shrink it: " + ", ".join(SHRINK_HINTS)
    if device.type == "cpu":
        hint += " (or raise the budget: deq_ext.set_cpu_workspace_budget / " \
                "DEQ_EXT_CPU_WORKSPACE_BUDGET)"
    raise WorkspaceError(hint + ".")


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024  # type: ignore[assignment]
    return f"{nbytes} B"
