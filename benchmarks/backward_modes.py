"""The DEQ layer's backward modes side by side (issue 27): cost and accuracy of each gradient.

``python -m benchmarks.backward_modes [--quick] [--reps N] [--workloads NAME ...] [--out PATH]``
``python -m benchmarks.backward_modes --training-runs [--seeds 0 1 2] [--tasks ...] [--out PATH]``

Per training step (the default run, a few minutes on 2 cores), for each workload and each mode
of :data:`MODES`: the rows f was applied to and the rows of the VJPs taken through it (counted
as :mod:`benchmarks.training_step` counts them: the adjoint solve's VJPs plus the final backward
to the parameters), the backward time over the forward time (forward: the step's own
preparation, the solve and the loss; backward: ``loss.backward()``), and the parameter
gradient's cosine and relative error against the exact adjoint solved to a tight tolerance
(:data:`REFERENCE_FACTOR` times the workload's backward tolerance). torchdeq's own DEQ
(``get_deq(ift=True)``, as in :mod:`benchmarks.training_step`) is timed alongside, so each
mode's step time can be compared with it. The workloads: the trained copy-memory
DEQ-Transformer and the heterogeneous MLP of :mod:`benchmarks.step_workloads`, the trained
digits MDEQ and the trained CPU language model of :mod:`benchmarks.trained_runs`.

``--training-runs``: whole training runs of copy memory and digits, one per seed and mode, with
the training scripts' ``--grad-mode``, ``--backward-init`` and ``--phantom-steps``: final test
loss and accuracy, wall time (much longer: minutes per run on 2 cores). The record is written
after every run, and a rerun with the same ``--out`` keeps the runs it already holds.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from deq_ext import DEQ, SolverSettings
from deq_ext.bench import (
    machine_busy,
    median_index,
    progress,
    provenance,
    ratio,
    spread,
    sync,
    write_json,
)

from . import model_setup as ms
from . import step_workloads as sw
from . import trained_copy, trained_runs
from .training_step import CountedF

PROGRAM = "python -m benchmarks.backward_modes"
WORKLOADS = ("copy_memory", "digits", "cpu_lm", "hetero_mlp")
TASKS = ("copy_memory", "digits")
PHANTOM_STEPS = 5

# name -> (DEQ keyword arguments beyond the settings, backward options, what it is).
MODES: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "implicit": ({}, {}, "exact: adjoint Broyden solve from dL/dz* (the default)"),
    "implicit_warm": ({}, {"init": "shine"},
                      "exact: adjoint Broyden solve from the forward estimate -H^T dL/dz*"),
    "shine": ({"grad_mode": "shine"}, {},
              "the forward estimate -H^T dL/dz*, checked with one VJP (shine_tol 0.1), "
              "exact adjoint for the samples that fail"),
    "shine_unchecked": ({"grad_mode": "shine"}, {"shine_tol": math.inf},
                        "the forward estimate alone, no VJP (fallback only for unconverged "
                        "samples)"),
    "phantom": ({"grad_mode": "phantom", "phantom_steps": PHANTOM_STEPS}, {},
                f"backprop through {PHANTOM_STEPS} steps of f from z* (damping 1)"),
    "one_step": ({"grad_mode": "phantom", "phantom_steps": 1}, {},
                 "backprop through one step of f from z* (Jacobian-free)"),
}
# The training scripts' flags for each mode of the training runs.
TRAINING_MODES: dict[str, list[str]] = {
    "implicit": ["--grad-mode", "implicit", "--backward-init", "grad"],
    "implicit_warm": ["--grad-mode", "implicit", "--backward-init", "shine"],
    "shine": ["--grad-mode", "shine"],
    "phantom": ["--grad-mode", "phantom", "--phantom-steps", str(PHANTOM_STEPS)],
    "one_step": ["--grad-mode", "phantom", "--phantom-steps", "1"],
}
# The issue's targets, on the trained copy-memory model: (mode, figure, bound, at most?).
TARGETS: dict[str, tuple[tuple[str, str, float, bool], ...]] = {
    "copy_memory": (("implicit", "vjp_rows_over_f_rows", 0.4, True),
                    ("implicit_warm", "vjp_rows_over_f_rows", 0.4, True),
                    ("implicit", "torchdeq_over_step", 2.0, False),
                    ("implicit_warm", "torchdeq_over_step", 2.0, False),
                    ("shine", "cosine", 0.95, False),
                    ("shine_unchecked", "cosine", 0.95, False)),
}
REFERENCE_FACTOR = 1e-3  # the reference adjoint's tolerance, relative to the workload's
REFERENCE_MAX_ITER = 200
COUNTING = ("f rows: rows of every call of f (forward solve, the application at z* that "
            "records the graph, phantom steps, re-recordings); VJP rows: rows of the cotangent "
            "at every VJP through a recorded f (the adjoint solve's, SHINE's check, the final "
            "backward to the parameters); adjoint VJP rows: backward_stats.vjp_rows")
TIMING = ("median of interleaved repeats after warm-up, perf_counter (CUDA: synchronized); "
          "forward = prepare + solve + loss, backward = loss.backward()")


# -- the digits and language-model workloads -----------------------------------------------------
def digits_workload(device: torch.device, quick: bool, seed: int = 0,
                    run_dir: str = trained_runs.DIGITS_DIR) -> sw.Workload:
    """The trained digits MDEQ on its first test images: injection, DEQ core, linear head."""
    trained = trained_runs.load_digits(run_dir, quick)
    model = trained["model"].to(device).train()
    batch = 16 if quick else 64
    x, y = trained["test_x"][:batch].to(device), trained["test_y"][:batch].to(device)
    cell = model.core.cell

    def prepare() -> tuple[torch.Tensor, tuple]:
        inj = model.injection(x)
        return torch.zeros_like(inj), (inj,)

    def loss(z: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model.head(cell.layout.unpack(z)[-1].flatten(1)), y)

    modes = model.core.modes
    info = {"batch": batch, "weights": f"trained ({trained['step']} steps)",
            "train_command": trained["train_command"],
            "loss": "cross-entropy of the classifier on the test labels"}
    return sw.Workload("digits", "trained digits MDEQ (8x8 + 4x4), test images", cell, model,
                       prepare, loss, modes.forward, modes.backward, seed, info)


def cpu_lm_workload(device: torch.device, quick: bool, seed: int = 0,
                    run_dir: str = trained_runs.LM_DIR) -> sw.Workload:
    """The trained CPU language model on its second training segment, with the first one's
    memory (embedding without dropout, DEQ core, output projection, adaptive-softmax loss)."""
    from train.data_lm import segment

    trained = trained_runs.load_cpu_lm(run_dir, quick)
    model = trained["model"].to(device)
    core, data = model.core, trained["train"].to(device)
    tokens0, _ = segment(data, 0, trained["tgt_len"])
    tokens, targets = segment(data, 1, trained["tgt_len"])
    with torch.no_grad():
        memory = model.eval()(tokens0).memory
    model.train()

    def prepare() -> tuple[torch.Tensor, tuple]:
        return core.cell_inputs(model.embedding(tokens), memory)

    def loss(z: torch.Tensor) -> torch.Tensor:
        return model.embedding.nll(model.out_proj(core.features(z)), targets).mean()

    if core.modes.subseq_len is not None:
        raise ValueError("the CPU language model solves in chunks; this benchmark solves whole "
                         "segments")
    info = {"batch": int(tokens.shape[0]), "seq": int(tokens.shape[1]),
            "weights": f"trained ({trained['step']} steps)",
            "train_command": trained["train_command"],
            "loss": "next-token negative log-likelihood on the training stream"}
    return sw.Workload("cpu_lm", "trained CPU language model (configs/cpu_lm.json), one segment",
                       core.solver_cell(), model, prepare, loss, core.modes.forward,
                       core.modes.backward, seed, info)


def build(name: str, device: torch.device, quick: bool, seed: int = 0,
          copy_dir: str = trained_copy.DEFAULT_DIR) -> sw.Workload:
    """The workload called ``name`` (tiny sizes and models with ``quick``)."""
    if name == "digits":
        return digits_workload(device, quick, seed,
                               trained_runs.DIGITS_DIR + ("-quick" if quick else ""))
    if name == "cpu_lm":
        return cpu_lm_workload(device, quick, seed, trained_runs.LM_DIR + ("-quick" if quick else ""))
    if name == "copy_memory":
        return sw.build(name, device, quick, seed, copy_dir + ("-quick" if quick else ""))
    if name == "hetero_mlp":
        return sw.build(name, device, quick, seed)
    raise ValueError(f"unknown workload {name!r}; expected one of {WORKLOADS}")


# -- one workload ----------------------------------------------------------------------------------
def with_options(s: SolverSettings, **options: Any) -> SolverSettings:
    return SolverSettings(s.method, s.max_iter, s.tol, s.stop_mode, s.memory,
                          {**s.options, **options})


def layer(w: sw.Workload, counted: CountedF, mode: str) -> DEQ:
    """A DEQ around the counted f with the workload's settings and ``mode``'s gradient."""
    kwargs, options, _ = MODES[mode]
    return DEQ(counted, forward=w.forward, backward=with_options(w.backward, **options), **kwargs)


def reference_layer(w: sw.Workload, counted: CountedF) -> DEQ:
    """The exact adjoint at a tight tolerance: the gradient every mode is compared with."""
    b = w.backward
    tight = SolverSettings(b.method, REFERENCE_MAX_ITER, b.tol * REFERENCE_FACTOR, b.stop_mode,
                           None, {**b.options, "stall_patience": 0})
    return DEQ(counted, forward=w.forward, backward=tight)


class Step:
    """One timed training step of a workload with one DEQ layer (or torchdeq's DEQ)."""

    def __init__(self, w: sw.Workload, solve: Callable[[torch.Tensor, tuple], torch.Tensor],
                 counted: CountedF) -> None:
        self.w, self.solve, self.counted = w, solve, counted
        self.device = next(w.module.parameters()).device

    def run(self) -> dict[str, Any]:
        """Fresh gradients, the seed of the workload (dropout masks), one step; its figures."""
        ms.zero_grads(self.w.module)
        self.counted.reset()
        torch.manual_seed(self.w.seed)
        sync(self.device)
        t0 = time.perf_counter()
        z0, inputs = self.w.prepare()
        loss = self.w.loss(self.solve(z0, inputs))
        sync(self.device)
        t1 = time.perf_counter()
        fwd = self.counted.snapshot()
        loss.backward()
        sync(self.device)
        t2 = time.perf_counter()
        total = self.counted.snapshot()
        return {"forward_s": t1 - t0, "backward_s": t2 - t1, "step_s": t2 - t0,
                "f_rows": total["eval_rows"] + total["graph_rows"],
                "f_rows_forward": fwd["eval_rows"] + fwd["graph_rows"],
                "vjp_rows": total["vjp_rows"]}


def flat_grads(module: torch.nn.Module) -> torch.Tensor:
    """Every parameter gradient of ``module``, flattened into one float64 vector."""
    return torch.cat([g.double().flatten() for g in sw.parameter_grads(module).values()])


def agreement(g: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Cosine and relative error ``||g - ref|| / ||ref||`` of two flat gradients."""
    den = float(g.norm() * ref.norm())
    return {"cosine": float(g @ ref) / den if den else math.nan,
            "rel_error": float((g - ref).norm() / ref.norm()) if float(ref.norm()) else math.nan}


def backward_record(deq: DEQ) -> dict[str, Any]:
    """The adjoint solve's figures of the layer's last step (empty for phantom gradients)."""
    b = deq.backward_stats
    if b is None:
        return {}
    rec: dict[str, Any] = {"adjoint_vjp_rows": b.vjp_rows, "rerecord_rows": b.rerecord_rows,
                           "backward_iterations_mean": float(b.nstep.double().mean()),
                           "backward_iterations_max": int(b.nstep.max())}
    if b.fallback is not None:
        codes = b.fallback.tolist()
        rec["shine_fallback"] = {str(c): codes.count(c) for c in sorted(set(codes))}
        rec["shine_fallback_share"] = sum(c != 0 for c in codes) / len(codes)
        if b.estimate_rel_residual is not None:  # the estimates' own, before any fallback
            rec["shine_estimate_rel_residual"] = spread(b.estimate_rel_residual.tolist())
    return rec


def torchdeq_step(w: sw.Workload) -> Optional[Step]:
    """torchdeq's DEQ on the workload, or None where torchdeq is missing or cannot run it."""
    try:
        from .training_step import TorchdeqSide

        counted = CountedF(w.cell)
        side = TorchdeqSide(w, counted)
    except (ImportError, ValueError) as err:
        progress(f"{w.name}: no torchdeq side ({err})")
        return None
    return Step(w, side.solve, counted)


def measure(w: sw.Workload, reps: int, warmup: int, modes: list[str]) -> dict[str, Any]:
    """Every mode's interleaved steps, its gradient against the reference, and torchdeq's step."""
    counted = CountedF(w.cell)
    ref_layer = reference_layer(w, counted)
    Step(w, lambda z0, inputs: ref_layer(*inputs, z0=z0), counted).run()
    ref = flat_grads(w.module)
    ref_stats = ref_layer.backward_stats
    assert ref_stats is not None
    layers = {m: layer(w, counted, m) for m in modes}
    steps: dict[str, Step] = {m: Step(w, (lambda d: lambda z0, inputs: d(*inputs, z0=z0))(d),
                                      counted) for m, d in layers.items()}
    torchdeq = torchdeq_step(w)
    if torchdeq is not None:
        steps["torchdeq"] = torchdeq
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in steps}
    grads: dict[str, torch.Tensor] = {}
    extra: dict[str, dict[str, Any]] = {}
    for rep in range(warmup + reps):
        t0 = time.perf_counter()
        for name, step in steps.items():
            rec = step.run()
            if rep >= warmup:
                runs[name].append(rec)
            if name in layers and rep == warmup + reps - 1:
                grads[name] = flat_grads(w.module)
                extra[name] = backward_record(layers[name])
        label = "warm-up" if rep < warmup else f"repeat {rep - warmup + 1}/{reps}"
        progress(f"{w.name}: {label} ({time.perf_counter() - t0:.1f}s)")
    result: dict[str, Any] = {
        "description": w.description, **w.info,
        "settings": {"forward": sw.settings_record(w.forward, "forward"),
                     "backward": sw.settings_record(w.backward, "backward")},
        "reference": {"backward_tol": w.backward.tol * REFERENCE_FACTOR,
                      "backward_max_iter": REFERENCE_MAX_ITER,
                      "rel_residual_max": float(ref_stats.rel_residual.max()),
                      "abs_residual_max": float(ref_stats.abs_residual.max()),
                      "iterations_max": int(ref_stats.nstep.max())},
        "modes": {}}
    torchdeq_s = None
    if "torchdeq" in runs:
        td = runs["torchdeq"]
        torchdeq_s = td[median_index([r["step_s"] for r in td])]["step_s"]
        result["torchdeq"] = {"median_step_s": torchdeq_s, "per_step": td[0]}
    for name in layers:
        recs = runs[name]
        med = recs[median_index([r["step_s"] for r in recs])]
        first = recs[0]  # rows are the same in every repeat (same seed and inputs)
        result["modes"][name] = {
            "description": MODES[name][2],
            "f_rows": first["f_rows"], "f_rows_forward": first["f_rows_forward"],
            "vjp_rows": first["vjp_rows"],
            "vjp_rows_over_f_rows": ratio(first["vjp_rows"], first["f_rows"]),
            "median_step_s": med["step_s"], "forward_s": med["forward_s"],
            "backward_s": med["backward_s"],
            "backward_over_forward": ratio(med["backward_s"], med["forward_s"]),
            "torchdeq_over_step": ratio(torchdeq_s, med["step_s"]),
            "step_s": spread([r["step_s"] for r in recs]),
            **agreement(grads[name], ref), **extra[name]}
    result["targets"] = targets(w.name, result["modes"])
    return result


def targets(workload: str, modes: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets that apply to the workload's measured modes, each with its verdict
    (None without a value; ``main`` clears them all on a busy machine)."""
    out = []
    for mode, figure, bound, at_most in TARGETS.get(workload, ()):
        if mode not in modes:
            continue
        value = modes[mode].get(figure)
        passed = None if value is None else (value <= bound if at_most else value >= bound)
        out.append({"mode": mode, "figure": figure, "value": value,
                    "bound": f"{'<=' if at_most else '>='} {bound:g}", "pass": passed})
    return out


# -- whole training runs -------------------------------------------------------------------------
def training_run(task: str, mode: str, seed: int, quick: bool,
                 steps: Optional[int] = None) -> dict[str, Any]:
    """One training run of ``task`` with ``mode``'s flags (and ``steps`` optimizer steps instead
    of the script's when given); its final figures and wall time."""
    args = ["--seed", str(seed), "--progress", "false", *TRAINING_MODES[mode]]
    if quick:
        args += ["--preset", "tiny"]
    if steps is not None:
        args += ["--steps", str(steps)]
    if task == "copy_memory":
        from train import copy_memory

        summary = copy_memory.main(args)
        final = summary["final"]
        figures = {"test_loss": final["test_loss"],
                   "test_accuracy": final.get("test_copy_accuracy")}
    elif task == "digits":
        from train import digits

        summary = digits.main(args)
        final = summary["final"]
        figures = {"test_loss": final["test_loss"], "test_accuracy": final["test_accuracy"]}
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    module = "train." + task
    return {"command": f"python -m {module} " + " ".join(args), **figures,
            "wall_s": summary["wall_s"], "final_train_loss": summary["losses"][-1]}


def training_runs(tasks: list[str], modes: list[str], seeds: list[int], quick: bool,
                  done: Optional[dict[str, Any]] = None,
                  save: Callable[[dict[str, Any]], None] = lambda out: None,
                  steps: Optional[dict[str, int]] = None) -> dict[str, Any]:
    """Every (task, mode, seed) run, and per task and mode the figures listed by seed.

    Runs already in ``done`` (an earlier record's ``training_runs``, same seeds) are kept, not
    rerun; ``save`` gets the record after every run, so a long series can be resumed. ``steps``:
    optimizer steps per task where not the script's own."""
    out: dict[str, Any] = {}
    for task in tasks:
        runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
        # Seed by seed, so that a series cut short has every mode at its first seeds.
        for seed in seeds:
            for mode in modes:
                earlier = {r["seed"]: r for r in (done or {}).get(task, {}).get(mode, {})
                           .get("runs", [])}
                if seed in earlier:
                    runs[mode].append(earlier[seed])
                else:
                    progress(f"training {task} with {mode}, seed {seed}")
                    runs[mode].append({"seed": seed, **training_run(
                        task, mode, seed, quick, (steps or {}).get(task))})
                out[task] = {m: _by_seed(r) for m, r in runs.items() if r}
                save(out)
    return out


def _by_seed(runs: list[dict[str, Any]]) -> dict[str, Any]:
    entry: dict[str, Any] = {"seeds": [r["seed"] for r in runs], "runs": runs}
    for k in ("test_loss", "test_accuracy", "wall_s", "final_train_loss"):
        vals = [r[k] for r in runs if r[k] is not None]
        entry[k] = vals
        entry[f"{k}_mean"] = statistics.fmean(vals) if vals else None
    return entry


# -- the run ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and models (smoke tests)")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed repeats per mode (default 3; --quick: 1)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed warm-up rounds (default 1; --quick: 0)")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), metavar="NAME",
                        help=f"of {', '.join(WORKLOADS)} (default: all)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), metavar="MODE",
                        help=f"of {', '.join(MODES)} (default: all; training runs: "
                             f"{', '.join(TRAINING_MODES)})")
    parser.add_argument("--training-runs", action="store_true",
                        help="whole training runs instead of single steps")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), metavar="TASK",
                        help=f"training runs: of {', '.join(TASKS)} (default: both)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="training runs: the seeds (default 0 1 2)")
    parser.add_argument("--copy-steps", type=int, default=None,
                        help="training runs: optimizer steps of copy memory (default: the "
                             "script's 1500)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own choice)")
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line, checked (argparse errors exit with status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, known in (("workloads", WORKLOADS), ("tasks", TASKS)):
        bad = [n for n in getattr(args, name) if n not in known]
        if bad:
            parser.error(f"unknown {name} {bad}; choose from {', '.join(known)}")
    known_modes = TRAINING_MODES if args.training_runs else MODES
    if "--modes" not in argv:
        args.modes = list(known_modes)
    bad = [m for m in args.modes if m not in known_modes]
    if bad:
        parser.error(f"unknown modes {bad}; choose from {', '.join(known_modes)}")
    for name in ("reps", "threads", "copy_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Measure, print the table, write the JSON; returns the results."""
    args_list = sys.argv[1:] if argv is None else list(argv)
    args = parse(args_list)
    device = ms.resolve_device(args.device)
    ms.apply_threads(args.threads)
    results = provenance(device, PROGRAM, args_list)
    t0 = time.perf_counter()
    if args.training_runs:
        done = None
        if args.out and Path(args.out).exists():  # resume a series
            done = json.loads(Path(args.out).read_text()).get("training_runs")

        def save(partial: dict[str, Any]) -> None:
            if args.out:
                write_json({**results, "training_runs": partial, "complete": False}, args.out)

        steps = {"copy_memory": args.copy_steps} if args.copy_steps else None
        results["training_runs"] = training_runs(args.tasks, args.modes, args.seeds, args.quick,
                                                 done, save, steps)
        results["complete"] = True
        table = format_training_table(results)
    else:
        reps = args.reps or (1 if args.quick else 3)
        warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
        results.update({"numerics": ms.numerics(device), "reps": reps, "warmup": warmup,
                        "timing": TIMING, "counting": COUNTING,
                        "reference_factor": REFERENCE_FACTOR, "workloads": {}})
        for name in dict.fromkeys(args.workloads):
            progress(f"{name}: building")
            w = build(name, device, args.quick, args.seed)
            results["workloads"][name] = measure(w, reps, warmup, args.modes)
        table = format_table(results)
    results["wall_s"] = time.perf_counter() - t0
    results["load_average_end"] = ms.load_average()
    results["busy"] = machine_busy(results["load_average_start"], results["load_average_end"])
    if results["busy"]:  # timings on a shared machine get figures but no verdicts
        for res in results.get("workloads", {}).values():
            for t in res["targets"]:
                if "over_step" in t["figure"]:
                    t["pass"] = None
    ms.report(results, table, args.out)
    return results


# -- tables ---------------------------------------------------------------------------------------------
def format_table(results: dict[str, Any]) -> str:
    """One block per workload, one line per mode."""
    lines = [f"Backward modes, one training step each, device: {results['device']} (median of "
             f"{results['reps']} repeats); gradients against the exact adjoint at "
             f"{results['reference_factor']:g} x the backward tolerance"]
    if results.get("busy"):
        lines.append(f"NOTE: the machine was busy ({results['busy']}): times are noisy")
    for name, res in results["workloads"].items():
        td = res.get("torchdeq")
        lines += ["", f"{name} ({res['description']}; batch {res['batch']}"
                      + (f"; torchdeq step {td['median_step_s']:.4f}s" if td else "") + "):",
                  f"  {'mode':<16}{'f rows':>8}{'VJP rows':>9}{'VJP/f':>7}{'bwd/fwd':>9}"
                  f"{'s/step':>9}{'td/step':>9}{'cosine':>10}{'rel err':>10}{'fallback':>9}"]
        for mode, m in res["modes"].items():
            fb = m.get("shine_fallback_share")
            lines.append(
                f"  {mode:<16}{m['f_rows']:>8}{m['vjp_rows']:>9}"
                f"{ms.cell(m['vjp_rows_over_f_rows'], '.2f'):>7}"
                f"{ms.cell(m['backward_over_forward'], '.2f'):>9}"
                f"{m['median_step_s']:>9.4f}{ms.cell(m['torchdeq_over_step'], '.2f'):>9}"
                f"{m['cosine']:>10.6f}{m['rel_error']:>10.2e}{ms.cell(fb, '.2f'):>9}")
        for t in res["targets"]:
            verdict = "-" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
            lines.append(f"  target: {t['mode']} {t['figure']} {ms.cell(t['value'], '.3f')} "
                         f"{t['bound']}: {verdict}")
    return "\n".join(lines)


def markdown_table(results: dict[str, Any]) -> str:
    """The per-step record as the Markdown table of docs/backward.md (one row per workload and
    mode). The timing columns are left out of a record taken on a busy machine."""
    timed = not results.get("busy")
    head = ["workload", "mode", "f rows", "VJP rows", "VJP / f", "adjoint iterations",
            "cosine", "rel. error", "fallback"]
    if timed:
        head += ["bwd / fwd time", "torchdeq / step time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, res in results["workloads"].items():
        for mode, m in res["modes"].items():
            cells = [name, mode, str(m["f_rows"]), str(m["vjp_rows"]),
                     ms.cell(m["vjp_rows_over_f_rows"], ".2f"),
                     ms.cell(m.get("backward_iterations_mean"), ".2f"), f"{m['cosine']:.4f}",
                     f"{m['rel_error']:.1e}", ms.cell(m.get("shine_fallback_share"), ".2f")]
            if timed:
                cells += [ms.cell(m["backward_over_forward"], ".2f"),
                          ms.cell(m["torchdeq_over_step"], ".2f")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_training_table(results: dict[str, Any]) -> str:
    """The training-run record as the Markdown table of docs/backward.md."""
    lines = ["| task | mode | test loss (per seed) | accuracy (per seed) | wall s (mean) |",
             "|---|---|---|---|---|"]
    for task, modes in results["training_runs"].items():
        for mode, e in modes.items():
            loss = ", ".join(f"{v:.4g}" for v in e["test_loss"])
            acc = ", ".join(f"{v:.4f}" for v in e["test_accuracy"])
            lines.append(f"| {task} | {mode} | {loss} | {acc} | {ms.cell(e['wall_s_mean'], '.0f')} |")
    return "\n".join(lines)


def format_training_table(results: dict[str, Any]) -> str:
    """Per task and mode: final test loss and accuracy (mean and per seed), wall time."""
    lines = [f"Whole training runs per backward mode, device: {results['device']}"]
    for task, modes in results["training_runs"].items():
        lines += ["", f"{task}:", f"  {'mode':<16}{'test loss (per seed)':<40}"
                                  f"{'accuracy (per seed)':<34}{'wall s (mean)':>14}"]
        for mode, e in modes.items():
            loss = " ".join(f"{v:.4g}" for v in e["test_loss"])
            acc = " ".join(f"{v:.4f}" for v in e["test_accuracy"])
            lines.append(f"  {mode:<16}{loss:<40}{acc:<34}{ms.cell(e['wall_s_mean'], '.1f'):>14}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
