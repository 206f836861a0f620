"""Language model around a DEQ core: embedding -> core -> output layer tied to the embedding.

Segments of a long token stream are fed one after the other; the memory returned for one segment
(detached history: z* and injection for the transformer, padding for the TrellisNet) is passed
with the next.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple, Optional, Union

import torch
from torch import nn

from .adaptive import TiedAdaptiveEmbedding
from .modes import Memory, ModeConfig, SequenceCore
from .regularization import VariationalDropout
from .transformer import DEQTransformerCore, TransformerConfig
from .trellisnet import DEQTrellisNetCore, TrellisNetConfig

CoreConfig = Union[TransformerConfig, TrellisNetConfig]


@dataclass(frozen=True)
class LMConfig:
    """A language model: vocabulary, embedding, core and how the core runs.

    Attributes:
        vocab_size: number of tokens (sorted by frequency when ``cutoffs`` are given).
        d_embed: embedding width (the core's input width, and the output layer's).
        core: a :class:`TransformerConfig` or :class:`TrellisNetConfig`; its ``d_input`` is
            ``d_embed`` (left None, it is filled in).
        modes: mode and solver settings of the core.
        cutoffs, div_val: adaptive embedding/softmax clusters; ``()``: a full softmax.
        emb_dropout: variational dropout on the embeddings (one mask per sequence).
        out_dropout: variational dropout on the decoder input.
    """

    vocab_size: int
    d_embed: int
    core: CoreConfig
    modes: ModeConfig = field(default_factory=ModeConfig)
    cutoffs: tuple[int, ...] = ()
    div_val: int = 1
    emb_dropout: float = 0.0
    out_dropout: float = 0.0


class LMOutput(NamedTuple):
    """Result of one segment."""

    loss: Optional[torch.Tensor]  # mean negative log-likelihood (when targets are given)
    nll: Optional[torch.Tensor]   # (B, T) per-token negative log-likelihood
    hidden: torch.Tensor          # (B, T, d_embed): the output layer's input
    memory: Memory                # pass with the next segment


def build_core(cfg: CoreConfig, modes: ModeConfig) -> SequenceCore:
    """The core for a configuration."""
    if isinstance(cfg, TransformerConfig):
        return DEQTransformerCore(cfg, modes)
    if isinstance(cfg, TrellisNetConfig):
        return DEQTrellisNetCore(cfg, modes)
    raise TypeError(f"unknown core configuration {type(cfg).__name__}")


class DEQLanguageModel(nn.Module):
    """Token embedding, a DEQ core (any of the three modes), tied (adaptive) softmax, memory."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        if cfg.core.d_input not in (None, cfg.d_embed):
            raise ValueError(
                f"core.d_input ({cfg.core.d_input}) must equal d_embed ({cfg.d_embed})")
        self.cfg = cfg
        self.embedding = TiedAdaptiveEmbedding(cfg.vocab_size, cfg.d_embed, cfg.cutoffs,
                                               cfg.div_val)
        self.core: SequenceCore = build_core(replace(cfg.core, d_input=cfg.d_embed), cfg.modes)
        # The TrellisNet's h is usually wider than the embedding it is tied to.
        self.out_proj = (nn.Identity() if self.core.d_out == cfg.d_embed
                         else nn.Linear(self.core.d_out, cfg.d_embed, bias=False))
        self.emb_dropout = VariationalDropout(cfg.emb_dropout)
        self.out_dropout = VariationalDropout(cfg.out_dropout)

    @property
    def mode(self) -> str:
        return self.core.modes.mode

    def set_mode(self, mode: str, **changes) -> None:
        """Switch between ``'deq'``, ``'unrolled'`` and ``'pretrain'`` (same parameters)."""
        self.core.set_mode(mode, **changes)

    def core_parameters(self) -> list[nn.Parameter]:
        """The non-embedding parameters (the paper's "non-embedding model size")."""
        return list(self.core.parameters()) + list(self.out_proj.parameters())

    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None,
                memory: Optional[Memory] = None) -> LMOutput:
        """One segment of token ids ``(B, T)``; ``targets`` ``(B, T)`` gives the loss."""
        x = self.emb_dropout(self.embedding(tokens))
        out = self.core(x, memory)
        hidden = self.out_dropout(self.out_proj(out.features))
        if targets is None:
            return LMOutput(None, None, hidden, out.memory)
        nll = self.embedding.nll(hidden, targets)
        return LMOutput(nll.mean(), nll, hidden, out.memory)

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token log-distribution ``(..., vocab_size)`` for ``hidden`` from :meth:`forward`."""
        return self.embedding.log_probs(hidden)
