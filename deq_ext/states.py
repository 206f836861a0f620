"""Structured states: z given as a tuple, list or dict of tensors batched on dim 0.

A multi-resolution DEQ keeps one tensor per resolution, e.g. ``(z_fine (B, C, 16, 16),
z_coarse (B, 2C, 8, 8))``. The solvers work on one flat ``(B, D)`` tensor: :class:`StateSpec`
concatenates each sample's elements of every leaf (in the order :func:`deq_ext._tree.map_tensors`
walks them: sequence order, dict insertion order) and restores the structure for ``f``, so
``f`` always sees and returns the user's structure.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from ._tree import map_tensors
from .precision import to_state_dtype


@dataclass(frozen=True)
class _Leaf:
    """What a structure compares by: each leaf's per-sample shape (and its position)."""

    shape: tuple[int, ...]


def is_structured(z: Any) -> bool:
    """Whether ``z`` is a tuple, list or dict (a structured state) rather than a tensor."""
    return isinstance(z, (tuple, list, dict))


def _leaves(obj: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    map_tensors(out.append, obj)
    return out


def _has_non_tensor_leaf(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return False
    if isinstance(obj, (list, tuple)):
        return any(_has_non_tensor_leaf(v) for v in obj)
    if isinstance(obj, dict):
        return any(_has_non_tensor_leaf(v) for v in obj.values())
    return True


class StateSpec:
    """The layout of a structured state: flattens it to ``(B, D)`` and back, for any batch size."""

    def __init__(self, z0: Any, name: str = "z0") -> None:
        if not is_structured(z0):
            raise TypeError(f"{name} must be a tensor or a tuple, list or dict of tensors, "
                            f"got {type(z0).__name__}")
        if _has_non_tensor_leaf(z0):
            raise TypeError(f"every leaf of a structured {name} must be a torch.Tensor")
        leaves = _leaves(z0)
        if not leaves:
            raise ValueError(f"a structured {name} must hold at least one tensor")
        first = leaves[0]
        for i, t in enumerate(leaves):
            if t.dim() < 1:
                raise ValueError(f"{name} leaf {i} is 0-d: every leaf must be batched on dim 0")
            if t.shape[0] != first.shape[0]:
                raise ValueError(f"{name} leaves must share the batch size (dim 0): leaf 0 has "
                                 f"{first.shape[0]}, leaf {i} has {t.shape[0]}")
            if t.dtype != first.dtype:
                raise TypeError(f"{name} leaves must share one dtype: leaf 0 is {first.dtype}, "
                                f"leaf {i} is {t.dtype}")
            if t.device != first.device:
                raise ValueError(f"{name} leaves must be on one device: leaf 0 is on {first.device}, "
                                 f"leaf {i} on {t.device}")
        self.template = z0
        self.batch = first.shape[0]
        self.dtype, self.device = first.dtype, first.device
        self.shapes = [tuple(t.shape[1:]) for t in leaves]
        self.sizes = [int(torch.Size(s).numel()) for s in self.shapes]
        self.signature = self._signature(z0)

    @staticmethod
    def _signature(obj: Any) -> Any:
        return map_tensors(lambda t: _Leaf(tuple(t.shape[1:])), obj)

    @property
    def numel(self) -> int:
        """D: the elements of one sample, all leaves together."""
        return sum(self.sizes)

    def pack(self, z: Any, what: str = "the state") -> torch.Tensor:
        """The structure ``z`` (laid out like the template) as one ``(n, D)`` tensor;
        differentiable, so gradients flow back to the leaves."""
        if not is_structured(z) or _has_non_tensor_leaf(z):
            raise TypeError(f"{what} must be structured like z0 (a {type(self.template).__name__} "
                            f"of tensors), got {type(z).__name__}")
        if self._signature(z) != self.signature:
            raise ValueError(f"{what} must have z0's structure and per-sample shapes "
                             f"{self.signature}, got {self._signature(z)}")
        leaves = _leaves(z)
        n = leaves[0].shape[0]
        for i, t in enumerate(leaves):
            if t.dtype != self.dtype:
                raise TypeError(f"{what}: leaf {i} must have z0's dtype {self.dtype}, got {t.dtype}")
            if t.shape[0] != n:
                raise ValueError(f"{what}: leaves must share the batch size, leaf {i} has "
                                 f"{t.shape[0]} rows, leaf 0 has {n}")
        return torch.cat([t.reshape(n, -1) for t in leaves], dim=1)

    def unpack(self, flat: torch.Tensor) -> Any:
        """The ``(n, D)`` tensor as the template's structure (views of ``flat``, any n)."""
        n = flat.shape[0]
        pieces = torch.split(flat.reshape(n, self.numel), self.sizes, dim=1)
        it: Iterator[torch.Tensor] = iter(p.reshape(n, *s) for p, s in zip(pieces, self.shapes))
        return map_tensors(lambda _: next(it), self.template)

    def wrap(self, f: Callable[..., Any]) -> Callable[..., torch.Tensor]:
        """``f`` on the structure as a function of the flat ``(n, D)`` tensor."""
        def flat_f(z: torch.Tensor, *inputs: Any) -> torch.Tensor:
            # Under torch.autocast the leaves may come back in autocast's dtype.
            out = to_state_dtype(f(self.unpack(z), *inputs), self.dtype)
            return self.pack(out, what="f's output")
        return flat_f


def solves_structured_states(solver: Callable[..., Any]) -> Callable[..., Any]:
    """Lets ``solver(f, z0, **options)`` take a structured ``z0``: it solves the flat problem
    and returns ``z`` (and ``recorded``) in z0's structure."""
    @functools.wraps(solver)
    def wrapper(f: Callable[..., Any], z0: Any, *args: Any, **options: Any) -> Any:
        if isinstance(z0, torch.Tensor) or not is_structured(z0):
            return solver(f, z0, *args, **options)  # the solver's own checks reject non-tensors
        if not callable(f):
            raise TypeError(f"f must be callable, got {type(f).__name__}")
        spec = StateSpec(z0)
        res = solver(spec.wrap(f), spec.pack(z0, what="z0").detach(), *args, **options)
        res.z = spec.unpack(res.z)
        if res.recorded is not None:
            res.recorded = [spec.unpack(r) for r in res.recorded]
        return res
    return wrapper
