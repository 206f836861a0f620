"""Broyden's history in bfloat16/float16 against the state dtype: steps to tolerance and time.

``python -m benchmarks.history_precision [--device cpu|cuda] [--quick] [--out PATH]``

``history_dtype`` stores the pairs U, V (the largest buffer, and what the two fused passes stream
every iteration) in half precision while the passes accumulate in float64. That halves the bytes
of a bandwidth-bound pass but rounds every stored pair, so the iteration becomes an inexact
Broyden. This measures both sides on the same problems:

* **steps**: per history dtype, the mean and largest step count, samples converged and the largest
  residual, on the benchmark's MLP f and solver-bound f (float32 state, the headline batch), the
  trained copy-memory model's forward solve (when its run directory is given) and a hard solve
  (the image DEQ to a relative residual of 1e-11 in float64);
* **passes**: seconds of one ``broyden_reduce`` + ``broyden_expand_`` at a full ring, history
  twice the last-level cache on the CPU (the bench's bandwidth sizes), the dtypes interleaved
  round by round; the ratio to the state-dtype history is the speedup of the passes;
* **solve**: seconds of the whole MLP-f solve per history dtype, interleaved likewise.

Step counts do not depend on the machine's load; the timings do, and carry the usual
load-average check.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable, Optional

import torch

import deq_ext
from deq_ext.bench import (
    Problem,
    fused_passes_time,
    load_average,
    machine_busy,
    median,
    progress,
    provenance,
    ratio,
    resolve_config,
    spread,
    sync,
    write_json,
)
from deq_ext.bench import build_parser as bench_parser

from .history_size import MDEQ_F, hard_mdeq, steps_lines

# None: the state dtype (a wide history), spelled out for each solve (:func:`history_of`):
# Broyden's own default under a float32 state is bfloat16.
HISTORIES = {"state": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def history_of(hist: Optional[torch.dtype], z0: torch.Tensor) -> torch.dtype:
    """The history dtype a row asks for: ``hist``, or the state dtype of a solve of ``z0``."""
    if hist is not None:
        return hist
    return torch.float64 if z0.dtype == torch.float64 else torch.float32
Solve = Callable[[Optional[torch.dtype]], deq_ext.SolverResult]


def _row(name: str, res: deq_ext.SolverResult, resid: torch.Tensor, tol: float) -> dict[str, Any]:
    steps = res.nstep.double()
    return {"history": name, "nstep_mean": float(steps.mean()), "nstep_max": int(steps.max()),
            "converged": int((resid < tol).sum()), "batch": int(resid.numel()),
            "max_residual": float(resid.max())}


def steps_case(label: str, solve: Solve, residual: Callable[[torch.Tensor], torch.Tensor],
               tol: float, info: dict[str, Any]) -> dict[str, Any]:
    """Step counts of one problem under every history dtype (same batch, same start)."""
    rows = []
    for name, hist in HISTORIES.items():
        res = solve(hist)
        rows.append(_row(name, res, residual(res.z), tol))
        progress(f"{label}, history {name}: steps {rows[-1]['nstep_mean']:.1f} mean, "
                 f"{rows[-1]['nstep_max']} max, {rows[-1]['converged']}/{rows[-1]['batch']} "
                 f"converged, residual {rows[-1]['max_residual']:.2e}")
    return {**info, "case": label, "tol": tol, "rows": rows}


def bench_problem(kind: str, device: str, quick: bool) -> tuple[Problem, Any]:
    argv = ["--device", device, "--problem", kind] + (["--quick"] if quick else [])
    cfg = resolve_config(bench_parser().parse_args(argv))
    return Problem(cfg), cfg


def problem_case(kind: str, device: str, quick: bool) -> dict[str, Any]:
    problem, cfg = bench_problem(kind, device, quick)

    def solve(hist: Optional[torch.dtype]) -> deq_ext.SolverResult:
        return deq_ext.broyden(problem.f, problem.z0, inputs=(problem.x, problem.rho),
                               max_iter=cfg.max_iter, tol=cfg.tol, stop_mode="abs",
                               history_dtype=history_of(hist, problem.z0))

    info = {"problem": problem.describe(), "state_dtype": str(cfg.torch_dtype), "dim": cfg.dim,
            "max_iter": cfg.max_iter}
    return steps_case(f"{kind} f", solve, problem.residual, cfg.tol, info)


def mdeq_case(quick: bool, max_iter: int = 100, tol: float = 1e-11) -> dict[str, Any]:
    """The hard solve of benchmarks.history_size: the image DEQ, float64, relative 1e-11."""
    model = hard_mdeq()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        batch = 3 if quick else 9
        inj = model.injection(torch.randn(batch, 1, 8, 8, generator=gen, dtype=torch.float64))
        z0 = torch.zeros(batch, model.core.cell.layout.dim, dtype=torch.float64)
        last: dict[str, deq_ext.SolverResult] = {}

        def solve(hist: Optional[torch.dtype]) -> deq_ext.SolverResult:
            res = deq_ext.broyden(model.core.cell, z0, inputs=(inj,), max_iter=max_iter,
                                  tol=tol, stop_mode="rel", history_dtype=history_of(hist, z0))
            last["res"] = res
            return res

        info = {"problem": {"kind": "mdeq", "f": MDEQ_F}, "state_dtype": "torch.float64",
                "dim": int(z0.shape[1]), "max_iter": max_iter, "residual": "relative"}
        return steps_case("mdeq (hard)", solve, lambda z: last["res"].rel_residual, tol, info)


def copy_memory_case(run_dir: str, quick: bool, batch: int) -> dict[str, Any]:
    """The trained copy-memory model's forward solve at its own settings."""
    from . import trained_copy

    trained = trained_copy.load(run_dir, quick)
    model, core = trained["model"], trained["model"].core
    settings = core.modes.forward
    with torch.no_grad():
        x = model.embedding(trained["test_x"][:batch])
        z0, inputs = core.cell_inputs(x, core.init_memory(batch, x.device))
        last: dict[str, deq_ext.SolverResult] = {}

        def solve(hist: Optional[torch.dtype]) -> deq_ext.SolverResult:
            res = deq_ext.broyden(core.cell, z0, inputs=tuple(inputs),
                                  max_iter=settings.max_iter, tol=settings.tol,
                                  stop_mode=settings.stop_mode,
                                  history_dtype=history_of(hist, z0))
            last["res"] = res
            return res

        info = {"problem": {"kind": "copy_memory", "weights": f"trained ({trained['step']} steps)"},
                "state_dtype": "torch.float32", "dim": int(z0[0].numel()),
                "max_iter": settings.max_iter, "residual": settings.stop_mode}
        pick = (lambda z: last["res"].abs_residual) if settings.stop_mode == "abs" else \
            (lambda z: last["res"].rel_residual)
        return steps_case("copy memory (trained)", solve, pick, settings.tol, info)


