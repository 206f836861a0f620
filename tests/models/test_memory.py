"""Training memory, measured as the bytes autograd saves for backward (so it runs on CPU):
flat in the DEQ's solver iterations, linear in the unrolled baseline's depth."""

from __future__ import annotations

import pytest

from deq_ext import SolverSettings

from .helpers import saved_bytes, tiny_model, tokens

DEPTHS = (1, 2, 4, 8, 16)


@pytest.mark.parametrize("kind", ["transformer", "trellisnet"])
def test_deq_memory_is_flat_while_the_unrolled_baseline_grows_with_depth(kind):
    model = tiny_model(kind).train()
    seq, tgt = tokens(2, 8), tokens(2, 8, seed=2)

    def measure(**changes) -> int:
        model.set_mode(**changes)
        return saved_bytes(lambda: model(seq, tgt).loss)

    deq = {}
    for iters in (3, 30):
        # A tolerance below float32's reach: the solve runs all the iterations.
        deq[iters] = measure(mode="deq", forward=SolverSettings(max_iter=iters, tol=1e-30))
        assert model.core.solver_stats[0]["forward"].nstep.max() == iters
    unrolled = [measure(mode="unrolled", unrolled_depth=L, checkpoint=False) for L in DEPTHS]
    checkpointed = [measure(mode="unrolled", unrolled_depth=L, checkpoint=True) for L in DEPTHS]

    assert deq[3] == deq[30], "the DEQ keeps nothing per solver iteration"
    per_layer = unrolled[1] - unrolled[0]
    for L, nbytes in zip(DEPTHS, unrolled):
        assert nbytes == pytest.approx(unrolled[0] + (L - 1) * per_layer, rel=0.01)
    assert deq[30] < unrolled[1], "the DEQ keeps about one layer, less than a 2-layer unroll"
    # Checkpointing keeps each layer's input z (one state) instead of its activations.
    z_bytes = model.core.zero_state(2, 8, "cpu").nbytes
    assert [b - a for a, b in zip(checkpointed, checkpointed[1:])] == \
        [(L2 - L1) * z_bytes for L1, L2 in zip(DEPTHS, DEPTHS[1:])]
    assert checkpointed[-1] < unrolled[-1] and per_layer > z_bytes
