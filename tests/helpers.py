"""Random solver states and comparison helpers for the op-level tests."""

from __future__ import annotations

import gc
import math
import os
import random
import types

import torch

from deq_ext import reference
from deq_ext.solvers._base import CUDA_CHUNK
from deq_ext.status import NUM_SCALARS, VALID, Status

# The random seed of this run's op tests: fresh each run, printed in the report header,
# and taken from DEQ_EXT_TEST_SEED when set (to repeat a run).
RUN_SEED = int(os.environ.get("DEQ_EXT_TEST_SEED", random.SystemRandom().randrange(2**30)))

TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
}


def random_status(B: int, gen: torch.Generator) -> torch.Tensor:
    """A mix of active and finished samples: at least one active, and one finished when B > 1."""
    status = torch.randint(0, 4, (B,), generator=gen)
    status[torch.rand(B, generator=gen) < 0.5] = int(Status.ACTIVE)
    status[0] = int(Status.ACTIVE)
    if B > 1:
        status[-1] = int(Status.CONVERGED)
    return status


# Ring slots per history chunk in the op tests: awkward, so that rings span several chunks and
# end inside one (the solver's own chunk size is deq_ext.solvers._history.DEFAULT_CHUNK).
CHUNK = 3


def chunked(history: torch.Tensor, C: int = CHUNK) -> list[torch.Tensor]:
    """A ``(B, m, D)`` history as the ops take it: ``(B, C, D)`` chunks, the last one with the
    remaining ``m % C`` slots when C does not divide m."""
    return [c.contiguous() for c in history.split(C, dim=1)]


def unchunked(chunks: list[torch.Tensor], m: int) -> torch.Tensor:
    """The first ``m`` ring slots of a chunk list, as one ``(B, m, D)`` tensor."""
    return torch.cat(chunks, dim=1)[:, :m]


def with_scratch(st: dict, B: int, D: int, m: int) -> dict:
    """The scratch every op takes: the CUDA kernels' partial sums (sized for the largest op) and
    block counters (zero), and the counts the residual op writes."""
    nch = -(-D // CUDA_CHUNK)
    st["partials"] = torch.zeros(B * (nch * (3 * m + 2) + 2 * m * m + m), dtype=torch.float64)
    st["tickets"] = torch.zeros(B + 1, dtype=torch.int32)
    st["counts"] = torch.zeros(2, dtype=torch.int64)
    return st


def to_device(st: dict, device) -> dict:
    """The state on ``device`` (chunk lists too; the ring length as it is)."""
    out = {}
    for k, v in st.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device).contiguous()
        elif isinstance(v, list):
            out[k] = [t.to(device).contiguous() for t in v]
        else:
            out[k] = v
    return out


