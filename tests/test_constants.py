"""Constants kept in Python and C++: the codes and layouts in deq_ext/status.py and the solver's
sizes must be those of the headers the kernels use (csrc/common/status.h, broyden_math.h,
history.h, csrc/cuda/launch.cuh)."""

from __future__ import annotations

import re
from pathlib import Path

from deq_ext import status
from deq_ext.solvers import _base, _history

CSRC = Path(__file__).resolve().parents[1] / "csrc"
STATUS = (CSRC / "common" / "status.h").read_text()
BROYDEN = (CSRC / "common" / "broyden_math.h").read_text()
HISTORY = (CSRC / "common" / "history.h").read_text()
LAUNCH = (CSRC / "cuda" / "launch.cuh").read_text()


def _enum(header: str, name: str) -> dict[str, int]:
    body = re.search(r"enum " + name + r"\s*:\s*\w+\s*\{(.*?)\};", header, re.S).group(1)
    return {k: int(v) for k, v in re.findall(r"(k\w+)\s*=\s*(\d+)", body)}


def _constexpr(header: str, name: str) -> str:
    return re.search(r"constexpr \w+ " + name + r" = ([^;]+);", header).group(1)


def test_status_codes_agree():
    codes = _enum(STATUS, "Status")
    assert codes == {"kActive": 0, "kConverged": 1, "kDiverged": 2, "kStalled": 3, "kMaxIter": 4}
    for cpp, py in [("kActive", "ACTIVE"), ("kConverged", "CONVERGED"), ("kDiverged", "DIVERGED"),
                    ("kStalled", "STALLED"), ("kMaxIter", "MAX_ITER")]:
        assert codes[cpp] == int(status.Status[py]), py
    assert len(status.Status) == len(codes)


def test_count_slots_agree():
    slots = _enum(STATUS, "CountSlot")
    assert slots["kPendingCount"] == status.PENDING_COUNT
    assert slots["kActiveCount"] == status.ACTIVE_COUNT
    assert slots["kNumCounts"] == status.NUM_COUNTS


def test_scalar_slots_agree():
    slots = _enum(BROYDEN, "ScalarSlot")
    assert slots["kDzDg"] == status.DZ_DG and slots["kDzG"] == status.DZ_G
    assert slots["kDen"] == status.DEN and slots["kVG"] == status.VG
    assert slots["kValid"] == status.VALID and slots["kNumScalars"] == status.NUM_SCALARS


def test_relative_residual_epsilon_agrees():
    assert float(_constexpr(STATUS, "kRelEps")) == status.REL_EPS


def test_sizes_agree():
    """The CUDA kernels' values per block (the solver sizes their scratch with it) and the
    number of history chunks a kernel takes."""
    threads = int(_constexpr(LAUNCH, "kThreads"))
    per_thread = int(_constexpr(LAUNCH, "kEPT"))
    assert _constexpr(LAUNCH, "kChunk") == "kThreads * kEPT"
    assert threads * per_thread == _base.CUDA_CHUNK
    assert int(_constexpr(HISTORY, "kMaxHistoryChunks")) == _history.MAX_CHUNKS
