"""benchmarks.figures: Figure 2 from metrics.jsonl files the tests write; Figures 3 and 4 on a
tiny copy-memory model trained here."""

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


# -- Figure 2 (right) ------------------------------------------------------------------------------
DEQ_RUN = [{"event": "train", "step": 1, "mode": "pretrain", "layer_change": 0.3},
           {"event": "train", "step": 2, "mode": "deq", "fwd_iter": 5.0, "bwd_iter": 4.0,
            "fwd_res": 2e-4, "bwd_res": 3e-5},
           {"event": "eval", "step": 2, "test_loss": 1.0},
           {"event": "train", "step": 3, "mode": "deq", "fwd_iter": 6.0, "bwd_iter": 5.0,
            "fwd_res": 4e-4, "bwd_res": 1e-5}]
UNROLLED_RUN = [{"event": "train", "step": 1, "mode": "pretrain", "layer_change": 0.3},
                {"event": "train", "step": 2, "mode": "unrolled", "layer_change": 0.05},
                {"event": "train", "step": 3, "mode": "unrolled", "layer_change": 0.02}]


def test_figure2_right_plots_residuals_and_the_unrolled_runs_last_layer_change(tmp_path):
    deq = _write_run(tmp_path / "deq", DEQ_RUN)
    unrolled = _write_run(tmp_path / "unrolled", UNROLLED_RUN)
    figures.main([deq, unrolled, "--out", str(tmp_path / "out")])  # --figure 2: both halves
    out = tmp_path / "out"
    assert (out / "figure2_iterations.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "figure2_residuals.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((out / "figure2_residuals.json").read_text())
    assert data["runs"]["deq"] == {"deq": {"step": [2, 3], "fwd_res": [2e-4, 4e-4],
                                           "bwd_res": [3e-5, 1e-5]}}
    # The shallow pretrain warm-up is not the deep weight-tied model: left out.
    assert data["runs"]["unrolled"] == {"unrolled": {"step": [2, 3], "layer_change": [0.05, 0.02]}}
    assert "checkpoint_unrolled" not in data


def test_runs_without_residuals_get_the_left_half_only(tmp_path):
    old = [{"event": "train", "step": 2, "mode": "deq", "fwd_iter": 5.5, "bwd_iter": 3.0}]
    run = _write_run(tmp_path / "old", old)
    figures.main([run, "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "figure2_iterations.json").exists()
    assert not (tmp_path / "out" / "figure2_residuals.json").exists()
    with pytest.raises(SystemExit, match="logged residuals"):
        figures.main([run, "--figure", "2right", "--out", str(tmp_path / "out")])


# -- Figures 3 and 4 on a tiny trained copy-memory model ---------------------------------------
@pytest.fixture(scope="module")
def copy_run(tmp_path_factory) -> str:
    """A finished ``--preset tiny`` copy-memory run (trains in seconds)."""
    from benchmarks import trained_copy

    run_dir = str(tmp_path_factory.mktemp("copy_run"))
    trained_copy.load(run_dir, quick=True)
    return run_dir


def test_figure2_right_adds_the_checkpoints_unrolled_point(tmp_path, copy_run):
    deq = _write_run(tmp_path / "deq", DEQ_RUN)
    figures.main([deq, "--figure", "2right", "--checkpoint", copy_run,
                  "--out", str(tmp_path / "out")])
    point = json.loads((tmp_path / "out" / "figure2_residuals.json").read_text())
    point = point["checkpoint_unrolled"]
    assert point["step"] == 24 and point["depth"] == 3  # the tiny preset: 24 steps, 3 layers
    assert 0 < point["layer_change"] < 1


def test_figure3_sweeps_the_inference_tolerance_and_iteration_limit(tmp_path, copy_run):
    from benchmarks import figure_data

    tols, limits = (1e-1, 1e-3, 1e-6), (1, 4, 30)
    data = figures.figure3(copy_run, str(tmp_path), tols, limits, sequences=32)
    assert (tmp_path / "figure3_inference.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "figure3_inference.json").read_text())["tol_sweep"] == \
        data["tol_sweep"]
    by_tol, by_iter = data["tol_sweep"], data["iter_sweep"]
    assert data["sequences"] == 32 and by_tol["tol"] == list(tols)
    # Tighter tolerances take more steps and reach their tolerance (every sample converges).
    assert by_tol["nstep"][0] < by_tol["nstep"][1] < by_tol["nstep"][2]
    assert all(r <= t for r, t in zip(by_tol["rel_residual"], tols))
    # Tolerance 1e-12 is out of reach: each solve runs to exactly its limit.
    assert by_iter["nstep"] == [1.0, 4.0, 30.0]
    assert by_iter["rel_residual"][0] > 10 * by_iter["rel_residual"][2]
    # Measured (tiny model): loss 0.9979 at 1e-1 and 0.9843 at 1e-6; a 1-step solve is worse.
    assert by_tol["loss"][2] < by_tol["loss"][0]
    assert by_iter["loss"][2] < by_iter["loss"][0]
    # The sweep leaves the model's own settings in place.
    trained = figure_data.copy_memory_model(copy_run, 4)
    before = trained["model"].core.modes
    figure_data.inference_sweep(trained["model"], trained["test_x"], trained["test_y"], [1e-2],
                                [2])
    assert trained["model"].core.modes == before


def test_figure4_relative_change_shrinks_with_depth(tmp_path, copy_run):
    data = figures.figure4(copy_run, str(tmp_path), depth=8, lm_lengths=(8, 32), batch=16)
    assert (tmp_path / "figure4_depth.png").read_bytes()[:4] == b"\x89PNG"
    assert data["layers"] == list(range(1, 8))
    copy_curves = data["copy_memory"]["by_length"]
    assert list(copy_curves) == ["21", "24", "28", "36"]  # delays 1, 4, 8, 16 around T = 4
    curves = list(copy_curves.values()) + list(data["tiny_lm"]["by_length"].values())
    assert all(len(c) == 7 and all(0 < v < 1 for v in c) for c in curves)
    # Both cells contract: measured 30x (tiny LM, 32 positions) to 200x over 7 layers.
    assert all(c[-1] < 0.1 * c[0] for c in curves)


def test_missing_checkpoint_and_missing_runs_are_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="no copy-memory checkpoint"):
        figures.main(["--figure", "3", "--checkpoint", str(tmp_path), "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        figures.main(["--figure", "2"])  # Figure 2 needs RUN_DIRs (argparse error, exit 2)
    with pytest.raises(SystemExit):
        figures.main([])


def test_a_restarted_runs_repeated_steps_count_once():
    from benchmarks.figures import residual_series

    first = [{"event": "train", "step": k, "mode": "unrolled", "layer_change": 1.0 / k}
             for k in (1, 2)]
    again = [{"event": "train", "step": k, "mode": "unrolled", "layer_change": 2.0 / k}
             for k in (1, 2, 3)]
    series = residual_series(first + again)["unrolled"]
    assert series["step"] == [1, 2, 3]
    assert series["layer_change"] == [2.0, 1.0, 2.0 / 3]
