"""A whole DEQ training step, deq_ext's DEQ layer against torchdeq's DEQ (issue 14, item 3).

``python -m benchmarks.training_step [--quick] [--reps N] [--workloads NAME ...] [--out PATH]
[--plot PATH]``

One training step is: the step's own work before the solve (embedding, input injection, dropout
masks), the forward fixed-point solve, the loss on z*, and ``loss.backward()`` (the implicit
backward: the adjoint solve and the backward through f to the parameters); no optimizer. Both
sides run the same f, the same inputs and loss, the same tolerances, stop modes and iteration
limits, and full Broyden histories:

* ``deq_ext``: :class:`deq_ext.DEQ` with the workload's settings (per-sample stopping, f on
  the active samples only, the compacted adjoint solve);
* ``torchdeq``: torchdeq's own DEQ, ``get_deq(core='sliced', ift=True, f_solver='broyden',
  b_solver='broyden', f_max_iter, b_max_iter, f_tol, b_tol, f_stop_mode, b_stop_mode)``: the
  whole batch iterates until every sample meets the tolerance; its backward re-applies f at z*
  and solves the adjoint system from zero with one VJP through the whole batch per iteration.

Timing: repeats interleaved (every repeat times both sides back to back) after a warm-up; per
side the median repeat, and the ratio torchdeq / deq_ext of the medians with the min..max of the
per-repeat ratio. CUDA events on GPU, perf_counter on CPU.

Counting (the same wrapper on both sides): every call of f counts its rows (dim 0 of z). A call
under no_grad is a solver evaluation; a call that records a graph (z* with the gradient attached,
deq_ext's re-recordings on fewer rows in its adjoint solve, torchdeq's re-application of f in its
backward) hooks its output's ``grad_fn``, and each execution of that node, i.e. each VJP through
f, counts the rows of its cotangent: the adjoint solve's VJPs and the final backward to the
parameters. deq_ext's own ``backward_stats.vjp_rows`` and ``rerecord_rows`` are recorded too.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from deq_ext import DEQ
from deq_ext.bench import (
    machine_busy,
    median_index,
    progress,
    provenance,
    ratio,
    spread,
    time_calls,
    write_json,
)

from . import model_setup as ms
from . import step_workloads as sw
from . import trained_copy

PROGRAM = "python -m benchmarks.training_step"
SIDES = ("deq_ext", "torchdeq")
TARGETS = {"hetero_mlp": 2.0, "copy_memory": 1.5}  # the issue's: torchdeq / deq_ext at least
COUNTING = ("f rows: rows of every call of f (no-grad solver evaluations and graph-recording "
            "applications); VJP rows: rows of the cotangent at every execution of the grad_fn of "
            "a recorded f (a hook on it): the adjoint solve's VJPs plus the final backward to the "
            "parameters. torchdeq's iterations: its forward solver's f calls - 1, its backward "
            "VJPs - 2 (the first evaluation at y=0, and the final backward)")
TIMING = ("median of interleaved repeats after warm-up; CUDA events on GPU, perf_counter on CPU; "
          "a step = prepare (embedding, injection, masks) + forward solve + loss + backward")


# -- counting f ------------------------------------------------------------------------------------
class CountedF:
    """Wraps f: counts the rows of its evaluations and of the VJPs taken through it."""

    def __init__(self, f: Callable[..., torch.Tensor]) -> None:
        self.f = f
        self.reset()

    def reset(self) -> None:
        self.eval_rows = self.eval_calls = 0  # no-grad evaluations (solver iterations)
        self.graph_rows = self.graph_calls = 0  # applications that record a graph
        self.vjp_rows = self.vjp_calls = 0

    def snapshot(self) -> dict[str, int]:
        return {"eval_rows": self.eval_rows, "eval_calls": self.eval_calls,
                "graph_rows": self.graph_rows, "graph_calls": self.graph_calls,
                "vjp_rows": self.vjp_rows, "vjp_calls": self.vjp_calls}

    def __call__(self, z: torch.Tensor, *inputs: Any) -> torch.Tensor:
        out = self.f(z, *inputs)
        rows = int(z.shape[0])
        if torch.is_grad_enabled() and out.grad_fn is not None:
            self.graph_rows += rows
            self.graph_calls += 1
            out.grad_fn.register_prehook(self._on_vjp)
        else:
            self.eval_rows += rows
            self.eval_calls += 1
        return out

    def _on_vjp(self, grad_outputs: tuple) -> None:
        g = grad_outputs[0]
        self.vjp_calls += 1
        self.vjp_rows += 0 if g is None else int(g.shape[0])


# -- the two DEQ layers ----------------------------------------------------------------------------
class DeqExtSide:
    """deq_ext's DEQ layer around the counted f."""

    name = "deq_ext"

    def __init__(self, w: sw.Workload, counted: CountedF) -> None:
        self.layer = DEQ(counted, forward=w.forward, backward=w.backward)

    def solve(self, z0: torch.Tensor, inputs: tuple) -> torch.Tensor:
        return self.layer(*inputs, z0=z0)

    def solver_record(self, fwd: dict[str, int], bwd: dict[str, int]) -> dict[str, Any]:
        f_stats, b_stats = self.layer.forward_stats, self.layer.backward_stats
        assert f_stats is not None and b_stats is not None, "a step without both solves"
        return {"forward_iterations": _per_sample(f_stats.nstep),
                "backward_iterations": _per_sample(b_stats.nstep),
                "forward_residual": _residuals(f_stats.abs_residual, f_stats.rel_residual),
                "backward_residual": _residuals(b_stats.abs_residual, b_stats.rel_residual),
                "backward_stats_vjp_rows": b_stats.vjp_rows,
                "backward_stats_rerecord_rows": b_stats.rerecord_rows}


