"""The headline figures of recorded benchmark runs, one line per target.

``python -m benchmarks.summary PATH [PATH ...]`` reads JSON results (files, or every ``*.json`` in
a folder) and prints, for each, the figures the issues set targets on, with PASS/FAIL. A file's
kind is told by its content: the ``command`` it records (``python -m benchmarks.solver_bench`` or
``python -m deq_ext.bench``,
``python -m benchmarks.memory_table``, ``python -m benchmarks.runtime_table``,
``python -m benchmarks.training_step``, ``python -m benchmarks.history_precision``,
``python -m benchmarks.backward_modes``) or, for
pytest-benchmark output (the microbenchmarks), its ``benchmarks`` list. Files of other kinds are
listed as skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from .solver_bench import results_targets

Line = tuple[str, Optional[float], str, Optional[bool]]
"""(figure, value, how it compares with its target, passed or None when there is no target)."""


def _verdict(passed: Optional[bool]) -> str:
    return "" if passed is None else ("PASS" if passed else "FAIL")


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def bench_lines(res: dict[str, Any]) -> Iterator[Line]:
    """The solver benchmark: every target that applies on its device, named with its workload
    (records without a problem kind predate the MLP problem: the solver-bound f) and the
    per-round spread of the ratio where the record has it. A record of ``python -m
    deq_ext.bench`` itself carries no targets: they are checked here from its ratios."""
    kind = res.get("problem", {}).get("kind", "block")
    workload = "solver-bound f" if kind == "block" else f"{kind} f"
    rounds = res.get("config", {}).get("repeat")
    spreads = res.get("ratio_spreads") or {}
    if res.get("busy"):
        yield (f"machine busy, no verdicts: {res['busy']}", None, "", None)
    targets = res["targets"] if "targets" in res else results_targets(res)
    for t in targets:
        if t["applies"]:
            sp = spreads.get(t["name"])
            extra = (f"; {sp['n']} rounds {sp['min']:.2f}..{sp['max']:.2f}"
                     if sp and sp.get("min") is not None else
                     (f"; {rounds} rounds" if rounds else ""))
            yield (f"{t['name']} [{workload}{extra}]", t["value"],
                   f"{t['op']} {t['threshold']:g}", t["passed"])


def memory_lines(res: dict[str, Any]) -> Iterator[Line]:
    """Memory table: the DEQ's share of the deep model's peak memory at the paper's depth
    (solver workspace included), and the saved-bytes share as a labelled secondary line."""
    for kind, model in res["models"].items():
        targets = model["targets"]
        if "depth" in targets:  # one target (against the unrolled model), before checkpointing
            targets = {"unrolled": targets}
        elif "share" in targets:  # a record of the older, saved-bytes-only table
            yield (f"{kind} DEQ saved bytes / 60-layer (old record: no workspace)",
                   targets["share"], "", None)
            continue
        for deep, t in targets.items():
            yield (f"{kind} DEQ peak memory / {t['depth']}-layer {deep}", t["share"],
                   f"<= {t['limit']:g}", t["pass"])
            if "share_saved_bytes" in t:
                yield (f"{kind} same, saved bytes only (secondary)", t["share_saved_bytes"], "",
                       None)


def _range(spreads: dict[str, Any], key: str) -> str:
    sp = spreads.get(key)
    return "" if not sp or sp.get("min") is None else f"; {sp['min']:.2f}..{sp['max']:.2f}"


def runtime_lines(res: dict[str, Any]) -> Iterator[Line]:
    """Runtime table: DEQ / deep for training and inference, and the f rows compaction saved."""
    if res.get("busy"):
        yield (f"machine busy, no verdicts: {res['busy']}", None, "", None)
    for kind, model in res["models"].items():
        weights = "trained" if str(model.get("weights", "")).startswith("trained") else "random"
        spreads = model.get("ratio_spreads") or {}
        for phase, t in model["targets"].items():
            spread = _range(spreads, f"deq_over_deep_{phase}")
            yield (f"{kind} DEQ / deep, {phase} [{weights} weights{spread}]",
                   t["ratio"], f"<= {t['limit']:g}", t["pass"])
        for phase in ("train", "infer"):
            key = f"torchdeq_over_deq_{phase}"
            if key in model.get("ratios", {}):
                yield (f"{kind} torchdeq's solver / deq_ext's, {phase}{_range(spreads, key)}",
                       model["ratios"][key], "", None)
        for phase, saved in model["compaction_rows_saved"].items():
            yield (f"{kind} f rows saved by compaction, {phase}", saved, "", None)


def training_step_lines(res: dict[str, Any]) -> Iterator[Line]:
    """Training step: torchdeq's DEQ / deq_ext's per workload (with the per-repeat spread), and
    the f rows torchdeq evaluated per deq_ext row as a secondary line."""
    if res.get("busy"):
        yield (f"machine busy, no verdicts: {res['busy']}", None, "", None)
    for name, w in res["workloads"].items():
        t = w.get("target")
        yield (f"{name} training step, torchdeq / deq_ext{_range(w, 'ratio_spread')}",
               w["ratio_torchdeq_over_deq_ext"], f">= {t['limit']:g}" if t else "",
               t["pass"] if t else None)
        yield (f"{name} f rows per step, torchdeq / deq_ext",
               w["rows_ratio_torchdeq_over_deq_ext"]["f_rows"], "", None)


def backward_modes_lines(res: dict[str, Any]) -> Iterator[Line]:
    """Backward modes: per workload and mode, VJP rows per f row and the gradient's cosine with
    the exact one; the issue's targets with their verdicts (none for a timing on a busy
    machine). Whole training runs: nothing to summarize."""
    if res.get("busy"):
        yield (f"machine busy, no timing verdicts: {res['busy']}", None, "", None)
    for name, w in res.get("workloads", {}).items():
        for mode, m in w["modes"].items():
            yield (f"{name} {mode}: VJP rows / f rows", m["vjp_rows_over_f_rows"], "", None)
            yield (f"{name} {mode}: gradient cosine with the exact one", m["cosine"], "", None)
        for t in w.get("targets", []):
            yield (f"{name} {t['mode']}: {t['figure']}", t["value"], t["bound"], t["pass"])


def _ratio(num: float, den: float) -> Optional[float]:
    return num / den if den else None


def history_precision_lines(res: dict[str, Any]) -> Iterator[Line]:
    """Half-precision history: per case and narrow dtype, samples converged against the
    state-dtype history's and the mean steps ratio; the passes' and the solve's speedups."""
    if res.get("machine_busy"):
        yield (f"machine busy, timings without conclusions: {res['machine_busy']}", None, "",
               None)
    for case in res["cases"]:
        rows = {r["history"]: r for r in case["rows"]}
        full = rows["state"]
        for name in ("bfloat16", "float16"):
            r = rows[name]
            yield (f"{case['case']}, {name} history: converged {r['converged']}/{r['batch']} "
                   f"(state dtype {full['converged']}); mean steps / state dtype's",
                   _ratio(r["nstep_mean"], full["nstep_mean"]), "", None)
    timing = res.get("timing")
    if timing:
        for name in ("bfloat16", "float16"):
            spread = _range(timing["speedup"], f"passes_{name}_spread")
            yield (f"{name} history: fused passes speedup{spread}",
                   timing["speedup"][f"passes_{name}"], "", None)
            yield (f"{name} history: MLP-f solve speedup", timing["speedup"][f"solve_{name}"],
                   "", None)


