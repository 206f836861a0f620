"""Change any field of a language model's configuration by its dotted name.

    >>> cfg = apply_overrides(get_preset("deq_transformer_small").config,
    ...                       {"core.d_inner": 4000, "modes": {"forward": {"max_iter": 20}}})

Names follow the dataclasses: ``d_embed``, ``core.<field>`` (of the preset's
:class:`~models.TransformerConfig` or :class:`~models.TrellisNetConfig`), ``modes.<field>``, and
``modes.forward.<field>`` / ``modes.backward.<field>`` / ``modes.eval_forward.<field>`` for the
:class:`deq_ext.SolverSettings` of the three solves. Values are checked against the field's type
(a JSON list becomes a tuple, an int is accepted for a float); an unknown name or a value of the
wrong type is a ValueError naming the field.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping, Union

from deq_ext import SolverSettings

from .lm import LMConfig
from .modes import ModeConfig
from .transformer import TransformerConfig
from .trellisnet import TrellisNetConfig

# The nested configurations a dotted name can walk into.
NESTED: dict[str, tuple[type, ...]] = {
    "core": (TransformerConfig, TrellisNetConfig),
    "modes": (ModeConfig,),
    "modes.forward": (SolverSettings,),
    "modes.backward": (SolverSettings,),
    "modes.eval_forward": (SolverSettings,),
}


def flatten(overrides: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"core": {"d_inner": 5}}`` -> ``{"core.d_inner": 5}`` (dotted keys are kept)."""
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and name in NESTED:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def leaf_fields(cls: type) -> dict[str, Any]:
    """Field name -> type annotation of a configuration dataclass, nested ones left out."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """``value`` checked against (and lightly converted to) the annotation ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        return tuple(_coerce(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{name} must be an object, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return value
    raise ValueError(f"{name}: cannot set a field of type {tp}")


def _set(obj: Any, parts: list[str], value: Any, path: str, full: str) -> Any:
    """``obj`` with the field at ``parts`` replaced (``path``: the dotted name of ``obj``)."""
    fields = leaf_fields(type(obj))
    head = parts[0]
    if head not in fields:
        where = f"model.{path}" if path else "model"
        raise ValueError(f"unknown model option {full!r}: {where} ({type(obj).__name__}) has "
                         f"no field {head!r}; fields: {sorted(fields)}")
    name = f"{path}.{head}" if path else head
    if len(parts) == 1:
        if name in NESTED:
            raise ValueError(f"model option {full!r} is a group; set its fields "
                             f"(e.g. model.{name}.<field>)")
        return dataclasses.replace(obj, **{head: _coerce("model." + full, value, fields[head])})
    if name not in NESTED:
        raise ValueError(f"unknown model option {full!r}: model.{name} has no fields")
    child = getattr(obj, head)
    if child is None and name == "modes.eval_forward":
        child = obj.forward  # no separate inference settings yet: start from the training ones
    return dataclasses.replace(obj, **{head: _set(child, parts[1:], value, name, full)})


def apply_overrides(cfg: LMConfig, overrides: Mapping[str, Any]) -> LMConfig:
    """``cfg`` with every (dotted or nested) field of ``overrides`` replaced."""
    for full, value in flatten(overrides).items():
        parts = full.split(".")
        if parts[0] == "core" and len(parts) == 2:
            kinds = [c for c in NESTED["core"] if parts[1] in leaf_fields(c)]
            if kinds and not isinstance(cfg.core, kinds[0]) and len(kinds) == 1:
                raise ValueError(f"model option {full!r} is a {kinds[0].__name__} field, but "
                                 f"this model's core is a {type(cfg.core).__name__}")
        cfg = _set(cfg, parts, value, "", full)
    return cfg
