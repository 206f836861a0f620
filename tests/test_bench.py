"""Smoke run of python -m deq_ext.bench: it runs, measures, and writes what it claims."""

from __future__ import annotations

import json
import math
from typing import Optional

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
    assert "deq_ext[graph]" not in solves  # CUDA only
    batch = results["config"]["batch"]
    for name, s in solves.items():
        assert s["converged"] == batch, name
        assert s["total_s"] >= s["f_s"] > 0, name
        # Per loop iteration: f calls less the one before the loop; the solver's own share.
        assert s["iterations"] == s["f_calls"] - 1, name
        assert s["solver_ms_per_iter"] == pytest.approx(s["solver_s"] / s["iterations"] * 1e3)
        assert s["total_ms_per_iter"] == pytest.approx(s["total_s"] / s["iterations"] * 1e3)
        # The bandwidth floor: the passes' bytes of this solve at the measured copy bandwidth.
        gbps = results["bandwidth"]["copy"]["gbps"]
        assert s["passes_bytes"] > 0 and s["floor_s"] == pytest.approx(s["passes_bytes"] / gbps / 1e9)
        assert s["floor_ms_per_iter"] == pytest.approx(s["floor_s"] / s["iterations"] * 1e3)
        assert s["solver_over_floor"] == pytest.approx(s["solver_s"] / s["floor_s"])
    # Amdahl: torchdeq's total over deq_ext's time in f, above the speedup actually reached.
    ratios = results["ratios"]
    assert ratios["amdahl_speedup_limit"] == pytest.approx(
        solves["torchdeq"]["total_s"] / solves["deq_ext"]["f_s"])
    assert ratios["amdahl_speedup_limit"] > ratios["total_speedup"]
    assert ratios["solver_over_floor"] == solves["deq_ext"]["solver_over_floor"]
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
    assert "targets" not in results  # the project's targets live in benchmarks/solver_bench.py
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
    report = capsys.readouterr().out
    assert "per loop iteration" in report and "Amdahl limit" in report
    assert "targets" not in report and "PASS" not in report


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


def test_busy_machine_is_detected():
    from deq_ext.bench.env import core_count, machine_busy

    cores = core_count()
    assert machine_busy([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], threads=1) is None
    assert "before the run" in machine_busy([cores * 0.9, 0, 0], [0.0, 0, 0], threads=1)
    assert "after the run" in machine_busy([0.0, 0, 0], [cores * 2.0, 0, 0], threads=1)


def test_passes_bytes_counts_each_sample_at_its_ring_fill():
    """Sample b's step i moves elem * D * (4 min(i - 1, m) + 11) bytes; the sum over its steps."""
    from deq_ext.bench import fused_bytes, passes_bytes
    from deq_ext.bench.config import BandwidthSizes

    def brute(n: int, m: int) -> int:
        return sum(4 * 10 * (4 * min(i - 1, m) + 11) for i in range(1, n + 1))

    for m in (1, 5, 60):
        steps = torch.tensor([0, 1, 4, 5, 6, 40, 61])
        assert passes_bytes(steps, 10, m, 4) == sum(brute(int(n), m) for n in steps)
    # A step at a full ring is what the bandwidth section's formula counts for one sample.
    full = passes_bytes(torch.tensor([9]), 10, 3, 4) - passes_bytes(torch.tensor([8]), 10, 3, 4)
    assert full == fused_bytes(BandwidthSizes(batch=1, dim=10, m=3, copy_mib=1, reps=1), 4)


def test_an_optional_row_the_solver_rejects_is_skipped_with_a_note(caplog):
    """The graph row (CUDA only) is dropped with a logged note while the solvers do not know
    the option (a TypeError) or not for these settings (a ValueError); a TypeError of any other
    row still fails the run."""
    import logging

    from deq_ext.bench.solves import SOLVER_EXT, SOLVER_GRAPH, bench_solvers, select_solvers

    cfg = resolve_config(build_parser().parse_args(
        ["--quick", "--device", "cpu", "--no-torchdeq", "--no-reference"]))
    problem = Problem(cfg)
    assert SOLVER_GRAPH not in select_solvers(cfg)
    assert SOLVER_GRAPH in select_solvers(cfg, graph=True)

    def rejects(*args):
        raise TypeError("broyden() got unexpected keyword argument(s) ['graph']")

    ext = select_solvers(cfg)[SOLVER_EXT]
    skipped: dict[str, str] = {}
    logging.getLogger("deq_ext.bench").addHandler(caplog.handler)
    try:
        solves = bench_solvers(cfg, problem, {SOLVER_EXT: ext, SOLVER_GRAPH: rejects}, skipped)
    finally:
        logging.getLogger("deq_ext.bench").removeHandler(caplog.handler)
    assert set(solves) == {SOLVER_EXT} and "graph" in skipped[SOLVER_GRAPH]
    assert any("skipping deq_ext[graph]" in r.getMessage() for r in caplog.records)
    with pytest.raises(TypeError):
        bench_solvers(cfg, problem, {SOLVER_EXT: rejects})

    def unsupported(*args):  # a combination the option does not support yet
        raise ValueError("graph=True needs stop_early=False")

    skipped.clear()
    solves = bench_solvers(cfg, problem, {SOLVER_EXT: ext, SOLVER_GRAPH: unsupported}, skipped)
    assert set(solves) == {SOLVER_EXT} and "stop_early" in skipped[SOLVER_GRAPH]


