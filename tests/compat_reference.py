"""The locuslab/deq solvers' algorithm, written out step by step as the test oracle for
``deq_ext.compat``'s ``semantics="official"``.

Written here from the algorithm's description (lib/solvers.py of locuslab/deq v2), literally
and without sharing code with ``deq_ext._locuslab_official``: one flat loop per solver, the
rank-1 pairs of Broyden's inverse Jacobian kept in x's (bsz, hidden, seq_len) layout as the
original keeps them (the contraction order over that layout decides the rounding).
"""

from __future__ import annotations

import math

import torch


def _apply_h(Us, VTs, x):
    """(-I + U V^T) x over the pairs stored so far (Us: B,C,L,n; VTs: B,n,C,L)."""
    if Us.shape[-1] == 0:
        return -x
    return -x + torch.einsum("bcln,bn->bcl", Us, torch.einsum("bncl,bcl->bn", VTs, x))


def _apply_h_t(Us, VTs, x):
    """x^T (-I + U V^T)."""
    if Us.shape[-1] == 0:
        return -x
    return -x + torch.einsum("bn,bncl->bcl", torch.einsum("bcl,bcln->bn", x, Us), VTs)


def _sq_norm(g):
    return torch.norm(g) ** 2 if torch.isfinite(g).all() else math.inf


def _line_search(g, x, gx, d):
    """Armijo search on phi(s) = |g(x + s d)|^2: s = 1, then a quadratic step, then cubic steps
    (each falling back to half the previous step unless it shrank by more than 96 %), giving up
    (s = 1) once the step is 1e-2 or less. A repeated trial step reuses its last evaluation."""
    cache = {"s": 0, "gx": gx, "phi": torch.norm(gx) ** 2}
    phi0 = cache["phi"]
    dphi0 = -phi0

    def phi(s):
        if s == cache["s"]:
            return cache["phi"]
        gs = g(x + s * d)
        cache["s"], cache["gx"], cache["phi"] = s, gs, _sq_norm(gs)
        return cache["phi"]

    s = None
    a0 = 1
    p0 = phi(a0)
    if p0 <= phi0 + 1e-4 * a0 * dphi0:
        s = a0
    else:
        a1 = -dphi0 * a0 ** 2 / 2.0 / (p0 - phi0 - dphi0 * a0)
        p1 = phi(a1)
        while a1 > 1e-2:
            fac = a0 ** 2 * a1 ** 2 * (a1 - a0)
            ca = (a0 ** 2 * (p1 - phi0 - dphi0 * a1) - a1 ** 2 * (p0 - phi0 - dphi0 * a0)) / fac
            cb = (-a0 ** 3 * (p1 - phi0 - dphi0 * a1) + a1 ** 3 * (p0 - phi0 - dphi0 * a0)) / fac
            a2 = (-cb + torch.sqrt(torch.abs(cb ** 2 - 3 * ca * dphi0))) / (3.0 * ca)
            p2 = phi(a2)
            if p2 <= phi0 + 1e-4 * a2 * dphi0:
                s = a2
                break
            if (a1 - a2) > a1 / 2.0 or (1 - a2 / a1) < 0.96:
                a2 = a1 / 2.0
            a0, a1, p0, p1 = a1, a2, p1, p2
    if s is None:
        s = 1.0
    x_new = x + s * d
    gx_new = cache["gx"] if s == cache["s"] else g(x_new)
    return x_new, gx_new


