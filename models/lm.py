"""Language model around a DEQ core: embedding -> core -> output layer tied to the embedding.

Segments of a long token stream are fed one after the other; the memory returned for one segment
(detached history: z* and injection for the transformer, padding for the TrellisNet) is passed
with the next.

Regularizers outside the core (TrellisNet's word-level PTB recipe and the authors' DEQ code):
dropout of whole words of the embedding table (``word_dropout``), variational dropout on the
embeddings (``emb_dropout``) and on the core's output (``out_dropout``), and the activation
penalties of Merity et al. (2018): AR, ``ar_alpha * mean(out^2)`` on the dropped-out output, and
TAR, ``tar_beta * mean((h_{t+1} - h_t)^2)`` on the output before dropout. The penalties are
returned apart from the loss (:attr:`LMOutput.penalty`): the loss stays the data's NLL.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple, Optional, Union

import torch
from torch import nn

from .adaptive import TiedAdaptiveEmbedding
from .modes import Memory, ModeConfig, SequenceCore
from .regularization import VariationalDropout, apply_mask, word_dropout_mask
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
        emb_dropout: variational dropout on the embeddings (one mask per sequence; the
            authors' dropouti).
        out_dropout: variational dropout on the core's output, the decoder input (dropout).
        word_dropout: drop whole words of the embedding table, one draw per forward pass
            (TrellisNet's emb_dropout; AWD-LSTM's embedded_dropout).
        ar_alpha: weight of the activation penalty mean(out^2) on the dropped-out core output.
        tar_beta: weight of the temporal activation penalty mean((h_{t+1} - h_t)^2) on the core
            output before dropout.
    """

    vocab_size: int
    d_embed: int
    core: CoreConfig
    modes: ModeConfig = field(default_factory=ModeConfig)
    cutoffs: tuple[int, ...] = ()
    div_val: int = 1
    emb_dropout: float = 0.0
    out_dropout: float = 0.0
    word_dropout: float = 0.0
    ar_alpha: float = 0.0
    tar_beta: float = 0.0


class LMOutput(NamedTuple):
    """Result of one segment."""

    loss: Optional[torch.Tensor]  # mean negative log-likelihood (when targets are given)
    nll: Optional[torch.Tensor]   # (B, T) per-token negative log-likelihood
    hidden: torch.Tensor          # (B, T, d_embed): the output layer's input
    memory: Memory                # pass with the next segment
    # AR + TAR (a scalar; None when both are off or in eval mode): add it to the training loss.
    penalty: Optional[torch.Tensor] = None


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
        emb = self.embedding(tokens)
        words = word_dropout_mask(self.cfg.word_dropout, self.cfg.vocab_size, dtype=emb.dtype,
                                  device=emb.device, active=self.training)
        x = self.emb_dropout(apply_mask(emb, None if words is None else words[tokens]))
        out = self.core(x, memory)
        raw = self.out_proj(out.features)
        hidden = self.out_dropout(raw)
        penalty = self._penalty(raw, hidden) if self.training else None
        if targets is None:
            return LMOutput(None, None, hidden, out.memory, penalty)
        nll = self.embedding.nll(hidden, targets)
        return LMOutput(nll.mean(), nll, hidden, out.memory, penalty)

    def _penalty(self, raw: torch.Tensor, dropped: torch.Tensor) -> Optional[torch.Tensor]:
        """AR on the dropped-out output plus TAR on the raw one (None when both are off)."""
        terms = []
        if self.cfg.ar_alpha:
            terms.append(self.cfg.ar_alpha * dropped.float().pow(2).mean())
        if self.cfg.tar_beta and raw.shape[1] > 1:
            terms.append(self.cfg.tar_beta * (raw[:, 1:] - raw[:, :-1]).float().pow(2).mean())
        return sum(terms[1:], terms[0]) if terms else None

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token log-distribution ``(..., vocab_size)`` for ``hidden`` from :meth:`forward`."""
        return self.embedding.log_probs(hidden)