def test_an_untimed_row_reports_its_total_and_no_f_figures():
    """The graph row's f is not timed (a replay does not call it): total, steps and outcome only."""
    from deq_ext.bench.solves import SOLVER_EXT, select_solvers, solve_once

    cfg = resolve_config(build_parser().parse_args(
        ["--quick", "--device", "cpu", "--no-torchdeq", "--no-reference"]))
    problem = Problem(cfg)
    fig = solve_once(select_solvers(cfg)[SOLVER_EXT], problem, cfg, time_f=False)
    assert fig["total_s"] > 0 and fig["converged"] == cfg.batch and fig["passes_bytes"] > 0
    assert all(fig[k] is None for k in ("f_s", "solver_s", "f_calls", "f_rows", "iterations"))


def test_cpu_bandwidth_history_does_not_fit_in_the_cache():
    from deq_ext.bench.env import last_level_cache_bytes

    cfg = resolve_config(build_parser().parse_args(["--device", "cpu"]))
    history = 2 * cfg.bw.batch * cfg.bw.m * cfg.bw.dim * 4
    assert history >= 2 * last_level_cache_bytes()
    assert cfg.bw.copy_mib * 2**20 >= history  # the copy moves as much as the history holds


def test_masked_samples_cost_the_fused_passes_nothing():
    """1 of 8 samples active: the passes take about 1/8 of the time (measured 0.11-0.18 on the
    2-core CPU machine); 0.5 leaves room for noise but not for passes that touch every sample.
    On one thread: with two, a busy machine slows the 8-sample pass (split over both cores) and
    not the 1-sample one (one core), which moved the ratio above 0.9 in a loaded CI run."""
    from deq_ext.bench.bandwidth import fused_passes_time
    from deq_ext.bench.config import BandwidthSizes

    cfg = resolve_config(build_parser().parse_args(["--quick", "--device", "cpu"]))
    sizes = BandwidthSizes(batch=8, dim=8192, m=8, copy_mib=1, reps=9)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one, all_ = fused_passes_time(cfg, sizes, active=1), fused_passes_time(cfg, sizes)
    finally:
        torch.set_num_threads(threads)
    assert one < 0.5 * all_, (one, all_)


def test_cuda_f_timer_records_events_and_never_waits_inside_the_solve(monkeypatch):
    """On CUDA, f is timed by a pair of events per call, read after the solve: no call of f
    synchronizes (a host clock would need a blocking wait before and after each call)."""
    from deq_ext.bench import TimedF

    waits: list[str] = []
    clock = iter(range(0, 1000, 5))  # each record 5 ms after the one before

    class FakeEvent:
        def __init__(self, enable_timing: bool = False) -> None:
            assert enable_timing
            self.t: Optional[int] = None

        def record(self) -> None:
            self.t = next(clock)

        def synchronize(self) -> None:
            waits.append("event")

        def elapsed_time(self, end: "FakeEvent") -> float:
            return float(end.t - self.t)

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: waits.append("device"))
    timed = TimedF(lambda z, s: z * s, torch.device("cuda"))
    assert timed.clock == "events"
    for rows in (4, 3, 1):
        timed(torch.ones(rows, 2), torch.ones(rows, 1))
    assert waits == [] and (timed.calls, timed.rows) == (3, 8)
    assert timed.seconds == pytest.approx(3 * 5e-3)  # start -> end of each call, summed
    assert waits == ["event"]  # reading the total waits once, for the last event
    with pytest.raises(ValueError, match="CUDA"):
        TimedF(lambda z: z, torch.device("cpu"), clock="events")
    untimed = TimedF(lambda z: z, torch.device("cpu"), clock="none")
    untimed(torch.ones(2, 2))
    assert untimed.calls == 1 and math.isnan(untimed.seconds)
