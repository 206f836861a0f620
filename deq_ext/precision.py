"""Mixed precision: f under ``torch.autocast``, the solves in the state's precision.

Autocast runs f's matrix products in a lower precision (bfloat16 on the CPU, float16 or bfloat16
on CUDA) and so makes f return that dtype, whatever dtype ``z`` came in. The solvers keep their
state in float32 or wider (float64 for a float64 ``z0``) and hand f ``z`` in ``z0``'s dtype, so
one rule decides what is done with f's output: under an enabled autocast for f's device, an
output of autocast's dtype (or float32, which autocast's widening ops return) is cast to
``z0``'s dtype (:func:`autocast_output`); any other mismatch is still an error.

The layer goes one step further (:class:`AutocastState`): the solves' own arithmetic runs with
autocast off, and every call of f, in the forward solve, at ``z*`` and when the adjoint solve
re-records f on fewer rows, runs under the autocast setting the layer was called with. The
backward pass usually runs outside the ``autocast`` block; the vector-Jacobian products through
the recorded f use the dtypes autograd recorded, and the re-recordings use the saved setting.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ._tree import map_tensors


def autocast_output(out: torch.Tensor, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``out`` cast to ``dtype`` when autocast explains the mismatch, else None.

    Autocast explains it when it is enabled for ``out``'s device type and ``out`` is of
    autocast's dtype there or float32 (the dtype of autocast's float32-policy ops).
    """
    kind = out.device.type
    if not (out.is_floating_point() and dtype.is_floating_point) or kind not in AUTOCAST_DEVICES:
        return None
    if not torch.is_autocast_enabled(kind):
        return None
    if out.dtype not in (torch.get_autocast_dtype(kind), torch.float32):
        return None
    return out.to(dtype)


def to_state_dtype(out: Any, dtype: torch.dtype) -> Any:
    """Every tensor of ``out`` (a tensor or a structure of tensors) that autocast made of another
    dtype than ``dtype``, cast to it (:func:`autocast_output`); everything else as it is."""
    def cast(t: torch.Tensor) -> torch.Tensor:
        if t.dtype == dtype:
            return t
        cast_t = autocast_output(t, dtype)
        return t if cast_t is None else cast_t
    return map_tensors(cast, out)


# Device types autocast has a setting for (the solvers also run on meta tensors).
AUTOCAST_DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class AutocastState:
    """The autocast setting of one device type, as it was when the layer was called."""

    kind: str
    enabled: bool
    dtype: torch.dtype

    @classmethod
    def now(cls, device: torch.device) -> "AutocastState":
        """The current setting for ``device``'s type (off for types autocast does not know,
        such as meta)."""
        kind = device.type
        if kind not in AUTOCAST_DEVICES:
            return cls(kind, False, torch.float32)
        return cls(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))

    def applied(self) -> contextlib.AbstractContextManager:
        """A context that restores this setting (f is recorded the same way again)."""
        if self.kind not in AUTOCAST_DEVICES:
            return contextlib.nullcontext()
        return torch.autocast(self.kind, self.dtype, self.enabled)

    def off(self) -> contextlib.AbstractContextManager:
        """A context with autocast off for this device type (the solvers' own arithmetic);
        a no-op when this setting was already off."""
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.kind, enabled=False)

    def wrap(self, f: Callable[..., Any], dtype: torch.dtype) -> Callable[..., Any]:
        """``f`` run under this setting, its output cast to ``dtype`` where autocast made it
        narrower; ``f`` itself when this setting is off."""
        if not self.enabled:
            return f

        def f_under_autocast(z: Any, *inputs: Any) -> Any:
            with self.applied():
                return to_state_dtype(f(z, *inputs), dtype)
        return f_under_autocast