def timing(device: str, quick: bool, rounds: int) -> dict[str, Any]:
    """Passes and whole MLP-f solves per history dtype, interleaved round by round."""
    problem, cfg = bench_problem("mlp", device, quick)
    dev = cfg.torch_device
    passes: dict[str, list[float]] = {n: [] for n in HISTORIES}
    solves: dict[str, list[float]] = {n: [] for n in HISTORIES}
    for r in range(rounds):
        for name, hist in HISTORIES.items():
            passes[name].append(fused_passes_time(cfg, cfg.bw, history_dtype=hist))
            sync(dev)
            t0 = time.perf_counter()
            deq_ext.broyden(problem.f, problem.z0, inputs=(problem.x, problem.rho),
                            max_iter=cfg.max_iter, tol=cfg.tol,
                            history_dtype=history_of(hist, problem.z0))
            sync(dev)
            solves[name].append(time.perf_counter() - t0)
        progress(f"round {r + 1}/{rounds}: passes " + ", ".join(
            f"{n} {passes[n][-1] * 1e3:.2f} ms" for n in HISTORIES) + "; solves " + ", ".join(
            f"{n} {solves[n][-1]:.3f} s" for n in HISTORIES))
    out: dict[str, Any] = {"passes_sizes": {"batch": cfg.bw.batch, "dim": cfg.bw.dim,
                                            "m": cfg.bw.m, "state_dtype": str(cfg.torch_dtype)},
                           "rounds": rounds, "passes_s": {}, "solve_s": {}, "speedup": {}}
    for name in HISTORIES:
        out["passes_s"][name] = median(passes[name])
        out["solve_s"][name] = median(solves[name])
        if name != "state":
            out["speedup"][f"passes_{name}"] = ratio(out["passes_s"]["state"],
                                                    out["passes_s"][name])
            out["speedup"][f"solve_{name}"] = ratio(out["solve_s"]["state"], out["solve_s"][name])
            out["speedup"][f"passes_{name}_spread"] = spread(
                [ratio(a, b) for a, b in zip(passes["state"], passes[name])])
    return out


def format_table(results: dict[str, Any]) -> str:
    lines = [f"Broyden history dtype: steps to tolerance and time ({results['device']})"]
    for c in results["cases"]:
        lines.append(f"\n{c['case']}, state {c['state_dtype']}, D={c['dim']}, "
                     f"max_iter {c['max_iter']}, tol {c['tol']:g}")
        lines += steps_lines(c["rows"], "history", "history", "max_residual", width=9)
    t = results.get("timing")
    if t:
        s = t["passes_sizes"]
        lines.append(f"\nreduce + expand_ at a full ring (B={s['batch']} D={s['dim']} m={s['m']}, "
                     f"state {s['state_dtype']}) and the MLP-f solve, median of {t['rounds']} "
                     "interleaved rounds:")
        for n in HISTORIES:
            extra = "" if n == "state" else (f"  passes {t['speedup'][f'passes_{n}']:.2f}x, "
                                             f"solve {t['speedup'][f'solve_{n}']:.2f}x")
            lines.append(f"  {n:>9}: passes {t['passes_s'][n] * 1e3:8.2f} ms, "
                         f"solve {t['solve_s'][n]:.3f} s{extra}")
        if results.get("machine_busy"):
            lines.append("  (the machine was busy: timings recorded, no conclusions)")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args_list = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.history_precision",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--no-timing", action="store_true", help="step counts only")
    p.add_argument("--copy-dir", default=None,
                   help="also solve with the trained copy-memory model of this run directory")
    p.add_argument("--copy-batch", type=int, default=256, help="test sequences of that case")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(args_list)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    device = torch.device(args.device)
    results = provenance(device, "python -m benchmarks.history_precision", args_list)
    t0 = time.perf_counter()
    results["cases"] = [problem_case("mlp", args.device, args.quick),
                        problem_case("block", args.device, args.quick),
                        mdeq_case(args.quick)]
    if args.copy_dir:
        results["cases"].append(copy_memory_case(args.copy_dir, args.quick, args.copy_batch))
    if not args.no_timing:
        results["timing"] = timing(args.device, args.quick, args.rounds)
        results["load_average_end"] = load_average()
        results["machine_busy"] = machine_busy(results["load_average_start"],
                                               results["load_average_end"])
    results["wall_s"] = time.perf_counter() - t0
    print(format_table(results), flush=True)
    if args.out:
        write_json(results, args.out)
    return results


if __name__ == "__main__":
    main()