class TorchdeqSide:
    """torchdeq's own DEQ (``get_deq(..., ift=True)``, Broyden both ways) around the counted f."""

    name = "torchdeq"

    def __init__(self, w: sw.Workload, counted: CountedF) -> None:
        from torchdeq import get_deq

        for s in (w.forward, w.backward):
            if s.method != "broyden" or s.memory not in (None, s.max_iter):
                raise ValueError(f"torchdeq's side runs Broyden with the whole history; the "
                                 f"workload asks for method={s.method!r}, memory={s.memory}")
        self.config = dict(core="sliced", ift=True, f_solver="broyden", b_solver="broyden",
                           f_max_iter=w.forward.max_iter, b_max_iter=w.backward.max_iter,
                           f_tol=w.forward.tol, b_tol=w.backward.tol,
                           f_stop_mode=w.forward.stop_mode, b_stop_mode=w.backward.stop_mode)
        self.deq = get_deq(**self.config).train()
        self.counted = counted
        self.info: dict[str, Any] = {}
        self.backward_info: dict[str, Any] = {}

    def _on_backward(self, info: dict[str, Any]) -> None:
        self.backward_info = info

    def solve(self, z0: torch.Tensor, inputs: tuple) -> torch.Tensor:
        def f(z: torch.Tensor) -> torch.Tensor:
            return self.counted(z, *inputs)

        z_out, self.info = self.deq(f, z0, backward_writer=self._on_backward)
        return z_out[-1]

    def solver_record(self, fwd: dict[str, int], bwd: dict[str, int]) -> dict[str, Any]:
        # The batch iterates together: every sample takes the loop's steps.
        b_info = self.backward_info
        return {"forward_iterations": _batch_steps(fwd["eval_calls"] - 1),
                "backward_iterations": _batch_steps(bwd["vjp_calls"] - 2),
                "forward_residual": _residuals(self.info["abs_lowest"], self.info["rel_lowest"]),
                "backward_residual": (_residuals(b_info["abs_lowest"], b_info["rel_lowest"])
                                      if b_info else None)}


