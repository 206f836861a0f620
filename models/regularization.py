"""Regularizers that keep a weight-tied cell f stable: weight normalization and variational dropout.

Variational dropout (Gal & Ghahramani 2016, as adapted by TrellisNet and the DEQ paper, Appendix E)
draws one mask per sample and per channel and applies it at every time step and at every
application of f. In a DEQ the mask must stay the same across solver iterations, or f would be a
different function at every iteration and have no fixed point. The masks are therefore drawn once
per forward pass and handed to f as batched inputs (so the solver's active-set compaction gathers
their rows together with z's rows). What the whole batch shares (a positional-encoding mask, a
DropConnect-ed weight) is handed to f inside a :class:`Shared`, which the solver passes as it is.

Also here: DropConnect on the temporal taps of a convolution's weight (``weight_drop``, Merity et
al. 2018 as TrellisNet applies it) and dropout of whole words of the embedding table
(``word_dropout_mask``).
"""

from __future__ import annotations

from typing import Optional, TypeVar, cast

import torch
from torch import nn
from torch.nn.utils import parametrize
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


class Shared:
    """A tensor shared by every sample of the batch, handed to f as an input.

    deq_ext gathers the rows of batched tensor inputs when it compacts the active set; an object
    that is not a tensor is passed through as it is, so a batch-wide tensor travels inside one.
    """

    __slots__ = ("value",)

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"Shared({tuple(self.value.shape)})"


def shared_value(x: Optional[Shared]) -> Optional[torch.Tensor]:
    """The tensor inside ``x`` (None stays None)."""
    return None if x is None else x.value


def weight_drop(module: nn.Module, p: float, active: bool) -> torch.Tensor:
    """``module``'s weight with DropConnect on every kernel tap but the last (the current step's).

    A weight without taps (a linear layer, a kernel of size 1) is dropped whole.
    As TrellisNet's temporal weight drop: for a weight-normalized module the dropout is applied to
    the direction v before the normalization, w = g * drop(v) / ||drop(v)||; otherwise to the
    weight. Kept entries are scaled by 1 / (1 - p). A new mask at every call (one per forward pass).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"weight dropout must be in [0, 1), got {p}")
    normalized = parametrize.is_parametrized(module, "weight")
    weight = cast(torch.Tensor, module.weight)
    if not active or p == 0.0:
        return weight
    params = cast(nn.Module, cast(nn.Module, module.parametrizations).weight) \
        if normalized else None
    v = cast(torch.Tensor, params.original1) if params is not None else weight
    keep = torch.empty_like(v).bernoulli_(1.0 - p) / (1.0 - p)
    if v.dim() > 2 and v.shape[-1] > 1:
        keep[..., -1:] = 1.0  # the tap on the current position is never dropped
    v = v * keep
    if params is None:
        return v
    g = cast(torch.Tensor, params.original0)
    return g * v / v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (v.dim() - 1))


def word_dropout_mask(p: float, vocab_size: int, *, dtype: torch.dtype, device: torch.device,
                      active: bool) -> Optional[torch.Tensor]:
    """A ``(vocab_size, 1)`` mask dropping whole words of the embedding table (None when off).

    Multiplying the looked-up embeddings by ``mask[tokens]`` is the same as looking them up in
    the table with its rows masked (TrellisNet's and AWD-LSTM's ``embedded_dropout``).
    """
    return draw_mask(p, (vocab_size, 1), dtype=dtype, device=device, active=active)
