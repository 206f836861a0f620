"""The half-precision history benchmark: a quick run records what it claims to measure."""

from __future__ import annotations

import json

import pytest

from benchmarks import history_precision, summary


def test_quick_run_measures_steps_and_time_for_every_history_dtype(tmp_path):
    out = tmp_path / "hp.json"
    res = history_precision.main(["--quick", "--rounds", "1", "--out", str(out)])
    assert json.loads(out.read_text())["command"].startswith("python -m benchmarks.history_precision")
    assert [c["case"] for c in res["cases"]] == ["mlp f", "block f", "mdeq (hard)"]
    for case in res["cases"]:
        assert [r["history"] for r in case["rows"]] == ["state", "bfloat16", "float16"]
        state = case["rows"][0]
        assert state["converged"] == state["batch"], case["case"]
        assert state["max_residual"] < case["tol"]
    # The easy problems converge with a bfloat16 history too.
    for case in res["cases"][:2]:
        bf16 = case["rows"][1]
        assert bf16["converged"] == bf16["batch"] and bf16["max_residual"] < case["tol"]
    t = res["timing"]
    for name in ("bfloat16", "float16"):
        assert t["speedup"][f"passes_{name}"] == pytest.approx(t["passes_s"]["state"] / t["passes_s"][name])
    text, _ = summary.summarize([str(out)])
    assert "mdeq (hard), bfloat16 history" in text and "fused passes speedup" in text


def test_rounds_must_be_positive():
    with pytest.raises(SystemExit):
        history_precision.main(["--quick", "--rounds", "0"])
