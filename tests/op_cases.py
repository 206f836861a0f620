"""One random call of every extension op: its state and its arguments, by op name.

Shared by the schedule tests of the emulated kernels and the dispatcher (opcheck) tests.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .helpers import RESIDUAL_ARGS, anderson_state, history_state, residual_state, with_reduced_scalars

# Awkward sizes (B, D, m): a single element, one partial warp, three chunks of the CUDA
# kernels' D (1024 per block) with a partial last one, and a long history; every state
# mixes active and finished samples, and one active sample has wrapped its ring.
SIZES = [(1, 1, 1), (3, 7, 5), (5, 2 * 1024 + 37, 6), (2, 4096 + 32, 30)]


def _names(*names: str) -> Callable[[dict], tuple]:
    return lambda st: tuple(st[n] for n in names)


def _mix_state(B, D, m, dtype, seed):
    st = anderson_state(B, m, D, dtype, "cpu", seed)
    st["nhist"].clamp_(min=1)  # mixing follows a store: at least one entry
    return st


# op name -> (state(B, D, m, dtype, seed) -> dict of tensors, arguments(state) -> tuple)
OP_CASES: dict[str, tuple[Callable[..., dict], Callable[[dict], tuple]]] = {
    "broyden_reduce": (
        lambda B, D, m, dt, s: history_state(B, m, D, dt, "cpu", s),
        # restart=True: the ring policy the DEQ layer uses by default.
        lambda st: (*_names("U", "V", "dz", "dg", "g", "status", "npairs", "proj", "scal",
                            "partials", "tickets", "m")(st), True)),
    "broyden_expand_": (
        lambda B, D, m, dt, s: with_reduced_scalars(history_state(B, m, D, dt, "cpu", s), s),
        lambda st: (*_names("U", "V", "dz", "dg", "g", "z", "proj", "scal", "status", "npairs",
                            "tickets", "m")(st), True)),
    "residual_status_": (
        lambda B, D, m, dt, s: residual_state(B, D, dt, dt, "cpu", s),
        lambda st: (*_names(*RESIDUAL_ARGS)(st), 0.5, False, 3, 1e3, True, True)),
    "anderson_store_": (
        lambda B, D, m, dt, s: anderson_state(B, m, D, dt, "cpu", s),
        lambda st: (*_names("X", "G", "gram", "z", "g", "alpha", "fallback", "status", "nhist",
                            "partials", "tickets", "m")(st), 1e-4)),
    "anderson_mix_": (
        _mix_state,
        lambda st: (*_names("X", "G", "z", "alpha", "status", "nhist", "m")(st), 0.8)),
    "fixed_point_step_": (
        lambda B, D, m, dt, s: anderson_state(B, m, D, dt, "cpu", s),
        lambda st: (st["z"], st["g"], st["status"], 0.7)),
}


def run_op(ops: Any, name: str, st: dict) -> None:
    """Calls op ``name`` of ``ops`` on the state ``st`` (in place)."""
    getattr(ops, name)(*OP_CASES[name][1](st))


def make_state(name: str, B: int, D: int, m: int, dtype: torch.dtype, seed: int) -> dict:
    return OP_CASES[name][0](B, D, m, dtype, seed)
