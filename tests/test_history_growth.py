"""The history grows with the steps a solve takes, not with max_iter, and changes no result;
a workspace that cannot fit is a clear error before anything is allocated."""

from __future__ import annotations

import pytest
import torch

import deq_ext
from deq_ext.solvers import _history
from deq_ext.solvers._history import History, chunk_size

from .helpers import same_bits
from .problems import contraction_inputs

pytestmark = pytest.mark.usefixtures("compiled")


def _solve(max_iter: int, method: str = "broyden", **kw):
    B, D = 6, 20
    f, inputs = contraction_inputs(B, D, seed=3)
    z0 = torch.zeros(B, D, dtype=torch.float64)
    return deq_ext.solve(f, z0, method=method, inputs=inputs, max_iter=max_iter, tol=1e-9,
                         return_state=True, **kw)


@pytest.mark.parametrize("method,key", [("broyden", "U"), ("anderson", "X")])
def test_history_bytes_follow_the_steps_taken(method, key):
    """The same solve with max_iter 200 and 40 takes the same steps and holds the same history:
    the chunks its steps filled, not max_iter pairs."""
    kw = {"memory": 200} if method == "anderson" else {}
    long = _solve(200, method, **kw)
    short = _solve(40, method, **({"memory": 40} if method == "anderson" else {}))
    assert torch.equal(long.nstep, short.nstep)
    steps = int(long.nstep.max())
    assert steps < 40
    held = long.state[key].shape[1]
    # Step `it` needs slot it: the chunks that cover every step taken (plus the last check's).
    assert held == short.state[key].shape[1]
    assert steps <= held <= chunk_size(200) * (steps // chunk_size(200) + 2)
    assert held < 200 // 2


@pytest.mark.parametrize("method", ["broyden", "anderson"])
def test_growing_the_history_changes_no_bit(monkeypatch, method):
    """Chunks of 8 (grown as needed) or one chunk of the whole ring up front: the same bits."""
    grown = _solve(60, method, memory=30)
    monkeypatch.setattr(_history, "DEFAULT_CHUNK", 10**6)
    whole = _solve(60, method, memory=30)
    assert whole.state["U" if method == "broyden" else "X"].shape[1] >= \
        grown.state["U" if method == "broyden" else "X"].shape[1]
    for field in ("z", "status", "nstep", "nfev", "abs_residual"):
        assert same_bits(getattr(grown, field), getattr(whole, field)), field


def test_a_ring_that_wraps_keeps_m_slots():
    B, D = 3, 12
    f, inputs = contraction_inputs(B, D, seed=4)
    out = deq_ext.broyden(f, torch.zeros(B, D, dtype=torch.float64), inputs=inputs, memory=5,
                          max_iter=30, tol=1e-14, return_state=True)
    assert int(out.nstep.max()) > 5  # the ring wrapped
    assert out.state["U"].shape[1] == 5  # exactly m slots, never more


def test_history_reserve_allocates_whole_chunks_up_to_m():
    h = History(("U", "V"), B=2, D=3, m=20, dtype=torch.float32, device=torch.device("cpu"))
    assert h.capacity == 0 and h.C == 8
    assert h.reserve(1) and h.capacity == 8
    assert not h.reserve(8)
    assert h.reserve(9) and h.capacity == 16
    assert h.reserve(100) and h.capacity == 20  # the last chunk has the 4 slots left
    assert [t.shape[1] for t in h["U"]] == [8, 8, 4]
    assert h.nbytes() == 2 * 2 * 20 * 3 * 4 == h.bytes_at(20)
    assert chunk_size(1000) == 16  # at most 64 chunks


def test_a_workspace_that_cannot_fit_is_a_clear_error():
    z0 = torch.zeros(4, 1000)
    deq_ext.set_cpu_workspace_budget(10_000)
    try:
        with pytest.raises(deq_ext.WorkspaceError, match=r"needs .* more for the solver state on "
                           r"cpu, but only 9\.8 KiB is in the budget.*restart=True.*"
                           r"history_dtype=torch\.bfloat16"):
            deq_ext.broyden(lambda z: 0.5 * z, z0)
        # A state that fits, whose history does not: the error comes before the history grows.
        deq_ext.set_cpu_workspace_budget(200_000)
        with pytest.raises(deq_ext.WorkspaceError, match=r"history chunk.*a full history would take"):
            deq_ext.broyden(lambda z: 0.5 * z + 1, z0, tol=1e-12)
    finally:
        deq_ext.set_cpu_workspace_budget(None)
    assert isinstance(deq_ext.WorkspaceError("x"), MemoryError)
    with pytest.raises(ValueError, match="positive number of bytes"):
        deq_ext.set_cpu_workspace_budget(-1)
