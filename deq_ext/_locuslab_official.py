"""The locuslab/deq solvers' own algorithm, reproduced in pure PyTorch (``semantics="official"``).

This is the reproduction mode of :mod:`deq_ext.compat`: the iterates, stopping decisions and
result dict of ``lib/solvers.py`` in locuslab/deq (v2, shared by DEQ-Sequence and MDEQ-Vision),
written here from a description of that algorithm. What makes it "official" rather than
deq_ext's per-sample solve:

* residuals are norms over the whole batch (one number per step), and the batch stops together;
* Broyden: stops below ``eps``; gives up on a stall (objective < 3 eps after more than 30 steps
  with max/min of the last 30 objectives < 1.3); breaks (``prot_break``) when the objective
  exceeds its first value times ``1e3 * seq_len`` (``rel``) or ``1e6 * seq_len`` (``abs``);
  a non-finite objective breaks nothing; the history is never truncated;
* Anderson: ``threshold`` counts evaluations of f (two before the loop); no stall or
  divergence rule; ``lam`` is an absolute ridge; relative residual ``|g| / (|f| + 1e-5)``
  (Broyden: ``|g| / (|g + z| + 1e-9)``);
* ``result`` is the iterate of the lowest stop-mode residual (strictly lower than all before,
  starting from 1e8), ``nstep`` the step where it occurred, traces hold one entry per step
  (not the start), padded with the lowest values to ``threshold + 1`` (Broyden) or
  ``threshold - 2`` (Anderson) entries.

The operations are ordered as in the original so that float64 runs agree to rounding (see
tests/test_compat_official.py). Everything stays in x0's dtype; the original allocates
Broyden's history in torch's default dtype, which only works when the two agree.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

import torch

Func = Callable[[torch.Tensor], torch.Tensor]
_START_LOWEST = 1e8   # the "lowest residual" before any step
_BROYDEN_REL_EPS = 1e-9
_ANDERSON_REL_EPS = 1e-5
_STALL_WINDOW, _STALL_RATIO, _STALL_FACTOR = 30, 1.3, 3.0


def _check_x0(x0: torch.Tensor, solver: str) -> None:
    if not isinstance(x0, torch.Tensor):
        raise TypeError(f"{solver}: x0 must be a tensor, got {type(x0).__name__}")
    if x0.dim() != 3:
        raise ValueError(f"{solver} with semantics='official' needs x0 shaped (bsz, hidden, seq_len) "
                         f"as locuslab/deq lays it out; got shape {tuple(x0.shape)}")
    if not x0.is_floating_point():
        raise TypeError(f"{solver}: x0 must be floating point, got dtype {x0.dtype}")


def _check_stop_mode(stop_mode: str) -> None:
    if stop_mode not in ("abs", "rel"):
        raise ValueError(f"stop_mode must be 'abs' or 'rel', got {stop_mode!r}")


class _Record:
    """Trace of batch residuals and the lowest one seen, as the original keeps them."""

    def __init__(self, stop_mode: str) -> None:
        self.stop_mode = stop_mode
        self.trace: dict[str, list[float]] = {"abs": [], "rel": []}
        self.lowest = {"abs": _START_LOWEST, "rel": _START_LOWEST}
        self.lowest_step = {"abs": 0, "rel": 0}

    def add(self, step: int, abs_diff: float, rel_diff: float) -> bool:
        """Append one step's residuals; True when the stop-mode residual is a new lowest."""
        improved = False
        for mode, value in (("abs", abs_diff), ("rel", rel_diff)):
            self.trace[mode].append(value)
            if value < self.lowest[mode]:   # NaN never counts as lower
                self.lowest[mode], self.lowest_step[mode] = value, step
                improved |= mode == self.stop_mode
        return improved

    def pad_to(self, length: int) -> None:
        for mode in ("abs", "rel"):
            self.trace[mode].extend([self.lowest[mode]] * (length - len(self.trace[mode])))

    def last(self) -> float:
        return self.trace[self.stop_mode][-1]

    def result(self, z: torch.Tensor, prot_break: bool, eps: float, threshold: int) -> dict[str, Any]:
        mode = self.stop_mode
        return {"result": z, "lowest": self.lowest[mode], "nstep": self.lowest_step[mode],
                "prot_break": prot_break, "abs_trace": self.trace["abs"],
                "rel_trace": self.trace["rel"], "eps": eps, "threshold": threshold}


# -- Broyden ---------------------------------------------------------------------------------------
def _inv_jac_times(U: torch.Tensor, VT: torch.Tensor, n: int, x: torch.Tensor) -> torch.Tensor:
    """(-I + U V^T) x for the first n pairs; x is (B, C, L), U is (B, C, L, cap), VT is (B, cap, C, L).

    The pairs keep x's (C, L) layout because the contraction order over it decides the
    rounding: this layout gives the original's bits.
    """
    if n == 0:
        return -x
    coeff = torch.einsum("bkcl,bcl->bk", VT[:, :n], x)
    return -x + torch.einsum("bclk,bk->bcl", U[..., :n], coeff)


