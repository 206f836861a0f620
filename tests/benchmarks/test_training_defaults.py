"""benchmarks.training_defaults: a --quick series (tiny presets, one seed, both tasks) records each
run under the old and the new Broyden defaults with the child's proof that the patch took effect
(ring sizes, history dtype, restarts of every solve); a rerun keeps the recorded runs; the
verdicts and the child's check fail where they must."""

from __future__ import annotations

import json

import pytest

from benchmarks import _train_with_defaults as child
from benchmarks import training_defaults as td

pytestmark = pytest.mark.usefixtures("compiled")


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[list[str], dict]:
    tmp = tmp_path_factory.mktemp("training_defaults")
    args = ["--quick", "--seeds", "0", "--out", str(tmp / "defaults.json"),
            "--work-dir", str(tmp / "work")]
    td.main(args)
    return args, json.loads((tmp / "defaults.json").read_text())


def test_quick_series_records_every_run_with_provenance(quick):
    _, res = quick
    assert res["command"].startswith("python -m benchmarks.training_defaults --quick")
    assert res["complete"] is True and res["quick"] is True
    assert res["load_average_start"] is not None and "busy" in res and res["timestamp"]
    assert res["versions"]["deq_ext_build"]["loaded"] and res["omp_wait_policy"]
    assert list(res["tasks"]) == list(td.TASKS)
    for task, entry in res["tasks"].items():
        assert list(entry["settings"]) == list(td.SETTINGS)
        for setting, e in entry["settings"].items():
            assert e["seeds"] == [0] and e["checks_ok"] is True, (task, setting)
            run = e["runs"][0]
            assert run["command"] == f"python -m train.{task} --seed 0 --progress false " \
                                     "--preset tiny"
            assert run["config"]["seed"] == 0 and run["omp_wait_policy"]
            assert run["test_loss"] > 0 and 0 <= run["test_accuracy"] <= 1
            for name in td.STEPS:
                assert 0 < run[name] <= run["config"]["fwd_iter"], (task, setting, name)
                assert e[name] == [run[name]] and e[f"{name}_mean"] == run[name]
            assert run["wall_s"] > 0 and run["cpu_s"] > 0 and run["peak_mem_mb"] > 0
        if task == "digits":  # the spy's means agree with the script's own figures
            own = entry["settings"]["new"]["runs"][0]["script_figures"]
            run = entry["settings"]["new"]["runs"][0]
            assert run["test_fwd_steps"] == pytest.approx(own["test_fwd_steps_mean"])
            assert run["train_fwd_steps"] == pytest.approx(own["train_forward_steps_mean"])
            assert run["train_bwd_steps"] == pytest.approx(own["train_backward_steps_mean"])
        v = entry["verdicts"]
        assert set(td.QUALITY + td.STEPS) <= set(v) and v["seeds_match"] is True
        assert v["pass"] in (True, False)
    assert "verdict test_loss" in td.format_table(res)


def test_the_old_patch_changed_the_history(quick):
    _, res = quick
    for task, entry in res["tasks"].items():
        old, new = (entry["settings"][s]["runs"][0] for s in ("old", "new"))
        assert old["patched"]["DEFAULT_MEMORY"] == {"forward": child.OLD_MEMORY,
                                                    "backward": child.OLD_MEMORY}
        assert old["patched"]["history_dtype_under_float32"] == "torch.float32"
        assert new["patched"]["history_dtype_under_float32"] == "torch.bfloat16"
        fwd_iter, bwd_iter = old["config"]["fwd_iter"], old["config"]["bwd_iter"]
        # Every solve of the training run, as the child saw it.
        for key, entry_ in old["solves"].items():
            assert entry_["restarts"] == 0, key
            for c in entry_["configs"]:
                assert c["history_dtype"] == "torch.float32" and c["memory"] == c["max_iter"]
        seen = {(k, c["memory"], c["history_dtype"]) for k, e in new["solves"].items()
                for c in e["configs"]}
        assert ("train/forward", min(16, fwd_iter), "torch.bfloat16") in seen
        assert ("train/backward", min(8, bwd_iter), "torch.bfloat16") in seen
        # The tiny pre-check DEQ runs past both new rings: new restarts, old does not.
        pre_old, pre_new = old["check"]["precheck"], new["check"]["precheck"]
        for direction, ring in (("forward", 16), ("backward", 8)):
            o, n = (p["solves"][f"train/{direction}"] for p in (pre_old, pre_new))
            assert o["restarts"] == 0 and n["restarts"] > 0
            assert o["configs"][0]["memory"] == child.PRECHECK_ITER
            assert n["configs"][0]["memory"] == ring
            assert pre_old["workspace"][direction]["history_bytes_per_value"] == 4
            assert pre_new["workspace"][direction]["history_bytes_per_value"] == 2
    # Where the new backward ring (8) is shorter than the solves (tiny digits: 12 steps), the
    # new runs restarted and the old ones did not; the results differ.
    digits = res["tasks"]["digits"]["settings"]
    assert digits["new"]["runs"][0]["solves"]["train/backward"]["restarts"] > 0
    assert digits["old"]["runs"][0]["train_bwd_restarts"] == 0
    assert digits["new"]["runs"][0]["train_bwd_restarts"] > 0


