"""DEQ-Transformer (paper, section 4): a weight-tied, memory-augmented self-attention layer.

    x~ = x W_x                                                     (input injection, once a segment)
    f(z; x) = LN(phi(LN(SelfAttention([z_mem, z] W_QKV + [x~_mem, x~]; PE) + z)))

with phi(h) = h + FF(h) a 2-layer position-wise feed-forward residual block, relative positional
encoding and Transformer-XL memory: the previous segment's equilibrium z* and its injection are
prepended as history (detached).

The residual ``+ z`` inside the first layer norm is the authors' code (both versions of
locuslab/deq compute ``LN(attn_out + z)``), which produced the published numbers; the paper's
formula omits it: ``attn_residual=False`` gives the paper's ``LN(SelfAttention(...))``, where z
enters f only through Q, K, V.

Variational dropout (one mask per forward pass, as the authors' code): on the attention output,
the feed-forward hidden layer and output, and the positional encodings (one mask over their
channels for the whole batch); the language model adds it on the word embeddings and on z*.

``pre_ln=True`` moves the layer norms to the inputs of the two sublayers; f's output is then not
normalized, and :meth:`DEQTransformerCore.features` applies a final layer norm to z*, as pre-LN
stacks do after their last layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .attention import RelativeMultiHeadAttention
from .modes import History, Masks, Memory, ModeConfig, SequenceCore, keep_last
from .regularization import Shared, apply_mask, draw_mask, maybe_weight_norm, shared_value


@dataclass(frozen=True)
class TransformerConfig:
    """Size and regularization of a DEQ-Transformer core.

    Attributes:
        d_model: width of z.
        n_head, d_head: attention heads and width per head.
        d_inner: hidden width of the position-wise feed-forward block.
        d_input: width of the core's input x (the embedding); None: ``d_model``.
        mem_len: positions of history (previous segments' z* and injection) kept as memory.
        pre_ln: layer norm on the sublayer inputs instead of their outputs.
        attn_residual: add z to the attention output before its layer norm (the authors' code,
            default); False: the paper's formula, without that residual.
        weight_norm: weight normalization (Salimans & Kingma 2016) of every projection in f.
        dropout: variational dropout rate on the attention output, the feed-forward hidden layer
            and output, and the positional encodings (as the authors' code).
        init_std: std of the normal initialisation of f's weights acting on z. The paper samples
            f's parameters from N(0, 0.05); the injection W_x is drawn with std 1/sqrt(d_input)
            so that it dominates Q, K, V at initialisation.
    """

    d_model: int
    n_head: int
    d_head: int
    d_inner: int
    d_input: Optional[int] = None
    mem_len: int = 0
    pre_ln: bool = False
    attn_residual: bool = True
    weight_norm: bool = True
    dropout: float = 0.0
    init_std: float = 0.05

    @property
    def input_width(self) -> int:
        """Width of x."""
        return self.d_model if self.d_input is None else self.d_input


def _linear(d_in: int, d_out: int, std: float, weight_norm: bool, bias: bool = True) -> nn.Module:
    lin = nn.Linear(d_in, d_out, bias=bias)
    nn.init.normal_(lin.weight, 0.0, std)
    if bias:
        nn.init.zeros_(lin.bias)
    return maybe_weight_norm(lin, weight_norm)


class DEQTransformerCell(nn.Module):
    """f(z, inj, z_hist, inj_hist, attn_mask, ff_mask, ff_out_mask, pos_mask) -> z, z ``(B, T, d)``.

    ``inj`` is ``(B, T, 3 * n_head * d_head)`` (added to Q, K, V); ``z_hist`` ``(B, M, d_model)``
    and ``inj_hist`` ``(B, M, 3 * n_head * d_head)`` are the history; the masks are variational
    dropout masks ``(B, 1, d_model)`` (attention output), ``(B, 1, d_inner)`` (feed-forward hidden),
    ``(B, 1, d_model)`` (feed-forward output) and a :class:`Shared` ``(d_model,)`` (positional
    encodings, the same for the whole batch), or None. Row-independent in the batch, causal in
    time.
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        d, width, std, wn = cfg.d_model, cfg.n_head * cfg.d_head, cfg.init_std, cfg.weight_norm
        self.pre_ln, self.attn_residual = cfg.pre_ln, cfg.attn_residual
        self.width = width
        self.qkv = _linear(d, 3 * width, std, wn, bias=False)
        self.attn = RelativeMultiHeadAttention(d, cfg.n_head, cfg.d_head, wn, std)
        self.ln_attn = nn.LayerNorm(d)
        self.ff_in = _linear(d, cfg.d_inner, std, wn)
        self.ff_out = _linear(cfg.d_inner, d, std, wn)
        self.ln_ff = nn.LayerNorm(d)

    def feed_forward(self, h: torch.Tensor, mask: Optional[torch.Tensor],
                     out_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return apply_mask(self.ff_out(apply_mask(torch.relu(self.ff_in(h)), mask)), out_mask)

    def forward(self, z: torch.Tensor, inj: torch.Tensor, z_hist: torch.Tensor,
                inj_hist: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                ff_mask: Optional[torch.Tensor] = None, ff_out_mask: Optional[torch.Tensor] = None,
                pos_mask: Optional[Shared] = None) -> torch.Tensor:
        M = z_hist.shape[1]
        seq = torch.cat([z_hist, z], dim=1)
        if self.pre_ln:
            seq = self.ln_attn(seq)
        qkv = self.qkv(seq) + torch.cat([inj_hist, inj], dim=1)
        q, k, v = qkv.split(self.width, dim=-1)
        a = apply_mask(self.attn(q[:, M:], k, v, shared_value(pos_mask)), attn_mask)
        if self.attn_residual:
            a = a + z
        if self.pre_ln:
            return a + self.feed_forward(self.ln_ff(a), ff_mask, ff_out_mask)
        h = self.ln_attn(a)
        return self.ln_ff(h + self.feed_forward(h, ff_mask, ff_out_mask))


class DEQTransformerCore(SequenceCore):
    """The DEQ-Transformer core: x ``(B, T, d_input)`` -> z* ``(B, T, d_model)``.

    Memory: ``(z_hist (B, M, d_model), inj_hist (B, M, 3 * n_head * d_head))``, M <= mem_len.
    """

    time_dim = 1

    def __init__(self, cfg: TransformerConfig, modes: Optional[ModeConfig] = None) -> None:
        super().__init__(DEQTransformerCell(cfg), modes or ModeConfig())
        self.cfg = cfg
        width = 3 * cfg.n_head * cfg.d_head
        self.injection = _linear(cfg.input_width, width, 1.0 / math.sqrt(cfg.input_width),
                                 cfg.weight_norm)
        self.out_norm = nn.LayerNorm(cfg.d_model) if cfg.pre_ln else None

    @property
    def d_out(self) -> int:
        """Width of :meth:`features`."""
        return self.cfg.d_model

    @property
    def injection_width(self) -> int:
        """Width of the injection (added to Q, K and V): 3 * n_head * d_head."""
        return 3 * self.cfg.n_head * self.cfg.d_head

    def init_memory(self, batch: int, device: torch.device) -> Memory:
        dtype = self.state_dtype()
        return (torch.zeros(batch, 0, self.cfg.d_model, dtype=dtype, device=device),
                torch.zeros(batch, 0, self.injection_width, dtype=dtype, device=device))

    def inject(self, x: torch.Tensor, memory: Memory) -> torch.Tensor:
        return self.injection(x)

    def history(self, memory: Memory) -> History:
        return memory

    def extend_history(self, history: History, z: torch.Tensor, inj: torch.Tensor) -> History:
        z_hist, inj_hist = history
        return torch.cat([z_hist, z], dim=1), torch.cat([inj_hist, inj.to(inj_hist.dtype)], dim=1)

    def next_memory(self, memory: Memory, x: torch.Tensor, z: torch.Tensor,
                    inj: torch.Tensor) -> Memory:
        z_hist, inj_hist = self.extend_history(memory, z.detach(), inj.detach())
        n = self.cfg.mem_len
        return keep_last(z_hist, n, 1), keep_last(inj_hist, n, 1)

    def draw_masks(self, batch: int, device: torch.device) -> Masks:
        dtype, active, p, d = self.state_dtype(), self.training, self.cfg.dropout, self.cfg.d_model
        pos = draw_mask(p, (d,), dtype=dtype, device=device, active=active)
        return (draw_mask(p, (batch, 1, d), dtype=dtype, device=device, active=active),
                draw_mask(p, (batch, 1, self.cfg.d_inner), dtype=dtype, device=device,
                          active=active),
                draw_mask(p, (batch, 1, d), dtype=dtype, device=device, active=active),
                None if pos is None else Shared(pos))

    def state_shape(self, batch: int, length: int) -> tuple[int, ...]:
        return (batch, length, self.cfg.d_model)

    def features(self, z: torch.Tensor) -> torch.Tensor:
        return z if self.out_norm is None else self.out_norm(z)
