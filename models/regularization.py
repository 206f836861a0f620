"""Regularizers that keep a weight-tied cell f stable: weight normalization and variational dropout.

Variational dropout (Gal & Ghahramani 2016, as adapted by TrellisNet and the DEQ paper, Appendix E)
draws one mask per sample and per channel and applies it at every time step and at every
application of f. In a DEQ the mask must stay the same across solver iterations, or f would be a
different function at every iteration and have no fixed point. The masks are therefore drawn once
per forward pass and handed to f as batched inputs (so the solver's active-set compaction gathers
their rows together with z's rows).
"""

from __future__ import annotations

from typing import Optional, TypeVar

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def maybe_weight_norm(module: ModuleT, enabled: bool) -> ModuleT:
    """Reparametrize ``module.weight`` as g * v / ||v|| (one norm per output unit) if enabled."""
    return weight_norm(module, name="weight", dim=0) if enabled else module


def draw_mask(p: float, shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device,
              active: bool) -> Optional[torch.Tensor]:
    """A variational dropout mask of ``shape``, or None when dropout is off (p == 0 or not active).

    ``shape`` is the batch size, the channels, and 1 on the time dimension, so the mask
    broadcasts over time. Kept entries are scaled by 1 / (1 - p).
    """
    if not active or p <= 0.0:
        return None
    if not p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    keep = torch.empty(shape, dtype=dtype, device=device).bernoulli_(1.0 - p)
    return keep / (1.0 - p)


def apply_mask(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """x * mask, or x unchanged when there is no mask."""
    return x if mask is None else x * mask


class VariationalDropout(nn.Module):
    """Variational dropout outside f (embeddings, decoder input): one mask per call for all steps.

    ``channel_dim`` is the channel dimension of the input (2 for ``(B, T, C)``).
    """

    def __init__(self, p: float, channel_dim: int = 2) -> None:
        super().__init__()
        self.p, self.channel_dim = p, channel_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [x.shape[0]] + [1] * (x.dim() - 1)
        shape[self.channel_dim] = x.shape[self.channel_dim]
        mask = draw_mask(self.p, tuple(shape), dtype=x.dtype, device=x.device,
                         active=self.training)
        return apply_mask(x, mask)

    def extra_repr(self) -> str:
        return f"p={self.p}"
