"""Tiny models, token batches and measurements shared by the model tests."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from deq_ext import SolverSettings
from models import DEQLanguageModel, LMConfig, get_preset

KINDS = ["transformer", "transformer_preln", "trellisnet"]

# Mode variants every behaviour is checked in: (id, ModeConfig changes).
VARIANTS = [
    ("deq", dict(mode="deq")),
    ("deq_subseq", dict(mode="deq", subseq_len=3)),
    ("deq_phantom", dict(mode="deq", grad_mode="phantom", phantom_steps=2)),
    ("unrolled", dict(mode="unrolled")),
    ("unrolled_ckpt", dict(mode="unrolled", checkpoint=True)),
    ("pretrain", dict(mode="pretrain")),
]
VARIANT_IDS = [v[0] for v in VARIANTS]
VARIANT_CHANGES = [v[1] for v in VARIANTS]

# Tight solves: float32 (relative residual) and float64.
TIGHT32 = dict(forward=SolverSettings(max_iter=60, tol=1e-6, stop_mode="rel"),
               backward=SolverSettings(max_iter=60, tol=1e-6, stop_mode="rel"))
TIGHT64 = dict(forward=SolverSettings(max_iter=100, tol=1e-11, stop_mode="rel"),
               backward=SolverSettings(max_iter=100, tol=1e-11, stop_mode="rel"))


def tiny_config(kind: str, dropout: float = 0.0, lm: dict | None = None,
                core: dict | None = None, **modes) -> LMConfig:
    """The tiny preset of ``kind`` with core dropout, LMConfig, core and ModeConfig changes."""
    name = "deq_trellisnet_tiny" if kind == "trellisnet" else "deq_transformer_tiny"
    cfg = get_preset(name).config
    core_cfg = replace(cfg.core, dropout=dropout, **(core or {}))
    if kind == "transformer_preln":
        core_cfg = replace(core_cfg, pre_ln=True)
    return replace(cfg, core=core_cfg, modes=replace(cfg.modes, **modes), **(lm or {}))


def tiny_model(kind: str, device: torch.device | str = "cpu", seed: int = 0,
               dropout: float = 0.0, lm: dict | None = None, dtype: torch.dtype = torch.float32,
               core: dict | None = None, **modes) -> DEQLanguageModel:
    torch.manual_seed(seed)
    return DEQLanguageModel(tiny_config(kind, dropout, lm, core, **modes)).to(device=device,
                                                                            dtype=dtype)


def tokens(batch: int, length: int, device: torch.device | str = "cpu", seed: int = 1,
           vocab: int = 64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen).to(device)


def saved_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
