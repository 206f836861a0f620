"""benchmarks.backward_modes: a --quick run on the MLP workload, its figures consistent with one
another and with what each mode is (no adjoint solve for SHINE without fallback, exact modes at
the reference's gradient)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import backward_modes as bm
from benchmarks.summary import summarize

pytestmark = pytest.mark.usefixtures("compiled")


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("backward_modes") / "modes.json"
    bm.main(["--quick", "--device", "cpu", "--workloads", "hetero_mlp",
             "--out", str(out)])
    return json.loads(out.read_text())


def test_quick_run_records_provenance_and_every_mode(quick):
    assert quick["command"].startswith("python -m benchmarks.backward_modes --quick")
    assert quick["versions"]["deq_ext_build"]["loaded"] and quick["reps"] == 1
    assert "busy" in quick and quick["load_average_end"] is not None
    w = quick["workloads"]["hetero_mlp"]
    assert list(w["modes"]) == list(bm.MODES)
    assert w["reference"]["backward_tol"] == pytest.approx(
        w["settings"]["backward"]["tol"] * bm.REFERENCE_FACTOR)
    for name, m in w["modes"].items():
        assert m["step_s"]["n"] == 1 and m["median_step_s"] > 0
        assert m["vjp_rows_over_f_rows"] == pytest.approx(m["vjp_rows"] / m["f_rows"])
        assert m["backward_over_forward"] == pytest.approx(m["backward_s"] / m["forward_s"])
        if w.get("torchdeq"):
            assert m["torchdeq_over_step"] == pytest.approx(
                w["torchdeq"]["median_step_s"] / m["median_step_s"])
        assert -1 <= m["cosine"] <= 1 + 1e-9 and m["rel_error"] >= 0, name


def test_rows_and_accuracy_follow_each_mode(quick):
    w = quick["workloads"]["hetero_mlp"]
    modes, batch = w["modes"], w["batch"]
    # The exact modes agree with the reference to about their backward tolerance.
    for name in ("implicit", "implicit_warm"):
        assert modes[name]["cosine"] > 0.9999 and modes[name]["rel_error"] < 1e-3, name
        assert modes[name]["adjoint_vjp_rows"] >= batch  # at least the first evaluation
    # Unchecked SHINE: no VJP for the samples it keeps; their share is what fell back.
    assert modes["shine"]["shine_estimate_rel_residual"]["n"] == batch  # every estimate checked
    assert "shine_estimate_rel_residual" not in modes["shine_unchecked"]
    unchecked = modes["shine_unchecked"]
    kept = round(batch * (1 - unchecked["shine_fallback_share"]))
    assert unchecked["adjoint_vjp_rows"] == 0 or kept < batch
    # One-step: the only VJP is the final backward to the parameters, one per sample.
    assert modes["one_step"]["vjp_rows"] == batch
    assert modes["phantom"]["vjp_rows"] == bm.PHANTOM_STEPS * batch
    assert modes["phantom"]["f_rows"] == modes["one_step"]["f_rows"] + \
        (bm.PHANTOM_STEPS - 1) * batch
    # The inexact ones are inexact, but point the same way.
    for name in ("one_step", "shine_unchecked"):
        assert 0 < modes[name]["cosine"] < 1 and math.isfinite(modes[name]["rel_error"])


def test_the_table_lists_every_mode(quick):
    table = bm.format_table(quick)
    for name in bm.MODES:
        assert name in table


def test_training_table_and_bad_arguments():
    res = {"device": "cpu", "training_runs": {"digits": {"shine": {
        "test_loss": [0.5, 0.4], "test_accuracy": [0.9, 0.95], "wall_s_mean": 3.0}}}}
    assert "0.9000 0.9500" in bm.format_training_table(res)
    for bad in (["--workloads", "nope"], ["--modes", "shine_unchecked", "--training-runs"],
                ["--reps", "0"]):
        with pytest.raises(SystemExit):
            bm.parse(bad)
    assert bm.parse(["--training-runs"]).modes == list(bm.TRAINING_MODES)


def test_targets_and_their_summary(tmp_path):
    modes = {"implicit": {"vjp_rows_over_f_rows": 0.8, "torchdeq_over_step": 2.5, "cosine": 1.0},
             "shine": {"vjp_rows_over_f_rows": 0.2, "torchdeq_over_step": None, "cosine": 0.97}}
    got = {(t["mode"], t["figure"]): t["pass"] for t in bm.targets("copy_memory", modes)}
    assert got == {("implicit", "vjp_rows_over_f_rows"): False,
                   ("implicit", "torchdeq_over_step"): True, ("shine", "cosine"): True}
    assert bm.targets("hetero_mlp", modes) == []
    record = {"command": "python -m benchmarks.backward_modes", "device": "cpu0", "busy": None,
              "workloads": {"copy_memory": {"modes": modes,
                                            "targets": bm.targets("copy_memory", modes)}}}
    path = tmp_path / "modes.json"
    path.write_text(json.dumps(record))
    text, ok = summarize([str(path)])
    assert not ok
    line = next(ln for ln in text.splitlines() if "implicit: vjp_rows_over_f_rows" in ln)
    assert "0.800" in line and "<= 0.4" in line and line.endswith("FAIL")


def test_a_training_run_is_recorded_and_kept_on_a_rerun(tmp_path, monkeypatch):
    out = tmp_path / "runs.json"
    args = ["--training-runs", "--quick", "--tasks", "digits", "--modes", "one_step",
            "--seeds", "0", "--out", str(out)]
    first = bm.main(args)["training_runs"]["digits"]["one_step"]
    assert first["seeds"] == [0] and 0 <= first["test_accuracy"][0] <= 1
    assert "--grad-mode phantom --phantom-steps 1" in first["runs"][0]["command"]
    assert json.loads(out.read_text())["complete"] is True

    def no_training(*args, **kwargs):
        raise AssertionError("a recorded run was run again")

    monkeypatch.setattr(bm, "training_run", no_training)
    assert bm.main(args)["training_runs"]["digits"]["one_step"] == first


def test_the_docs_show_the_recorded_tables():
    root = Path(bm.__file__).resolve().parents[1]
    doc = (root / "docs" / "backward.md").read_text()
    steps = json.loads((root / "benchmarks" / "results" / "backward-modes-cpu.json").read_text())
    assert bm.markdown_table(steps) in doc
    runs = json.loads((root / "benchmarks" / "results" /
                       "backward-modes-training-cpu.json").read_text())
    assert bm.markdown_training_table(runs) in doc
