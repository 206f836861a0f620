"""A small multiscale DEQ (MDEQ, Bai, Koltun, Kolter 2020) image classifier on deq_ext.

The state z holds one feature map per resolution (e.g. 16 channels at 8x8 and 32 at 4x4). One
application of the cell f runs a residual block on every resolution, each with its share of the
input injection, then fuses the resolutions (every output resolution sums every input
resolution, resampled: stride-2 convolutions down, 1x1 convolution and nearest upsampling up).
GroupNorm normalizes each sample on its own, so samples stay independent and the solver's
active-set compaction applies. The fixed point is solved by :class:`deq_ext.DEQ` on the state
flattened per sample into one ``(B, D)`` tensor (:class:`StateLayout` packs and unpacks it).

    >>> model = MDEQClassifier(MDEQConfig(channels=(16, 32)), ModeConfig(mode="deq"))
    >>> logits = model(images)                  # images (B, 1, 8, 8) -> logits (B, 10)
    >>> model.core.solver_stats                 # forward (and, after backward, backward) stats

The modes are those of :mod:`models.modes` (``deq``, ``unrolled``, ``pretrain``), with the same
parameters in each.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any, Optional, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from deq_ext import DEQ, SolverStats

from .modes import ModeConfig


@dataclass(frozen=True)
class MDEQConfig:
    """Sizes of an :class:`MDEQClassifier`.

    Attributes:
        channels: channels per resolution, finest first; resolution i has ``image_size / 2**i``
            pixels a side.
        groups: GroupNorm groups (must divide every entry of ``channels``).
        in_channels: channels of the input images.
        image_size: side of the (square) input images; divisible by ``2**(len(channels) - 1)``.
        n_classes: outputs of the classifier.
    """

    channels: tuple[int, ...] = (16, 32)
    groups: int = 4
    in_channels: int = 1
    image_size: int = 8
    n_classes: int = 10

    def __post_init__(self) -> None:
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError(f"channels must be a non-empty tuple of positive ints, got {self.channels}")
        if self.groups < 1 or any(c % self.groups for c in self.channels):
            raise ValueError(f"groups ({self.groups}) must divide every entry of channels {self.channels}")
        if self.image_size % 2 ** (len(self.channels) - 1):
            raise ValueError(f"image_size {self.image_size} is not divisible by 2**{len(self.channels) - 1} "
                             f"({len(self.channels)} resolutions)")
        if self.in_channels < 1 or self.n_classes < 2:
            raise ValueError("in_channels must be >= 1 and n_classes >= 2")

    def sides(self) -> tuple[int, ...]:
        """Pixels a side of each resolution, finest first."""
        return tuple(self.image_size // 2 ** i for i in range(len(self.channels)))


class StateLayout:
    """Packs one feature map per resolution into a ``(B, D)`` row per sample, and back."""

    def __init__(self, channels: tuple[int, ...], sides: tuple[int, ...]) -> None:
        self.shapes = [(c, s, s) for c, s in zip(channels, sides)]
        self.sizes = [c * s * s for c, s, s in self.shapes]
        self.dim = sum(self.sizes)

    def pack(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """``(B, D)`` from maps ``(B, C_i, S_i, S_i)``."""
        return torch.cat([m.flatten(1) for m in maps], dim=1)

    def unpack(self, z: torch.Tensor) -> list[torch.Tensor]:
        """The maps (views of ``z``) from ``(B, D)``."""
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"a packed state must be (batch, {self.dim}), got {tuple(z.shape)}")
        return [piece.view(z.shape[0], *shape)
                for piece, shape in zip(z.split(self.sizes, dim=1), self.shapes)]


class ResidualBlock(nn.Module):
    """z -> GN(ReLU(z + GN(conv(ReLU(GN(conv(z)))) + injection))), at one resolution."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.norm3 = nn.GroupNorm(groups, channels)

    def forward(self, z: torch.Tensor, injection: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(z)))
        h = self.norm2(self.conv2(h) + injection)
        return self.norm3(F.relu(h + z))