def _per_sample(nstep: torch.Tensor) -> dict[str, Any]:
    steps = nstep.double()
    return {"mean": float(steps.mean()), "min": int(nstep.min()), "max": int(nstep.max())}


def _batch_steps(n: int) -> dict[str, Any]:
    return {"mean": float(n), "min": n, "max": n}


def _residuals(abs_res: torch.Tensor, rel_res: torch.Tensor) -> dict[str, float]:
    a, r = abs_res.double().flatten(), rel_res.double().flatten()
    return {"abs_mean": float(a.mean()), "abs_max": float(a.max()),
            "rel_mean": float(r.mean()), "rel_max": float(r.max())}


# -- one step ----------------------------------------------------------------------------------------
class Bench:
    """One workload with both sides, each with its own counter; runs and records steps."""

    def __init__(self, w: sw.Workload) -> None:
        self.w = w
        self.counted = {s: CountedF(w.cell) for s in SIDES}
        self.torchdeq = TorchdeqSide(w, self.counted["torchdeq"])
        self.sides: dict[str, Union[DeqExtSide, TorchdeqSide]] = {
            "deq_ext": DeqExtSide(w, self.counted["deq_ext"]), "torchdeq": self.torchdeq}
        self._fwd: dict[str, dict[str, int]] = {}

    @property
    def device(self) -> torch.device:
        return next(self.w.module.parameters()).device

    def reset(self, side: str) -> None:
        """Untimed: fresh gradients and counts, the same seed (dropout masks) for both sides."""
        ms.zero_grads(self.w.module)
        self.counted[side].reset()
        torch.manual_seed(self.w.seed)

    def step(self, side: str) -> None:
        """The timed training step."""
        z0, inputs = self.w.prepare()
        z = self.sides[side].solve(z0, inputs)
        self._fwd[side] = self.counted[side].snapshot()
        self.w.loss(z).backward()

    def timed(self, side: str) -> float:
        return time_calls(self.device, lambda: self.step(side), lambda: self.reset(side), reps=1,
                          warmup=0)[0]

    def record(self, side: str) -> dict[str, Any]:
        """Rows and solver figures of the side's last step (reads the device)."""
        fwd, total = self._fwd[side], self.counted[side].snapshot()
        bwd = {k: total[k] - fwd[k] for k in total}
        rec = {"f_rows": total["eval_rows"] + total["graph_rows"],
               "f_rows_forward": fwd["eval_rows"] + fwd["graph_rows"],
               "f_rows_backward": bwd["eval_rows"] + bwd["graph_rows"],
               "f_calls": total["eval_calls"] + total["graph_calls"],
               "vjp_rows": total["vjp_rows"], "vjp_calls": total["vjp_calls"]}
        rec.update(self.sides[side].solver_record(fwd, bwd))
        return rec

    def gradients(self, side: str) -> dict[str, torch.Tensor]:
        """One untimed step of ``side``; its parameter gradients."""
        self.reset(side)
        self.step(side)
        return sw.parameter_grads(self.w.module)