def _times_inv_jac(U: torch.Tensor, VT: torch.Tensor, n: int, x: torch.Tensor) -> torch.Tensor:
    """x^T (-I + U V^T) for the first n pairs, shaped like x."""
    if n == 0:
        return -x
    coeff = torch.einsum("bcl,bclk->bk", x, U[..., :n])
    return -x + torch.einsum("bk,bkcl->bcl", coeff, VT[:, :n])


def _squared_norm_or_inf(g: torch.Tensor) -> Union[torch.Tensor, float]:
    return torch.norm(g) ** 2 if bool(torch.isfinite(g).all()) else math.inf


def _armijo_step(phi: Callable[[Any], Any], phi0: torch.Tensor, amin: float = 1e-2,
                 c1: float = 1e-4) -> Optional[Any]:
    """The original's step-size search: try 1, then a quadratic, then safeguarded cubics.

    ``phi(alpha)`` is the squared residual norm at ``z + alpha * update``; the slope at 0 is
    ``-phi0``. Returns the accepted step, or None when the step fell to ``amin`` or below.
    Unlike scipy's version, the quadratic step is not tested before the first cubic one.
    """
    slope = -phi0
    a_prev = 1
    phi_prev = phi(a_prev)
    if phi_prev <= phi0 + c1 * a_prev * slope:
        return a_prev
    a_cur = -slope * a_prev ** 2 / 2.0 / (phi_prev - phi0 - slope * a_prev)
    phi_cur = phi(a_cur)
    while a_cur > amin:
        # Cubic through phi0, slope, (a_prev, phi_prev), (a_cur, phi_cur).
        denom = a_prev ** 2 * a_cur ** 2 * (a_cur - a_prev)
        r_cur = phi_cur - phi0 - slope * a_cur
        r_prev = phi_prev - phi0 - slope * a_prev
        a3 = (a_prev ** 2 * r_cur - a_cur ** 2 * r_prev) / denom
        b3 = (-a_prev ** 3 * r_cur + a_cur ** 3 * r_prev) / denom
        a_next = (-b3 + torch.sqrt(torch.abs(b3 ** 2 - 3 * a3 * slope))) / (3.0 * a3)
        phi_next = phi(a_next)
        if phi_next <= phi0 + c1 * a_next * slope:
            return a_next
        if (a_cur - a_next) > a_cur / 2.0 or (1 - a_next / a_cur) < 0.96:
            a_next = a_cur / 2.0
        a_prev, a_cur = a_cur, a_next
        phi_prev, phi_cur = phi_cur, phi_next
    return None


