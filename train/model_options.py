"""Command-line options for every field of a language model's configuration (``--model.X``).

One option per leaf field of :class:`models.LMConfig`, named by its dotted path (``--model.d_embed``,
``--model.core.d_inner``, ``--model.modes.forward.max_iter``), with the field's description from
its class docstring; :func:`models.overrides.apply_overrides` applies the values to the preset.
"""

from __future__ import annotations

import json
import typing
from typing import Any, Callable, Union

from models.lm import LMConfig
from models.overrides import NESTED, leaf_fields

from .config import _parse_bool, field_docs

# deq_ext.SolverSettings has no Attributes section; its fields, described here.
SOLVER_DOCS = {
    "method": "solver: broyden, anderson or fixed_point.",
    "max_iter": "iteration limit of the solve.",
    "tol": "stopping tolerance on the residual.",
    "stop_mode": "abs (absolute residual) or rel (relative residual).",
    "memory": "history size of Broyden/Anderson (none: the iteration limit).",
    "options": "further solver options, a JSON object (e.g. {\"line_search\": true}).",
}
SOLVES = {"forward": "training forward solve", "backward": "backward (adjoint) solve",
          "eval_forward": "forward solve in evaluation"}


def _tuple_of_ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


def converter(tp: Any) -> Callable[[str], Any]:
    """Parse a command-line string for a field annotated ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        base = converter([a for a in args if a is not type(None)][0])
        return lambda s: None if s.lower() == "none" else base(s)
    if origin is tuple:
        return _tuple_of_ints
    if origin is dict or tp is dict:
        return json.loads
    if tp is bool:
        return _parse_bool
    return tp


def model_options(prefix: str = "model") -> dict[str, tuple[Callable[[str], Any], str]]:
    """Dotted option name -> (string parser, help) for every leaf field of a language model."""
    out: dict[str, tuple[Callable[[str], Any], str]] = {}

    def add(path: str, cls: type, label: str = "") -> None:
        docs = SOLVER_DOCS if cls.__name__ == "SolverSettings" else field_docs(cls)
        for name, tp in leaf_fields(cls).items():
            full = f"{path}.{name}" if path else name
            if full in NESTED:
                continue
            text = docs.get(name, "").replace("``", "")
            if path.startswith("modes.") and path != "modes":
                text = f"{SOLVES[path.split('.')[1]]}: {text}"
            key = f"{prefix}.{full}"
            if key in out:  # a field both cores have: one option, both descriptions
                first = out[key][1].replace(" (transformer only)", "")
                both = first if first == text else f"transformer: {first} trellisnet: {text}"
                out[key] = (out[key][0], both)
                continue
            out[key] = (converter(tp), (text + label).strip())

    add("", LMConfig)
    add("core", NESTED["core"][0], " (transformer only)")
    add("core", NESTED["core"][1], " (trellisnet only)")
    add("modes", NESTED["modes"][0])
    for solve in SOLVES:
        add(f"modes.{solve}", NESTED[f"modes.{solve}"][0])
    return out