# -- one workload ------------------------------------------------------------------------------------
def measure(w: sw.Workload, reps: int, warmup: int) -> dict[str, Any]:
    """Interleaved timings, per-step rows and iterations, and the gradients' agreement."""
    bench = Bench(w)
    times: dict[str, list[float]] = {s: [] for s in SIDES}
    records: dict[str, list[dict[str, Any]]] = {s: [] for s in SIDES}
    for rep in range(warmup + reps):
        t0 = time.perf_counter()
        for side in SIDES:
            t = bench.timed(side)
            if rep >= warmup:
                times[side].append(t)
                records[side].append(bench.record(side))
        label = "warm-up" if rep < warmup else f"repeat {rep - warmup + 1}/{reps}"
        progress(f"{w.name}: {label} ({time.perf_counter() - t0:.1f}s)")
    med = {s: median_index(times[s]) for s in SIDES}
    median_s = {s: times[s][med[s]] for s in SIDES}
    per_step = {s: records[s][med[s]] for s in SIDES}
    r = ratio(median_s["torchdeq"], median_s["deq_ext"])
    grads = {s: bench.gradients(s) for s in SIDES}
    result: dict[str, Any] = {
        "description": w.description, **w.info,
        "settings": {"forward": sw.settings_record(w.forward, "forward"),
                     "backward": sw.settings_record(w.backward, "backward")},
        "torchdeq_config": bench.torchdeq.config,
        "times_s": times, "median_s": median_s,
        "spread_s": {s: spread(times[s]) for s in SIDES},
        "ratio_torchdeq_over_deq_ext": r,
        "ratio_spread": spread([ratio(a, b) for a, b in zip(times["torchdeq"], times["deq_ext"])]),
        "per_step": per_step,
        "rows_ratio_torchdeq_over_deq_ext": {
            k: ratio(per_step["torchdeq"][k], per_step["deq_ext"][k])
            for k in ("f_rows", "vjp_rows")},
        "grad_rel_diff": sw.relative_difference(grads["torchdeq"], grads["deq_ext"]),
    }
    if w.name in TARGETS:
        limit = TARGETS[w.name]
        result["target"] = {"ratio": r, "limit": limit,
                            "pass": None if r is None else r >= limit}
    return result


