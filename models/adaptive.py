"""Token embedding and a softmax tied to it, optionally adaptive.

Adaptive softmax: Grave et al. 2017; adaptive input embeddings: Baevski & Auli 2019.

The vocabulary (sorted by frequency) is split by ``cutoffs`` into clusters; cluster i has
embeddings of width ``d_embed // div_val**i`` and, when narrower than ``d_embed``, a projection
to ``d_embed``. The output layer reuses both: the logits of cluster i are ``(h P_i) E_i^T + b_i``.
The head scores the first cluster's words and one entry per tail cluster; a tail word's
log-probability is that of its cluster in the head plus its own within the cluster. Without
cutoffs this is an ordinary embedding with a tied full softmax.
"""

from __future__ import annotations

import math
from typing import Sequence, cast

import torch
import torch.nn.functional as F
from torch import nn


class TiedAdaptiveEmbedding(nn.Module):
    """Embedding (``forward``) and tied output distribution (``log_probs``, ``nll``).

    Embeddings are drawn from N(0, 1/sqrt(width)) and scaled by sqrt(d_embed) on input, so inputs
    have unit-size entries while the tied logits start small.
    """

    def __init__(self, vocab_size: int, d_embed: int, cutoffs: Sequence[int] = (),
                 div_val: int = 1) -> None:
        super().__init__()
        bounds = [0, *cutoffs, vocab_size]
        if any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(
                f"cutoffs must increase strictly within (0, {vocab_size}), got {list(cutoffs)}")
        if div_val < 1:
            raise ValueError(f"div_val must be >= 1, got {div_val}")
        self.vocab_size, self.d_embed, self.bounds = vocab_size, d_embed, bounds
        self.scale = math.sqrt(d_embed)
        self.tables = nn.ModuleList()
        self.projections = nn.ModuleList()
        for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
            width = max(1, d_embed // div_val ** i)
            table = nn.Embedding(hi - lo, width)
            nn.init.normal_(table.weight, 0.0, 1.0 / math.sqrt(width))
            self.tables.append(table)
            if width == d_embed:
                self.projections.append(nn.Identity())
            else:
                proj = nn.Linear(width, d_embed, bias=False)
                nn.init.normal_(proj.weight, 0.0, 1.0 / math.sqrt(width))
                self.projections.append(proj)
        self.biases = nn.ParameterList(
            [nn.Parameter(torch.zeros(hi - lo)) for lo, hi in zip(bounds, bounds[1:])])
        n_tail = len(bounds) - 2
        # One head entry per tail cluster; absent without cutoffs.
        self.cluster_weight = nn.Parameter(torch.zeros(n_tail, d_embed)) if n_tail else None
        self.cluster_bias = nn.Parameter(torch.zeros(n_tail)) if n_tail else None

    @property
    def n_clusters(self) -> int:
        return len(self.tables)

    def _clusters(self, ids: torch.Tensor):
        """(cluster, lo, positions of ``ids`` in it) for every non-empty cluster."""
        for i, (lo, hi) in enumerate(zip(self.bounds, self.bounds[1:])):
            idx = torch.nonzero((ids >= lo) & (ids < hi)).squeeze(1)
            if idx.numel():
                yield i, lo, idx

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``(B, T)`` -> embeddings ``(B, T, d_embed)``."""
        if self.n_clusters == 1:
            return self.tables[0](tokens) * self.scale
        flat = tokens.reshape(-1)
        out = torch.zeros(flat.numel(), self.d_embed, dtype=self._table(0).weight.dtype,
                          device=tokens.device)
        for i, lo, idx in self._clusters(flat):
            emb = self.projections[i](self.tables[i](flat[idx] - lo))
            out = out.index_copy(0, idx, emb.to(out.dtype))
        return (out * self.scale).view(*tokens.shape, self.d_embed)

    def _table(self, i: int) -> nn.Embedding:
        return cast(nn.Embedding, self.tables[i])

    def _logits(self, h: torch.Tensor, i: int) -> torch.Tensor:
        proj = self.projections[i]
        if isinstance(proj, nn.Linear):
            h = h @ proj.weight  # (N, d_embed) -> (N, width): the input map transposed
        return F.linear(h, self._table(i).weight, self.biases[i]).float()

    def _head_log_probs(self, h: torch.Tensor) -> torch.Tensor:
        head = self._logits(h, 0)
        if self.cluster_weight is not None:
            tail = F.linear(h, self.cluster_weight, self.cluster_bias).float()
            head = torch.cat([head, tail], dim=-1)
        return torch.log_softmax(head, dim=-1)

    def log_probs(self, h: torch.Tensor) -> torch.Tensor:
        """Log-distribution ``(..., vocab_size)`` (float32) for hidden states ``(..., d_embed)``."""
        shape = h.shape[:-1]
        h = h.reshape(-1, h.shape[-1])
        head = self._head_log_probs(h)
        n0 = self.bounds[1]
        parts = [head[:, :n0]]
        for i in range(1, self.n_clusters):
            parts.append(head[:, n0 + i - 1: n0 + i] + torch.log_softmax(self._logits(h, i), -1))
        return torch.cat(parts, dim=-1).view(*shape, self.vocab_size)

    def nll(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood (float32) of every target, shaped like ``targets``."""
        shape = targets.shape
        h, t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        if self.n_clusters == 1:
            return F.cross_entropy(self._logits(h, 0), t, reduction="none").view(shape)
        head = self._head_log_probs(h)
        n0 = self.bounds[1]
        out = torch.zeros(t.shape, dtype=torch.float32, device=h.device)
        present = set()
        for i, lo, idx in self._clusters(t):
            present.add(i)
            if i == 0:
                lp = head[idx].gather(1, t[idx, None]).squeeze(1)
            else:
                tail = torch.log_softmax(self._logits(h[idx], i), dim=-1)
                lp = head[idx, n0 + i - 1] + tail.gather(1, (t[idx] - lo)[:, None]).squeeze(1)
            out = out.index_copy(0, idx, -lp)
        # A tail cluster without targets in this batch must still take part in the loss (with
        # weight 0): DistributedDataParallel expects a gradient for every parameter.
        absent = [p for i in range(1, self.n_clusters) if i not in present
                  for p in (self.tables[i].weight, self.biases[i], *self.projections[i].parameters())]
        if absent:
            out = out + 0.0 * sum(p.sum() for p in absent)
        return out.view(shape)
