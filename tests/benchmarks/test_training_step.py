"""benchmarks.training_step: a --quick run, its rows and ratios, and the two sides' gradients.

The smoke run checks that every recorded figure is consistent with the others (rows against
iterations, ratios against the times they come from), not the figures themselves. The gradient
test holds both DEQ layers to the same answer where both solves are converged tightly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import step_workloads as sw
from benchmarks import training_step as ts
from benchmarks.summary import summarize
from deq_ext.bench import median_index

pytestmark = pytest.mark.usefixtures("compiled")


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("training_step") / "step.json"
    copy_dir = tmp_path_factory.mktemp("copy_memory_run")  # trains the tiny copy model there
    ts.main(["--quick", "--device", "cpu", "--reps", "2", "--out", str(out),
             "--copy-dir", str(copy_dir)])
    return json.loads(out.read_text()), out


def test_quick_run_records_provenance_and_every_workload(quick):
    res, out = quick
    assert res["command"].startswith("python -m benchmarks.training_step --quick")
    assert res["versions"]["torch"] == torch.__version__ and res["versions"]["torchdeq"]
    assert res["versions"]["deq_ext_build"]["loaded"]
    assert res["load_average_start"] is not None and res["load_average_end"] is not None
    assert "busy" in res and res["reps"] == 2
    assert list(res["workloads"]) == list(sw.WORKLOADS)
    assert out.with_suffix(".png").stat().st_size > 0  # matplotlib is a bench requirement
    for name, w in res["workloads"].items():
        assert w["torchdeq_config"]["ift"] is True and w["torchdeq_config"]["f_solver"] == "broyden"
        assert w["torchdeq_config"]["f_tol"] == w["settings"]["forward"]["tol"]
        assert w["torchdeq_config"]["b_max_iter"] == w["settings"]["backward"]["max_iter"]
        for side in ts.SIDES:
            times = w["times_s"][side]
            assert len(times) == 2 and all(t > 0 for t in times)
            assert w["median_s"][side] == times[median_index(times)]
        assert w["ratio_torchdeq_over_deq_ext"] == pytest.approx(
            w["median_s"]["torchdeq"] / w["median_s"]["deq_ext"])
        per_repeat = [a / b for a, b in zip(w["times_s"]["torchdeq"], w["times_s"]["deq_ext"])]
        assert w["ratio_spread"]["min"] == pytest.approx(min(per_repeat))
        assert w["ratio_spread"]["max"] == pytest.approx(max(per_repeat))
        assert ("target" in w) == (name in ts.TARGETS)
        assert math.isfinite(w["grad_rel_diff"]) and w["grad_rel_diff"] < 0.05, name


def test_rows_per_step_follow_the_iterations(quick):
    res, _ = quick
    for name, w in res["workloads"].items():
        B, de, td = w["batch"], w["per_step"]["deq_ext"], w["per_step"]["torchdeq"]
        for st in (de, td):
            assert st["f_rows"] == st["f_rows_forward"] + st["f_rows_backward"]
        # torchdeq: the whole batch at every forward step (+1 first evaluation), z* recorded
        # once in the forward and once more in its backward; a VJP over the batch per adjoint
        # step (+1 at y = 0) and the final backward to the parameters.
        fwd, bwd = td["forward_iterations"]["max"], td["backward_iterations"]["max"]
        assert td["f_rows"] == B * (fwd + 1) + 2 * B, name
        assert td["vjp_rows"] == B * (bwd + 2), name
        # deq_ext: its own count of the adjoint's VJP rows, plus the final backward.
        assert de["vjp_rows"] == de["backward_stats_vjp_rows"] + B, name
        assert de["f_rows_backward"] == de["backward_stats_rerecord_rows"], name
        assert de["forward_iterations"]["max"] <= w["settings"]["forward"]["max_iter"]
        assert de["f_rows"] <= td["f_rows"], name
        assert w["rows_ratio_torchdeq_over_deq_ext"]["f_rows"] == pytest.approx(
            td["f_rows"] / de["f_rows"])
    # The heterogeneous batch: samples stop at different steps on deq_ext's side.
    mlp = res["workloads"]["hetero_mlp"]["per_step"]["deq_ext"]["forward_iterations"]
    assert mlp["min"] < mlp["max"]


def test_summary_prints_the_headline_lines(quick):
    _, out = quick
    text, _ = summarize([str(out)])
    assert "(training step;" in text
    for name in sw.WORKLOADS:
        assert f"{name} training step, torchdeq / deq_ext" in text
        assert f"{name} f rows per step, torchdeq / deq_ext" in text
    line = next(ln for ln in text.splitlines() if "hetero_mlp training step" in ln)
    assert ">= 2" in line


def test_both_layers_give_the_same_gradients_when_converged():
    sizes = sw.MLPSizes(batch=6, dim=64, width=16, hidden=32, max_iter=150, forward_tol=1e-12,
                        backward_tol=1e-12)
    w = sw.hetero_mlp(sizes, torch.device("cpu"), seed=3, dtype=torch.float64)
    bench = ts.Bench(w)
    grads = {side: bench.gradients(side) for side in ts.SIDES}
    assert set(grads["deq_ext"]) == {"W1", "W2"}
    for name, g in grads["deq_ext"].items():
        assert float(g.abs().max()) > 1e-3, name  # a real gradient, not an empty one
        torch.testing.assert_close(grads["torchdeq"][name], g, rtol=1e-8, atol=1e-10, msg=name)
    rec = bench.record("deq_ext")
    assert rec["forward_residual"]["abs_max"] <= 1e-12
    assert rec["forward_iterations"]["min"] < rec["forward_iterations"]["max"]


def test_the_cell_is_the_bench_problem():
    sizes = sw.MLP_SIZES["quick"]
    problem = sw.mlp_problem(sizes, torch.device("cpu"), torch.float64, seed=1)
    cell = sw.MLPCell(problem)
    z = torch.randn(sizes.batch, sizes.dim, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(cell(z, problem.x, problem.rho),
                                   problem.f(z, problem.x, problem.rho), rtol=0, atol=1e-14)


@pytest.mark.parametrize("argv, message", [
    (["--workloads", "hetero_mlp", "nope"], "unknown workload"),
    (["--reps", "0"], "--reps must be >= 1"),
])
def test_bad_command_lines_are_rejected(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        ts.main(["--quick", *argv])
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_workload_name_in_the_api():
    with pytest.raises(ValueError, match="unknown workload 'nope'"):
        sw.build("nope", torch.device("cpu"), quick=True)
