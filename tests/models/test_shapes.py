"""Shapes, dtypes (float32, float64, bf16 autocast), batch sizes 1 and odd, sequence length 1."""

from __future__ import annotations

import pytest
import torch

from models import MODES

from .helpers import KINDS, tiny_model, tokens


def _memory_shapes(kind: str, B: int, T: int) -> list[tuple[int, ...]]:
    if kind == "trellisnet":  # d_hidden 24, k = 2, s = 1: one position of [h, c] and of x
        return [(B, 48, 1), (B, 16, 1)]
    M = min(T, 8)  # mem_len 8
    return [(B, M, 16), (B, M, 48)]


@pytest.mark.parametrize("B,T", [(1, 1), (3, 7), (1, 12), (3, 1)])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_shapes_and_dtypes(kind, mode, B, T, device):
    model = tiny_model(kind, device, dropout=0.1, mode=mode).train()
    seq, tgt = tokens(B, T, device), tokens(B, T, device, seed=2)
    out = model(seq, tgt)
    assert out.hidden.shape == (B, T, 16) and out.hidden.dtype == torch.float32
    assert out.nll.shape == (B, T) and out.loss.shape == ()
    assert torch.isfinite(out.loss)
    assert [tuple(m.shape) for m in out.memory] == _memory_shapes(kind, B, T)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.log_probs(out.hidden).shape == (B, T, 64)


@pytest.mark.parametrize("kind", KINDS)
def test_float64_model_keeps_its_state_in_float64(kind):
    model = tiny_model(kind, dtype=torch.float64)
    out = model(tokens(3, 5), tokens(3, 5, seed=2))
    assert out.hidden.dtype == torch.float64 and out.memory[0].dtype == torch.float64
    out.loss.backward()
    assert all(p.grad.dtype == torch.float64 for p in model.parameters())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_bf16_autocast_forward_and_backward(kind, mode, device):
    model = tiny_model(kind, device, mode=mode).train()
    seq, tgt = tokens(3, 7, device), tokens(3, 7, device, seed=2)
    reference = model(seq, tgt).loss.item()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        first = model(seq, tgt)
        second = model(tokens(3, 7, device, seed=3), tgt, memory=first.memory)
    # f returns z in the parameters' dtype: the solver state and the memory stay float32.
    assert first.hidden.shape == (3, 7, 16)
    assert all(m.dtype == torch.float32 for m in first.memory)
    assert abs(first.loss.item() - reference) < 0.1, "bf16 should only perturb the loss"
    (first.loss + second.loss).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name
