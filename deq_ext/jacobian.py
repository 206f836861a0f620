"""Estimates about J_f(z*) from the one application of f a DEQ already records at z*.

* :func:`jac_reg`: the Hutchinson estimate of ``||J_f(z*)||_F^2`` per sample, the Jacobian
  regularizer of Bai, Koltun and Kolter ("Stabilizing Equilibrium Models by Jacobian
  Regularization", ICML 2021). Differentiable with respect to f's parameters, to be added to
  the training loss.
* :func:`spectral_radius`: the power-iteration estimate of J_f(z*)'s spectral radius per
  sample, a diagnostic of how contractive f is at the equilibrium.

Both take ``fz = f(z)`` computed with ``z`` requiring grad, and use vector-Jacobian products
``v^T J`` (one backward through the recorded f each); ``fz`` and ``z`` may be tensors or
matching tuples, lists or dicts of tensors (structured states), batched on dim 0. Each
sample's row of ``fz`` must depend only on its own row of ``z`` (as every DEQ's f here): the
estimates are then per sample.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ._tree import map_tensors


def _leaves(obj: Any, name: str) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    map_tensors(out.append, obj)
    if not out:
        raise TypeError(f"{name} must be a tensor or a tuple, list or dict of tensors, "
                        f"got {type(obj).__name__}")
    return out


def _checked(fz: Any, z: Any) -> tuple[list[torch.Tensor], list[torch.Tensor], int, int]:
    """(fz leaves, z leaves, B, D) after checking that fz is f(z) with z requiring grad."""
    fz_leaves, z_leaves = _leaves(fz, "fz"), _leaves(z, "z")
    if [tuple(t.shape) for t in fz_leaves] != [tuple(t.shape) for t in z_leaves]:
        raise ValueError(f"fz must have z's structure and shapes: fz has "
                         f"{[tuple(t.shape) for t in fz_leaves]}, z has {[tuple(t.shape) for t in z_leaves]}")
    if any(t.dim() < 1 for t in z_leaves) or len({t.shape[0] for t in z_leaves}) != 1:
        raise ValueError("z's tensors must be batched on dim 0 with one batch size")
    if not all(t.requires_grad for t in z_leaves):
        raise ValueError("z must require grad: compute fz as f(z) after z.requires_grad_()")
    if not any(t.requires_grad for t in fz_leaves):
        raise ValueError("fz does not depend on z through autograd: compute it as f(z) with grad "
                         "enabled and z.requires_grad_()")
    B = z_leaves[0].shape[0]
    D = sum(t[0].numel() for t in z_leaves) if B else sum(t.numel() for t in z_leaves)
    return fz_leaves, z_leaves, B, D


def _probe(like: torch.Tensor, kind: str, generator: Optional[torch.Generator]) -> torch.Tensor:
    if kind == "gaussian":
        return torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator)
    signs = torch.randint(0, 2, like.shape, device=like.device, generator=generator)
    return (2 * signs - 1).to(like.dtype)


def _vjp(fz: list[torch.Tensor], z: list[torch.Tensor], vs: list[torch.Tensor],
         create_graph: bool) -> list[torch.Tensor]:
    grads = torch.autograd.grad(fz, z, vs, retain_graph=True, create_graph=create_graph,
                                allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, z)]


def _per_sample_sq(ts: list[torch.Tensor], B: int) -> torch.Tensor:
    return sum(t.reshape(B, -1).pow(2).sum(1) for t in ts)  # type: ignore[return-value]


def jac_reg(fz: Any, z: Any, samples: int = 1, *, probe: str = "gaussian",
            create_graph: bool = True, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per-sample Hutchinson estimate of ``||J_f(z)||_F^2 / D`` (D: elements per sample).

    With probes ``v`` of zero mean and identity covariance, ``E ||v^T J||^2 = tr(J J^T) =
    ||J||_F^2``; the estimate averages ``samples`` probes. No extra forward pass: it runs
    ``samples`` backward passes through the graph of ``fz``.

    Args:
        fz: ``f(z)``, computed with grad enabled (a DEQ records it at z*).
        z: the input of that application of f, requiring grad.
        samples: number of probes (>= 1).
        probe: ``'gaussian'`` or ``'rademacher'`` (random signs; lower variance).
        create_graph: keep the graph of the estimate, so that it is differentiable with
            respect to f's parameters (True, for a loss); False for monitoring only.
        generator: draws the probes (default: the global RNG of fz's device).

    Returns:
        ``(B,)``: the estimate for each sample, in fz's dtype. Add
        ``weight * jac_reg(...).mean()`` to the loss.

    Example:
        >>> z = z_star.detach().requires_grad_()
        >>> loss = task_loss + 2.0 * deq_ext.jac_reg(f(z, x), z).mean()
    """
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
    if probe not in ("gaussian", "rademacher"):
        raise ValueError(f"probe must be 'gaussian' or 'rademacher', got {probe!r}")
    fz_leaves, z_leaves, B, D = _checked(fz, z)
    total = None
    for _ in range(samples):
        vs = [_probe(t, probe, generator) for t in fz_leaves]
        sq = _per_sample_sq(_vjp(fz_leaves, z_leaves, vs, create_graph), B)
        total = sq if total is None else total + sq
    assert total is not None
    return total / (samples * max(D, 1))


def spectral_radius(fz: Any, z: Any, steps: int = 20, *,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per-sample power-iteration estimate of the spectral radius of ``J_f(z)`` (no graph kept).

    Iterates ``v <- J^T v / ||J^T v||`` from a random start, ``steps`` VJPs in all, and returns
    ``||J^T v||`` for the last unit ``v``. J^T has J's eigenvalues. When one real eigenvalue
    ``lambda_1`` dominates, the estimate converges to ``|lambda_1|`` with an error shrinking like
    ``|lambda_2 / lambda_1|^steps``. When the dominant eigenvalues are a complex-conjugate pair
    (or several of equal modulus), v does not converge: it keeps turning in the pair's invariant
    plane, and the estimate is J's gain on the current v there, which oscillates between the
    smallest and the largest gain of J on that plane, on both sides of the radius. It is exact
    only where J acts on that plane as a scaled rotation (a normal J); otherwise treat it as a
    rough diagnostic, not a bound.

    Args:
        fz, z: as for :func:`jac_reg`.
        steps: power iterations (>= 1).
        generator: draws the start vector.

    Returns:
        ``(B,)`` estimates (detached), in fz's dtype.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    fz_leaves, z_leaves, B, _ = _checked(fz, z)
    with torch.no_grad():
        vs = [_probe(t, "gaussian", generator) for t in fz_leaves]
    est = torch.zeros(B, dtype=fz_leaves[0].dtype, device=fz_leaves[0].device)
    for _ in range(steps):
        norm = _per_sample_sq(vs, B).sqrt().clamp_min(torch.finfo(est.dtype).tiny)
        vs = [v / norm.view(-1, *[1] * (v.dim() - 1)) for v in vs]
        with torch.enable_grad():
            us = _vjp(fz_leaves, z_leaves, vs, create_graph=False)
        est = _per_sample_sq(us, B).sqrt()
        vs = [u.detach() for u in us]
    return est.detach()
