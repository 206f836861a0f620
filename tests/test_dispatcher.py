"""The extension ops in PyTorch's dispatcher: schemas that say what each op writes, opcheck."""

from __future__ import annotations

import pytest
import torch

from deq_ext import _extension, reference

from .helpers import clone_state, states_equal, to_device
from .op_cases import OP_CASES, SIZES, make_state


@pytest.mark.parametrize("name", _extension.OP_NAMES)
def test_schema_marks_exactly_the_tensors_the_op_writes(name):
    """The schema's Tensor(x!) arguments are the ones the reference twin writes, when every
    sample is active (and one Anderson sample falls back), so that every output is written."""
    schema = getattr(torch.ops.deq_ext, name).default._schema
    assert len(schema.returns) == 0
    declared = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    st = make_state(name, 3, 9, 4, torch.float64, seed=1)
    st["status"].fill_(0)  # ACTIVE
    if name == "anderson_store_":
        st["gram"][0] = float("nan")  # a failed weight solve: the fallback counter is written
    if name == "residual_status_":
        st["counts"].fill_(-1)  # no count is negative: both are written
    before = clone_state(st)
    args = OP_CASES[name][1](st)
    getattr(reference, name)(*args)
    names = [a.name for a in schema.arguments]
    assert len(names) == len(args)
    written = {n for n, a in zip(names, args) if isinstance(a, (torch.Tensor, list))
               and states_equal({n: a}, {n: before_of(before, st, a)})}
    # The CUDA kernels' scratch is written by them only (the twin, like the CPU kernels, needs none).
    scratch = {"partials", "tickets"}
    assert written == declared - scratch, \
        f"{name}: writes {sorted(written)}, schema declares {sorted(declared)}"


def before_of(before: dict, st: dict, value):
    for key, v in st.items():
        if v is value:
            return before[key]
    raise KeyError("argument not in the state")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("B,D,m", SIZES, ids=[f"B{b}-D{d}-m{m}" for b, d, m in SIZES])
@pytest.mark.parametrize("name", _extension.OP_NAMES)
def test_opcheck(ext, device, name, B, D, m, dtype):
    """torch.library.opcheck: schema (no undeclared mutation), autograd registration, fake
    tensor, AOT dispatch with dynamic shapes."""
    st = to_device(make_state(name, B, D, m, dtype, seed=B + D + m), device)
    torch.library.opcheck(getattr(ext, name), OP_CASES[name][1](st))