def _resample(c_in: int, c_out: int, steps: int, groups: int) -> nn.Module:
    """From resolution i to j = i + steps: stride-2 3x3 convolutions down (steps > 0), a 1x1
    convolution then nearest upsampling by 2**-steps up (steps < 0)."""
    if steps > 0:
        layers: list[nn.Module] = []
        for k in range(steps):
            c = c_out if k == steps - 1 else c_in
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False),
                       nn.GroupNorm(groups, c)]
            if k < steps - 1:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.GroupNorm(groups, c_out),
                         nn.Upsample(scale_factor=2 ** -steps, mode="nearest"))


class MDEQCell(nn.Module):
    """f(z, injection) -> z on packed states: a residual block per resolution, then fusion."""

    def __init__(self, cfg: MDEQConfig) -> None:
        super().__init__()
        self.layout = StateLayout(cfg.channels, cfg.sides())
        n = len(cfg.channels)
        self.blocks = nn.ModuleList(ResidualBlock(c, cfg.groups) for c in cfg.channels)
        # fuse[j][i] carries resolution i into resolution j (the identity on the diagonal).
        self.fuse = nn.ModuleList(
            nn.ModuleList(nn.Identity() if i == j else
                          _resample(cfg.channels[i], cfg.channels[j], j - i, cfg.groups)
                          for i in range(n))
            for j in range(n))
        self.post = nn.ModuleList(nn.GroupNorm(cfg.groups, c) for c in cfg.channels)

    def forward(self, z: torch.Tensor, injection: torch.Tensor) -> torch.Tensor:
        zs, injs = self.layout.unpack(z), self.layout.unpack(injection)
        branches = [block(zi, xi) for block, zi, xi in zip(self.blocks, zs, injs)]
        fused = []
        for row, post in zip(self.fuse, self.post):
            total = branches[0].new_zeros(())
            for branch, resample in zip(branches, cast(nn.ModuleList, row)):
                total = total + resample(branch)
            fused.append(post(F.relu(total)))
        return self.layout.pack(fused)


