"""A tiny DEQ-Transformer written the way locuslab/deq's DEQ-Sequence code is (the client of
``deq_ext.compat``'s locuslab adapters), and a few SGD steps of training it.

The pattern it reproduces: the solvers are passed in as functions (``f_solver``/``b_solver``,
as ``train_transformer.py`` does with ``eval(args.f_solver)``); the forward solve runs under
``no_grad`` with ``threshold`` and ``stop_mode`` and only ``['result']`` is read; in training f
is applied once more at z* and a backward hook on that output solves the adjoint equation with
the backward solver, calling ``autograd.grad`` inside its f, and removes itself. States are laid
out (bsz, d_model, seq_len). Used by tests/test_compat_client.py and tools/compat_semantics_table.py.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.autograd as autograd
import torch.nn.functional as F
from torch import nn

Solver = Callable[..., dict]


class TinyDEQTransformer(nn.Module):
    """f(z; u) = LN(h + FF(h)), h = LN(z + Attn(z W_qkv + u)), causal, one head per d_head."""

    def __init__(self, vocab: int, d_model: int, n_head: int, f_solver: Solver,
                 b_solver: Optional[Solver] = None, stop_mode: str = "rel") -> None:
        super().__init__()
        self.n_head, self.d_model = n_head, d_model
        self.embed = nn.Embedding(vocab, d_model)
        self.inject = nn.Linear(d_model, 3 * d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.ReLU(), nn.Linear(2 * d_model, d_model))
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.decoder = nn.Linear(d_model, vocab)
        self.f_solver = f_solver
        self.b_solver = b_solver if b_solver else f_solver
        self.stop_mode = stop_mode
        self.hook: Any = None

    def func(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """One application of the weight-tied layer; z and the result are (bsz, d, T)."""
        bsz, d, T = z.shape
        h = z.transpose(1, 2)   # (bsz, T, d)
        q, k, v = (self.qkv(h) + u).chunk(3, dim=-1)
        split = lambda t: t.reshape(bsz, T, self.n_head, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        scores = q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5)
        causal = torch.ones(T, T, dtype=torch.bool, device=z.device).triu(1)
        att = scores.masked_fill(causal, float("-inf")).softmax(-1) @ v
        h = self.ln1(h + self.out(att.transpose(1, 2).reshape(bsz, T, d)))
        h = self.ln2(h + self.ff(h))
        return h.transpose(1, 2)

    def forward(self, tokens: torch.Tensor, target: torch.Tensor, f_thres: int = 30,
                b_thres: int = 40) -> torch.Tensor:
        """Mean cross-entropy of predicting ``target`` from ``tokens`` (both (bsz, T))."""
        x = self.embed(tokens)
        u = self.inject(x)
        z1s = torch.zeros(x.shape[0], self.d_model, x.shape[1], dtype=x.dtype)
        with torch.no_grad():
            result = self.f_solver(lambda z: self.func(z, u), z1s, threshold=f_thres,
                                   stop_mode=self.stop_mode)
            z1s = result["result"]
        new_z1s = z1s
        if self.training:
            z1s.requires_grad_()
            new_z1s = self.func(z1s, u)

            def backward_hook(grad: torch.Tensor) -> torch.Tensor:
                if self.hook is not None:
                    self.hook.remove()   # the adjoint's own autograd.grad calls must not re-enter
                return self.b_solver(lambda y: autograd.grad(new_z1s, z1s, y, retain_graph=True)[0] + grad,
                                     torch.zeros_like(grad), threshold=b_thres)["result"]
            self.hook = new_z1s.register_hook(backward_hook)
        logits = self.decoder(new_z1s.transpose(1, 2))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def make_batch(seed: int, vocab: int = 11, bsz: int = 3,
               seq_len: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy-the-previous-token task: target[t] = tokens[t - 1]."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (bsz, seq_len), generator=gen)
    target = torch.cat([torch.zeros(bsz, 1, dtype=torch.long), tokens[:, :-1]], dim=1)
    return tokens, target


def build(seed: int, f_solver: Solver, b_solver: Solver, dtype: torch.dtype = torch.float64,
          vocab: int = 11, d_model: int = 8, n_head: int = 2) -> TinyDEQTransformer:
    """The model with weights drawn from ``seed`` (the same for every solver choice)."""
    torch.manual_seed(seed)
    return TinyDEQTransformer(vocab, d_model, n_head, f_solver, b_solver).to(dtype)


def train(seed: int, f_solver: Solver, b_solver: Solver, steps: int = 4, lr: float = 0.2,
          dtype: torch.dtype = torch.float64) -> tuple[list[float], list[torch.Tensor]]:
    """``steps`` SGD steps on fresh batches; returns the losses and the final parameters."""
    model = build(seed, f_solver, b_solver, dtype)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        tokens, target = make_batch(1000 * seed + step)
        opt.zero_grad()
        loss = model(tokens, target)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, [p.detach().clone() for p in model.parameters()]


def loss_and_grads(seed: int, f_solver: Solver, b_solver: Solver, f_thres: int = 30, b_thres: int = 40,
                   dtype: torch.dtype = torch.float64) -> tuple[float, list[torch.Tensor]]:
    """Loss and parameter gradients of one batch at the model's initial weights."""
    model = build(seed, f_solver, b_solver, dtype)
    model.train()
    tokens, target = make_batch(seed)
    loss = model(tokens, target, f_thres=f_thres, b_thres=b_thres)
    loss.backward()
    return float(loss.detach()), [p.grad.detach().clone() for p in model.parameters()]
