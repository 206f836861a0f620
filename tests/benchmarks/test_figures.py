"""benchmarks.figures: Figure 2 (left) from a metrics.jsonl the test writes."""

from __future__ import annotations

import json

import pytest

from benchmarks import figures


def _write_run(path, records) -> str:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_figure2_plots_the_deq_steps_iterations(tmp_path):
    records = [{"event": "train", "step": 1, "mode": "pretrain", "loss": 3.0},
               {"event": "train", "step": 2, "mode": "deq", "fwd_iter": 5.5, "bwd_iter": 3.0},
               {"event": "eval", "step": 2, "test_loss": 2.0},
               {"event": "train", "step": 3, "mode": "deq", "fwd_iter": 7.0, "bwd_iter": 4.5}]
    run = _write_run(tmp_path / "run_a", records)
    figures.main([run, "--out", str(tmp_path / "out")])
    png = (tmp_path / "out" / "figure2_iterations.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    data = json.loads((tmp_path / "out" / "figure2_iterations.json").read_text())
    assert data["runs"]["run_a"] == {"step": [2, 3], "fwd_iter": [5.5, 7.0],
                                     "bwd_iter": [3.0, 4.5]}


def test_a_directory_without_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        figures.main([str(tmp_path), "--out", str(tmp_path / "out")])
