"""Pure-PyTorch twin of every extension op, with the same semantics op by op.

The solver state lives in flat ``(B, D)`` tensors and a history of ring length
``m`` stored as a list of ``(B, C, D)`` chunks, allocated as the ring fills (slot
``j`` of the ring is row ``j % C`` of chunk ``j // C``; see docs/design.md). Every
op reads and writes only the samples whose ``status`` is ``Status.ACTIVE``; all
others are left bit for bit as they were. The compiled ops in ``deq_ext._C`` are
tested against these functions, and the solver falls back to them when the
extension is not available. ``partials`` and ``tickets`` are the CUDA kernels'
scratch; the twin (like the CPU kernels) does not use them.

Accumulation precision: every reduction accumulates in float64, for float32
state too, here as in the CPU and CUDA kernels, so that per-sample decisions (a
usable Broyden denominator, a new best iterate) are taken from the same sums on
every device. The kernels add in a different order (chunked), so float32
comparisons still need a float32 tolerance.
"""

from __future__ import annotations

import torch

from .status import ACTIVE_COUNT, DEN, NUM_SCALARS, PENDING_COUNT, REL_EPS, VALID, VG, Status


def _active_index(status: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(status == Status.ACTIVE, as_tuple=False).flatten()


def _smallest_normal(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).tiny


def _ring(chunks: list[torch.Tensor], m: int) -> torch.Tensor:
    """The history as one ``(B, capacity, D)`` tensor (a copy), capacity <= m slots."""
    return torch.cat(list(chunks), dim=1)[:, :m]


def _write_slots(chunks: list[torch.Tensor], samples: torch.Tensor, slots: torch.Tensor,
                 rows: torch.Tensor) -> None:
    """``chunks[slot // C][sample, slot % C] = row`` for every (sample, slot, row)."""
    C = chunks[0].shape[1]
    for c in torch.unique(slots // C).tolist():
        sel = slots // C == c
        chunks[c][samples[sel], slots[sel] % C] = rows[sel].to(chunks[c].dtype)


def _check_capacity(chunks: list[torch.Tensor], count: torch.Tensor, idx: torch.Tensor,
                    needed) -> None:
    capacity = sum(c.shape[1] for c in chunks)
    need = needed(count.index_select(0, idx))
    if need.numel() and int(need.max()) > capacity:
        raise RuntimeError(f"deq_ext: a sample needs {int(need.max())} history slots, but only "
                           f"{capacity} are allocated")


def residual_status_(
    fz: torch.Tensor,
    z: torch.Tensor,
    g: torch.Tensor,
    dg: torch.Tensor,
    z_best: torch.Tensor,
    best_abs: torch.Tensor,
    best_rel: torch.Tensor,
    res_abs: torch.Tensor,
    res_rel: torch.Tensor,
    status: torch.Tensor,
    nstep: torch.Tensor,
    nfev: torch.Tensor,
    stall: torch.Tensor,
    counts: torch.Tensor,
    partials: torch.Tensor,
    tickets: torch.Tensor,
    tol: float,
    use_rel: bool,
    stall_patience: int,
    diverge_ratio: float,
    count_step: bool,
    freeze_converged: bool,
) -> None:
    """Residual, norms, lowest-residual tracking and status update, in place.

    ``fz`` is f's output as it comes, ``(B, ...)`` with D values per sample. For every
    active sample b, with ``fz[b] = f(z[b])`` (any float dtype):
    ``g_new = fz - z``; ``dg = g_new - g``; ``g = g_new``;
    ``res_abs = ||g_new||``, ``res_rel = res_abs / (||fz|| + 1e-9)``;
    ``nfev += 1`` and, if ``count_step``, ``nstep += 1``. If the stop-mode
    objective is lower than the best so far, ``z_best = z`` and
    ``best_abs/best_rel`` take the new residuals, and ``stall`` resets to 0
    (else it grows by one). Then the status: non-finite residual -> DIVERGED;
    objective < tol (with ``freeze_converged``) -> CONVERGED; objective >
    ``diverge_ratio`` x previous best -> DIVERGED; ``stall >= stall_patience``
    (when > 0) -> STALLED. Finally ``counts`` (int64, 2) receives the number of
    pending samples (active and, with ``freeze_converged`` False, not below tol) and
    of active samples over the whole batch.
    """
    idx = _active_index(status)
    if idx.numel():
        _residual_update(fz.reshape(fz.shape[0], -1), z, g, dg, z_best, best_abs, best_rel,
                         res_abs, res_rel, status, nstep, nfev, stall, idx, tol, use_rel,
                         stall_patience, diverge_ratio, count_step, freeze_converged)
    active = status == Status.ACTIVE
    pending = active
    if not freeze_converged:
        obj = (res_rel if use_rel else res_abs).to(torch.float64)
        pending = active & ~(obj < tol)
    counts[PENDING_COUNT] = pending.sum()
    counts[ACTIVE_COUNT] = active.sum()


def _residual_update(fz, z, g, dg, z_best, best_abs, best_rel, res_abs, res_rel, status, nstep,
                     nfev, stall, idx, tol, use_rel, stall_patience, diverge_ratio, count_step,
                     freeze_converged) -> None:
    acc = torch.float64
    fz_a = fz.index_select(0, idx)
    z_a = z.index_select(0, idx)
    g_new = fz_a.to(z.dtype) - z_a
    dg.index_copy_(0, idx, g_new - g.index_select(0, idx))
    g.index_copy_(0, idx, g_new)

    sq_g = (g_new.to(acc) ** 2).sum(dim=1)
    sq_fz = (fz_a.to(acc) ** 2).sum(dim=1)
    r_abs = sq_g.sqrt()
    r_rel = r_abs / (sq_fz.sqrt() + REL_EPS)
    obj = r_rel if use_rel else r_abs
    best_obj = (best_rel if use_rel else best_abs).index_select(0, idx).to(acc)

    finite = torch.isfinite(r_abs) & torch.isfinite(r_rel)
    improved = finite & (obj < best_obj)
    old_stall = stall.index_select(0, idx)
    new_stall = torch.where(improved, torch.zeros_like(old_stall), old_stall + 1)
    new_stall = torch.where(finite, new_stall, old_stall)

    new_status = torch.full_like(idx, int(Status.ACTIVE))
    if stall_patience > 0:
        new_status = torch.where(new_stall >= stall_patience, int(Status.STALLED), new_status)
    # Below tol is never a blow-up: with per_sample=False a converged sample keeps iterating, and
    # rounding noise above a best residual of 0 would otherwise flag it diverged.
    blew_up = torch.isfinite(best_obj) & (obj > diverge_ratio * best_obj) & ~(obj < tol)
    new_status = torch.where(blew_up, int(Status.DIVERGED), new_status)
    if freeze_converged:
        new_status = torch.where(obj < tol, int(Status.CONVERGED), new_status)
    new_status = torch.where(finite, new_status, int(Status.DIVERGED))

    res_abs.index_copy_(0, idx, r_abs.to(res_abs.dtype))
    res_rel.index_copy_(0, idx, r_rel.to(res_rel.dtype))
    stall.index_copy_(0, idx, new_stall)
    nfev.index_add_(0, idx, torch.ones_like(idx))
    if count_step:
        nstep.index_add_(0, idx, torch.ones_like(idx))

    imp = idx[improved]
    z_best.index_copy_(0, imp, z.index_select(0, imp))
    best_abs.index_copy_(0, imp, r_abs[improved].to(best_abs.dtype))
    best_rel.index_copy_(0, imp, r_rel[improved].to(best_rel.dtype))
    status.index_copy_(0, idx, new_status)


def _sherman_morrison(
    proj: torch.Tensor, dz_dg: torch.Tensor, dz_g: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a, b, c = proj[:, 0], proj[:, 1], proj[:, 2]
    den = (a * b).sum(dim=1) - dz_dg
    vg = (a * c).sum(dim=1) - dz_g
    tiny = _smallest_normal(dtype)
    valid = torch.isfinite(den) & torch.isfinite(vg) & (den.abs() > tiny)
    return den, vg, valid


def live_pairs(npairs: torch.Tensor, m: int, restart: bool) -> torch.Tensor:
    """The pair count an active sample's step starts from: with ``restart`` (restarted
    Broyden) a full ring (``npairs >= m``) starts over as if empty. The count itself changes
    only when a pair is stored, so a finished sample keeps its m pairs."""
    return torch.where(npairs >= m, 0, npairs) if restart else npairs


def broyden_reduce(
    U: list[torch.Tensor],
    V: list[torch.Tensor],
    dz: torch.Tensor,
    dg: torch.Tensor,
    g: torch.Tensor,
    status: torch.Tensor,
    npairs: torch.Tensor,
    proj: torch.Tensor,
    scal: torch.Tensor,
    partials: torch.Tensor,
    tickets: torch.Tensor,
    m: int,
    restart: bool = False,
) -> None:
    """Fused reduction pass over the history (writes ``proj`` and ``scal``).

    For every active sample with k = min(n, m) stored pairs (ring slots
    0..k-1, which must be allocated), n = :func:`live_pairs` of ``npairs``: ``proj[b, 0, j] = U[b, j] . dz``,
    ``proj[b, 1, j] = V[b, j] . dg``, ``proj[b, 2, j] = V[b, j] . g`` for j < k,
    and 0 for j >= k; ``scal[b] = [dz.dg, dz.g, den, vg, valid]`` with the
    Sherman-Morrison quantities of ``csrc/common/broyden_math.h``.
    """
    idx = _active_index(status)
    if idx.numel() == 0:
        return
    _check_capacity(U, npairs, idx, lambda n: torch.clamp(live_pairs(n, m, restart), max=m))
    acc = torch.float64
    U_a = _ring(U, m).index_select(0, idx).to(acc)
    V_a = _ring(V, m).index_select(0, idx).to(acc)
    cap = U_a.shape[1]
    dz_a = dz.index_select(0, idx).to(acc)
    dg_a = dg.index_select(0, idx).to(acc)
    g_a = g.index_select(0, idx).to(acc)
    k = torch.clamp(live_pairs(npairs.index_select(0, idx), m, restart), max=m)
    stored = (torch.arange(cap, device=dz.device)[None, :] < k[:, None]).to(acc)

    p = torch.zeros(idx.numel(), 3, m, dtype=acc, device=dz.device)
    p[:, :, :cap] = torch.stack(
        [
            torch.einsum("bmd,bd->bm", U_a, dz_a),
            torch.einsum("bmd,bd->bm", V_a, dg_a),
            torch.einsum("bmd,bd->bm", V_a, g_a),
        ],
        dim=1,
    ) * stored[:, None, :]
    dz_dg = (dz_a * dg_a).sum(dim=1)
    dz_g = (dz_a * g_a).sum(dim=1)
    den, vg, valid = _sherman_morrison(p, dz_dg, dz_g, dz.dtype)
    s = torch.stack([dz_dg, dz_g, den, vg, valid.to(acc)], dim=1)
    proj.index_copy_(0, idx, p.to(proj.dtype))
    scal.index_copy_(0, idx, s.to(scal.dtype))


def _to_history(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round a new pair to the history dtype as the kernels do: a float16/bfloat16 history
    takes the double through float32 (one rounding each), the state dtype directly."""
    if dtype in (torch.float16, torch.bfloat16):
        x = x.to(torch.float32)
    return x.to(dtype)


def broyden_expand_(
    U: list[torch.Tensor],
    V: list[torch.Tensor],
    dz: torch.Tensor,
    dg: torch.Tensor,
    g: torch.Tensor,
    z: torch.Tensor,
    proj: torch.Tensor,
    scal: torch.Tensor,
    status: torch.Tensor,
    npairs: torch.Tensor,
    tickets: torch.Tensor,
    m: int,
    restart: bool = False,
) -> None:
    """Fused expansion pass: store the new pair, form the next step, move z.

    For every active sample, with n = :func:`live_pairs` of ``npairs``, k = min(n, m),
    slot = n % m (both allocated) and (a, b, c) = proj[b]: if ``scal[b, VALID]``,
    ``u = (dz + dg - U b) / den``, ``v = -dz + V a``, the pair goes into ring
    slot ``slot`` (replacing the oldest pair once the ring is full) and
    ``npairs = n + 1``; the step is ``-H' g = g - sum_{j kept} U_j c_j - u vg``.
    Otherwise the history is untouched and the step is ``g - U c``. Finally
    ``dz = step`` and ``z += step``.
    """
    idx = _active_index(status)
    if idx.numel() == 0:
        return
    _check_capacity(U, npairs, idx,
                    lambda n: torch.clamp(live_pairs(n, m, restart) + 1, max=m))
    acc = torch.float64
    U_a = _ring(U, m).index_select(0, idx).to(acc)
    V_a = _ring(V, m).index_select(0, idx).to(acc)
    cap = U_a.shape[1]
    dz_a = dz.index_select(0, idx).to(acc)
    dg_a = dg.index_select(0, idx).to(acc)
    g_a = g.index_select(0, idx).to(acc)
    p = proj.index_select(0, idx).to(acc)[:, :, :cap]
    s = scal.index_select(0, idx).to(acc)
    n = live_pairs(npairs.index_select(0, idx), m, restart)
    k = torch.clamp(n, max=m)
    slot = n % m
    valid = s[:, VALID] != 0
    ar = torch.arange(cap, device=dz.device)[None, :]
    stored = (ar < k[:, None]).to(acc)
    # Once the ring is full, the new pair replaces the one in `slot`.
    kept = stored * ~(valid[:, None] & (ar == slot[:, None]))

    a, b, c = p[:, 0] * stored, p[:, 1] * stored, p[:, 2]
    u = (dz_a + dg_a - torch.einsum("bmd,bm->bd", U_a, b)) / s[:, DEN, None]
    v = -dz_a + torch.einsum("bmd,bm->bd", V_a, a)
    step = g_a - torch.einsum("bmd,bm->bd", U_a, c * kept)
    step = torch.where(valid[:, None], step - u * s[:, VG, None], step)

    vi = idx[valid]
    if vi.numel():
        _write_slots(U, vi, slot[valid], _to_history(u[valid], U[0].dtype))
        _write_slots(V, vi, slot[valid], _to_history(v[valid], V[0].dtype))
        npairs.index_copy_(0, vi, n[valid] + 1)
    step = step.to(z.dtype)
    dz.index_copy_(0, idx, step)
    z.index_copy_(0, idx, z.index_select(0, idx) + step)


def fixed_point_step_(z: torch.Tensor, g: torch.Tensor, status: torch.Tensor, tau: float) -> None:
    """Damped fixed-point step ``z += tau * g`` (g = f(z) - z) for every active sample."""
    idx = _active_index(status)
    if idx.numel() == 0:
        return
    step = (tau * g.index_select(0, idx).to(torch.float64)).to(z.dtype)
    z.index_copy_(0, idx, z.index_select(0, idx) + step)


def anderson_store_(
    X: list[torch.Tensor],
    G: list[torch.Tensor],
    gram: torch.Tensor,
    z: torch.Tensor,
    g: torch.Tensor,
    alpha: torch.Tensor,
    fallback: torch.Tensor,
    status: torch.Tensor,
    nhist: torch.Tensor,
    partials: torch.Tensor,
    tickets: torch.Tensor,
    m: int,
    lam: float,
) -> None:
    """Store the newest iterate and residual, its row of the residual Gram matrix, and the
    next mixing weights.

    For every active sample, with slot = nhist % m (the oldest entry once the ring is
    full; allocated, like every stored entry): ``X[b, slot] = z``, ``G[b, slot] = g``
    (rounded to a narrower history dtype), and ``gram[b, slot, i] = gram[b, i, slot] =
    G[b, slot] . G[b, i]`` for every stored entry i (the new one included); then
    ``nhist += 1``, and with n = min(nhist, m) entries (the newest in ``slot``),
    ``alpha[b, :n]`` gets the weights of :func:`anderson_weights` from the stored Gram
    matrix (0 beyond n) and ``fallback[b] += 1`` when they fell back to the newest entry.
    """
    idx = _active_index(status)
    if idx.numel() == 0:
        return
    _check_capacity(X, nhist, idx, lambda n: torch.where(n < m, n + 1, m))
    C = X[0].shape[1]
    samples = idx.tolist()
    for b in samples:
        slot = int(nhist[b]) % m
        X[slot // C][b, slot % C] = _to_history(z[b], X[0].dtype)
        G[slot // C][b, slot % C] = _to_history(g[b], G[0].dtype)
    ring = _ring(G, m)
    for b in samples:
        h = int(nhist[b])
        slot, n = h % m, min(h + 1, m)
        rows = ring[b, :n].to(torch.float64)
        # Products of the stored rows (g rounded to a narrow history like the others).
        dots = (rows @ rows[slot]).to(gram.dtype)
        gram[b, slot, :n] = dots
        gram[b, :n, slot] = dots
        nhist[b] = h + 1
        w, ok = anderson_weights(gram[b, :n, :n], slot, lam)
        alpha[b].zero_()
        alpha[b, :n] = w.to(alpha.dtype)
        if not ok:
            fallback[b] += 1


def anderson_weights(gram: torch.Tensor, newest: int, lam: float) -> tuple[torch.Tensor, bool]:
    """Mixing weights of one sample from its (n, n) Gram matrix (see anderson_math.h).

    ``alpha = a / sum(a)`` with ``(K + lam * s I) a = 1``, s the smallest positive
    diagonal entry of K; on a failed factorisation (a pivot within rounding error of
    zero, see anderson_math.h) or non-finite weights: the newest entry alone, and ok False.
    """
    K = gram.to(torch.float64)
    n = K.shape[0]
    diag = K.diagonal()
    fallback = torch.zeros(n, dtype=torch.float64, device=K.device)
    fallback[newest] = 1.0
    if not bool(torch.isfinite(diag).all()):
        return fallback, False
    positive = diag[diag > 0]
    ridge = lam * (float(positive.min()) if positive.numel() else 1.0)
    L, info = torch.linalg.cholesky_ex(K + ridge * torch.eye(n, dtype=torch.float64, device=K.device))
    # Breakdown: a pivot (L_jj squared) within the elimination's rounding error of its
    # diagonal entry, 8 n u (K_jj + ridge): the sign of that error differs between devices.
    tiny_pivot = L.diagonal() ** 2 <= 8 * n * torch.finfo(torch.float64).eps * (diag + ridge)
    if int(info) != 0 or not bool(torch.isfinite(L).all()) or bool(tiny_pivot.any()):
        return fallback, False
    a = torch.cholesky_solve(torch.ones(n, 1, dtype=torch.float64, device=K.device), L).flatten()
    total = a.sum()
    alpha = a / total
    if not bool(torch.isfinite(total)) or float(total.abs()) <= torch.finfo(gram.dtype).tiny \
            or not bool(torch.isfinite(alpha).all()):
        return fallback, False
    return alpha, True


def anderson_mix_(
    X: list[torch.Tensor],
    G: list[torch.Tensor],
    z: torch.Tensor,
    alpha: torch.Tensor,
    status: torch.Tensor,
    nhist: torch.Tensor,
    m: int,
    beta: float,
) -> None:
    """Anderson step ``z = sum_i alpha_i (X_i + beta G_i)`` over the n = min(nhist, m)
    stored entries, with the weights ``alpha`` of the last :func:`anderson_store_`."""
    idx = _active_index(status)
    if idx.numel() == 0:
        return
    _check_capacity(X, nhist, idx, lambda n: torch.clamp(n, max=m))
    Xr, Gr = _ring(X, m), _ring(G, m)
    for b in idx.tolist():
        n = min(int(nhist[b]), m)
        mixed = Xr[b, :n].to(torch.float64) + beta * Gr[b, :n].to(torch.float64)
        z[b] = (alpha[b, :n].to(torch.float64) @ mixed).to(z.dtype)


def new_scratch(batch: int, m: int, dtype: torch.dtype, device: torch.device):
    """Scratch tensors ``(proj, scal)`` for the reduction/expansion passes."""
    proj = torch.zeros(batch, 3, m, dtype=dtype, device=device)
    scal = torch.zeros(batch, NUM_SCALARS, dtype=dtype, device=device)
    return proj, scal


__all__ = [
    "residual_status_",
    "broyden_reduce",
    "broyden_expand_",
    "new_scratch",
    "fixed_point_step_",
    "anderson_store_",
    "anderson_weights",
    "anderson_mix_",
]