def _broyden_move(g: Func, z: torch.Tensor, gz: torch.Tensor, update: torch.Tensor,
                  line_search: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """z + s * update and its residual, s = 1 or the original's line-search step."""
    last = {"s": 0, "g": gz, "phi": torch.norm(gz) ** 2}   # the last trial, reused when repeated

    def phi(s: Any) -> Any:
        if s == last["s"]:
            return last["phi"]
        g_new = g(z + s * update)
        last.update(s=s, g=g_new, phi=_squared_norm_or_inf(g_new))
        return last["phi"]

    s = _armijo_step(phi, last["phi"]) if line_search else None
    if s is None:
        s = 1.0
    z_new = z + s * update
    g_new = last["g"] if s == last["s"] else g(z_new)
    return z_new, g_new


def official_broyden(f: Func, x0: torch.Tensor, threshold: int, eps: float = 1e-3,
                     stop_mode: str = "rel", ls: bool = False) -> dict[str, Any]:
    """Broyden's method exactly as locuslab/deq's ``broyden`` runs it (see the module docstring).

    Returns the original's dict: ``result``, ``lowest``, ``nstep``, ``prot_break``,
    ``abs_trace``, ``rel_trace`` (``threshold + 1`` entries), ``eps``, ``threshold``.
    """
    _check_x0(x0, "broyden")
    _check_stop_mode(stop_mode)
    if not isinstance(threshold, int) or threshold < 0:
        raise ValueError(f"broyden: threshold must be an int >= 0, got {threshold!r}")
    bsz, hidden, seq_len = x0.shape

    def g(z: torch.Tensor) -> torch.Tensor:
        return f(z) - z

    z = x0
    gz = g(z)
    U = torch.zeros(bsz, hidden, seq_len, threshold, dtype=x0.dtype, device=x0.device)
    VT = torch.zeros(bsz, threshold, hidden, seq_len, dtype=x0.dtype, device=x0.device)
    update = -_inv_jac_times(U, VT, 0, gz)
    protect = (1e6 if stop_mode == "abs" else 1e3) * seq_len
    rec = _Record(stop_mode)
    best, prot_break, nstep = x0, False, 0
    while nstep < threshold:
        z_new, g_new = _broyden_move(g, z, gz, update, ls)
        dz, dg = z_new - z, g_new - gz
        z, gz = z_new, g_new
        nstep += 1
        abs_diff = torch.norm(gz).item()
        rel_diff = abs_diff / (torch.norm(gz + z).item() + _BROYDEN_REL_EPS)
        if rec.add(nstep, abs_diff, rel_diff):
            best = z.clone().detach()
        objective = rec.last()
        if objective < eps:
            break
        window = rec.trace[stop_mode][-_STALL_WINDOW:]
        if objective < _STALL_FACTOR * eps and nstep > _STALL_WINDOW and _spread(window) < _STALL_RATIO:
            break
        if objective > rec.trace[stop_mode][0] * protect:
            prot_break = True
            break
        # Good Broyden update of the inverse Jacobian from the step just taken.
        n = nstep - 1
        v = _times_inv_jac(U, VT, n, dz)
        u = (dz - _inv_jac_times(U, VT, n, dg)) / torch.einsum("bcl,bcl->b", v, dg)[:, None, None]
        VT[:, n] = torch.where(torch.isnan(v), 0.0, v)   # NaN entries only; infinities stay
        U[..., n] = torch.where(torch.isnan(u), 0.0, u)
        update = -_inv_jac_times(U, VT, nstep, gz)
    rec.pad_to(threshold + 1)
    return rec.result(best, prot_break, eps, threshold)


def _spread(values: list[float]) -> float:
    """max / min of the window as numpy computes it (NaN if any is NaN; x / 0 is inf or NaN)."""
    if any(math.isnan(v) for v in values):
        return math.nan
    hi, lo = max(values), min(values)
    if lo == 0:
        return math.nan if hi == 0 else math.copysign(math.inf, hi)
    return hi / lo


# -- Anderson --------------------------------------------------------------------------------------
def official_anderson(f: Func, x0: torch.Tensor, m: int = 6, lam: float = 1e-4, threshold: int = 50,
                      eps: float = 1e-3, stop_mode: str = "rel", beta: float = 1.0) -> dict[str, Any]:
    """Anderson acceleration exactly as locuslab/deq's ``anderson`` runs it.

    ``threshold`` evaluations of f at most: two start the history (x0 and f(x0)), then one per
    step k = 2 .. threshold - 1. Returns the original's dict; traces have ``threshold - 2``
    entries; ``prot_break`` is always False.
    """
    _check_x0(x0, "anderson")
    _check_stop_mode(stop_mode)
    if not isinstance(m, int) or m < 2:
        raise ValueError(f"anderson: m (history size) must be an int >= 2, got {m!r}")
    if not isinstance(threshold, int) or threshold < 3:
        raise ValueError(f"anderson with semantics='official' needs threshold >= 3 (evaluations of f, "
                         f"two before the first step), got {threshold!r}")
    bsz, shape = x0.shape[0], x0.shape
    dtype, device = x0.dtype, x0.device

    def fv(z: torch.Tensor) -> torch.Tensor:
        return f(z.reshape(shape)).reshape(bsz, -1)

    X = torch.zeros(bsz, m, x0[0].numel(), dtype=dtype, device=device)
    F = torch.zeros_like(X)
    X[:, 0], F[:, 0] = x0.reshape(bsz, -1), fv(x0)
    X[:, 1], F[:, 1] = F[:, 0], fv(F[:, 0])
    rec = _Record(stop_mode)
    best: Optional[torch.Tensor] = None
    for k in range(2, threshold):
        n = min(k, m)
        G = F[:, :n] - X[:, :n]
        # Bordered system [[0, 1^T], [1, G G^T + lam I]] [nu; alpha] = [1; 0].
        H = torch.zeros(bsz, n + 1, n + 1, dtype=dtype, device=device)
        H[:, 0, 1:] = H[:, 1:, 0] = 1
        H[:, 1:, 1:] = torch.bmm(G, G.transpose(1, 2)) + lam * torch.eye(n, dtype=dtype, device=device)[None]
        rhs = torch.zeros(bsz, n + 1, 1, dtype=dtype, device=device)
        rhs[:, 0] = 1
        alpha = torch.linalg.solve(H, rhs)[:, 1:n + 1, 0]
        slot = k % m
        X[:, slot] = (beta * torch.bmm(alpha[:, None], F[:, :n])[:, 0]
                      + (1 - beta) * torch.bmm(alpha[:, None], X[:, :n])[:, 0])
        F[:, slot] = fv(X[:, slot])
        gx = F[:, slot] - X[:, slot]
        abs_diff = gx.norm().item()
        rel_diff = abs_diff / (_ANDERSON_REL_EPS + F[:, slot].norm().item())
        if rec.add(k, abs_diff, rel_diff):
            best = X[:, slot].reshape(shape).clone().detach()
        if rec.last() < eps:
            break
    if best is None:
        raise RuntimeError(
            f"anderson (semantics='official'): no step had a {stop_mode} residual below "
            f"{_START_LOWEST:g} (last {rec.last()}); the original solver fails here too "
            "(it has no result to return)")
    rec.pad_to(threshold - 2)
    return rec.result(best, False, eps, threshold)
