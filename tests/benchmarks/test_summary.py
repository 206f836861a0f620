"""benchmarks.summary: tells result kinds apart and reports every target's verdict."""

from __future__ import annotations

import json

from benchmarks.summary import main, summarize


def _write(path, obj) -> None:
    path.write_text(json.dumps(obj))


def test_summary_of_each_kind_and_its_exit_status(tmp_path, capsys):
    _write(tmp_path / "a-bench.json", {
        "command": "python -m deq_ext.bench --quick", "device": "cpu0",
        "targets": [
            {"name": "total_speedup", "value": 2.5, "op": ">=", "threshold": 2.0, "applies": True,
             "passed": True},
            {"name": "fused_bandwidth_fraction", "value": 0.1, "op": ">=", "threshold": 0.7,
             "applies": False, "passed": False}]})
    _write(tmp_path / "b-memory.json", {
        "command": "python -m benchmarks.memory_table", "device": "cpu0",
        "models": {"transformer": {"targets": {"depth": 16, "share": 0.05, "limit": 0.12,
                                               "pass": True, "share_saved_bytes": 0.02}}}})
    def micro(op, impl, axis, conv, median, frac):
        return {"stats": {"median": median}, "extra_info": {
            "op": op, "impl": impl, "device": "cpu", "axis": axis, "converged_fraction": conv,
            "fraction_of_copy": frac}}

    _write(tmp_path / "c-micro.json", {"benchmarks": [
        micro("broyden_iteration", "compiled", "base", 0.0, 2.0, 0.6),
        micro("broyden_iteration", "torchdeq", "base", 0.0, 3.0, 0.4),
        micro("broyden_iteration", "compiled", "converged", 0.875, 0.5, 0.6),
        micro("broyden_iteration", "torchdeq", "converged", 0.875, 3.0, 0.05),
        micro("broyden_reduce", "compiled", "dim", 0.0, 1.0, 0.9)]})
    _write(tmp_path / "d-other.json", {"command": "python -m train.copy_memory"})
    text, ok = summarize([str(tmp_path)])
    lines = text.splitlines()
    assert ok
    assert any("total_speedup" in ln and "2.500" in ln and ln.endswith("PASS") for ln in lines)
    assert not any("fused_bandwidth_fraction" in ln for ln in lines), "a target for another device"
    assert any("transformer DEQ peak memory / 16-layer" in ln and "0.050" in ln
               and ln.endswith("PASS") for ln in lines)
    assert any("saved bytes only (secondary)" in ln and "0.020" in ln for ln in lines)
    # The current table: targets against the unrolled and the checkpointed model.
    current = tmp_path / "current"
    current.mkdir()
    _write(current / "memory.json", {
        "command": "python -m benchmarks.memory_table", "device": "cpu0",
        "models": {"trellisnet": {"targets": {
            "unrolled": {"depth": 60, "share": 0.136, "limit": 0.14, "pass": True},
            "checkpointed": {"depth": 60, "share": 0.7, "limit": 0.6, "pass": False}}}}})
    table = summarize([str(current)])[0].splitlines()
    assert any("trellisnet DEQ peak memory / 60-layer unrolled" in ln and "0.136" in ln
               and ln.endswith("PASS") for ln in table)
    assert any("60-layer checkpointed" in ln and "0.700" in ln and ln.endswith("FAIL")
               for ln in table)
    # A bench record without a problem kind is the solver-bound f of earlier versions.
    assert any("total_speedup [solver-bound f" in ln for ln in lines)
    assert any("broyden_iteration (cpu): fraction of copy" in ln and "0.600" in ln for ln in lines)
    assert any("(cpu, 0 converged): torchdeq / deq_ext" in ln and "1.500" in ln for ln in lines)
    assert any("(cpu, 0.875 converged): torchdeq / deq_ext" in ln and "6.000" in ln for ln in lines)
    assert not any("broyden_reduce" in ln for ln in lines), "only base points are summarized"
    assert "d-other.json: skipped" in text

    _write(tmp_path / "e-runtime.json", {
        "command": "python -m benchmarks.runtime_table", "device": "cpu0",
        "models": {"trellisnet": {
            "targets": {"infer": {"ratio": 1.5, "limit": 1.3, "pass": False}},
            "compaction_rows_saved": {"infer": 0.25}}}})
    assert main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "trellisnet DEQ / deep, infer" in out and "FAIL" in out
    assert "trellisnet f rows saved by compaction, infer" in out and "0.250" in out


def test_a_busy_bench_run_gets_no_verdict_and_names_its_workload(tmp_path):
    _write(tmp_path / "busy.json", {
        "command": "python -m deq_ext.bench", "device": "cpu0", "busy": "load 3.1",
        "problem": {"kind": "mlp"}, "config": {"repeat": 5},
        "ratio_spreads": {"total_speedup": {"median": 2.1, "min": 1.9, "max": 2.3, "n": 5}},
        "targets": [{"name": "total_speedup", "value": 2.1, "op": ">=", "threshold": 2.0,
                     "applies": True, "passed": None}]})
    text, ok = summarize([str(tmp_path)])
    assert ok
    assert "machine busy, no verdicts: load 3.1" in text
    line = next(ln for ln in text.splitlines() if "total_speedup" in ln)
    assert "[mlp f; 5 rounds 1.90..2.30]" in line and not line.rstrip().endswith("PASS")


def test_a_record_of_the_user_benchmark_gets_its_targets_checked_here(tmp_path):
    """``python -m deq_ext.bench`` records no targets; the summary checks them from its ratios."""
    _write(tmp_path / "plain.json", {
        "command": "python -m deq_ext.bench --device cpu", "device": "cpu0", "busy": None,
        "problem": {"kind": "mlp"}, "config": {"device": "cpu", "repeat": 5},
        "ratios": {"solver_overhead_ratio": 0.2, "total_speedup": 1.5, "compaction_rows_saved": 0.45},
        "bandwidth": None})
    text, ok = summarize([str(tmp_path)])
    assert not ok
    line = next(ln for ln in text.splitlines() if "total_speedup" in ln)
    assert "1.500" in line and line.rstrip().endswith("FAIL")
    assert any("compaction_rows_saved" in ln and ln.rstrip().endswith("PASS")
               for ln in text.splitlines())
