"""The copy-memory generator against the task definition (paper, Appendix F)."""

from __future__ import annotations

import math

import pytest
import torch

from train.data_copy import DELIMITER, baseline_losses, copy_memory, copy_memory_splits

CASES = [(1, 1, 0), (7, 1, 3), (50, 20, 11), (33, 57, 5), (4, 400, 9)]


@pytest.mark.parametrize("n,T,seed", CASES)
def test_inputs_follow_the_definition(n: int, T: int, seed: int) -> None:
    x, _ = copy_memory(n, T, seed)
    assert x.shape == (n, T + 20) and x.dtype == torch.long
    assert ((x[:, :10] >= 1) & (x[:, :10] <= 8)).all()
    # 1-based: x_{11..T+9} = 0, x_{T+10} = 9 (the paper's delimiter), x_{T+11..T+20} = 0.
    assert (x[:, 10:T + 9] == 0).all()
    assert (x[:, T + 9] == DELIMITER).all()
    assert (x[:, T + 10:] == 0).all()
    assert (x == DELIMITER).sum() == n


@pytest.mark.parametrize("n,T,seed", CASES)
def test_targets_follow_the_definition(n: int, T: int, seed: int) -> None:
    x, y = copy_memory(n, T, seed)
    assert y.shape == x.shape
    assert (y[:, :T + 10] == 0).all()             # y_{1..T+10} = 0 (the delimiter's step too)
    assert torch.equal(y[:, T + 10:], x[:, :10])  # then the first 10 symbols, in order
    assert ((y >= 0) & (y <= 8)).all()            # 10-way classification, 9 never a target


def test_symbols_cover_1_to_8_uniformly() -> None:
    x, _ = copy_memory(4000, 5, 0)
    counts = torch.bincount(x[:, :10].flatten(), minlength=10)
    assert counts[0] == 0 and counts[9] == 0
    freq = counts[1:9].double() / counts.sum()
    assert torch.allclose(freq, torch.full((8,), 1 / 8, dtype=torch.float64), atol=0.01)


def test_seeded_and_independent_of_global_rng() -> None:
    torch.manual_seed(0)
    a = copy_memory(100, 10, 42)
    torch.manual_seed(1)
    b = copy_memory(100, 10, 42)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], copy_memory(100, 10, 43)[0])


def test_paper_split_sizes_and_distinct_test_set() -> None:
    splits = copy_memory_splits(T=3, seed=0)
    assert splits["train"][0].shape == (20_000, 23)
    assert splits["test"][0].shape == (2_000, 23)
    assert not torch.equal(splits["train"][0][:2000], splits["test"][0])


@pytest.mark.parametrize("T", [1, 20, 400])
def test_baselines_are_the_entropies_of_the_targets(T: int) -> None:
    _, y = copy_memory(3000, T, 1)
    freq = torch.bincount(y.flatten(), minlength=10).double() / y.numel()
    empirical = -(freq[freq > 0] * freq[freq > 0].log()).sum().item()
    base = baseline_losses(T)
    assert base["class_prior"] == pytest.approx(empirical, abs=0.01)
    assert base["blank_then_uniform"] == pytest.approx(10 * math.log(8) / (T + 20))


def test_bad_sizes_raise() -> None:
    with pytest.raises(ValueError):
        copy_memory(-1, 5, 0)
    with pytest.raises(ValueError, match="T >= 1"):
        copy_memory(3, 0, 0)
