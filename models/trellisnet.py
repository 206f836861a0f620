"""DEQ-TrellisNet (paper, section 4): a weight-tied causal temporal convolution, LSTM-style gates.

    x~ = Conv1D([x_hist, x]; W_x)                                  (input injection, once a segment)
    a  = Conv1D([h_hist, h]; W_z) + x~                             (kernel k, dilation s, causal)
    c' = sigmoid(a_f) * c_{t-1} + sigmoid(a_i) * tanh(a_g),   h' = sigmoid(a_o) * tanh(c')
    f([h, c]; x) = [h', c']

As in the authors' code (TrellisNet's ``word_PTB`` model and locuslab/deq's DEQ-TrellisNet), h
has ``d_hidden + d_output`` channels (their ``nhid + nout``) and the model's output is the last
``d_output`` channels of h, read without any projection (so ``d_output`` is the embedding width
when the softmax is tied to the embedding). The state is z = [h, c] stacked on the channel
dimension, ``(B, 2 * h_size, T)``. The convolution reads the h half and the gate carries c from the
previous time step; the history padding ((k - 1) * s positions of h, and the last c) comes from
the previous segment's equilibrium, zeros before the first segment.

Regularization (TrellisNet's): variational dropout on h where the convolution reads it, and
DropConnect (``weight_dropout``) on the temporal taps of both convolutions' weights, drawn once
per forward pass; the dropped weight is handed to f in a :class:`~models.regularization.Shared`
so that every solver iteration sees the same f.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, cast

import torch
import torch.nn.functional as F
from torch import nn

from .modes import History, Masks, Memory, ModeConfig, SequenceCore, keep_last
from .regularization import Shared, apply_mask, draw_mask, maybe_weight_norm, weight_drop


@dataclass(frozen=True)
class TrellisNetConfig:
    """Size and regularization of a DEQ-TrellisNet core.

    Attributes:
        d_hidden: the hidden channels of h beyond the output channels (the authors' nhid).
        d_output: the output channels of h (the authors' nout); None: the input width. h has
            d_hidden + d_output channels, c as many, and the core's output is h's last d_output.
        d_input: width of the core's input x (the embedding); None: d_hidden + d_output.
        kernel_size, dilation: k and s of the two causal convolutions.
        weight_norm: weight normalization of both convolutions.
        dropout: variational dropout rate on h where the convolution reads it (dropouth).
        weight_dropout: DropConnect rate on the temporal taps of both convolutions' weights
            (TrellisNet's wdrop; one draw per forward pass).
        init_std: std of the normal initialisation of W_z (the injection W_x is drawn with
            std 1/sqrt(input width * kernel_size)).
    """

    d_hidden: int
    d_output: Optional[int] = None
    d_input: Optional[int] = None
    kernel_size: int = 2
    dilation: int = 1
    weight_norm: bool = True
    dropout: float = 0.0
    weight_dropout: float = 0.0
    init_std: float = 0.05

    def __post_init__(self) -> None:
        for name in ("d_hidden", "d_output", "d_input"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "d_hidden" else 1):
                raise ValueError(f"{name} must be positive, got {value}")
        if not 0.0 <= self.weight_dropout < 1.0:
            raise ValueError(f"weight_dropout must be in [0, 1), got {self.weight_dropout}")

    @property
    def output_width(self) -> int:
        """d_output (the input width when None, as when the softmax is tied to the embedding)."""
        if self.d_output is not None:
            return self.d_output
        return self.d_input if self.d_input is not None else self.d_hidden

    @property
    def h_size(self) -> int:
        """Channels of h (and of c): d_hidden + d_output."""
        return self.d_hidden + self.output_width

    @property
    def input_width(self) -> int:
        """Width of x."""
        return self.h_size if self.d_input is None else self.d_input

    @property
    def padding(self) -> int:
        """(k - 1) * s: how far back the convolution reads."""
        return (self.kernel_size - 1) * self.dilation


def _conv(d_in: int, d_out: int, cfg: TrellisNetConfig, std: float, bias: bool) -> nn.Conv1d:
    conv = nn.Conv1d(d_in, d_out, cfg.kernel_size, dilation=cfg.dilation, bias=bias)
    nn.init.normal_(conv.weight, 0.0, std)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return maybe_weight_norm(conv, cfg.weight_norm)


class TrellisNetCell(nn.Module):
    """f(z, inj, z_hist, h_mask, weight) -> z, with z ``(B, 2 * h_size, T)``.

    ``inj`` is ``(B, 4 * h_size, T)``; ``z_hist`` ``(B, 2 * h_size, P)`` holds at least
    max((k - 1) * s, 1) positions of history; ``h_mask`` ``(B, h_size, 1)`` or None; ``weight``
    the convolution's weight for this forward pass in a :class:`Shared` (None: the module's own).
    """

    def __init__(self, cfg: TrellisNetConfig) -> None:
        super().__init__()
        self.h_size, self.padding, self.dilation = cfg.h_size, cfg.padding, cfg.dilation
        self.conv = _conv(cfg.h_size, 4 * cfg.h_size, cfg, cfg.init_std, bias=False)

    def forward(self, z: torch.Tensor, inj: torch.Tensor, z_hist: torch.Tensor,
                h_mask: Optional[torch.Tensor] = None,
                weight: Optional[Shared] = None) -> torch.Tensor:
        h, c = z.split(self.h_size, dim=1)
        h_hist, c_hist = z_hist.split(self.h_size, dim=1)
        h_seq = apply_mask(torch.cat([keep_last(h_hist, self.padding, 2), h], dim=2), h_mask)
        w = self.conv.weight if weight is None else weight.value
        a = F.conv1d(h_seq, w.to(h_seq.dtype), dilation=self.dilation) + inj
        c_prev = torch.cat([c_hist[..., -1:], c[..., :-1]], dim=2)
        a_i, a_o, a_g, a_f = a.chunk(4, dim=1)
        c_new = torch.sigmoid(a_f) * c_prev + torch.sigmoid(a_i) * torch.tanh(a_g)
        h_new = torch.sigmoid(a_o) * torch.tanh(c_new)
        return torch.cat([h_new, c_new], dim=1)


class DEQTrellisNetCore(SequenceCore):
    """The DEQ-TrellisNet core: x ``(B, T, d_input)`` -> the last d_output channels of h*.

    Memory: ``(z_hist (B, 2 * h_size, max((k-1)s, 1)), x_hist (B, d_input, (k-1)s))``.
    """

    time_dim = 2

    def __init__(self, cfg: TrellisNetConfig, modes: Optional[ModeConfig] = None) -> None:
        super().__init__(TrellisNetCell(cfg), modes or ModeConfig())
        self.cfg = cfg
        std = 1.0 / math.sqrt(cfg.input_width * cfg.kernel_size)
        self.injection = _conv(cfg.input_width, 4 * cfg.h_size, cfg, std, bias=True)

    @property
    def d_out(self) -> int:
        """Width of :meth:`features`: d_output."""
        return self.cfg.output_width

    @property
    def _z_hist_len(self) -> int:
        # At least one position: the gate reads c of the step before the segment's first.
        return max(self.cfg.padding, 1)

    def init_memory(self, batch: int, device: torch.device) -> Memory:
        dtype = self.state_dtype()
        return (torch.zeros(batch, 2 * self.cfg.h_size, self._z_hist_len, dtype=dtype,
                            device=device),
                torch.zeros(batch, self.cfg.input_width, self.cfg.padding, dtype=dtype,
                            device=device))

    def inject(self, x: torch.Tensor, memory: Memory) -> torch.Tensor:
        x_seq = torch.cat([memory[1].to(x.dtype), x.transpose(1, 2)], dim=2)
        conv = self.injection
        w = weight_drop(conv, self.cfg.weight_dropout, self.training)
        return F.conv1d(x_seq, w.to(x_seq.dtype), conv.bias, dilation=self.cfg.dilation)

    def history(self, memory: Memory) -> History:
        return (memory[0],)

    def extend_history(self, history: History, z: torch.Tensor, inj: torch.Tensor) -> History:
        return (keep_last(torch.cat([history[0], z], dim=2), self._z_hist_len, 2),)

    def next_memory(self, memory: Memory, x: torch.Tensor, z: torch.Tensor,
                    inj: torch.Tensor) -> Memory:
        (z_hist,) = self.extend_history(self.history(memory), z.detach(), inj)
        x_hist = torch.cat([memory[1], x.detach().transpose(1, 2).to(memory[1].dtype)], dim=2)
        return z_hist, keep_last(x_hist, self.cfg.padding, 2)

    def draw_masks(self, batch: int, device: torch.device) -> Masks:
        # The convolution's weight is computed once per forward pass (weight norm, DropConnect)
        # and shared by every application of f.
        conv = cast(nn.Module, self.cell.conv)
        weight = weight_drop(conv, self.cfg.weight_dropout, self.training)
        return (draw_mask(self.cfg.dropout, (batch, self.cfg.h_size, 1), dtype=self.state_dtype(),
                          device=device, active=self.training),
                Shared(weight))

    def state_shape(self, batch: int, length: int) -> tuple[int, ...]:
        return (batch, 2 * self.cfg.h_size, length)

    def features(self, z: torch.Tensor) -> torch.Tensor:
        """The last d_output channels of h (the authors' ``get_output``), ``(B, T, d_output)``."""
        return z[:, self.cfg.d_hidden: self.cfg.h_size].transpose(1, 2)
