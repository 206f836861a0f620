"""Smoke run of benchmarks.compile_step (eager backend, tiny sizes): it runs and records what it claims."""

from __future__ import annotations

import json

import pytest

from benchmarks import compile_step


def test_compile_step_runs_and_writes_json(tmp_path):
    out = tmp_path / "compile.json"
    results = compile_step.main(["--backend", "eager", "--batch", "2", "--seq", "5",
                                 "--repeat", "2", "--device", "cpu", "--out", str(out)])
    recorded = json.loads(out.read_text())
    assert recorded["command"].startswith("python -m benchmarks.compile_step --backend eager")
    v = recorded["variants"]
    assert set(v) == set(compile_step.VARIANTS)
    losses = {name: v[name]["loss"] for name in v}
    assert len(set(losses.values())) == 1, losses  # the same step, compiled or not
    for name in v:
        assert len(v[name]["runs_s"]) == 2 and v[name]["step_s"] > 0
    assert recorded["ratios"]["compiled_f_speedup"] == pytest.approx(
        v["eager"]["step_s"] / v["compiled_f"]["step_s"])
    assert results["ratios"] == recorded["ratios"]
