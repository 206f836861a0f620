"""The DEQ output is a fixed point of f, equals the converged unrolled model, and is the same
whether a sequence is solved whole, in subsequences, or in segments carried by memory."""

from __future__ import annotations

import pytest
import torch

from deq_ext import Status

from .helpers import KINDS, TIGHT32, TIGHT64, grads, tiny_model, tokens


def _per_sample_rel_residual(fz: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return (fz - z).flatten(1).norm(dim=1) / fz.flatten(1).norm(dim=1)


@pytest.mark.parametrize("kind", KINDS)
def test_deq_output_is_a_fixed_point_and_matches_the_converged_unrolled_model(kind, device):
    model = tiny_model(kind, device, **TIGHT32).eval()
    tol = TIGHT32["forward"].tol
    x = model.embedding(tokens(3, 10, device))
    with torch.no_grad():
        memory = model.core(model.embedding(tokens(3, 6, device, seed=2))).memory
        z_star = model.core(x, memory).state
        stats = model.core.solver_stats[0]["forward"]
        _, inputs = model.core.cell_inputs(x, memory)
        fz = model.core.cell(z_star, *inputs)
        model.set_mode("unrolled", unrolled_depth=100)
        z_unrolled = model.core(x, memory).state
    assert (stats.status == Status.CONVERGED).all()
    assert (_per_sample_rel_residual(fz, z_star) < tol).all()
    torch.testing.assert_close(z_unrolled, z_star, atol=5e-5, rtol=0)
    # The unrolled model has converged too: one more layer does not move it.
    assert (_per_sample_rel_residual(model.core.cell(z_unrolled, *inputs), z_unrolled) < tol).all()


@pytest.mark.parametrize("kind", ["transformer", "trellisnet"])
def test_subsequence_solve_matches_the_whole_sequence_values_and_gradients(kind):
    seq, tgt = tokens(2, 10, seed=11), tokens(2, 10, seed=12)
    results = []
    for subseq_len in (None, 4):
        # 'all': every chunk sees everything before it, so the chunked solve is the whole one.
        model = tiny_model(kind, dtype=torch.float64, subseq_len=subseq_len,
                           subseq_history="all", **TIGHT64)
        out = model(seq, tgt)
        out.loss.backward()
        results.append((out.hidden.detach(), grads(model), len(model.core.solver_stats)))
    (h_whole, g_whole, n_whole), (h_sub, g_sub, n_sub) = results
    assert (n_whole, n_sub) == (1, 3)  # chunks of 4, 4 and 2 positions
    torch.testing.assert_close(h_sub, h_whole, atol=1e-8, rtol=0)
    assert g_sub.keys() == g_whole.keys()
    for name in g_whole:
        torch.testing.assert_close(g_sub[name], g_whole[name], atol=1e-8, rtol=1e-6, msg=name)


def test_a_later_chunk_sees_only_the_previous_chunk_by_default():
    """The authors' subsequence history: chunk 2 is solved as a segment whose memory is chunk 1
    alone (not the segment's memory, not chunk 0)."""
    model = tiny_model("transformer", dtype=torch.float64, subseq_len=4, **TIGHT64).eval()
    assert model.core.modes.subseq_history == "previous"
    core = model.core
    with torch.no_grad():
        memory = model(tokens(2, 6, seed=31)).memory
        x = model.embedding(tokens(2, 12, seed=32))
        chunked = core(x, memory).state
        core.set_mode("deq", subseq_len=None)
        z1 = core(x[:, 4:8], (chunked[:, :4], core.inject(x[:, :4], memory))).state
        z2 = core(x[:, 8:], (z1, core.inject(x[:, 4:8], memory))).state
        core.set_mode("deq", subseq_len=4, subseq_history="all")
        seeing_all = core(x, memory).state
    # Chunk 0 sees the segment's memory either way.
    torch.testing.assert_close(chunked[:, :4], seeing_all[:, :4], atol=1e-8, rtol=0)
    torch.testing.assert_close(chunked[:, 4:8], z1, atol=1e-8, rtol=0)
    torch.testing.assert_close(chunked[:, 8:], z2, atol=1e-8, rtol=0)
    assert (chunked[:, 4:] - seeing_all[:, 4:]).abs().max() > 1e-4, "the history should matter"


@pytest.mark.parametrize("kind", ["transformer", "trellisnet"])
def test_memory_carries_the_previous_segment_into_the_next(kind):
    model = tiny_model(kind, dtype=torch.float64, **TIGHT64).eval()
    seq = tokens(3, 10, seed=21)
    with torch.no_grad():
        whole = model(seq).hidden
        first = model(seq[:, :6])
        second = model(seq[:, 6:], memory=first.memory)
        forgetful = model(seq[:, 6:]).hidden
    torch.testing.assert_close(torch.cat([first.hidden, second.hidden], 1), whole, atol=1e-8,
                               rtol=0)
    assert (forgetful - second.hidden).abs().max() > 1e-3, "the memory should matter"


def test_transformer_memory_keeps_the_last_mem_len_positions():
    model = tiny_model("transformer")  # mem_len 8, training mode
    out = model(tokens(2, 5))
    assert [m.shape[1] for m in out.memory] == [5, 5]
    out = model(tokens(2, 5, seed=2), memory=out.memory)
    z_hist, inj_hist = out.memory
    assert z_hist.shape == (2, 8, 16) and inj_hist.shape == (2, 8, 3 * 16)
    assert not z_hist.requires_grad and not inj_hist.requires_grad