def micro_lines(res: dict[str, Any]) -> Iterator[Line]:
    """Microbenchmarks: each compiled op's fraction of copy bandwidth at the base point, and one
    Broyden iteration of torchdeq against the compiled one, with nothing and 7/8 converged."""
    median: dict[tuple, float] = {}
    for b in res["benchmarks"]:
        info = b.get("extra_info", {})
        if "fraction_of_copy" not in info:
            continue  # an untimed (smoke) run
        key = (info["op"], info["impl"], info["device"], info["axis"], info["converged_fraction"])
        median[key] = b["stats"]["median"]
        if info["impl"] == "compiled" and info["axis"] == "base":
            target = "(GPU: >= 0.7)" if info["op"] == "broyden_iteration" else ""
            yield (f"{info['op']} ({info['device']}): fraction of copy bandwidth",
                   info["fraction_of_copy"], target, None)
    for (op, impl, device, axis, conv), t in sorted(median.items()):
        if op == "broyden_iteration" and impl == "torchdeq" and axis in ("base", "converged"):
            compiled = median.get((op, "compiled", device, axis, conv))
            yield (f"broyden iteration ({device}, {conv:.3g} converged): torchdeq / deq_ext",
                   None if compiled is None else t / compiled, "", None)


def kind_of(res: dict[str, Any]) -> Optional[tuple[str, Callable[[dict[str, Any]], Iterator[Line]]]]:
    """Which summary applies to a result, or None."""
    if isinstance(res.get("benchmarks"), list):
        return "microbenchmarks", micro_lines
    command = str(res.get("command", ""))
    for prefix, label, lines in (("python -m benchmarks.solver_bench", "deq_ext.bench", bench_lines),
                                 ("python -m deq_ext.bench", "deq_ext.bench", bench_lines),
                                 ("python -m benchmarks.memory_table", "memory table", memory_lines),
                                 ("python -m benchmarks.runtime_table", "runtime table",
                                  runtime_lines),
                                 ("python -m benchmarks.training_step", "training step",
                                  training_step_lines),
                                 ("python -m benchmarks.history_precision", "history precision",
                                  history_precision_lines),
                                 ("python -m benchmarks.backward_modes", "backward modes",
                                  backward_modes_lines)):
        if command.startswith(prefix):
            return label, lines
    return None


def result_files(paths: list[str]) -> list[Path]:
    """The JSON files named, or found in the folders named, in a stable order."""
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.json")) if p.is_dir() else [p]
    return files


def summarize(paths: list[str]) -> tuple[str, bool]:
    """The summary text, and whether every target with a verdict passed."""
    out, all_passed = [], True
    for path in result_files(paths):
        try:
            res = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            out.append(f"{path}: unreadable ({err})")
            all_passed = False
            continue
        kind = kind_of(res) if isinstance(res, dict) else None
        if kind is None:
            out.append(f"{path.name}: skipped (not a known benchmark result)")
            continue
        label, lines = kind
        device = res.get("device") or res.get("machine_info", {}).get("cpu", {}).get("brand_raw", "?")
        out.append(f"{path.name} ({label}; {device})")
        for figure, value, target, passed in lines(res):
            out.append(f"  {figure:<66}{_fmt(value):>9}  {target:<14}{_verdict(passed)}")
            all_passed = all_passed and passed is not False
    return "\n".join(out), all_passed


def main(argv: Optional[list[str]] = None) -> int:
    """Print the summary; exit status 1 if a target failed or a file was unreadable."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.summary", description=__doc__)
    parser.add_argument("paths", nargs="+", help="result JSON files or folders of them")
    text, ok = summarize(parser.parse_args(sys.argv[1:] if argv is None else argv).paths)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
