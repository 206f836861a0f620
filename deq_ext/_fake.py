"""Fake (meta) implementations of the extension ops, for torch.compile and FakeTensor.

Every op writes into tensors it is given (its schema marks which) and returns
nothing, so its fake implementation has no output to describe: it only has to
exist, so that the compiler can trace a call without running a kernel. It does
check that all tensors share one device, as the kernels do: otherwise a call with
one meta tensor among CPU tensors would be dispatched here and pass silently. The
other checks (shapes, dtypes) run with the kernel.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

_registered: set[str] = set()


def _same_device_check(qualname: str) -> Callable[..., None]:
    namespace, name = qualname.split("::")
    names = [a.name for a in getattr(getattr(torch.ops, namespace), name).default._schema.arguments]

    def fake(*args, **kwargs) -> None:
        bound = dict(zip(names, args), **kwargs)
        tensors = []
        for n, v in bound.items():
            if isinstance(v, torch.Tensor):
                tensors.append((n, v))
            elif isinstance(v, (list, tuple)):  # a history given as a list of chunks
                tensors += [(f"{n}[{i}]", t) for i, t in enumerate(v) if isinstance(t, torch.Tensor)]
        first_name, first = tensors[0]
        for n, t in tensors[1:]:
            if t.device != first.device:
                raise RuntimeError(f"deq_ext: '{n}' is on {t.device} but '{first_name}' is on "
                                   f"{first.device}")
        return None

    return fake


def register(namespace: str, names: Iterable[str]) -> None:
    """Registers the fake implementation of ``namespace::name`` for each name (once)."""
    for name in names:
        qualname = f"{namespace}::{name}"
        if qualname not in _registered:
            torch.library.register_fake(qualname)(_same_device_check(qualname))
            _registered.add(qualname)
