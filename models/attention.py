"""Causal multi-head self-attention with relative positional encoding over [history, segment].

The score of query i (absolute position M + i, M = history length) and key j follows
Transformer-XL (Dai et al. 2019): ``(q_i + u) . k_j + (q_i + v) . R[M + i - j]``, where R is a
learned projection of the sinusoidal encoding of the distance and u, v are learned per-head
biases. Keys after the query (j > M + i) are masked, which makes the layer causal. Q, K and V are
given (the DEQ-Transformer adds its input injection to them before calling this module).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .regularization import maybe_weight_norm


def sinusoid_encoding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """``(len(positions), dim)`` sine/cosine encoding (Vaswani et al. 2017) of float positions."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, device=positions.device,
                                                dtype=positions.dtype) / dim))
    angles = positions[:, None] * inv_freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class RelativeMultiHeadAttention(nn.Module):
    """Causal attention of a segment's queries over ``[history, segment]``, relative positions.

    Args:
        d_model: width of the encodings of distances and of the output.
        n_head, d_head: heads and width per head (Q, K, V have ``n_head * d_head`` features).
        weight_norm: weight-normalize the position and output projections.
        init_std: std of the normal initialisation of the projections and of the biases u, v.
    """

    def __init__(self, d_model: int, n_head: int, d_head: int, weight_norm: bool,
                 init_std: float) -> None:
        super().__init__()
        if d_model % 2:
            raise ValueError(f"d_model must be even for the sinusoidal encoding, got {d_model}")
        self.d_model, self.n_head, self.d_head = d_model, n_head, d_head
        self.scale = 1.0 / math.sqrt(d_head)
        pos = nn.Linear(d_model, n_head * d_head, bias=False)
        out = nn.Linear(n_head * d_head, d_model, bias=False)
        for lin in (pos, out):
            nn.init.normal_(lin.weight, 0.0, init_std)
        self.pos_proj = maybe_weight_norm(pos, weight_norm)
        self.out_proj = maybe_weight_norm(out, weight_norm)
        self.content_bias = nn.Parameter(torch.empty(n_head, d_head).normal_(0.0, init_std))
        self.position_bias = nn.Parameter(torch.empty(n_head, d_head).normal_(0.0, init_std))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                pos_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``q`` ``(B, T, H*dh)``; ``k``, ``v`` ``(B, M + T, H*dh)``; returns ``(B, T, d_model)``.

        ``pos_mask`` ``(d_model,)``: a dropout mask on the channels of the positional encodings.
        """
        B, T, _ = q.shape
        K = k.shape[1]
        M = K - T
        H, dh = self.n_head, self.d_head
        q, k, v = q.view(B, T, H, dh), k.view(B, K, H, dh), v.view(B, K, H, dh)

        content = torch.einsum("bihd,bjhd->bhij", q + self.content_bias, k)
        # Scores against every distance 0..K-1, then picked per (i, j) at distance M + i - j.
        # At least float32 (half-precision sines are too coarse), float64 in a float64 model.
        enc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        distances = torch.arange(K, device=q.device, dtype=enc_dtype)
        enc = sinusoid_encoding(distances, self.d_model).to(q.dtype)
        if pos_mask is not None:
            enc = enc * pos_mask.to(q.dtype)
        r = self.pos_proj(enc).view(K, H, dh)
        by_distance = torch.einsum("bihd,khd->bhik", q + self.position_bias, r)
        query_pos = torch.arange(T, device=q.device)[:, None] + M
        dist = query_pos - torch.arange(K, device=q.device)[None, :]
        position = by_distance.gather(-1, dist.clamp(min=0).expand(B, H, T, K))

        scores = (content + position) * self.scale
        scores = scores.masked_fill(dist < 0, float("-inf"))
        attn = torch.softmax(scores, dim=-1)
        out = torch.einsum("bhij,bjhd->bihd", attn, v).reshape(B, T, H * dh)
        return self.out_proj(out)
