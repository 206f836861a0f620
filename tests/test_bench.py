"""Smoke run of python -m deq_ext.bench: it runs, measures, and writes what it claims."""

from __future__ import annotations

import json

import pytest

from deq_ext import bench


def test_quick_bench_runs_and_writes_json(tmp_path, capsys):
    pytest.importorskip("torchdeq")
    out = tmp_path / "nested" / "bench.json"
    results = bench.main(["--quick", "--device", "cpu", "--out", str(out)])
    solves = results["solves"]
    assert {"deq_ext", "deq_ext[no compact]", "deq_ext[reference]", "torchdeq"} <= set(solves)
    batch = results["config"]["batch"]
    for name, s in solves.items():
        assert s["converged"] == batch, name
        assert s["total_s"] >= s["f_s"] > 0, name
    # Compaction evaluates no more rows than the whole-batch solve, and the same calls.
    assert solves["deq_ext"]["f_rows"] <= solves["deq_ext[no compact]"]["f_rows"]
    assert solves["deq_ext"]["f_calls"] == solves["deq_ext[no compact]"]["f_calls"]
    assert results["ratios"]["total_speedup"] > 0
    names = {t["name"] for t in results["targets"]}
    assert {"solver_overhead_ratio", "total_speedup", "compaction_rows_saved"} <= names
    saved = json.loads(out.read_text())
    assert saved["command"].startswith("python -m deq_ext.bench --quick")
    assert saved["device"] and saved["versions"]["torch"]
    assert "targets" in capsys.readouterr().out
