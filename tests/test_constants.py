"""Constants kept in Python and C++: the codes and layouts in deq_ext/status.py must be those of
csrc/common/broyden_math.h, which the kernels use."""

from __future__ import annotations

import re
from pathlib import Path

from deq_ext import status

HEADER = (Path(__file__).resolve().parents[1] / "csrc" / "common" / "broyden_math.h").read_text()


def _enum(name: str) -> dict[str, int]:
    body = re.search(r"enum " + name + r"\s*:\s*\w+\s*\{(.*?)\};", HEADER, re.S).group(1)
    return {k: int(v) for k, v in re.findall(r"(k\w+)\s*=\s*(\d+)", body)}


def test_status_codes_agree():
    codes = _enum("Status")
    assert codes == {"kActive": 0, "kConverged": 1, "kDiverged": 2, "kStalled": 3, "kMaxIter": 4}
    for cpp, py in [("kActive", "ACTIVE"), ("kConverged", "CONVERGED"), ("kDiverged", "DIVERGED"),
                    ("kStalled", "STALLED"), ("kMaxIter", "MAX_ITER")]:
        assert codes[cpp] == int(status.Status[py]), py
    assert len(status.Status) == len(codes)


def test_scalar_slots_agree():
    slots = _enum("ScalarSlot")
    assert slots["kDzDg"] == status.DZ_DG and slots["kDzG"] == status.DZ_G
    assert slots["kDen"] == status.DEN and slots["kVG"] == status.VG
    assert slots["kValid"] == status.VALID and slots["kNumScalars"] == status.NUM_SCALARS


def test_relative_residual_epsilon_agrees():
    value = re.search(r"constexpr double kRelEps = ([0-9.eE+-]+);", HEADER).group(1)
    assert float(value) == status.REL_EPS
