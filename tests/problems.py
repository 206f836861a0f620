"""Small fixed-point problems with known behaviour, shared by the solver tests."""

from __future__ import annotations

import torch


def contraction(B: int, D: int, dtype=torch.float64, device="cpu", seed: int = 0,
                rho_min: float = 0.3, rho_max: float = 0.95):
    """f(z) = rho_b * tanh(W z) + x_b, one contraction factor per sample (heterogeneous batch).

    The matrix-vector product is written as an elementwise product and a sum over
    the last dim, so each row's arithmetic does not depend on the batch size
    (needed for the bit-level batch-invariance tests).
    """
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(D, D, generator=gen, dtype=torch.float64)
    W = W / torch.linalg.matrix_norm(W, ord=2)
    rho = torch.linspace(rho_min, rho_max, B, dtype=torch.float64)[:, None]
    x = torch.randn(B, D, generator=gen, dtype=torch.float64)
    W, rho, x = (t.to(device=device, dtype=dtype) for t in (W, rho, x))

    def f(z: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        r = rho if rows is None else rho[rows]
        xx = x if rows is None else x[rows]
        return r * torch.tanh((z[:, None, :] * W[None]).sum(-1)) + xx

    return f


class CountingF:
    """Wraps f and counts how many times it was called."""

    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, z):
        self.calls += 1
        return self.f(z)


def contraction_inputs(B: int, D: int, dtype=torch.float64, device="cpu", seed: int = 0):
    """The same heterogeneous contraction with its data passed as inputs: f(z, x, rho, W, scale).

    x and rho are batched, W (D, D) is not (D != B in the tests), scale is not a tensor.
    """
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(D, D, generator=gen, dtype=torch.float64)
    W = (W / torch.linalg.matrix_norm(W, ord=2)).to(device=device, dtype=dtype)
    rho = torch.linspace(0.3, 0.95, B, dtype=torch.float64)[:, None].to(device=device, dtype=dtype)
    x = torch.randn(B, D, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    def f(z, x, rho, W, scale):
        return scale * rho * torch.tanh((z[:, None, :] * W[None]).sum(-1)) + x

    return f, (x, rho, W, 1.0)


class RowCountingF:
    """Wraps f and counts the rows (samples) it was evaluated on."""

    def __init__(self, f):
        self.f, self.rows, self.calls = f, 0, 0

    def __call__(self, z, *inputs):
        self.rows += z.shape[0]
        self.calls += 1
        return self.f(z, *inputs)


def mixed_line_search(B: int, D: int, dtype=torch.float64, device="cpu", seed: int = 0):
    """f(z, x, s) = s_b tanh(W z) - 0.5 z + x_b with s_b from 0.3 to 2.5, and (x, s).

    Small s_b are contractions on which full Broyden steps are accepted; large s_b are not,
    and the line search backtracks there: a batch in which some samples backtrack and some
    do not. Row-independent arithmetic, as in :func:`contraction`.
    """
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(D, D, generator=gen, dtype=torch.float64)
    W = (W / torch.linalg.matrix_norm(W, ord=2)).to(device=device, dtype=dtype)
    s = torch.linspace(0.3, 2.5, B, dtype=torch.float64)[:, None].to(device=device, dtype=dtype)
    x = (3 * torch.randn(B, D, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)

    def f(z, x, s):
        return s * torch.tanh((z[:, None, :] * W[None]).sum(-1)) - 0.5 * z + x

    return f, (x, s)