def history_state(B: int, m: int, D: int, dtype: torch.dtype, device, seed: int) -> dict:
    """Random U, V (as chunk lists), dz, dg, g, z, npairs (with ring wrap) and status, the ring
    length ``m``, plus scratch."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    st = dict(
        U=chunked(rnd(B, m, D) / math.sqrt(D)), V=chunked(rnd(B, m, D) / math.sqrt(D)),
        dz=rnd(B, D), dg=rnd(B, D), g=rnd(B, D), z=rnd(B, D),
        npairs=torch.randint(0, 2 * m + 3, (B,), generator=gen),
        status=random_status(B, gen), m=m,
    )
    st["npairs"][0] = m + 1 + (seed % 3)  # make sure one active sample has wrapped the ring
    st["proj"], st["scal"] = reference.new_scratch(B, m, dtype, "cpu")
    st["proj"].copy_(rnd(B, 3, m))
    st["scal"].copy_(rnd(B, NUM_SCALARS))
    return to_device(with_scratch(st, B, D, m), device)


def with_reduced_scalars(st: dict, gen_seed: int) -> dict:
    """Fill proj/scal as the reduction pass would, then skip the update for some samples."""
    reference.broyden_reduce(st["U"], st["V"], st["dz"], st["dg"], st["g"], st["status"],
                             st["npairs"], st["proj"], st["scal"], st["partials"],
                             st["tickets"], st["m"])
    gen = torch.Generator().manual_seed(gen_seed)
    skip = (torch.rand(st["scal"].shape[0], generator=gen) < 0.3).to(st["scal"].device)
    st["scal"][skip, VALID] = 0
    return st


def clone_state(st: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor)
            else [t.clone() for t in v] if isinstance(v, list) else v for k, v in st.items()}


def assert_states_match(got: dict, want: dict, before: dict, dtype: torch.dtype,
                        amplification: float = 1.0) -> None:
    """Active rows match the reference; inactive rows are unchanged bit for bit.

    ``amplification`` (a condition number) widens the float64 tolerance for ops
    that solve a linear system, where two correct orders of operations differ
    by about eps times the condition number.
    """
    active = before["status"] == Status.ACTIVE
    for name in want:
        g, w, b = got[name], want[name], before[name]
        if name == "partials" or not isinstance(w, (torch.Tensor, list)):
            continue  # the CUDA kernels' scratch: its contents are theirs
        if isinstance(w, list):  # a history: compare its slots (the padding included)
            g, w, b = (torch.cat(x, dim=1) for x in (g, w, b))
        if g.dtype in (torch.int64, torch.int32, torch.bool):
            assert torch.equal(g, w), f"{name}: {g} != {w}"
            continue
        if g.dim() >= 1 and g.shape[0] == active.shape[0] and (~active).any():
            assert torch.equal(g[~active], b[~active]), f"{name}: an inactive sample was written"
        scale = max(1.0, float(w[torch.isfinite(w)].abs().max()) if torch.isfinite(w).any() else 1.0)
        tol = {k: max(v, 1e-15 * amplification) for k, v in TOL[dtype].items()}
        torch.testing.assert_close(g, w, rtol=tol["rtol"], atol=tol["atol"] * scale,
                                   equal_nan=True, msg=lambda m, n=name: f"{n}: {m}")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaNs included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def bytes_kept_for_backward(out: torch.Tensor, params=()) -> int:
    """Bytes of the distinct storages that ``out``'s autograd graph keeps alive until backward.

    Walks everything reachable from ``out.grad_fn``: the tensors each node saved, the Python
    objects a custom Function's context holds (closures included, through their cells), and
    the graphs of the tensors found. Parameters, and views of ``params``, are left out (they
    live anyway), and so are modules and a function's globals (shared with the whole program).
    """
    seen: set[int] = set()
    skip = {p.untyped_storage().data_ptr() for p in params}
    storages: dict[int, int] = {}
    stack: list[object] = [out.grad_fn]
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen or isinstance(obj, torch.nn.Parameter):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            st = obj.untyped_storage()
            if st.data_ptr() not in skip:
                storages[st.data_ptr()] = st.nbytes()
            stack.append(obj.grad_fn)
            continue
        if isinstance(obj, (types.ModuleType, type, torch.nn.Module)):
            continue
        if isinstance(obj, types.FunctionType):
            for cell in obj.__closure__ or ():
                try:
                    stack.append(cell.cell_contents)
                except ValueError:  # an empty cell
                    pass
            stack.extend(obj.__defaults__ or ())
            continue
        if hasattr(obj, "next_functions"):  # an autograd node
            stack.extend(node for node, _ in obj.next_functions)
            for name in dir(obj):
                if name.startswith("_saved_") or name == "saved_tensors":
                    try:
                        stack.append(getattr(obj, name))
                    except RuntimeError:  # already freed
                        pass
        stack.extend(gc.get_referents(obj))
    return sum(storages.values())


# The arguments of each op, by their names in the state dicts (schemas: csrc/op_schemas.h).
REDUCE_ARGS = ("U", "V", "dz", "dg", "g", "status", "npairs", "proj", "scal", "partials", "tickets",
               "m")
EXPAND_ARGS = ("U", "V", "dz", "dg", "g", "z", "proj", "scal", "status", "npairs", "tickets", "m")
STORE_ARGS = ("X", "G", "gram", "z", "g", "alpha", "fallback", "status", "nhist", "partials",
              "tickets", "m")
MIX_ARGS = ("X", "G", "z", "alpha", "status", "nhist", "m")


def args_of(st: dict, names: tuple) -> tuple:
    return tuple(st[n] for n in names)


def states_equal(a: dict, b: dict) -> list[str]:
    """Names of the entries that differ (bit for bit) between two op states."""
    out = []
    for k, v in a.items():
        w = b[k]
        if isinstance(v, list):
            same = all(torch.equal(x, y) for x, y in zip(v, w)) and len(v) == len(w)
        elif isinstance(v, torch.Tensor):
            same = torch.equal(v, w) if not v.is_floating_point() else same_bits(v, w)
        else:
            same = v == w
        if not same:
            out.append(k)
    return out


RESIDUAL_ARGS = ("fz", "z", "g", "dg", "z_best", "best_abs", "best_rel", "res_abs", "res_rel",
                 "status", "nstep", "nfev", "stall", "counts", "partials", "tickets")


def residual_state(B, D, dtype, fz_dtype, device, seed):
    """Random residual/status state: fz near z (one NaN sample when B > 2), mixed status."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    z = rnd(B, D)
    fz = (z.double() + 0.1 * torch.randn(B, D, generator=gen, dtype=torch.float64)
          * torch.rand(B, 1, generator=gen, dtype=torch.float64)).to(fz_dtype)
    if B > 2:
        fz[1, 0] = math.nan  # a sample whose f returned NaN must be flagged diverged
    best = (0.1 * math.sqrt(D) * torch.rand(B, generator=gen, dtype=torch.float64)).to(dtype)
    best[torch.rand(B, generator=gen) < 0.3] = math.inf
    st = dict(
        fz=fz, z=z, g=rnd(B, D), dg=rnd(B, D), z_best=rnd(B, D),
        best_abs=best, best_rel=best.clone() / 3,
        res_abs=rnd(B).abs(), res_rel=rnd(B).abs(),
        status=random_status(B, gen),
        nstep=torch.randint(0, 9, (B,), generator=gen),
        nfev=torch.randint(0, 9, (B,), generator=gen),
        stall=torch.randint(0, 5, (B,), generator=gen),
    )
    if B > 2:
        st["status"][1] = int(Status.ACTIVE)
    return to_device(with_scratch(st, B, D, 1), device)


def anderson_state(B, m, D, dtype, device, seed):
    """Random X, G with a consistent Gram matrix, nhist with ring wrap, mixed status."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    G = rnd(B, m, D) / math.sqrt(D)
    st = dict(
        X=chunked(rnd(B, m, D).to(dtype)), G=chunked(G.to(dtype)),
        gram=(G @ G.transpose(1, 2)).to(dtype),
        z=rnd(B, D).to(dtype), g=(rnd(B, D) / math.sqrt(D)).to(dtype),
        alpha=rnd(B, m).to(dtype),
        fallback=torch.randint(0, 3, (B,), generator=gen),
        nhist=torch.randint(0, 2 * m + 3, (B,), generator=gen),
        status=random_status(B, gen), m=m,
    )
    st["nhist"][0] = m + 1 + (seed % 3)  # one active sample has wrapped the ring
    return to_device(with_scratch(st, B, D, m), device)
