"""Shared fixtures: one suite parametrized over devices.

* ``cpu``: the CPU kernels.
* ``cuda``: the CUDA kernels on a GPU (skipped without one).
* ``cuda-emu``: the same CUDA kernels compiled as host C++ on the CUDA emulation
  (``deq_ext._C_emu``, built with ``DEQ_EXT_BUILD_EMU=1``), on CPU tensors: every op
  and solve of the test runs through them, under a seeded random thread schedule.
  Skipped when the module was not built, a failure when ``DEQ_EXT_EXPECT_EMU=1``.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

import deq_ext
from deq_ext import _extension

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
    pytest.param("cuda-emu", id="cuda-emu", marks=[pytest.mark.cuda_emu]),
]


def emulation_or_skip():
    """The emulation module, or a skip (a failure where CI expects it)."""
    emu = _extension.emulation_module()
    if emu is None:
        if os.environ.get("DEQ_EXT_EXPECT_EMU") == "1":
            pytest.fail("DEQ_EXT_EXPECT_EMU=1 but deq_ext._C_emu was not built "
                        "(build with DEQ_EXT_BUILD_EMU=1)")
        pytest.skip("deq_ext._C_emu not built (DEQ_EXT_BUILD_EMU=1)")
    return emu


@pytest.fixture
def compiled() -> None:
    """For tests that compare the compiled ops with something: without the extension the
    solvers would fall back to the reference twin and compare it with itself."""
    info = deq_ext.build_info()
    assert info["loaded"], f"deq_ext._C failed to load: {info.get('error')}"


@pytest.fixture(params=DEVICES)
def device(request, compiled):
    if request.param == "cuda-emu":
        emu = emulation_or_skip()
        emu.set_schedule("random", zlib.crc32(request.node.nodeid.encode()))
        launches = emu.stats()["launches"]
        with _extension.use_ops(_extension.emulated_ops()):
            yield torch.device("cpu")
        # A cuda-emu case that launched no kernel would pass without testing one.
        assert emu.stats()["launches"] > launches, "no emulated CUDA kernel was launched"
        return
    dev = torch.device(request.param)
    if dev.type == "cuda" and not deq_ext.build_info().get("cuda", False):
        pytest.fail("a CUDA device is present but deq_ext was built without CUDA kernels")
    yield dev


@pytest.fixture
def ext(request, compiled):
    """The ops under test (the device's, when the test has a device)."""
    if "device" in request.fixturenames:
        request.getfixturevalue("device")
    return _extension.ops()


def _seed_line() -> str:
    from .helpers import RUN_SEED

    return f"deq_ext op tests: seed {RUN_SEED} (repeat with DEQ_EXT_TEST_SEED={RUN_SEED})"


def pytest_report_header(config):
    return _seed_line()


def pytest_terminal_summary(terminalreporter):
    """The op tests' seed (the header is not shown with -q), and how much of the run went
    through the emulated CUDA kernels."""
    terminalreporter.write_line(_seed_line())
    passed = [r for r in terminalreporter.stats.get("passed", []) if "cuda-emu" in r.nodeid]
    emu = _extension.emulation_module() if passed else None
    if emu is not None:
        s = emu.stats()
        terminalreporter.write_line(
            f"cuda-emu: {len(passed)} passed test cases ran the CUDA kernels on the emulation "
            f"({s['launches']} launches, {s['blocks']} blocks, {s['threads']} threads)")
