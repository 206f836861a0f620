"""benchmarks.solver_bench: the user's benchmark plus the project's targets and verdicts."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.solver_bench import check_targets, main, results_targets, targets_met


def test_busy_machine_gets_figures_but_no_verdict():
    ratios = {"solver_overhead_ratio": 0.1, "total_speedup": 3.0, "compaction_rows_saved": 0.5}
    quiet = check_targets(ratios, None, torch.device("cpu"))
    busy = check_targets(ratios, None, torch.device("cpu"), busy=True)
    assert [t["passed"] for t in quiet if t["applies"]] == [True, True, True]
    assert targets_met(quiet) is True
    assert all(t["passed"] is None for t in busy) and targets_met(busy) is None
    assert [t["value"] for t in busy] == [t["value"] for t in quiet]
    slow = check_targets({**ratios, "total_speedup": 1.5}, None, torch.device("cpu"))
    assert targets_met(slow) is False


def test_quick_run_adds_the_targets_to_the_benchmark_record(tmp_path, capsys):
    pytest.importorskip("torchdeq")
    out = tmp_path / "bench.json"
    results = main(["--quick", "--device", "cpu", "--no-sweep", "--no-reference", "--out", str(out)])
    names = {t["name"] for t in results["targets"]}
    assert {"solver_overhead_ratio", "total_speedup", "compaction_rows_saved"} <= names
    total = next(t for t in results["targets"] if t["name"] == "total_speedup")
    assert total["value"] == results["ratios"]["total_speedup"]
    saved = json.loads(out.read_text())
    assert saved["command"].startswith("python -m benchmarks.solver_bench --quick")
    assert saved["targets"] == results["targets"] and "targets_met" in saved
    assert saved["solves"].keys() == results["solves"].keys()
    assert "\ntargets\n" in capsys.readouterr().out
    # The same verdicts from the record of the user-facing benchmark alone (what the summary does).
    plain = {k: v for k, v in saved.items() if k not in ("targets", "targets_met")}
    assert results_targets(plain) == saved["targets"]