# -- the run -------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke tests)")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed repeats per side (default 5; --quick: 1)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed warm-up rounds (default 1; --quick: 0)")
    parser.add_argument("--workloads", nargs="+", default=list(sw.WORKLOADS), metavar="NAME",
                        help=f"workloads to time, of {', '.join(sw.WORKLOADS)} (default: all)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--plot", default=None,
                        help="PNG of times and rows (default: --out with .png when --out is given)")
    parser.add_argument("--copy-dir", default=trained_copy.DEFAULT_DIR,
                        help="run directory of the trained copy-memory model (trained there first "
                             "if it holds no finished run)")
    parser.add_argument("--copy-batch", type=int, default=None,
                        help="test sequences per step of copy_memory (default 64 on CPU, 256 on "
                             "CUDA; --quick: 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own choice)")
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line, checked (argparse errors exit with status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = [n for n in args.workloads if n not in sw.WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; choose from {', '.join(sw.WORKLOADS)}")
    for name in ("reps", "copy_batch", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Time every workload, print the table, write the JSON (and the plot); returns the results."""
    args_list = sys.argv[1:] if argv is None else list(argv)
    args = parse(args_list)
    device = ms.resolve_device(args.device)
    ms.apply_threads(args.threads)
    reps = args.reps or (1 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    results = provenance(device, PROGRAM, args_list)
    results.update({"numerics": ms.numerics(device), "reps": reps, "warmup": warmup,
                    "timing": TIMING, "counting": COUNTING, "targets": dict(TARGETS)})
    t0 = time.perf_counter()
    results["workloads"] = {}
    for name in dict.fromkeys(args.workloads):
        progress(f"{name}: building")
        w = sw.build(name, device, args.quick, args.seed, args.copy_dir, args.copy_batch)
        results["workloads"][name] = measure(w, reps, warmup)
    results["wall_s"] = time.perf_counter() - t0
    results["load_average_end"] = ms.load_average()
    # A busy machine gets figures but no verdict.
    results["busy"] = machine_busy(results["load_average_start"], results["load_average_end"])
    if results["busy"]:
        for res in results["workloads"].values():
            if "target" in res:
                res["target"]["pass"] = None
    print(format_table(results), flush=True)
    if args.out:
        write_json(results, args.out)
        progress(f"wrote {args.out}")
    plot = args.plot or (str(Path(args.out).with_suffix(".png")) if args.out else None)
    if plot:
        skipped = plot_results(results, plot)
        progress(f"plot skipped: {skipped}" if skipped else f"wrote {plot}")
    return results


# -- report ------------------------------------------------------------------------------------------
def format_table(results: dict[str, Any]) -> str:
    """One block per workload: seconds per step, the ratio, rows and iterations of both sides."""
    lines = [f"Training step (forward + loss.backward()): deq_ext's DEQ vs torchdeq's DEQ "
             f"(broyden, ift), device: {results['device']}",
             f"median of {results['reps']} interleaved repeats (min..max of the per-repeat ratio "
             f"in brackets)"]
    if results.get("busy"):
        lines.append(f"WARNING: the machine was busy ({results['busy']}); no verdicts")
    for name, res in results["workloads"].items():
        fwd, bwd = res["settings"]["forward"], res["settings"]["backward"]
        lines += ["", f"{name} ({res['description']}; batch {res['batch']}; forward "
                      f"{fwd['stop_mode']} tol {fwd['tol']:g} max {fwd['max_iter']}, backward "
                      f"{bwd['stop_mode']} tol {bwd['tol']:g} max {bwd['max_iter']}):",
                  f"  {'side':<10}{'s/step':>9}{'f rows':>9}{'VJP rows':>10}"
                  f"{'fwd it mean/max':>17}{'bwd it mean/max':>17}{'fwd resid max':>15}"]
        for side in SIDES:
            st = res["per_step"][side]
            resid = st["forward_residual"][f"{fwd['stop_mode']}_max"]
            lines.append(f"  {side:<10}{res['median_s'][side]:>9.4f}{st['f_rows']:>9}"
                         f"{st['vjp_rows']:>10}{_iters(st['forward_iterations']):>17}"
                         f"{_iters(st['backward_iterations']):>17}{resid:>15.1e}")
        sp = res["ratio_spread"]
        rng = "" if sp["min"] is None else f" [{sp['min']:.2f}..{sp['max']:.2f}]"
        r = res["ratio_torchdeq_over_deq_ext"]
        line = f"  torchdeq / deq_ext: {_x(r)}{rng}; gradients differ by {res['grad_rel_diff']:.1e}"
        if "target" in res:
            t = res["target"]
            verdict = "-" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
            line += f"; target >= {t['limit']}x: {verdict}"
        lines.append(line)
    return "\n".join(lines)


def _iters(it: dict[str, Any]) -> str:
    return f"{it['mean']:.1f}/{it['max']}"


def _x(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def plot_results(results: dict[str, Any], path: str) -> Optional[str]:
    """Seconds per step (median, min..max) and f / VJP rows per step, both sides, per workload.
    Returns None when written, else why it was skipped."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display on benchmark machines
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    names = list(results["workloads"])
    fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(9.6, 4.0))
    res = [results["workloads"][n] for n in names]
    width = 0.38
    for i, side in enumerate(SIDES):
        xs = [k + (i - 0.5) * width for k in range(len(names))]
        med = [r["median_s"][side] for r in res]
        err = [[m - r["spread_s"][side]["min"] for m, r in zip(med, res)],
               [r["spread_s"][side]["max"] - m for m, r in zip(med, res)]]
        ax_t.bar(xs, med, width, yerr=err, capsize=3, color=f"C{i}", label=side)
        # Four bars per workload: f rows then VJP rows (hatched), each side in its colour.
        for j, (key, hatch) in enumerate((("f_rows", None), ("vjp_rows", "//"))):
            xr = [k + (2 * j + i - 1.5) * width / 2 for k in range(len(names))]
            ax_r.bar(xr, [r["per_step"][side][key] for r in res], width / 2, color=f"C{i}",
                     hatch=hatch, edgecolor="white" if hatch else None,
                     label=f"{side} {key.replace('_rows', '').replace('vjp', 'VJP')} rows")
    for ax, label in ((ax_t, "seconds per training step"), (ax_r, "rows per step")):
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    ax_t.set_yscale("log")
    ax_r.set_yscale("log")
    fig.suptitle(f"DEQ training step: deq_ext vs torchdeq ({results['device']})", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


if __name__ == "__main__":
    main()
