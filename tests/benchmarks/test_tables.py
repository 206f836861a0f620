"""Smoke tests of the memory and runtime table scripts (``--quick``: tiny presets and sizes).

They check that each script runs end to end, writes JSON with provenance, and that its figures are
consistent with each other (orderings that must hold, ratios equal to the quotients of the
recorded numbers), not the figures themselves.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import memory_table, runtime_table
from benchmarks import model_setup as ms
from benchmarks.peak_memory import PeakTracker, peak_bytes
from deq_ext.layer import DEFAULT_MEMORY
from models import get_preset
from tests.models.helpers import saved_bytes as saved_bytes_by_pointer


@pytest.fixture(scope="module")
def memory_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("memory") / "memory.json"
    memory_table.main(["--quick", "--device", "cpu", "--out", str(out)])
    return json.loads(Path(out).read_text())


@pytest.fixture(scope="module")
def runtime_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("runtime") / "runtime.json"
    copy_dir = tmp_path_factory.mktemp("copy_memory_run")
    runtime_table.main(["--quick", "--device", "cpu", "--out", str(out),
                        "--copy-dir", str(copy_dir)])
    return json.loads(Path(out).read_text())


def check_provenance(results: dict, module: str) -> None:
    assert results["command"].startswith(f"python -m benchmarks.{module} --quick")
    assert results["device"] and results["versions"]["torch"] == torch.__version__
    assert results["versions"]["deq_ext_build"]["loaded"]


# -- memory table --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["transformer", "trellisnet"])
def test_meta_and_real_runs_give_the_same_peak_and_saved_bytes(kind):
    preset = ms.QUICK_PRESETS[kind]
    real, meta = memory_table.build_pair(preset, 8, None, torch.device("cpu"), seed=0)
    for ckpt in (False, True):
        counts = [memory_table.cpu_row(c, c, 2, 8, "unrolled", 3, ckpt) for c in (real, meta)]
        assert counts[0] == counts[1], ckpt
        # (saved bytes count the parameters autograd saves, which the peak leaves out)
        assert counts[0]["peak_bytes"] > 0 and counts[0]["saved_bytes"] > 0
    # The storage-keyed count agrees with the pointer-keyed one of the model tests.
    x, memory, w = memory_table.inputs_for(real, 2, 8)
    ms.set_mode(real, "unrolled", 3)
    fn = lambda: ms.core_loss(real, x, memory, w)  # noqa: E731
    assert memory_table.saved_bytes(fn) == saved_bytes_by_pointer(fn)


def test_peak_tracker_counts_new_storages_once_and_frees_them():
    before = torch.randn(1000)  # existed before: not counted

    def step() -> None:
        a = torch.empty(1000, dtype=torch.float64)  # 8000 bytes
        b = torch.empty(500)                        # +2000 = 10000: the peak
        before.add_(1)                              # in place on an old tensor: nothing new
        before[:10].mul_(2)                         # a view of it: nothing new
        b.add_(1)                                   # in place on a new tensor: nothing new
        del a                                       # back to 2000
        torch.empty(250)                            # 2000 + 1000, below the peak

    assert peak_bytes(step) == 10000


def test_peak_tracker_sees_the_solver_workspace():
    """A DEQ step's peak holds Broyden's history: U and V, (B, m, D) each (bfloat16 by
    default), which the history label finds among the storages live at the peak."""
    import deq_ext

    B, D, m = 3, 50, 7
    lin = torch.nn.Linear(D, D)
    with torch.no_grad():
        lin.weight.mul_(0.3)
    x = torch.randn(B, D)
    deq = deq_ext.DEQ(lambda z, x: torch.tanh(lin(z)) + x,
                      forward=dict(max_iter=20, memory=m, tol=1e-6),
                      backward=dict(max_iter=20, memory=m, tol=1e-6))
    with PeakTracker(memory_table.history_label(B, D)) as tracker:
        deq(x, z0=torch.zeros(B, D)).sum().backward()
    assert tracker.peak >= 2 * B * m * D * 2 + 4 * B * D * 4
    assert tracker.peak_labelled["history"] == 2 * B * m * D * 2


def test_memory_table_runs_and_is_consistent(memory_results):
    res = memory_results
    check_provenance(res, "memory_table")
    assert all(check["equal"] for check in res["meta_check"].values())
    for kind, model in res["models"].items():
        rows = model["rows"]
        deq, converged = rows[0], rows[1]
        assert deq["row"] == "deq" and converged["row"] == "deq_converged"
        assert deq["peak_bytes"] > 0
        # The DEQ's peak holds at least its larger solve's workspace (history as a full ring:
        # its solves run to the limit), and the history is part of it.
        assert deq["peak_bytes"] >= model["solver_workspace"]["peak_bytes"]
        assert 0 < deq["history_bytes"] <= deq["peak_bytes"]
        # A solve that stops earlier holds no more chunks (fewer where its steps end in an
        # earlier chunk than the ring's last).
        assert converged["history_bytes"] <= deq["history_bytes"]
        steps = res["sizes"]["converged_steps"]
        assert converged["solves"]["forward_nstep"]["max"] == steps[0]
        assert converged["solves"]["backward_nstep"]["max"] <= steps[1]
        assert deq["solves"]["forward_nstep"]["min"] > steps[0]
        assert converged["peak_bytes"] <= deq["peak_bytes"]
        for r in (deq, converged):
            assert r["history_share"] == pytest.approx(r["history_bytes"] / r["peak_bytes"])
        unrolled = {r["depth"]: r for r in rows if r["row"] == "unrolled"}
        ckpt = {r["depth"]: r for r in rows if r["row"] == "checkpointed"}
        assert unrolled.keys() == ckpt.keys() == set(res["sizes"]["depths"][kind])
        depths = sorted(unrolled)
        for key in ("peak_bytes", "saved_bytes"):
            assert [unrolled[L][key] for L in depths] == sorted(r[key] for r in unrolled.values())
        for L in depths:
            assert ckpt[L]["saved_bytes"] < unrolled[L]["saved_bytes"]
            assert ckpt[L]["peak_bytes"] <= unrolled[L]["peak_bytes"]
        for r in rows:
            assert r["deq_share"] == pytest.approx(deq["peak_bytes"] / r["peak_bytes"])
            assert r["deq_converged_share"] == pytest.approx(
                converged["peak_bytes"] / r["peak_bytes"])
            assert r["deq_share_saved"] == pytest.approx(deq["saved_bytes"] / r["saved_bytes"])
        depth = res["sizes"]["target_depth"][kind]
        assert depth == memory_table.TARGET_DEPTH[kind]
        for name, limit in (("unrolled", memory_table.TARGET_SHARE),
                            ("checkpointed", memory_table.TARGET_CHECKPOINTED)):
            t, deep = model["targets"][name], (unrolled if name == "unrolled" else ckpt)[depth]
            assert t["depth"] == depth and t["limit"] == limit
            assert t["share"] == pytest.approx(deq["peak_bytes"] / deep["peak_bytes"])
            assert t["pass"] == (t["share"] <= limit)


def test_memory_table_max_iter_part(memory_results):
    """max_iter 200 against 20 on a solve that converges in fewer steps: the same steps, and
    ratios that are the quotients of the recorded peaks, judged against 1.5x."""
    mi = memory_results["max_iter"]
    hi, lo = (mi["max_iter"][str(m)] for m in memory_table.MAX_ITERS)
    assert mi["same_steps"] and hi["solve_converged"] and lo["solve_converged"]
    assert hi["solve_steps_max"] < memory_table.MAX_ITERS[1]
    for what in ("solve", "step"):
        r = hi[f"{what}_peak_bytes"] / lo[f"{what}_peak_bytes"]
        assert mi[f"{what}_ratio"] == pytest.approx(r)
        assert mi[f"{what}_target"]["pass"] == (r <= memory_table.TARGET_MAX_ITER_RATIO)
    # The training step's solves use the layer's bounded ring: max_iter changes nothing.
    assert hi["step_peak_bytes"] == lo["step_peak_bytes"]


@pytest.mark.parametrize("kind", ["transformer", "trellisnet"])
def test_solver_workspace_follows_the_broyden_state_shapes(memory_results, kind):
    ws = memory_results["models"][kind]["solver_workspace"]
    sizes = memory_results["sizes"]
    for name in ("forward", "backward"):
        part = ws[name]
        B, m, D = part["B"], part["history_m"], part["D"]
        history = 2 * B * m * D * 2  # U and V, bfloat16 (the default under a float32 state)
        assert part["history_bytes"] == history
        # Plus a handful of (B, D) vectors and the small per-sample ones.
        small = 64 * B * (m + 16)  # (B,) vectors, projections (B, 3, m), scalars
        assert history + 5 * B * D * 4 <= part["bytes"] <= history + 8 * B * D * 4 + small
        assert part["history_m"] == min(DEFAULT_MEMORY[name], part["max_iter"])
        assert B == sizes["batch"]
    assert ws["peak_bytes"] == max(ws["forward"]["bytes"], ws["backward"]["bytes"])


# -- runtime table -------------------------------------------------------------------------------
def test_runtime_table_runs_and_is_consistent(runtime_results):
    res = runtime_results
    check_provenance(res, "runtime_table")
    assert "paper" in res["settings"] and "random" in res["weights"]
    assert set(res["models"]) == {"transformer", "trellisnet", runtime_table.COPY}
    for kind, model in res["models"].items():
        med = model["median_s"]
        assert set(model["times_s"]) == set(runtime_table.VARIANTS), kind
        for variant, phases in model["times_s"].items():
            for phase, times in phases.items():
                assert len(times) == res["sizes"]["reps"] and min(times) > 0, (kind, variant)
                assert med[variant][phase] == sorted(times)[(len(times) - 1) // 2]
        r = model["ratios"]
        for phase in ("train", "infer"):
            assert r[f"deq_over_deep_{phase}"] == pytest.approx(
                med["deq"][phase] / med["deep"][phase])
            assert r[f"no_compact_over_deq_{phase}"] == pytest.approx(
                med["deq_no_compact"][phase] / med["deq"][phase])
            t = model["targets"][phase]
            assert t["pass"] in (None, t["ratio"] <= runtime_table.TARGETS[phase])
            assert (t["pass"] is None) == (res["busy"] is not None)
            assert r[f"torchdeq_over_deq_{phase}"] == pytest.approx(
                med["deq_torchdeq"][phase] / med["deq"][phase])
        inst = model["instrumented"]
        for variant, phases in inst.items():
            for phase, run in phases.items():
                # f's share is what the instrumented f evaluations, attachments and VJPs took.
                f_s = run["f_eval_s"] + run["f_attach_s"] + run["f_vjp_s"]
                assert run["f_share"] == pytest.approx(f_s / run["total_s"])
                assert 0 < run["f_share"] < 1
                assert 0 < run["f_eval_s"] <= run["total_s"]
                assert run["f_rows"] <= run["f_rows_full_batch"]
                fwd = run["forward_nstep"]
                assert 1 <= fwd["mean"] <= fwd["max"]
                # One evaluation at z0, one per step (by the slowest sample).
                assert run["f_evals"] == fwd["max"] + 1
                assert (run["vjps"] > 0) == (phase == "train") == ("backward_nstep" in run)
            if variant != "deq":
                assert all(p["f_rows"] == p["f_rows_full_batch"] for p in phases.values())
        for phase in ("train", "infer"):
            saved = model["compaction_rows_saved"][phase]
            assert saved == pytest.approx(
                1 - inst["deq"][phase]["f_rows"] / inst["deq_no_compact"][phase]["f_rows"])
            # One solve per pass: with compaction f sees each sample once per evaluation
            # (nstep + 1), without it the whole batch as often as the slowest sample needs.
            fwd = inst["deq"][phase]["forward_nstep"]
            assert saved == pytest.approx(1 - (fwd["mean"] + 1) / (fwd["max"] + 1))
    # The trained model's row says how it was trained and how its solves ended (the 24-step
    # tiny run of --quick need not converge; the recorded full run's figures say whether it does).
    copy = res["models"][runtime_table.COPY]
    assert copy["weights"].startswith("trained") and copy["train_command"].startswith(
        "python -m train.copy_memory")
    for phase in ("train", "infer"):
        fwd = copy["instrumented"]["deq"][phase]["forward_nstep"]
        assert sum(fwd["status"].values()) == 4  # --copy-batch default of --quick


def test_torchdeq_solver_in_the_layer_solves_the_same_equation():
    pytest.importorskip("torchdeq")
    import deq_ext
    from benchmarks import torchdeq_solver

    method = torchdeq_solver.register()
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(12, 12, generator=gen, dtype=torch.float64) * 0.1
    x = torch.randn(5, 12, generator=gen, dtype=torch.float64)

    def f(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ W) + x

    res = deq_ext.solve(f, torch.zeros_like(x), method=method, inputs=(x,), max_iter=40,
                        tol=1e-10, stop_mode="abs")
    ref = deq_ext.solve(f, torch.zeros_like(x), inputs=(x,), max_iter=40, tol=1e-10,
                        stop_mode="abs")
    assert bool(res.converged.all())
    torch.testing.assert_close(res.z, ref.z, rtol=0, atol=1e-9)
    assert int(res.nfev[0]) == int(res.nstep[0]) + 1
    with pytest.raises(TypeError, match="does not implement"):
        deq_ext.solve(f, torch.zeros_like(x), method=method, inputs=(x,), line_search=True)


# -- shared setup ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["transformer", "trellisnet"])
def test_solver_variants_solve_the_same_equation(kind):
    core = ms.make_core(ms.QUICK_PRESETS[kind], seq=6).eval()
    base = core.modes
    x = ms.random_inputs(core, 3, 6, "cpu")
    memory = ms.steady_memory(core, 3, "cpu")
    with torch.no_grad():
        expected = core(x, memory).features
        for variant, options in ms.VARIANT_OPTIONS.items():
            core.set_mode("deq", **ms.with_solver_options(base, options))
            assert core.modes.forward.options == options
            got = core(x, memory).features
            if options.get("per_sample", True):  # masking and compaction change nothing
                torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=variant)
            else:  # the batch iterates on together: at least as converged
                torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3, msg=variant)


def test_paper_tolerances_follow_sqrt_T():
    for name in ms.PRESETS.values():
        preset = get_preset(name)
        same = ms.paper_modes(name, preset.seq_len)
        assert same.forward == preset.config.modes.forward
        longer = ms.paper_modes(name, 4 * preset.seq_len)
        for field in ("forward", "backward", "eval_forward"):
            base = getattr(preset.config.modes, field)
            got = getattr(longer, field)
            assert got.tol == pytest.approx(2 * base.tol) and got.max_iter == base.max_iter
    assert math.isclose(ms.paper_modes("deq_transformer_small", 150).forward.tol,
                        math.sqrt(150) * 1e-5)
