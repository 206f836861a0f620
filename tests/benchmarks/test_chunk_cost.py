"""benchmarks.chunk_cost: both chunkings are timed on both models, alternated, with a ratio."""

from __future__ import annotations

import json

from benchmarks import chunk_cost


def test_quick_run_times_both_chunkings(tmp_path):
    out = tmp_path / "c.json"
    res = chunk_cost.main(["--quick", "--device", "cpu", "--repeats", "2", "--out", str(out)])
    assert json.loads(out.read_text())["command"].startswith("python -m benchmarks.chunk_cost")
    assert set(res["models"]) == {"transformer", "trellisnet"}
    for r in res["models"].values():
        assert [len(r["step_s"][name]) for name in ("whole", "chunked")] == [2, 2]
        assert all(t > 0 for ts in r["step_s"].values() for t in ts)
        lo, hi = r["chunked_over_whole_range"]
        assert lo <= hi and r["chunked_over_whole"] > 0
        assert r["samples_per_solve"] is None  # the tiny presets' batches are below the threshold


def test_a_number_of_samples_per_solve(tmp_path):
    res = chunk_cost.main(["--quick", "--device", "cpu", "--repeats", "1", "--chunk", "2"])
    assert {r["samples_per_solve"] for r in res["models"].values()} == {2}
