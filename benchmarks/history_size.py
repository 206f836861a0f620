"""How many Broyden pairs a solve needs: iterations to tolerance against the history size m.

``python -m benchmarks.history_size [--quick] [--out PATH]``

The history ``(B, m, D)`` twice over (U and V) is most of a DEQ's training memory (see the memory
table), and it only pays while its pairs still help. This sweeps m on the benchmark's problems
(the MLP f of the headline and the solver-bound f, float32 and float64, the same heterogeneous
batch) and reports per m: the mean and largest step count, the samples converged and the largest
residual. Step counts do not depend on the machine's load, so this needs no quiet machine. The
smallest m whose mean steps stay within ``--slack`` of the full history's (m = max_iter), with as
many samples converged, on every problem is the recommended history size. A hard solve (the image
DEQ to a relative residual of 1e-11, float64) is among the problems: there a ring shorter than
the solve stalls or diverges samples that the whole history converges.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Optional

import torch

import deq_ext
from deq_ext.bench import Problem, progress, provenance, resolve_config, write_json
from deq_ext.bench import build_parser as bench_parser

MEMORIES = (4, 6, 8, 10, 12, 16, 20, 24, 32, 40, 60)
QUICK_MEMORIES = (2, 4, 30)
CASES = (("mlp", "float32"), ("mlp", "float64"), ("block", "float32"), ("block", "float64"))


def sweep_case(problem_kind: str, dtype: str, memories: tuple[int, ...], quick: bool,
               max_iter: int, tol: float) -> dict[str, Any]:
    """Step counts of one problem at every history size (the same batch, the same start)."""
    argv = ["--device", "cpu", "--problem", problem_kind, "--dtype", dtype,
            "--max-iter", str(max_iter), "--tol", str(tol)] + (["--quick"] if quick else [])
    cfg = resolve_config(bench_parser().parse_args(argv))
    problem = Problem(cfg)
    rows = []
    for m in memories:
        t0 = time.perf_counter()
        res = deq_ext.broyden(problem.f, problem.z0, inputs=(problem.x, problem.rho),
                              max_iter=cfg.max_iter, tol=cfg.tol, stop_mode="abs",
                              memory=min(m, cfg.max_iter))
        resid = problem.residual(res.z)
        steps = res.nstep.double()
        rows.append({"memory": m, "nstep_mean": float(steps.mean()), "nstep_max": int(steps.max()),
                     "converged": int((resid < cfg.tol).sum()), "batch": cfg.batch,
                     "max_abs_residual": float(resid.max()),
                     "seconds": time.perf_counter() - t0})
        progress(f"{problem_kind} {dtype} m={m}: steps {rows[-1]['nstep_mean']:.1f} mean, "
                 f"{rows[-1]['nstep_max']} max, {rows[-1]['converged']}/{cfg.batch} converged")
    return {"problem": problem.describe(), "dtype": dtype, "batch": cfg.batch, "dim": cfg.dim,
            "max_iter": cfg.max_iter, "tol": cfg.tol, "rows": rows}


def sweep_copy_memory(run_dir: str, memories: tuple[int, ...], quick: bool,
                      batch: int) -> dict[str, Any]:
    """Step counts of the trained copy-memory model's forward solve (its own training settings)
    on ``batch`` test sequences at every history size up to its iteration limit."""
    from . import trained_copy

    trained = trained_copy.load(run_dir, quick)
    model, core = trained["model"], trained["model"].core
    settings = core.modes.forward
    with torch.no_grad():
        x = model.embedding(trained["test_x"][:batch])
        z0, inputs = core.cell_inputs(x, core.init_memory(batch, x.device))
        rows = []
        for m in [m for m in memories if m <= settings.max_iter] or [settings.max_iter]:
            t0 = time.perf_counter()
            res = deq_ext.broyden(core.cell, z0, inputs=tuple(inputs), max_iter=settings.max_iter,
                                  tol=settings.tol, stop_mode=settings.stop_mode, memory=m)
            steps = res.nstep.double()
            rows.append({"memory": m, "nstep_mean": float(steps.mean()),
                         "nstep_max": int(steps.max()), "converged": int(res.converged.sum()),
                         "batch": batch, "max_abs_residual": float(res.abs_residual.max()),
                         "seconds": time.perf_counter() - t0})
            progress(f"copy memory m={m}: steps {rows[-1]['nstep_mean']:.1f} mean, "
                     f"{rows[-1]['nstep_max']} max, {rows[-1]['converged']}/{batch} converged")
    return {"problem": {"kind": "copy_memory", "weights": f"trained ({trained['step']} steps)",
                        "train_command": trained["train_command"]},
            "dtype": "float32", "batch": batch, "dim": int(z0[0].numel()),
            "max_iter": settings.max_iter, "tol": settings.tol, "stop_mode": settings.stop_mode,
            "rows": rows}


MDEQ_F = "models.mdeq cell, channels (4, 8), GroupNorm gains x0.25, random images"


def hard_mdeq() -> Any:
    """The image DEQ of the hard solve (models/mdeq.py, small, float64, eval mode), its
    GroupNorm gains scaled by 0.25 so that its cell contracts (see :data:`MDEQ_F`)."""
    from models import MDEQClassifier, MDEQConfig, ModeConfig

    torch.manual_seed(0)
    model = MDEQClassifier(MDEQConfig(channels=(4, 8), groups=2), ModeConfig()).double().eval()
    with torch.no_grad():
        for norm in model.core.cell.post:
            norm.weight.mul_(0.25)
    return model


def sweep_mdeq(memories: tuple[int, ...], quick: bool, seeds: tuple[int, ...] = (0, 3, 5),
               max_iter: int = 100, tol: float = 1e-11) -> dict[str, Any]:
    """A hard solve: the image DEQ (:func:`hard_mdeq`) on random 8x8 images to a relative
    residual of 1e-11, which takes ~40 Broyden steps with the whole history. Every seed is a
    batch of 3."""
    model = hard_mdeq()
    cases = [m for m in memories if m <= max_iter] + ([] if max_iter in memories else [max_iter])
    rows = []
    with torch.no_grad():
        for m in cases:
            steps, conv, worst = [], 0, 0.0
            for seed in seeds[:1] if quick else seeds:
                gen = torch.Generator().manual_seed(seed)
                inj = model.injection(torch.randn(3, 1, 8, 8, generator=gen, dtype=torch.float64))
                z0 = torch.zeros(3, model.core.cell.layout.dim, dtype=torch.float64)
                res = deq_ext.broyden(model.core.cell, z0, inputs=(inj,), max_iter=max_iter,
                                      tol=tol, stop_mode="rel", memory=m)
                steps += res.nstep.tolist()
                conv += int(res.converged.sum())
                worst = max(worst, float(res.rel_residual.max()))
            rows.append({"memory": m, "nstep_mean": sum(steps) / len(steps),
                         "nstep_max": max(steps), "converged": conv, "batch": len(steps),
                         "max_abs_residual": worst})
            progress(f"mdeq m={m}: steps {rows[-1]['nstep_mean']:.1f} mean, "
                     f"{conv}/{len(steps)} converged")
    return {"problem": {"kind": "mdeq", "f": MDEQ_F, "residual": "relative (max_abs_residual "
                        "holds the largest relative one)"},
            "dtype": "float64", "batch": rows[0]["batch"], "dim": model.core.cell.layout.dim,
            "max_iter": max_iter, "tol": tol, "stop_mode": "rel", "rows": rows}


def recommend(cases: list[dict[str, Any]], slack: float) -> Optional[int]:
    """The smallest m within ``slack`` of the full history's mean steps, and with as many samples
    converged, on every case (None if no m qualifies)."""
    candidates = sorted({r["memory"] for c in cases for r in c["rows"]})
    for m in candidates:
        ok = True
        for c in cases:
            full = max(c["rows"], key=lambda r: r["memory"])
            # The case's row at m, or at the next larger m it swept (its sweep stops at its
            # iteration limit, and a ring as long as the solve is the whole history).
            row = min((r for r in c["rows"] if r["memory"] >= m), key=lambda r: r["memory"],
                      default=full)
            ok &= row["nstep_mean"] <= (1 + slack) * full["nstep_mean"]
            ok &= row["converged"] >= full["converged"]
        if ok:
            return m
    return None


def steps_lines(rows: list[dict[str, Any]], label: str, key: str, resid_key: str,
                width: int) -> list[str]:
    """A steps-to-tolerance table: its header, then one line per row (``row[key]`` first)."""
    lines = [f"  {label:>{width}}{'steps mean':>12}{'max':>6}{'converged':>11}{'max resid':>12}"]
    for r in rows:
        lines.append(f"  {r[key]:>{width}}{r['nstep_mean']:>12.1f}{r['nstep_max']:>6}"
                     f"{r['converged']:>6}/{r['batch']:<4}{r[resid_key]:>12.2e}")
    return lines


def format_table(results: dict[str, Any]) -> str:
    lines = [f"Broyden steps against history size m ({results['device']})"]
    for c in results["cases"]:
        lines.append(f"\n{c['problem']['kind']} f, {c['dtype']}, B={c['batch']} D={c['dim']}, "
                     f"max_iter {c['max_iter']}, tol {c['tol']:g} ({c.get('stop_mode', 'abs')})")
        lines += steps_lines(c["rows"], "m", "memory", "max_abs_residual", width=4)
    rec = results["recommended_memory"]
    lines.append(f"\nrecommended default history size (within {results['slack']:.0%} of the full "
                 f"history's mean steps everywhere): {rec}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args_list = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.history_size",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--slack", type=float, default=0.05,
                   help="allowed growth of the mean step count against m = max_iter")
    p.add_argument("--max-iter", type=int, default=60, help="solver steps at most")
    p.add_argument("--tol", type=float, default=1e-4, help="absolute-residual tolerance")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--copy-dir", default=None,
                   help="also sweep the trained copy-memory model of this run directory "
                        "(trained there first if it holds no finished run)")
    p.add_argument("--copy-batch", type=int, default=256, help="test sequences of that sweep")
    args = p.parse_args(args_list)
    results = provenance(torch.device("cpu"), "python -m benchmarks.history_size", args_list)
    memories = QUICK_MEMORIES if args.quick else MEMORIES
    t0 = time.perf_counter()
    results["cases"] = [sweep_case(kind, dtype, memories, args.quick, args.max_iter, args.tol)
                        for kind, dtype in CASES]
    results["cases"].append(sweep_mdeq(memories, args.quick))
    if args.copy_dir:
        results["cases"].append(sweep_copy_memory(args.copy_dir, memories, args.quick,
                                                  args.copy_batch))
    results["slack"] = args.slack
    results["recommended_memory"] = recommend(results["cases"], args.slack)
    results["wall_s"] = time.perf_counter() - t0
    print(format_table(results), flush=True)
    if args.out:
        write_json(results, args.out)
    return results


if __name__ == "__main__":
    main()
