"""DEQ-Transformer and DEQ-TrellisNet (Bai, Kolter, Koltun 2019) on deq_ext, each also unrolled.

    >>> from models import build_model
    >>> model = build_model("deq_transformer_tiny")          # mode 'deq'
    >>> out = model(tokens, targets)                          # out.loss, out.memory
    >>> out = model(next_tokens, next_targets, out.memory)    # memory carried between segments
    >>> model.set_mode("unrolled")                            # same parameters, f applied L times

The image DEQ (a small multiscale DEQ classifier) is :class:`MDEQClassifier` (models/mdeq.py).

Repository code (run from the repository root), not installed with deq_ext; see
docs/training.md, "Models", and models/README.md.
"""

from __future__ import annotations

from .adaptive import TiedAdaptiveEmbedding
from .attention import RelativeMultiHeadAttention
from .lm import DEQLanguageModel, LMConfig, LMOutput, build_core
from .mdeq import MDEQCell, MDEQClassifier, MDEQConfig, MDEQCore, StateLayout
from .modes import MODES, CoreOutput, ModeConfig, SequenceCore
from .overrides import apply_overrides
from .presets import PRESETS, Preset, build_model, count_parameters, get_preset
from .transformer import DEQTransformerCell, DEQTransformerCore, TransformerConfig
from .trellisnet import DEQTrellisNetCore, TrellisNetCell, TrellisNetConfig

__all__ = [
    "MODES",
    "PRESETS",
    "CoreOutput",
    "DEQLanguageModel",
    "DEQTransformerCell",
    "DEQTransformerCore",
    "DEQTrellisNetCore",
    "LMConfig",
    "LMOutput",
    "MDEQCell",
    "MDEQClassifier",
    "MDEQConfig",
    "MDEQCore",
    "ModeConfig",
    "Preset",
    "RelativeMultiHeadAttention",
    "SequenceCore",
    "StateLayout",
    "TiedAdaptiveEmbedding",
    "TransformerConfig",
    "TrellisNetCell",
    "TrellisNetConfig",
    "apply_overrides",
    "build_core",
    "build_model",
    "count_parameters",
    "get_preset",
]
