"""Training quality under the DEQ layer's new Broyden defaults against the previous ones.

``python -m benchmarks.training_defaults [--tasks digits copy_memory] [--seeds 0 1 2]
[--copy-steps N] [--quick] [--out PATH]``

The layer's defaults changed (``deq_ext/layer.py``: ``SolverSettings.resolved`` and
``DEFAULT_MEMORY``; ``deq_ext/solvers/broyden.py``: ``default_history_dtype``): a Broyden solve
used to keep ``memory = max_iter`` pairs, never restarting, in the state dtype (float32); it now
keeps a ring of 16 pairs forward and 8 backward that restarts when full, in bfloat16. For each
task (``digits``: ``python -m train.digits``, 300 steps; ``copy_memory``: ``python -m
train.copy_memory``, the main job, 1500 steps) and seed, two whole training runs, each in a
process of its own (:mod:`benchmarks._train_with_defaults`):

* ``old``: the previous defaults, patched in that process before training (and checked there:
  every Broyden solve of the run is seen with its ring size, history dtype and restarts);
* ``new``: the current defaults, untouched.

Per run: final test loss and accuracy (copy memory: the accuracy on the 10 copied symbols, as
:mod:`benchmarks.backward_modes` records it; the accuracy over all positions alongside), mean
Broyden steps per sample of the training forward and backward solves and of the final
evaluation's forward solves, the ring restarts per sample of the training solves, wall and CPU
time, peak memory (the process's peak resident size on the CPU). Per task and setting: the
figures listed by seed with their mean, min and max. Per task, :func:`verdicts`:

* quality: ``new``'s mean test loss and mean test accuracy over the seeds lie inside
  ``[min, max]`` of ``old``'s per-seed values (widened by nothing but a relative 1e-9 for
  rounding);
  the looser ``|mean(new) - mean(old)| <= max(old) - min(old)`` and the one-sided ``not_worse``
  (loss not above old's worst seed, accuracy not below it) are recorded beside it;
* steps: ``new``'s mean steps (training forward, training backward, final evaluation forward)
  within 10% of ``old``'s: ``|mean(new) / mean(old) - 1| <= 0.10`` (+ 1e-9 for rounding).

The record is written after every run; a rerun with the same ``--out`` keeps the runs it already
holds (same training command) and runs the others. ``--quick``: the scripts' ``--preset tiny``
(seconds per run; for the test). The children run with ``OMP_WAIT_POLICY=PASSIVE`` unless the
environment sets it (see :data:`OMP_WAIT_POLICY`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from deq_ext.bench import load_average, machine_busy, progress, provenance, write_json

from . import model_setup as ms

PROGRAM = "python -m benchmarks.training_defaults"
ROOT = Path(__file__).resolve().parents[1]
RUNNER = "benchmarks._train_with_defaults"
TASKS = ("digits", "copy_memory")
SETTINGS = ("old", "new")
# The option that writes a training script's JSON record.
RESULT_OPTION = {"digits": "--out", "copy_memory": "--results"}
STEP_TOLERANCE = 0.10
# OpenMP threads that sleep while they wait: on a shared CPU, libgomp's default spinning made the
# 2-thread copy-memory run 8x slower (1.6 against 12 steps/s) whenever another process held a
# core. The same threads split the same work: the results do not change (checked: the same
# losses and steps), only the time a busy machine costs.
OMP_WAIT_POLICY = "PASSIVE"
QUALITY = ("test_loss", "test_accuracy")
STEPS = ("train_fwd_steps", "train_bwd_steps", "test_fwd_steps")
# Per-seed figures listed per setting (with their mean, min and max).
FIGURES = (*QUALITY, "test_accuracy_all_positions", *STEPS, "train_fwd_restarts",
           "train_bwd_restarts", "final_train_loss", "train_loss_last_50", "wall_s", "cpu_s",
           "peak_mem_mb")
ROUNDING = 1e-9  # slack of the [min, max] test (relative) and of the 10% test, for rounding
JUDGING = {
    "quality": "new's mean over the seeds inside [min, max] of old's per-seed values (widened by "
               "nothing beyond a relative 1e-9 for rounding); also recorded: |mean(new) - "
               "mean(old)| <= max(old) - min(old), and not_worse: new's mean not beyond old's "
               "worst seed (loss <= max, accuracy >= min)",
    "steps": f"|mean(new) / mean(old) - 1| <= {STEP_TOLERANCE:g} for the mean Broyden steps per "
             "sample of the training forward solves, the training backward solves and the final "
             "evaluation's forward solves (each run's mean, then the mean over the seeds)",
    "test_accuracy": "digits: accuracy on the 360 test images; copy memory: accuracy on the 10 "
                     "copied symbols of the 2000 test sequences (test_copy_accuracy)",
}
DEFAULTS_DESCRIPTION = {
    "old": "before the change: memory = max_iter pairs (DEFAULT_MEMORY patched to 2**30, so "
           "resolved's min gives max_iter; its restart=True never fires since npairs < max_iter "
           "at every step: checked, restarts = 0), history in the state dtype (float32; "
           "default_history_dtype patched)",
    "new": "the current defaults, untouched: rings of min(16, max_iter) pairs forward and "
           "min(8, max_iter) backward, restart=True, bfloat16 history under float32",
}


# -- one run -------------------------------------------------------------------------------------
def training_args(task: str, seed: int, quick: bool, steps: Optional[int]) -> list[str]:
    """The training script's arguments (without its result file)."""
    args = ["--seed", str(seed), "--progress", "false"]
    if quick:
        args += ["--preset", "tiny"]
    if steps is not None:
        args += ["--steps", str(steps)]
    return args