def reference_broyden(f, x0, threshold, eps=1e-3, stop_mode="rel", ls=False):
    """locuslab/deq's Broyden."""
    B, C, L = x0.shape
    g = lambda y: f(y) - y  # noqa: E731
    x, gx = x0, g(x0)
    Us = torch.zeros(B, C, L, threshold, dtype=x0.dtype)
    VTs = torch.zeros(B, threshold, C, L, dtype=x0.dtype)
    d = -_apply_h(Us[..., :0], VTs[:, :0], gx)
    limit = (1e6 if stop_mode == "abs" else 1e3) * L
    traces = {"abs": [], "rel": []}
    low = {"abs": 1e8, "rel": 1e8}
    low_at = {"abs": 0, "rel": 0}
    best, broke, k = x0, False, 0
    while k < threshold:
        x_new, gx_new = _line_search(g, x, gx, d) if ls else (x + 1.0 * d, g(x + 1.0 * d))
        dx, dgx = x_new - x, gx_new - gx
        x, gx = x_new, gx_new
        k += 1
        a = torch.norm(gx).item()
        r = a / (torch.norm(gx + x).item() + 1e-9)
        traces["abs"].append(a)
        traces["rel"].append(r)
        for mode, val in (("abs", a), ("rel", r)):
            if val < low[mode]:
                low[mode], low_at[mode] = val, k
                if mode == stop_mode:
                    best = x.clone()
        obj = traces[stop_mode][-1]
        if obj < eps:
            break
        last = traces[stop_mode][-30:]
        ratio = math.nan if any(map(math.isnan, last)) else max(last) / min(last)
        if obj < 3 * eps and k > 30 and ratio < 1.3:
            break
        if obj > traces[stop_mode][0] * limit:
            broke = True
            break
        vT = _apply_h_t(Us[..., :k - 1], VTs[:, :k - 1], dx)
        denom = torch.einsum("bcl,bcl->b", vT, dgx)[:, None, None]
        u = (dx - _apply_h(Us[..., :k - 1], VTs[:, :k - 1], dgx)) / denom
        vT[torch.isnan(vT)] = 0
        u[torch.isnan(u)] = 0
        VTs[:, k - 1], Us[..., k - 1] = vT, u
        d = -_apply_h(Us[..., :k], VTs[:, :k], gx)
    while len(traces[stop_mode]) < threshold + 1:
        for mode in ("abs", "rel"):
            traces[mode].append(low[mode])
    return {"result": best, "lowest": low[stop_mode], "nstep": low_at[stop_mode],
            "prot_break": broke, "abs_trace": traces["abs"], "rel_trace": traces["rel"],
            "eps": eps, "threshold": threshold}


def reference_anderson(f, x0, m=6, lam=1e-4, threshold=50, eps=1e-3, stop_mode="rel", beta=1.0,
                       log=None):
    """locuslab/deq's Anderson."""
    B = x0.shape[0]
    D = x0[0].numel()
    X = torch.zeros(B, m, D, dtype=x0.dtype)
    F = torch.zeros(B, m, D, dtype=x0.dtype)
    X[:, 0] = x0.reshape(B, -1)
    F[:, 0] = f(x0).reshape(B, -1)
    X[:, 1] = F[:, 0]
    F[:, 1] = f(F[:, 0].reshape(x0.shape)).reshape(B, -1)
    traces = {"abs": [], "rel": []}
    low = {"abs": 1e8, "rel": 1e8}
    low_at = {"abs": 0, "rel": 0}
    best = None
    for k in range(2, threshold):
        n = min(k, m)
        G = F[:, :n] - X[:, :n]
        H = torch.zeros(B, n + 1, n + 1, dtype=x0.dtype)
        H[:, 0, 1:] = 1
        H[:, 1:, 0] = 1
        H[:, 1:, 1:] = G @ G.transpose(1, 2) + lam * torch.eye(n, dtype=x0.dtype)
        y = torch.zeros(B, n + 1, 1, dtype=x0.dtype)
        y[:, 0] = 1
        alpha = torch.linalg.solve(H, y)[:, 1:, 0]
        j = k % m
        X[:, j] = beta * (alpha[:, None] @ F[:, :n])[:, 0] + (1 - beta) * (alpha[:, None] @ X[:, :n])[:, 0]
        F[:, j] = f(X[:, j].reshape(x0.shape)).reshape(B, -1)
        a = (F[:, j] - X[:, j]).norm().item()
        r = a / (1e-5 + F[:, j].norm().item())
        traces["abs"].append(a)
        traces["rel"].append(r)
        for mode, val in (("abs", a), ("rel", r)):
            if val < low[mode]:
                low[mode], low_at[mode] = val, k
                if mode == stop_mode:
                    best = X[:, j].reshape(x0.shape).clone()
        if traces[stop_mode][-1] < eps:
            while len(traces[stop_mode]) < threshold - 2:
                for mode in ("abs", "rel"):
                    traces[mode].append(low[mode])
            break
    if best is None:
        raise RuntimeError("no step below 1e8 (the original has no result here)")
    return {"result": best, "lowest": low[stop_mode], "nstep": low_at[stop_mode],
            "prot_break": False, "abs_trace": traces["abs"], "rel_trace": traces["rel"],
            "eps": eps, "threshold": threshold}
