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


def test_problem_rates_follow_rho():
    """W is orthogonal, so sample b's rate tracks rho_b: iterations grow with rho and the
    slowest sample takes well over twice the fastest one's (the spread compaction exploits)."""
    cfg = resolve_config(build_parser().parse_args(
        ["--device", "cpu", "--dtype", "float64", "--batch", "6", "--dim", "512", "--max-iter", "60"]))
    problem = Problem(cfg)
    eye = torch.eye(problem.block, dtype=torch.float64)
    torch.testing.assert_close(problem.W @ problem.W.T, eye, atol=1e-12, rtol=0)
    res = deq_ext.solve(problem.f, problem.z0, inputs=(problem.x, problem.rho), max_iter=cfg.max_iter,
                        tol=cfg.tol, stop_mode="abs", memory=cfg.memory)
    steps = res.nstep.tolist()
    assert (problem.residual(res.z) < cfg.tol).all()
    assert steps == sorted(steps) and steps[-1] >= 2.5 * steps[0], steps


def test_masked_samples_cost_the_fused_passes_nothing():
    """1 of 8 samples active: the passes take about 1/8 of the time (measured 0.11-0.18 on the
    2-core CPU machine); 0.5 leaves room for noise but not for passes that touch every sample."""
    from deq_ext.bench.bandwidth import fused_passes_time
    from deq_ext.bench.config import BandwidthSizes

    cfg = resolve_config(build_parser().parse_args(["--quick", "--device", "cpu"]))
    sizes = BandwidthSizes(batch=8, dim=8192, m=8, copy_mib=1, reps=9)
    assert fused_passes_time(cfg, sizes, active=1) < 0.5 * fused_passes_time(cfg, sizes)
