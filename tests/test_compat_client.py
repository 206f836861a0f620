"""A real client of the locuslab adapters: the tiny official-style DEQ-Transformer of
tests/compat_client.py trains with ``semantics="official"`` bit for bit like the same model
driven by the locuslab/deq algorithm (tests/compat_reference.py), and trains with
``semantics="deq_ext"`` too."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from deq_ext import compat

from .compat_client import train
from .compat_reference import reference_anderson, reference_broyden


def _solvers(semantics):
    return (functools.partial(compat.anderson, semantics=semantics),   # the official defaults:
            functools.partial(compat.broyden, semantics=semantics))    # anderson fwd, broyden bwd


@pytest.mark.parametrize("seed", [1, 2])
def test_official_semantics_train_bit_for_bit_like_the_original_algorithm(seed):
    losses, params = train(seed, *_solvers("official"))
    ref_losses, ref_params = train(seed, reference_anderson, reference_broyden)
    # Bitwise: both run the same float64 operations in the same order (the reference keeps the
    # original's tensor layouts), and every stopping decision follows from those bits.
    assert losses == ref_losses
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)
    assert losses[-1] < losses[0]


def test_official_semantics_also_through_the_module_switch(monkeypatch):
    """A whole script flips with set_semantics: the plain functions, as a client passes them."""
    monkeypatch.delenv(compat.SEMANTICS_ENV, raising=False)
    previous = compat.set_semantics("deq_ext")
    try:
        per_sample, _ = train(3, compat.anderson, compat.broyden, steps=2)
        compat.set_semantics("official")
        official, _ = train(3, compat.anderson, compat.broyden, steps=2)
    finally:
        compat.set_semantics(previous)
    ref, _ = train(3, reference_anderson, reference_broyden, steps=2)
    assert official == ref and per_sample != ref


def test_deq_ext_semantics_train_close_to_the_official_run():
    losses, params = train(1, *_solvers("deq_ext"))
    ref_losses, ref_params = train(1, reference_anderson, reference_broyden)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    # Both solve to the adapters' default tolerance (1e-3, relative): the runs agree to about it.
    for a, b in zip(losses, ref_losses):
        assert a == pytest.approx(b, rel=1e-2)
