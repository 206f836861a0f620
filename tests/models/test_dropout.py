"""Variational dropout: one mask per forward pass, the same at every application of f."""

from __future__ import annotations

import pytest
import torch

from deq_ext import SolverSettings
from models.regularization import Shared

from .helpers import tiny_model, tokens

# f's trailing inputs that are dropout draws: (per-sample masks, batch-wide draws in a Shared).
# Transformer: attention output, FF hidden, FF output | positional encodings.
# TrellisNet: h | the DropConnect-ed convolution weight.
N_MASKS = {"transformer": (3, 1), "trellisnet": (1, 1)}
CORE = {"transformer": {}, "trellisnet": {"weight_dropout": 0.5}}


def _record_calls(model, kind: str) -> list[tuple[torch.Tensor, list, list]]:
    """Spy on f: every call's injection rows (they identify the samples), its per-sample masks
    and its batch-wide draws."""
    calls = []
    cell = model.core.cell
    forward = cell.forward
    n_rows, n_shared = N_MASKS[kind]

    def spy(z, inj, *rest):
        draws = rest[-(n_rows + n_shared):]
        rows = [None if m is None else m.clone() for m in draws[:n_rows]]
        shared = [None if s is None else s.value.detach().clone() for s in draws[n_rows:]]
        assert all(s is None or isinstance(s, Shared) for s in draws[n_rows:])
        calls.append((inj.detach().clone(), rows, shared))
        return forward(z, inj, *rest)

    cell.forward = spy
    return calls


@pytest.mark.parametrize("mode", ["deq", "unrolled"])
@pytest.mark.parametrize("kind", ["transformer", "trellisnet"])
def test_masks_are_fixed_across_iterations_and_redrawn_between_forwards(kind, mode):
    model = tiny_model(kind, dropout=0.5, mode=mode, core=CORE[kind],
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
        full_inj, reference, shared_ref = calls_of_one_forward[0]
        assert full_inj.shape[0] == 3 and all(m is not None for m in reference + shared_ref)
        for inj, masks, shared in calls_of_one_forward[1:]:
            # Match each row to its sample by its injection (compaction may drop finished rows).
            rows = [int((full_inj == r).flatten(1).all(1).nonzero()) for r in inj]
            for m, ref in zip(masks, reference):
                assert torch.equal(m, ref[rows])
            for s, ref in zip(shared, shared_ref):  # never gathered: the whole batch's draw
                assert torch.equal(s, ref)
    for a, b in zip(first[0][1] + first[0][2], second[0][1] + second[0][2]):
        assert not torch.equal(a, b), "a new forward pass should draw new masks"
    assert all((m == 0).any() for m in first[0][1] + first[0][2]), "p = 0.5 should drop something"


@pytest.mark.parametrize("kind", ["transformer", "trellisnet"])
def test_no_masks_in_eval_mode(kind):
    model = tiny_model(kind, dropout=0.5, core=CORE[kind]).eval()
    calls = _record_calls(model, kind)
    with torch.no_grad():
        model(tokens(2, 5))
    assert calls and all(m is None for _, masks, _ in calls for m in masks)
    if kind == "transformer":
        assert all(s is None for _, _, shared in calls for s in shared)
    else:  # the weight is the module's own, undropped
        w = model.core.cell.conv.weight.detach()
        assert all(torch.equal(s, w) for _, _, shared in calls for s in shared)