class Injection(nn.Module):
    """The input injection of every resolution, packed like z: a 3x3 convolution of the image at
    the finest resolution, then a stride-2 convolution per coarser one. Computed once per
    forward pass, outside f."""

    def __init__(self, cfg: MDEQConfig) -> None:
        super().__init__()
        self.layout = StateLayout(cfg.channels, cfg.sides())
        c = cfg.channels
        self.stem = nn.Sequential(nn.Conv2d(cfg.in_channels, c[0], 3, padding=1, bias=False),
                                  nn.GroupNorm(cfg.groups, c[0]))
        self.down = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c[i], c[i + 1], 3, stride=2, padding=1, bias=False),
                          nn.GroupNorm(cfg.groups, c[i + 1]))
            for i in range(len(c) - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = [self.stem(x)]
        for down in self.down:
            maps.append(down(F.relu(maps[-1])))
        return self.layout.pack(maps)


def deq_supports_jac_reg() -> bool:
    """Whether this deq_ext's :class:`DEQ` computes Jacobian regularization
    (``DEQ(..., jac_reg_samples=k)`` exposing ``jac_loss``)."""
    return "jac_reg_samples" in inspect.signature(DEQ).parameters


class MDEQCore(nn.Module):
    """Runs :class:`MDEQCell` as a DEQ (solved by :class:`deq_ext.DEQ`) or unrolled.

    Mirrors :class:`models.modes.SequenceCore`'s interface for the training loop: ``modes``
    (a :class:`ModeConfig`), :meth:`set_mode` and :attr:`solver_stats`. ``jac_reg_samples > 0``
    makes the DEQ layer estimate Jacobian regularization in training (:attr:`jac_loss`).
    """

    def __init__(self, cell: MDEQCell, modes: ModeConfig, jac_reg_samples: int = 0) -> None:
        super().__init__()
        if modes.subseq_len is not None or modes.compile_cell is not None:
            raise ValueError("an MDEQ core takes neither subseq_len (sequences only) nor compile_cell")
        if jac_reg_samples < 0:
            raise ValueError(f"jac_reg_samples must be >= 0, got {jac_reg_samples}")
        extra: dict[str, Any] = {}
        if jac_reg_samples:
            if not deq_supports_jac_reg():
                raise RuntimeError("Jacobian regularization (jac_reg_samples > 0) needs a deq_ext "
                                   "whose DEQ layer takes jac_reg_samples; this one does not")
            extra["jac_reg_samples"] = jac_reg_samples
        self.modes = modes
        self.jac_reg_samples = jac_reg_samples
        # The DEQ layer owns the cell (its parameters are registered once, under deq.f).
        self.deq = DEQ(cell, forward=modes.forward, backward=modes.adjoint_settings(),
                       grad_mode=modes.grad_mode, phantom_steps=modes.phantom_steps,
                       chunk=modes.chunk, **extra)

    @property
    def cell(self) -> MDEQCell:
        """f, as held by the DEQ layer."""
        cell: MDEQCell = self.deq.f  # type: ignore[assignment]
        return cell

    def set_mode(self, mode: str, **changes: Any) -> None:
        """Switch mode (and other :class:`ModeConfig` fields if given); parameters are untouched."""
        modes = replace(self.modes, mode=mode, **changes)
        if modes.subseq_len is not None or modes.compile_cell is not None:
            raise ValueError("an MDEQ core takes neither subseq_len (sequences only) nor compile_cell")
        self.modes = modes
        self.deq.backward_settings = modes.adjoint_settings()
        self.deq.grad_mode, self.deq.phantom_steps = modes.grad_mode, modes.phantom_steps

    @property
    def solver_stats(self) -> list[dict[str, SolverStats]]:
        """The last DEQ pass's ``forward`` and, after backward, ``backward`` statistics (empty
        outside ``deq`` mode)."""
        if self.modes.mode != "deq":
            return []
        found = {"forward": self.deq.forward_stats, "backward": self.deq.backward_stats}
        stats = {k: v for k, v in found.items() if v is not None}
        return [stats] if stats else []

    @property
    def jac_loss(self) -> Optional[torch.Tensor]:
        """The DEQ layer's Jacobian-regularization estimate of the last training pass (None
        when off, outside ``deq`` mode or in eval mode)."""
        if not self.jac_reg_samples or self.modes.mode != "deq" or not self.training:
            return None
        return getattr(self.deq, "jac_loss", None)

    def forward(self, injection: torch.Tensor) -> torch.Tensor:
        """z* (deq) or z after ``depth`` applications of f from 0 (unrolled modes), packed."""
        z0 = torch.zeros_like(injection)
        m = self.modes
        if m.mode == "deq":
            fwd = m.forward if self.training or m.eval_forward is None else m.eval_forward
            self.deq.forward_settings = fwd
            return self.deq(injection, z0=z0)
        z = z0
        for _ in range(m.depth):
            if m.checkpoint and torch.is_grad_enabled():
                z = checkpoint(self.cell, z, injection, use_reentrant=False)
            else:
                z = self.cell(z, injection)
        return z


class MDEQClassifier(nn.Module):
    """Images ``(B, C, S, S)`` -> logits ``(B, n_classes)``: injection, MDEQ core, then a linear
    layer on the coarsest resolution's equilibrium, flattened (the finer resolutions reach it
    through the fusion; averaging each map over its pixels instead learns far more slowly)."""

    def __init__(self, cfg: MDEQConfig, modes: ModeConfig, jac_reg_samples: int = 0) -> None:
        super().__init__()
        self.cfg: MDEQConfig = cfg
        self.injection = Injection(cfg)
        self.core: MDEQCore = MDEQCore(MDEQCell(cfg), modes, jac_reg_samples)
        self.head = nn.Linear(cfg.channels[-1] * cfg.sides()[-1] ** 2, cfg.n_classes)

    def set_mode(self, mode: str, **changes: Any) -> None:
        self.core.set_mode(mode, **changes)

    def check_input(self, x: torch.Tensor) -> None:
        """A ValueError/TypeError naming what is wrong with a batch of images."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(x).__name__}")
        want = (self.cfg.in_channels, self.cfg.image_size, self.cfg.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want or x.shape[0] < 1:
            raise ValueError(f"images must be (batch >= 1, {want[0]}, {want[1]}, {want[2]}), "
                             f"got {tuple(x.shape)}")
        dtype = self.head.weight.dtype
        if x.dtype != dtype:
            raise TypeError(f"images must have the parameters' dtype {dtype}, got {x.dtype}")
        if x.device != self.head.weight.device:
            raise ValueError(f"images are on {x.device} but the model is on {self.head.weight.device}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        z = self.core(self.injection(x))
        coarsest = self.core.cell.layout.unpack(z)[-1]
        return self.head(coarsest.flatten(1))
