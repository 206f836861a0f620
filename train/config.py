"""Run configuration: a dataclass filled from defaults, a preset, a JSON file and the command line.

Precedence, lowest first: the dataclass defaults, ``--preset NAME``, ``--config FILE`` (a JSON
object of field names), then explicit command-line flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional, Sequence, TypeVar, get_type_hints

from deq_ext.layer import GRAD_MODES
from deq_ext.shine import BACKWARD_INITS

C = TypeVar("C", bound="TrainConfig")


@dataclass
class TrainConfig:
    """Fields every training script shares (the scripts subclass it with their own).

    Attributes:
        seed: seeds the model initialisation, data order and dropout.
        steps: optimizer steps in total (pretrain steps included).
        batch_size: sequences per step and per process.
        optimizer: ``adamw`` (decoupled weight decay), ``adam`` (L2 weight decay, as the
            authors' scripts use torch.optim.Adam) or ``sgd`` (TrellisNet's PTB recipe).
        lr: the peak learning rate.
        weight_decay: the optimizer's weight decay.
        lr_warmup: steps of linear learning-rate warmup.
        schedule: ``cosine`` (to ``min_lr_ratio * lr``), ``linear``, ``constant``, ``step``
            (multiply by ``lr_decay`` at each step of ``lr_decay_at``) or ``plateau`` (multiply
            by ``lr_decay`` at an evaluation whose loss is above the best one from before the
            last ``plateau_patience`` evaluations, while the rate is above ``plateau_min_lr``:
            TrellisNet's PTB annealing) after warmup.
        min_lr_ratio: the cosine schedule's final learning rate, as a fraction of ``lr``.
        lr_decay_at: the ``step`` schedule's milestones: comma-separated step numbers.
        lr_decay: the ``step`` schedule's factor at each milestone (``plateau``: at each
            plateau).
        plateau_patience: evaluations the ``plateau`` schedule looks back past.
        plateau_min_lr: the ``plateau`` schedule anneals only while the rate is above this.
        clip: gradient-norm clipping threshold (<= 0: off).
        pretrain_steps: the first steps run the shallow ``pretrain`` mode (paper, Appendix E),
            then the model switches to ``mode``.
        mode: ``deq`` or ``unrolled`` after the pretrain steps.
        grad_mode: the DEQ's gradient: ``implicit`` (exact: the adjoint solve), ``shine`` (the
            forward Broyden estimate of the adjoint solution, checked with one VJP, the exact solve where
            the check fails; inexact) or
            ``phantom`` (backprop through ``phantom_steps`` steps of f from z*; 1: one-step).
            None: the model's own setting (implicit unless its preset says otherwise).
        backward_init: where the exact adjoint solve starts: ``grad`` (dL/dz*) or ``shine``
            (the forward Broyden estimate; same gradient, keeps the forward's pairs until
            backward). None: the model's own setting (grad). docs/backward.md compares them.
        phantom_steps: steps of f the ``phantom`` gradient backpropagates through (None: the
            model's own setting, 1).
        eval_every: evaluate every this many steps (and at the end); 0: only at the end.
        log_every: steps between metrics lines (and progress lines when stdout is not a terminal).
        out_dir: where ``metrics.jsonl`` and checkpoints go (None: no files).
        ckpt_every: save ``last.pt`` every this many steps (0: only at the end).
        resume: a checkpoint to resume from, or ``auto`` for ``out_dir/last.pt`` if it exists.
        amp: bf16 autocast: ``auto`` (on GPU only), ``on`` or ``off``. Never used on CPU.
        device: ``auto`` (cuda:LOCAL_RANK if available), ``cpu`` or ``cuda``.
        threads: torch CPU threads (0: torch's default).
        progress: a progress bar (on a terminal); without it, plain log lines every
            ``log_every`` steps. The run's header, evaluations and final summary are printed
            either way.
        tensorboard: also write the logged scalars for TensorBoard here (needs the
            ``tensorboard`` package).
    """

    seed: int = 0
    steps: int = 1000
    batch_size: int = 32
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_warmup: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.05
    lr_decay_at: str = ""
    lr_decay: float = 0.1
    plateau_patience: int = 10
    plateau_min_lr: float = 0.02
    clip: float = 1.0
    pretrain_steps: int = 0
    mode: str = "deq"
    grad_mode: Optional[str] = None
    backward_init: Optional[str] = None
    phantom_steps: Optional[int] = None
    eval_every: int = 0
    log_every: int = 20
    out_dir: Optional[str] = None
    ckpt_every: int = 0
    resume: Optional[str] = None
    amp: str = "auto"
    device: str = "auto"
    threads: int = 0
    progress: bool = True
    tensorboard: Optional[str] = None

    def __post_init__(self) -> None:
        if self.mode not in ("deq", "unrolled"):
            raise ValueError(f"mode must be 'deq' or 'unrolled', got {self.mode!r}")
        if self.schedule not in ("cosine", "linear", "constant", "step", "plateau"):
            raise ValueError(f"unknown schedule {self.schedule!r}")
        if self.optimizer not in ("adamw", "adam", "sgd"):
            raise ValueError(f"optimizer must be adamw, adam or sgd, got {self.optimizer!r}")
        try:
            milestones = self.milestones
        except ValueError:
            raise ValueError(f"lr_decay_at must be comma-separated step numbers, got "
                             f"{self.lr_decay_at!r}") from None
        if any(m < 1 for m in milestones):
            raise ValueError(f"lr_decay_at steps must be >= 1, got {self.lr_decay_at!r}")
        if self.amp not in ("auto", "on", "off"):
            raise ValueError(f"amp must be auto, on or off, got {self.amp!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if self.plateau_patience < 0:
            raise ValueError(f"plateau_patience must be >= 0, got {self.plateau_patience}")
        if self.grad_mode is not None and self.grad_mode not in GRAD_MODES:
            raise ValueError(f"grad_mode must be one of {', '.join(GRAD_MODES)}, "
                             f"got {self.grad_mode!r}")
        if self.backward_init is not None and self.backward_init not in BACKWARD_INITS:
            raise ValueError(f"backward_init must be one of {', '.join(BACKWARD_INITS)}, "
                             f"got {self.backward_init!r}")
        if self.phantom_steps is not None and self.phantom_steps < 1:
            raise ValueError(f"phantom_steps must be >= 1, got {self.phantom_steps}")

    def gradient_changes(self) -> dict[str, Any]:
        """The :class:`models.ModeConfig` fields the run sets (``grad_mode``, ``backward_init``,
        ``phantom_steps``; those left None keep the model's own)."""
        names = ("grad_mode", "backward_init", "phantom_steps")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    @property
    def milestones(self) -> tuple[int, ...]:
        """The ``step`` schedule's milestones, parsed from ``lr_decay_at``."""
        return tuple(int(t) for t in self.lr_decay_at.split(",") if t.strip())


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _converter(tp: Any):
    """argparse type for a field annotation (int, float, str, bool, Optional[...])."""
    if tp is bool:
        return _parse_bool
    args = getattr(tp, "__args__", None)
    if args:  # Optional[X]
        inner = [a for a in args if a is not type(None)][0]
        base = _converter(inner)
        return lambda s: None if s.lower() == "none" else base(s)
    return tp


_ATTRIBUTE = re.compile(r"^\s{8}([A-Za-z_]\w*(?:, [A-Za-z_]\w*)*): (.*)$")


def field_docs(cls: type) -> dict[str, str]:
    """Each field's description from the ``Attributes:`` sections of ``cls`` and its bases.

    An entry is ``name: text`` or ``a, b: text`` (shared), continued on more indented lines.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        lines = (klass.__doc__ or "").splitlines()
        names: list[str] = []
        in_section = False
        for line in lines:
            if line.strip() == "Attributes:" or line.strip().startswith("Attributes ("):
                in_section = True
                continue
            if not in_section:
                continue
            m = _ATTRIBUTE.match(line)
            if m:
                names = m.group(1).split(", ")
                for n in names:
                    docs[n] = m.group(2).strip()
            elif line.startswith(" " * 12) and names:
                for n in names:
                    docs[n] += " " + line.strip()
            elif line.strip():
                names = []
    return docs


def _is_mapping_field(tp: Any) -> bool:
    return tp is dict or dict in getattr(tp, "__args__", ()) or \
        any(getattr(a, "__origin__", None) is dict for a in getattr(tp, "__args__", ()))


def parse_config(cls: type[C], argv: Optional[Sequence[str]], description: str,
                 presets: Mapping[str, Mapping[str, Any]] = {},
                 nested: Mapping[str, tuple[Any, str]] = {}) -> C:
    """Build a ``cls`` from presets, ``--config FILE`` and one flag per field (``--batch-size``).

    ``nested`` maps dotted names ``FIELD.a.b`` to (string parser, help): each becomes a flag
    ``--FIELD.a.b`` whose value lands, as key ``a.b``, in the dict field ``FIELD`` (merged over
    what the preset and the JSON file put there; in the JSON file the field is a nested object).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="JSON file of field values (names as in the flags, "
                        "with underscores)")
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), help="a named configuration")
    hints = get_type_hints(cls)
    docs = field_docs(cls)
    for f in fields(cls):
        if _is_mapping_field(hints[f.name]):
            continue  # set through its nested flags or the JSON file
        default = f"(default {f.default!r})" if f.default is not dataclasses.MISSING else ""
        text = docs.get(f.name, "").replace("%", "%%").replace("``", "")
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name,
                            type=_converter(hints[f.name]), default=argparse.SUPPRESS,
                            help=f"{text} {default}".strip() or None)
    for name, (parse, text) in nested.items():
        parser.add_argument("--" + name, dest="nested:" + name, type=parse, metavar="VALUE",
                            default=argparse.SUPPRESS, help=text.replace("%", "%%") or None)
    ns = vars(parser.parse_args(argv))
    flags = {k.split(":", 1)[1]: ns.pop(k) for k in list(ns) if k.startswith("nested:")}
    values: dict[str, Any] = {}
    preset = ns.pop("preset", None)
    if preset is not None:
        values.update(presets[preset])
    config_file = ns.pop("config", None)
    if config_file is not None:
        with open(config_file) as fh:
            loaded = json.load(fh)
        unknown = set(loaded) - {f.name for f in fields(cls)}
        if unknown:
            parser.error(f"unknown fields in {config_file}: {sorted(unknown)}")
        values.update(loaded)
    values.update(ns)
    for name, value in flags.items():
        field_name, key = name.split(".", 1)
        merged = dict(values.get(field_name) or {})
        merged[key] = value
        values[field_name] = merged
    return cls(**values)
