"""The copy-memory task (paper, Appendix F).

An input is ``T + 20`` symbols: 10 symbols drawn uniformly from 1..8, then zeros, except the
delimiter 9 at (1-based) position ``T + 10``, the paper's ``x_{T+10} = 9`` (0-based index
``T + 9``). The target is zero at the 1-based positions 1..T+10 and then the 10 first symbols
(``y_{T+11:T+20} = x_{1:10}``): the step after the delimiter recalls the first symbol.
"""

from __future__ import annotations

import math

import torch

N_SYMBOLS = 10   # how many symbols are copied
N_CLASSES = 10   # 0 (blank), 1..8 (data), 9 (delimiter)
DELIMITER = 9


def copy_memory(n: int, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences of the task with delay ``T``: ``(inputs, targets)``, both ``(n, T + 20)``.

    The result depends only on ``(n, T, seed)`` (its own generator, not the global RNG).
    """
    if n < 0 or T < 1:
        # T = 0 would put the delimiter on the tenth symbol (1-based position 10).
        raise ValueError(f"n must be >= 0 and T >= 1, got n={n}, T={T}")
    gen = torch.Generator().manual_seed(seed)
    symbols = torch.randint(1, 9, (n, N_SYMBOLS), generator=gen)
    length = T + 2 * N_SYMBOLS
    x = torch.zeros(n, length, dtype=torch.long)
    y = torch.zeros(n, length, dtype=torch.long)
    x[:, :N_SYMBOLS] = symbols
    x[:, T + N_SYMBOLS - 1] = DELIMITER  # 1-based position T + 10
    y[:, T + N_SYMBOLS:] = symbols
    return x, y


def copy_memory_splits(T: int, seed: int, train_size: int = 20_000,
                       test_size: int = 2_000) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The paper's 20K training and 2K test sequences (other sizes on request), one seed each."""
    return {"train": copy_memory(train_size, T, seed),
            "test": copy_memory(test_size, T, seed + 1)}


def baseline_losses(T: int) -> dict[str, float]:
    """Cross-entropies (nats per step) of two trivial predictors, for comparison.

    ``class_prior``: predict the classes' overall frequencies at every step.
    ``blank_then_uniform``: zeros where the target is 0 and uniform over 1..8 after the
    delimiter: the best loss without remembering anything (10 log 8 / (T + 20)).
    """
    length = T + 2 * N_SYMBOLS
    p0 = (T + N_SYMBOLS) / length
    q = N_SYMBOLS / length / 8
    return {"class_prior": -(p0 * math.log(p0) + 8 * q * math.log(q)),
            "blank_then_uniform": N_SYMBOLS * math.log(8) / length}
