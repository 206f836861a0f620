"""Variational dropout: one mask per forward pass, the same at every application of f."""

from __future__ import annotations

import pytest
import torch

from deq_ext import SolverSettings

from .helpers import tiny_model, tokens

N_MASKS = {"transformer": 2, "trellisnet": 1}


def _record_calls(model, kind: str) -> list[tuple[torch.Tensor, list]]:
    """Spy on f: every call's injection rows (they identify the samples) and dropout masks."""
    calls = []
    cell = model.core.cell
    forward = cell.forward
    n = N_MASKS[kind]

    def spy(z, inj, *rest):
        calls.append((inj.detach().clone(), [None if m is None else m.clone() for m in rest[-n:]]))
        return forward(z, inj, *rest)

    cell.forward = spy
    return calls


@pytest.mark.parametrize("mode", ["deq", "unrolled"])
@pytest.mark.parametrize("kind", ["transformer", "trellisnet"])
def test_masks_are_fixed_across_iterations_and_redrawn_between_forwards(kind, mode):
    model = tiny_model(kind, dropout=0.5, mode=mode,
                       forward=SolverSettings(max_iter=20, tol=1e-6, stop_mode="rel")).train()
    calls = _record_calls(model, kind)
    seq = tokens(3, 6)
    with torch.no_grad():
        model(seq)
        first = list(calls)
        calls.clear()
        model(seq)
        second = list(calls)
    assert len(first) > 3, "f should have been applied several times"
    for calls_of_one_forward in (first, second):
        full_inj, reference = calls_of_one_forward[0]
        assert full_inj.shape[0] == 3 and all(m is not None for m in reference)
        for inj, masks in calls_of_one_forward[1:]:
            # Match each row to its sample by its injection (compaction may drop finished rows).
            rows = [int((full_inj == r).flatten(1).all(1).nonzero()) for r in inj]
            for m, ref in zip(masks, reference):
                assert torch.equal(m, ref[rows])
    assert any(not torch.equal(a, b) for a, b in zip(first[0][1], second[0][1])), \
        "a new forward pass should draw new masks"
    assert any((m == 0).any() for m in first[0][1]), "p = 0.5 should drop something"


def test_no_masks_in_eval_mode():
    model = tiny_model("transformer", dropout=0.5).eval()
    calls = _record_calls(model, "transformer")
    with torch.no_grad():
        model(tokens(2, 5))
    assert calls and all(m is None for _, masks in calls for m in masks)