def test_a_rerun_keeps_the_recorded_runs(quick, monkeypatch):
    args, res = quick

    def no_training(*a, **kw):
        raise AssertionError("a recorded run was run again")

    monkeypatch.setattr(td, "training_run", no_training)
    again = td.main(args)
    for task in td.TASKS:
        for s in td.SETTINGS:
            assert again["tasks"][task]["settings"][s]["runs"] == \
                res["tasks"][task]["settings"][s]["runs"]


def test_the_child_check_fails_without_the_patch():
    # In this process nothing is patched: the new defaults pass, and a check for the old ones fails.
    assert child.precheck("new")["ok"] is True
    found = child.precheck("old")["problems"]
    assert any("history dtype torch.bfloat16, expected torch.float32" in p for p in found)
    assert any("ring of 16 pairs, expected 20" in p for p in found)
    assert any("restarts with memory = max_iter" in p for p in found)
    assert any("bytes per stored value" in p for p in found)


def _entry(loss, acc, fwd, bwd, test_fwd, seeds=(0, 1, 2)):
    return {"seeds": list(seeds), "test_loss": loss, "test_accuracy": acc,
            "train_fwd_steps": fwd, "train_bwd_steps": bwd, "test_fwd_steps": test_fwd}


def test_verdicts_fail_outside_the_seed_range_or_beyond_ten_percent():
    old = _entry([0.10, 0.12, 0.11], [0.95, 0.97, 0.96], [10, 10, 10], [8, 8, 8], [9, 9, 9])
    same = td.verdicts(old, _entry([0.11, 0.115, 0.105], [0.96, 0.965, 0.955], [10.5, 10, 10],
                                   [8.5, 8.5, 8.5], [9.2, 9.2, 9.2]))
    assert same["pass"] is True and same["quality_pass"] and same["steps_pass"]

    # Loss worse than every old seed; accuracy still inside; steps 20% more forward.
    worse = td.verdicts(old, _entry([0.13, 0.14, 0.125], [0.95, 0.96, 0.97], [12, 12, 12],
                                    [8, 8, 8], [9.9, 9.9, 9.9]))
    assert worse["test_loss"]["pass"] is False and worse["test_accuracy"]["pass"] is True
    assert worse["test_loss"]["new_mean"] == pytest.approx(0.395 / 3)
    assert worse["train_fwd_steps"]["pass"] is False
    assert worse["train_fwd_steps"]["relative_change"] == pytest.approx(0.2)
    assert worse["train_bwd_steps"]["pass"] is True
    assert worse["test_fwd_steps"]["pass"] is True  # +10% exactly: inside
    assert worse["quality_pass"] is False and worse["steps_pass"] is False
    assert worse["pass"] is False

    # Outside old's range but within its spread of the means: the verdict still fails.
    near = td.quality_verdict([0.10, 0.12], [0.125, 0.125])
    assert near["pass"] is False and near["within_spread_of_means"] is True
    assert near["not_worse"] is False
    # Better than every old seed: not "the same" (fails), but not worse.
    better = td.quality_verdict([0.90, 0.92], [0.95, 0.96], higher_is_better=True)
    assert better["pass"] is False and better["not_worse"] is True
    assert worse["test_accuracy"]["not_worse"] is True and worse["test_loss"]["not_worse"] is False
    # One seed per setting: the range is a point; equal values pass, different ones fail.
    assert td.quality_verdict([1.0], [1.0])["pass"] is True
    assert td.quality_verdict([1.0], [0.9995])["pass"] is False
    # Fewer steps count too.
    assert td.steps_verdict([10.0], [8.9])["pass"] is False
    # A figure missing in one setting: no verdict.
    assert td.verdicts(old, _entry([], [], [], [], []))["pass"] is None


def test_bad_arguments():
    for bad in (["--tasks", "nope"], ["--copy-steps", "0"], ["--seeds", "1", "1"]):
        with pytest.raises(SystemExit):
            td.parse(bad)
