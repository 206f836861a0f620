"""Shared fixtures: one suite parametrized over devices (CUDA cases skip without a GPU)."""

from __future__ import annotations

import pytest
import torch

import deq_ext

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
        ],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    dev = torch.device(request.param)
    if dev.type == "cuda" and not deq_ext.build_info().get("cuda", False):
        pytest.fail("a CUDA device is present but deq_ext was built without CUDA kernels")
    return dev


@pytest.fixture
def ext():
    """The compiled ops module; these tests are about it, so its absence is a failure."""
    info = deq_ext.build_info()
    assert info["loaded"], f"deq_ext._C failed to load: {info.get('error')}"
    from deq_ext import _C

    return _C
