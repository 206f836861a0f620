"""Smoke run of python -m deq_ext.bench: it runs, measures, and writes what it claims."""

from __future__ import annotations

import json

import pytest
import torch

import deq_ext
from deq_ext import bench
from deq_ext.bench.config import build_parser, resolve_config
from deq_ext.bench.problem import Problem


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
    # Fewer device reads change no result: the same steps, more f calls (never fewer).
    for name in ("deq_ext[check_every=4]", "deq_ext[no sync]"):
        assert solves[name]["nstep_mean"] == solves["deq_ext"]["nstep_mean"], name
        assert solves[name]["f_calls"] >= solves["deq_ext"]["f_calls"], name
    assert solves["deq_ext[no sync]"]["f_calls"] == results["config"]["max_iter"] + 1
    assert results["ratios"]["no_sync_speedup"] == pytest.approx(
        solves["deq_ext"]["total_s"] / solves["deq_ext[no sync]"]["total_s"])
    names = {t["name"] for t in results["targets"]}
    assert {"solver_overhead_ratio", "total_speedup", "compaction_rows_saved"} <= names
    # Time per iteration against the active fraction: one point per active count, and masked
    # samples make the compiled passes no slower (they skip converged samples).
    section = results["active_fraction"]
    counts = [p["active"] for p in section["points"]]
    assert counts == sorted(set(counts)) and counts[-1] == section["sizes"]["batch"]
    for p in section["points"]:
        assert p["deq_ext_passes_ms"] > 0
        assert p["reference_passes_ms"] > 0 and p["torchdeq_iteration_ms"] > 0
    pytest.importorskip("matplotlib")
    png = out.with_suffix(".png")
    assert results["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(out.read_text())
    assert saved["command"].startswith("python -m deq_ext.bench --quick")
    assert saved["device"] and saved["versions"]["torch"]
    assert "targets" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["mlp", "block"])
def test_problem_rates_follow_rho(kind):
    """The weights are orthogonal, so sample b's rate tracks rho_b: iterations grow with rho and
    the slowest sample takes well over twice the fastest one's (the spread compaction exploits)."""
    cfg = resolve_config(build_parser().parse_args(
        ["--device", "cpu", "--dtype", "float64", "--batch", "6", "--dim", "512", "--max-iter", "60",
         "--problem", kind, "--width", "64", "--hidden", "256"]))
    problem = Problem(cfg)
    if kind == "block":
        eye = torch.eye(problem.block, dtype=torch.float64)
        torch.testing.assert_close(problem.W @ problem.W.T, eye, atol=1e-12, rtol=0)
    else:
        # W1 has orthonormal rows and W1 @ W2 is orthogonal: f's linearisation at 0 is rho_b Q.
        eye = torch.eye(problem.width, dtype=torch.float64)
        torch.testing.assert_close(problem.W1 @ problem.W1.T, eye, atol=1e-12, rtol=0)
        q = problem.W1 @ problem.W2
        torch.testing.assert_close(q @ q.T, eye, atol=1e-12, rtol=0)
        assert problem.describe()["hidden"] == 256
    res = deq_ext.solve(problem.f, problem.z0, inputs=(problem.x, problem.rho), max_iter=cfg.max_iter,
                        tol=cfg.tol, stop_mode="abs", memory=cfg.memory)
    steps = res.nstep.tolist()
    assert (problem.residual(res.z) < cfg.tol).all()
    assert steps == sorted(steps) and steps[-1] >= 2.5 * steps[0], steps


def test_each_solver_reports_its_median_round_whole():
    """Every figure of a row comes from one round (the median by total time), not a per-field
    median mixing rounds, and the ratio spreads are taken round by round."""
    from deq_ext.bench.env import median_index, spread
    from deq_ext.bench.solves import SOLVER_EXT, SOLVER_TD, ratio_spreads

    def runs(rounds):
        return {"runs": [{"total_s": t, "f_s": f, "solver_s": t - f} for t, f in rounds]}

    ext = [(3.0, 1.0), (1.0, 0.9), (2.0, 0.1)]
    i = median_index([t for t, _ in ext])
    assert ext[i] == (2.0, 0.1)  # its f_s 0.1, not the per-field median 0.9
    assert median_index([1.0, 4.0, 3.0, 2.0]) == 3  # the lower median of an even count
    sp = ratio_spreads({SOLVER_EXT: runs(ext), SOLVER_TD: runs([(6.0, 0.5), (4.0, 0.5), (5.0, 0.5)])})
    assert sp["total_speedup"] == spread([2.0, 4.0, 2.5])


def test_busy_machine_gets_figures_but_no_verdict():
    from deq_ext.bench.env import core_count, machine_busy
    from deq_ext.bench.report import check_targets

    cores = core_count()
    assert machine_busy([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], threads=1) is None
    assert "before the run" in machine_busy([cores * 0.9, 0, 0], [0.0, 0, 0], threads=1)
    assert "after the run" in machine_busy([0.0, 0, 0], [cores * 2.0, 0, 0], threads=1)
    ratios = {"solver_overhead_ratio": 0.1, "total_speedup": 3.0, "compaction_rows_saved": 0.5}
    quiet = check_targets(ratios, None, torch.device("cpu"))
    busy = check_targets(ratios, None, torch.device("cpu"), busy=True)
    assert [t["passed"] for t in quiet if t["applies"]] == [True, True, True]
    assert all(t["passed"] is None for t in busy)
    assert [t["value"] for t in busy] == [t["value"] for t in quiet]


def test_cpu_bandwidth_history_does_not_fit_in_the_cache():
    from deq_ext.bench.env import last_level_cache_bytes

    cfg = resolve_config(build_parser().parse_args(["--device", "cpu"]))
    history = 2 * cfg.bw.batch * cfg.bw.m * cfg.bw.dim * 4
    assert history >= 2 * last_level_cache_bytes()
    assert cfg.bw.copy_mib * 2**20 >= history  # the copy moves as much as the history holds


def test_masked_samples_cost_the_fused_passes_nothing():
    """1 of 8 samples active: the passes take about 1/8 of the time (measured 0.11-0.18 on the
    2-core CPU machine); 0.5 leaves room for noise but not for passes that touch every sample."""
    from deq_ext.bench.bandwidth import fused_passes_time
    from deq_ext.bench.config import BandwidthSizes

    cfg = resolve_config(build_parser().parse_args(["--quick", "--device", "cpu"]))
    sizes = BandwidthSizes(batch=8, dim=8192, m=8, copy_mib=1, reps=9)
    assert fused_passes_time(cfg, sizes, active=1) < 0.5 * fused_passes_time(cfg, sizes)