def training_command(task: str, args: Sequence[str]) -> str:
    """The training command a run is (under the defaults its setting patches in)."""
    return f"python -m train.{task} " + " ".join(map(shlex.quote, args))


def _mean(entry: dict[str, Any], key: str) -> Optional[float]:
    return entry.get(key, {}).get("steps_mean")


def figures_of(task: str, result: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """A run's figures from the training script's result file and the child's record."""
    final = result["final_test"]
    solves = child["solves"]

    def restarts(key: str) -> Optional[float]:
        entry = solves.get(key)
        return entry["restarts"] / entry["samples"] if entry and entry["samples"] else None

    out: dict[str, Any] = {
        "test_loss": final["test_loss"],
        "test_accuracy": final["test_copy_accuracy"] if task == "copy_memory"
        else final["test_accuracy"],
        "test_accuracy_all_positions": final["test_accuracy"] if task == "copy_memory" else None,
        "train_fwd_steps": _mean(solves, "train/forward"),
        "train_bwd_steps": _mean(solves, "train/backward"),
        "test_fwd_steps": _mean(solves, "final_eval/forward"),
        "train_fwd_restarts": restarts("train/forward"),
        "train_bwd_restarts": restarts("train/backward"),
        "first_train_loss": result["first_train_loss"],
        "final_train_loss": result["last_train_loss"],
        "train_loss_last_50": child["final_train_loss_last_50_mean"],
        "wall_s": result["wall_s"],
        "cpu_s": child["process_cpu_s"],
        "peak_mem_mb": final.get("peak_mem_mb"),
    }
    if task == "digits":  # the script's own figures (batch means per step), to cross-check
        means = result.get("train_solves", {}).get("mean", {})
        out["script_figures"] = {"train_forward_steps_mean": means.get("forward_steps"),
                                 "train_backward_steps_mean": means.get("backward_steps"),
                                 "test_fwd_steps_mean": final.get("test_fwd_steps_mean"),
                                 "cpu_s": result.get("cpu_s")}
    return out


def child_env() -> dict[str, str]:
    """The children's environment: run from the repository's root (they import ``train`` and
    ``benchmarks`` from it), with OpenMP's threads waiting passively unless the caller says
    otherwise (:data:`OMP_WAIT_POLICY`)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    env.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
    return env


def training_run(task: str, setting: str, seed: int, quick: bool, steps: Optional[int],
                 work_dir: Path) -> dict[str, Any]:
    """One run of ``task`` under ``setting``'s defaults in a child process; its figures, the
    child's checks and solve statistics. Raises when the child fails or its check does."""
    args = training_args(task, seed, quick, steps)
    run_dir = work_dir.resolve() / f"{task}-{setting}-seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    result_path, record_path, log_path = (run_dir / "result.json", run_dir / "record.json",
                                          run_dir / "log.txt")
    for p in (result_path, record_path):
        p.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", RUNNER, "--defaults", setting, "--task", task,
           "--record", str(record_path), "--", *args, RESULT_OPTION[task], str(result_path)]
    load_start = load_average()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False, cwd=ROOT,
                              env=child_env())
    if proc.returncode != 0 or not result_path.exists():
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-20:])
        raise RuntimeError(f"{task} {setting} seed {seed} failed (exit {proc.returncode}); "
                           f"log {log_path}:\n{tail}")
    result = json.loads(result_path.read_text())
    child = json.loads(record_path.read_text())
    return {"seed": seed, "command": training_command(task, args),
            "runner": f"python -m {RUNNER} --defaults {setting} --task {task} --record RECORD -- "
                      + " ".join(map(shlex.quote, args)) + f" {RESULT_OPTION[task]} RESULT",
            **figures_of(task, result, child),
            "load_average_start": load_start, "load_average_end": load_average(),
            "omp_wait_policy": child_env()["OMP_WAIT_POLICY"],
            "check": child["check"], "patched": {k: child[k] for k in
                                                 ("DEFAULT_MEMORY", "history_dtype_under_float32")},
            "solves": child["solves"], "final_test": result["final_test"],
            "config": result["config"]}


