"""One walk over nested inputs, shared by compaction and the training checkpoints."""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch


def map_tensors(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    """``obj`` with ``fn`` applied to every tensor in it, also inside lists, tuples (named too)
    and dicts, whose types are kept; everything else is returned unchanged."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        items = [map_tensors(fn, v) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the mapping's type (OrderedDict, defaultdict, ...)
        for k, v in obj.items():
            out[k] = map_tensors(fn, v)
        return out
    return obj
