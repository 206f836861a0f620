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
    runtime_table.main(["--quick", "--device", "cpu", "--out", str(out)])
    return json.loads(Path(out).read_text())


def check_provenance(results: dict, module: str) -> None:
    assert results["command"].startswith(f"python -m benchmarks.{module} --quick")
    assert results["device"] and results["versions"]["torch"] == torch.__version__
    assert results["versions"]["deq_ext_build"]["loaded"]


# -- memory table --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["transformer", "trellisnet"])
def test_meta_and_real_runs_save_the_same_bytes(kind):
    preset = ms.QUICK_PRESETS[kind]
    real, meta = memory_table.build_pair(preset, 8, None, torch.device("cpu"), seed=0)
    for ckpt in (False, True):
        counts = [memory_table.cpu_row_bytes(c, c, 2, 8, "unrolled", 3, ckpt) for c in (real, meta)]
        assert counts[0] == counts[1] > 0
    # The storage-keyed count agrees with the pointer-keyed one of the model tests.
    x, memory, w = memory_table.inputs_for(real, 2, 8)
    ms.set_mode(real, "unrolled", 3)
    fn = lambda: ms.core_loss(real, x, memory, w)  # noqa: E731
    assert memory_table.saved_bytes(fn) == saved_bytes_by_pointer(fn)


def test_memory_table_runs_and_is_consistent(memory_results):
    res = memory_results
    check_provenance(res, "memory_table")
    assert all(check["equal"] for check in res["meta_check"].values())
    for kind, model in res["models"].items():
        rows = model["rows"]
        deq = rows[0]
        assert deq["row"] == "deq" and deq["bytes"] > 0
        assert deq["bytes"] < model["reference"]["unrolled_2"], kind
        unrolled = {r["depth"]: r["bytes"] for r in rows if r["row"] == "unrolled"}
        ckpt = {r["depth"]: r["bytes"] for r in rows if r["row"] == "checkpointed"}
        assert unrolled.keys() == ckpt.keys() == set(res["sizes"]["depths"])
        depths = sorted(unrolled)
        assert [unrolled[L] for L in depths] == sorted(unrolled.values())
        for L in depths:
            assert ckpt[L] < unrolled[L]
        ws = model["solver_workspace"]
        for r in rows:
            assert r["deq_share"] == pytest.approx(deq["bytes"] / r["bytes"])
            assert r["deq_share_with_workspace"] == pytest.approx(
                (deq["bytes"] + ws["peak_bytes"]) / r["bytes"])
        t = model["targets"]
        assert t["share"] == pytest.approx(deq["bytes"] / unrolled[memory_table.TARGET_DEPTH])
        assert t["pass"] == (t["share"] <= memory_table.TARGET_SHARE)


@pytest.mark.parametrize("kind", ["transformer", "trellisnet"])
def test_solver_workspace_follows_the_broyden_state_shapes(memory_results, kind):
    ws = memory_results["models"][kind]["solver_workspace"]
    sizes = memory_results["sizes"]
    for name in ("forward", "backward"):
        part = ws[name]
        B, m, D = part["B"], part["history_m"], part["D"]
        history = 2 * B * m * D * 4  # U and V, float32
        assert part["history_bytes"] == history
        # Plus a handful of (B, D) vectors and the small per-sample ones.
        small = 64 * B * (m + 16)  # (B,) vectors, projections (B, 3, m), scalars
        assert history + 5 * B * D * 4 <= part["bytes"] <= history + 8 * B * D * 4 + small
        assert B == sizes["batch"]
    assert ws["peak_bytes"] == max(ws["forward"]["bytes"], ws["backward"]["bytes"])


# -- runtime table -------------------------------------------------------------------------------
def test_runtime_table_runs_and_is_consistent(runtime_results):
    res = runtime_results
    check_provenance(res, "runtime_table")
    assert "paper" in res["settings"] and "random" in res["weights"]
    for kind, model in res["models"].items():
        med = model["median_s"]
        for variant, phases in model["times_s"].items():
            for phase, times in phases.items():
                assert len(times) == res["sizes"]["reps"] and min(times) > 0, (kind, variant)
                assert med[variant][phase] == pytest.approx(sorted(times)[len(times) // 2])
        r = model["ratios"]
        for phase in ("train", "infer"):
            assert r[f"deq_over_deep_{phase}"] == pytest.approx(
                med["deq"][phase] / med["deep"][phase])
            assert r[f"no_compact_over_deq_{phase}"] == pytest.approx(
                med["deq_no_compact"][phase] / med["deq"][phase])
            t = model["targets"][phase]
            assert t["pass"] == (t["ratio"] <= runtime_table.TARGETS[phase])
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
