"""A high-water mark of tensor memory on any device (CPU and meta included).

CUDA has ``torch.cuda.max_memory_allocated``; the CPU allocator keeps no such statistic. This
module follows every tensor storage that the operators called under :class:`PeakTracker` create,
until it is freed, and keeps the largest total: the peak of what a step allocated above what
existed before it (parameters, inputs, anything created earlier does not count; gradients,
saved activations, solver workspace and transients do).

It sees what goes through the dispatcher: every ATen operator and every registered custom
operator (deq_ext's ops included), in the forward and in the backward. Not seen: scratch memory an
operator allocates and frees inside its own C++ body, and the allocator's rounding, so the figure
is a lower bound of the process's peak, exact for everything a Python user can hold.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class PeakTracker(TorchDispatchMode):
    """Tracks the live bytes of the storages created while it is active, and their peak.

    An operator's output that shares a storage with one of its inputs (a view, an in-place or
    ``out=`` operator) allocated nothing and is not counted again.

    ``label(tensor)``, if given, names what a new storage is (or None); :attr:`peak_labelled`
    then holds, per label, the bytes of the live storages so labelled at the peak (e.g. how much
    of the peak is a solver's history), and :attr:`label_peaks` the most each label held live
    at any one time.
    """

    def __init__(self, label: Optional[Callable[[torch.Tensor], Optional[str]]] = None) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int, Optional[str]]] = {}
        self.current = 0
        self.peak = 0
        self._label = label
        self._labelled: dict[str, int] = {}
        self.peak_labelled: dict[str, int] = {}
        self.label_peaks: dict[str, int] = {}

    def _prune(self) -> None:
        dead = [k for k, (ref, _, _) in self._live.items() if ref.expired()]
        for k in dead:
            _, nbytes, name = self._live.pop(k)
            self.current -= nbytes
            if name is not None:
                self._labelled[name] -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_key(t) for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        self._prune()  # storages freed since the last operator
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            key = _storage_key(t)
            if key in inputs or key in self._live:
                continue
            st = t.untyped_storage()
            name = self._label(t) if self._label is not None else None
            self._live[key] = (StorageWeakRef(st), st.nbytes(), name)
            self.current += st.nbytes()
            if name is not None:
                self._labelled[name] = self._labelled.get(name, 0) + st.nbytes()
                self.label_peaks[name] = max(self.label_peaks.get(name, 0),
                                             self._labelled[name])
        if self.current > self.peak:
            self.peak = self.current
            self.peak_labelled = dict(self._labelled)
        return out


def peak_bytes(step: Callable[[], Any]) -> int:
    """Peak bytes of tensor storage ``step()`` held at once, above what existed before it."""
    with PeakTracker() as tracker:
        step()
    return tracker.peak