# -- aggregation and verdicts ----------------------------------------------------------------------
def by_seed(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per figure of :data:`FIGURES`: the list by seed, its mean, min and max."""
    entry: dict[str, Any] = {"seeds": [r["seed"] for r in runs]}
    for k in FIGURES:
        vals = [r.get(k) for r in runs]
        vals = [v for v in vals if v is not None]
        entry[k] = vals
        entry[f"{k}_mean"] = statistics.fmean(vals) if vals else None
        entry[f"{k}_min"] = min(vals) if vals else None
        entry[f"{k}_max"] = max(vals) if vals else None
    entry["checks_ok"] = all(r["check"]["ok"] for r in runs)
    entry["runs"] = runs
    return entry


def quality_verdict(old: Sequence[float], new: Sequence[float],
                    higher_is_better: bool = False) -> dict[str, Any]:
    """``new``'s mean inside ``[min(old), max(old)]`` (see :data:`JUDGING`): ``pass``. Beside it,
    ``not_worse``: the one-sided test (new's mean not beyond old's worst seed)."""
    lo, hi = min(old), max(old)
    mean_old, mean_new = statistics.fmean(old), statistics.fmean(new)
    slack = ROUNDING * max(abs(lo), abs(hi), 1e-300)
    return {"old": list(old), "new": list(new), "old_min": lo, "old_max": hi,
            "old_mean": mean_old, "new_mean": mean_new, "diff": mean_new - mean_old,
            "old_spread": hi - lo,
            "within_spread_of_means": abs(mean_new - mean_old) <= hi - lo + slack,
            "not_worse": mean_new >= lo - slack if higher_is_better else mean_new <= hi + slack,
            "pass": lo - slack <= mean_new <= hi + slack}


def steps_verdict(old: Sequence[float], new: Sequence[float],
                  tolerance: float = STEP_TOLERANCE) -> dict[str, Any]:
    """``new``'s mean steps within ``tolerance`` (relative) of ``old``'s."""
    mean_old, mean_new = statistics.fmean(old), statistics.fmean(new)
    rel = mean_new / mean_old - 1 if mean_old else math.inf
    return {"old": list(old), "new": list(new), "old_mean": mean_old, "new_mean": mean_new,
            "relative_change": rel, "tolerance": tolerance,
            "pass": abs(rel) <= tolerance + ROUNDING}


def verdicts(old: dict[str, Any], new: dict[str, Any],
             tolerance: float = STEP_TOLERANCE) -> dict[str, Any]:
    """The verdicts of one task from the two settings' :func:`by_seed` entries (per-seed lists
    under the figure names of :data:`QUALITY` and :data:`STEPS`). ``pass`` is None when a figure
    has no value in either setting; ``seeds_match`` says whether both ran the same seeds."""
    out: dict[str, Any] = {"seeds_match": old.get("seeds") == new.get("seeds")}
    for name in (*QUALITY, *STEPS):
        a, b = old.get(name) or [], new.get(name) or []
        if not (a and b):
            out[name] = {"pass": None}
        elif name in QUALITY:
            out[name] = quality_verdict(a, b, higher_is_better=name == "test_accuracy")
        else:
            out[name] = steps_verdict(a, b, tolerance)
    quality = [out[n]["pass"] for n in QUALITY]
    steps = [out[n]["pass"] for n in STEPS]
    out["quality_pass"] = None if None in quality else all(quality)
    out["steps_pass"] = None if None in steps else all(steps)
    out["pass"] = None if None in (out["quality_pass"], out["steps_pass"]) \
        else out["quality_pass"] and out["steps_pass"]
    return out


# -- the series -------------------------------------------------------------------------------------
def run_series(tasks: Sequence[str], seeds: Sequence[int], quick: bool,
               copy_steps: Optional[int], work_dir: Path, done: Optional[dict[str, Any]] = None,
               save: Callable[[dict[str, Any]], None] = lambda out: None) -> dict[str, Any]:
    """Every (task, seed, setting) run, task by task and seed by seed (``old`` then ``new``);
    runs in ``done`` (an earlier record's ``tasks``) with the same training command are kept.
    ``save`` gets the tasks' record after every run."""
    out: dict[str, Any] = {}
    for task in tasks:
        steps = copy_steps if task == "copy_memory" else None
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SETTINGS}
        for seed in seeds:
            for setting in SETTINGS:
                command = training_command(task, training_args(task, seed, quick, steps))
                earlier = {r["seed"]: r for r in (done or {}).get(task, {}).get("settings", {})
                           .get(setting, {}).get("runs", [])}
                if seed in earlier and earlier[seed]["command"] == command:
                    progress(f"{task} {setting} seed {seed}: recorded, kept")
                    runs[setting].append(earlier[seed])
                else:
                    progress(f"{task} {setting} seed {seed}: training ({command})")
                    t0 = time.perf_counter()
                    run = training_run(task, setting, seed, quick, steps, work_dir)
                    runs[setting].append(run)
                    progress(f"{task} {setting} seed {seed}: test loss {run['test_loss']:.5g}, "
                             f"accuracy {run['test_accuracy']:.4f}, steps fwd "
                             f"{ms.cell(run['train_fwd_steps'], '.2f')} bwd "
                             f"{ms.cell(run['train_bwd_steps'], '.2f')} test "
                             f"{ms.cell(run['test_fwd_steps'], '.2f')}, wall {run['wall_s']:.0f}s "
                             f"(process {time.perf_counter() - t0:.0f}s)")
                entries = {s: by_seed(r) for s, r in runs.items() if r}
                first = next(iter(entries.values()))["runs"][0]
                out[task] = {"steps": first["config"]["steps"], "settings": entries}
                if len(entries) == len(SETTINGS):
                    out[task]["verdicts"] = verdicts(entries["old"], entries["new"])
                save(out)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, metavar="TASK",
                        help=f"of {', '.join(TASKS)} (default: both, in this order)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="training seeds (default 0 1 2)")
    parser.add_argument("--copy-steps", type=int, default=None,
                        help="optimizer steps of copy memory (default: the job's own, 1500)")
    parser.add_argument("--quick", action="store_true",
                        help="the training scripts' --preset tiny (seconds per run; tests)")
    parser.add_argument("--work-dir", default=None,
                        help="where the runs' logs and records go (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    return parser


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """The command line, checked (argparse errors exit with status 2)."""
    parser = build_parser()
    args = parser.parse_args(list(argv))
    if args.copy_steps is not None and args.copy_steps < 1:
        parser.error(f"--copy-steps must be >= 1, got {args.copy_steps}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds repeats a seed: {args.seeds}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the series, print the table, write the JSON; returns the results."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = parse(args_list)
    results = provenance(torch.device("cpu"), PROGRAM, args_list)
    results.update(description=__doc__.split("\n\n")[0], defaults=DEFAULTS_DESCRIPTION,
                   judging=JUDGING, step_tolerance=STEP_TOLERANCE, quick=args.quick,
                   omp_wait_policy=child_env()["OMP_WAIT_POLICY"])
    done = None
    if args.out and Path(args.out).exists():  # resume a series
        done = json.loads(Path(args.out).read_text()).get("tasks")

    def save(partial: dict[str, Any]) -> None:
        if args.out:
            write_json({**results, "tasks": partial, "complete": False,
                        "load_average_now": load_average()}, args.out)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="training-defaults-") as tmp:
        work_dir = Path(args.work_dir or tmp)
        results["tasks"] = run_series(args.tasks, args.seeds, args.quick, args.copy_steps,
                                      work_dir, done, save)
    results["complete"] = True
    results["wall_s"] = time.perf_counter() - t0
    results["load_average_end"] = load_average()
    # The training scripts set their own threads (digits 1, copy memory 2).
    results["busy"] = machine_busy(results["load_average_start"], results["load_average_end"], 2)
    ms.report(results, format_table(results), args.out)
    return results


# -- the table ---------------------------------------------------------------------------------------
def _verdict(v: Optional[bool]) -> str:
    return "-" if v is None else ("PASS" if v else "FAIL")


# The table's columns: (key, width, format); a run's figures are the keys themselves, a
# setting's means the keys with "_mean".
_COLUMNS = (("test_loss", 12, ".5g"), ("test_accuracy", 10, ".4f"), ("train_fwd_steps", 8, ".2f"),
            ("train_bwd_steps", 8, ".2f"), ("test_fwd_steps", 10, ".2f"),
            ("train_fwd_restarts", 9, ".2f"), ("train_bwd_restarts", 9, ".2f"),
            ("wall_s", 8, ".0f"), ("cpu_s", 8, ".0f"))


def _table_line(setting: str, label: str, figures: dict[str, Any], suffix: str) -> str:
    cells = "".join(f"{ms.cell(figures[key + suffix], fmt):>{width}}" for key, width, fmt in _COLUMNS)
    return f"  {setting:<8}{label:>5}{cells}"


def format_table(results: dict[str, Any]) -> str:
    """Per task and setting one line per seed and one of means (steps: mean Broyden steps per
    sample of the training forward and backward solves and of the final evaluation; rst: ring
    restarts per sample of the training solves); then the verdicts."""
    lines = [f"Training with the old and new Broyden defaults, device: {results['device']}"]
    if results.get("busy"):
        lines.append(f"NOTE: the machine was busy ({results['busy']}): wall times are noisy")
    head = (f"  {'setting':<8}{'seed':>5}{'test loss':>12}{'accuracy':>10}{'fwd':>8}{'bwd':>8}"
            f"{'test fwd':>10}{'fwd rst':>9}{'bwd rst':>9}{'wall s':>8}{'cpu s':>8}")
    for task, entry in results["tasks"].items():
        lines += ["", f"{task} ({entry['steps']} steps):", head]
        for setting, e in entry["settings"].items():
            for r in e["runs"]:
                lines.append(_table_line(setting, str(r["seed"]), r, ""))
            lines.append(_table_line(setting, "mean", e, "_mean"))
        v = entry.get("verdicts")
        if v is None:
            continue
        for name in QUALITY:
            q = v[name]
            if q["pass"] is None:
                continue
            lines.append(f"  verdict {name}: new mean {q['new_mean']:.5g} in old's "
                         f"[{q['old_min']:.5g}, {q['old_max']:.5g}]: {_verdict(q['pass'])} "
                         f"(|diff| {abs(q['diff']):.3g} <= old spread {q['old_spread']:.3g}: "
                         f"{q['within_spread_of_means']}; not worse than old's worst seed: "
                         f"{q['not_worse']})")
        for name in STEPS:
            s = v[name]
            if s["pass"] is None:
                continue
            lines.append(f"  verdict {name}: new {s['new_mean']:.3f} vs old {s['old_mean']:.3f} "
                         f"({s['relative_change']:+.1%}, tolerance {s['tolerance']:.0%}): "
                         f"{_verdict(s['pass'])}")
        lines.append(f"  verdict: quality {_verdict(v['quality_pass'])}, steps "
                     f"{_verdict(v['steps_pass'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
