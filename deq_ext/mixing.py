"""Cells whose output mixes samples, which compaction would silently change.

Compaction evaluates f on the samples still active only. That is exact when each sample's row
of f's output depends on its own rows of z and of the inputs alone; a module that computes
statistics over the batch (batch normalization in training mode) sees other statistics on
fewer rows, and every sample's fixed point moves. Before a compacted solve the layer walks f's
modules once (:func:`check_compactable`) and refuses such an f with an error that names the
module: compaction is the default, so a warning that turned it off would hide a change of cost
(every solver step on the whole batch) behind a message that is easy to miss, and an error is
fixed by one argument (``compact=False``).

What counts as mixing samples (:func:`sample_mixers`):

* ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm`` and the lazy variants when they use batch
  statistics: in training mode, or in eval mode without running statistics
  (``track_running_stats=False``);
* a module, module class or function marked with :func:`mixes_samples` (e.g. one that calls
  ``F.batch_norm(..., training=True)`` or attends across the batch); ``mixes_samples(m, False)``
  marks one as row-wise, overriding the batch-norm rule.

GroupNorm, LayerNorm, InstanceNorm, weight norm and dropout (with masks passed as inputs) keep
samples apart. f that is a plain function is checked only if it was marked: deq_ext cannot see
inside it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, TypeVar

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

_MARK = "_deq_ext_mixes_samples"
T = TypeVar("T")


def mixes_samples(obj: T, mixes: Optional[bool] = True) -> T:
    """Mark a module or function as mixing samples (True), as row-wise (False), or clear the
    mark (None: the built-in rule decides again). Returns ``obj``, so it can wrap a definition.

    A marked module inside a DEQ's f makes a compacted solve raise a ValueError (pass
    ``compact=False``); a module marked False is compacted even if it is a batch norm.

    Example:
        >>> norm = deq_ext.mixes_samples(MyBatchStatsNorm(64))
        >>> row_wise = deq_ext.mixes_samples(nn.BatchNorm1d(64), False)  # e.g. B is always 1
    """
    if mixes is not None and not isinstance(mixes, bool):
        raise TypeError(f"mixes must be True, False or None, got {mixes!r}")
    if isinstance(obj, nn.Module) or callable(obj):
        try:
            if mixes is None:
                if _MARK in vars(obj):
                    delattr(obj, _MARK)
            else:
                setattr(obj, _MARK, mixes)
        except (AttributeError, TypeError):
            raise TypeError(f"cannot mark a {type(obj).__name__} (a bound method?): mark the "
                            "module or the function itself") from None
        return obj
    raise TypeError(f"mixes_samples takes an nn.Module or a function, got {type(obj).__name__}")


def _mark(obj: Any) -> Optional[bool]:
    """The mark of ``obj`` or of its class (looked up without nn.Module's slow ``__getattr__``)."""
    mark = getattr(obj, "__dict__", {}).get(_MARK)
    return getattr(type(obj), _MARK, None) if mark is None else mark


def _mixes(obj: Any) -> Optional[str]:
    """Why ``obj`` mixes samples in its current mode, or None."""
    mark = _mark(obj)
    if mark is not None:
        return "marked with deq_ext.mixes_samples" if mark else None
    if isinstance(obj, _BatchNorm):
        if obj.training:
            return "batch statistics in training mode"
        if obj.running_mean is None:
            return "batch statistics (track_running_stats=False)"
    return None


def _roots(f: Any) -> list[tuple[str, Any]]:
    """The objects to look into: f, the module behind a bound method, a partial's function."""
    if isinstance(f, functools.partial):
        return _roots(f.func)
    owner = getattr(f, "__self__", None)
    if isinstance(owner, nn.Module):
        return [("f", f), ("f", owner)]
    return [("f", f)]


def sample_mixers(f: Callable[..., Any]) -> list[str]:
    """The modules of f (and f itself) that mix samples in their current mode, as
    ``"name (Type): why"``; empty when f is row-wise as far as deq_ext can tell."""
    found: list[str] = []
    for root_name, root in _roots(f):
        if isinstance(root, nn.Module):
            # One cheap pass over the modules (every forward call); names only for a finding.
            if not any(_mixes(m) is not None for m in root.modules()):
                continue
            for name, module in root.named_modules():
                why = _mixes(module)
                if why is not None:
                    label = f"{root_name}.{name}" if name else root_name
                    found.append(f"{label} ({type(module).__name__}): {why}")
        else:
            why = _mixes(root)
            if why is not None:
                found.append(f"{root_name} ({getattr(root, '__name__', type(root).__name__)}): {why}")
    return found


def check_compactable(f: Callable[..., Any], forward: bool, backward: bool) -> None:
    """Raise a ValueError naming the modules of f that mix samples if the forward or the
    backward (adjoint) solve is to be compacted."""
    if not (forward or backward):
        return
    mixers = sample_mixers(f)
    if not mixers:
        return
    if forward:
        where, fix = "the forward solve", "Pass compact=False to the DEQ layer (or deq_fixed_point)"
    else:
        where, fix = "the adjoint solve", "Pass backward=dict(compact=False)"
    raise ValueError(
        f"deq_ext: f mixes samples ({'; '.join(mixers)}), but {where} is compacted: f would "
        f"see only the active samples and every sample's result would change. {fix}; a batch "
        "norm in eval mode also compacts. If a module keeps samples apart after all, "
        "deq_ext.mixes_samples(module, False) says so.")
