"""Training and inference time of the DEQ against the deep weight-tied model (paper, Table 4).

``python -m benchmarks.runtime_table [--device auto|cpu|cuda] [--quick] [--out PATH]``

The core of each small preset (embeddings and softmax excluded, random embedding-sized inputs,
full Transformer-XL memory, random untrained weights) runs as:

* ``deep``: the same f unrolled L times with ordinary backprop, the same parameters: the paper's
  18-layer transformer and 70-layer TrellisNet;
* ``deq``: the model's own DEQ forward: per-sample stopping and active-set compaction (f only on
  the samples still active);
* ``deq_no_compact``: the same solver with ``compact=False``: finished samples are masked
  (frozen) but f runs on the whole batch every iteration;
* ``deq_no_mask``: no per-sample stopping either (``per_sample=False``, forward and backward):
  every sample iterates until the whole batch has converged, as torchdeq's batch-level stopping
  does. It runs the same compiled solver, so it isolates the effect of masking, not of the
  solver's implementation.

The variants are the model's own forward with solver options added to its settings
(``model_setup.VARIANT_OPTIONS``); they solve the same equation.

**Matched accuracy settings** are the paper's (section 5), as the presets give them: training
forward tolerance sqrt(T)*1e-5 and backward sqrt(T)*1e-8 (absolute residual), inference forward
tolerance relaxed to sqrt(T)*1e-2 (``ModeConfig.eval_forward``), with the presets' Broyden
iteration limits; the tolerances are rescaled to the benchmarked T by the paper's sqrt(T) rule.

Training time: one forward + backward of the core (no optimizer step), in train mode. Inference
time: one forward in eval mode under ``torch.no_grad``. Each is the median of several repeats,
interleaved across the variants, after a warm-up; the same seed is set before every call, so every
variant sees the same dropout masks.

**Solver share**: a separate instrumented run times every evaluation of f with device syncs
around it (forward hooks on the cell: the solver's no-grad evaluations and the one application
that attaches the gradient) and every vector-Jacobian product of f in the backward pass (a
pre-hook on f's output node and a hook on its input z*: each adjoint iteration and the final
backward through f). The solver's share is what is left: Broyden's updates, residuals and status,
compaction's gathers, plus the (small) injection and loss. The instrumented run also counts the
rows f is evaluated on, from which ``compaction_rows_saved`` = 1 - rows(deq) / rows(no compact).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import torch

from deq_ext import SolverStats
from deq_ext.bench import machine_busy, median_index, progress, ratio, spread, sync, time_calls
from models.modes import ModeConfig, SequenceCore

from . import model_setup as ms
from . import torchdeq_solver, trained_copy

DEEP_DEPTH = {"transformer": 18, "trellisnet": 70}  # paper, Table 4
VARIANTS = ("deep", "deq", "deq_no_compact", "deq_no_mask", "deq_torchdeq")
COPY = "copy_memory"  # the trained, converging model (benchmarks.trained_copy)
TARGETS = {"train": 2.0, "infer": 1.3}  # the issue's targets for DEQ / deep
PAPER = {"transformer": {"train": 2.82, "infer": 1.76},  # paper, Table 4
         "trellisnet": {"train": 2.40, "infer": 1.64}}


@dataclass(frozen=True)
class Sizes:
    """What one run measures: batch, sequence, memory, repeats."""

    batch: int
    seq: int
    mem_len: Optional[int]
    reps: int
    warmup: int


# -- running one variant ---------------------------------------------------------------------
@dataclass
class Bench:
    """One model: the core, its inputs and the per-call statistics of the DEQ variants."""

    kind: str
    core: SequenceCore
    x: torch.Tensor
    memory: tuple
    w: torch.Tensor  # the loss readout
    seed: int
    deep_depth: int
    variants: tuple[str, ...]
    stats: dict[str, SolverStats] = field(default_factory=dict)
    # The core's own settings, which every DEQ variant's options are added to.
    base_modes: ModeConfig = field(init=False)

    def __post_init__(self) -> None:
        self.base_modes = self.core.modes

    @property
    def device(self) -> torch.device:
        return self.x.device

    def prepare(self, variant: str, train: bool) -> None:
        """Untimed: mode, train/eval, fresh gradients, the same dropout masks for every variant."""
        if variant == "deep":
            ms.set_mode(self.core, "unrolled", self.deep_depth)
        elif variant == "deq_torchdeq":
            self.core.set_mode("deq", **ms.with_solver_method(self.base_modes,
                                                              torchdeq_solver.register()))
        else:
            self.core.set_mode("deq", **ms.with_solver_options(self.base_modes,
                                                               ms.VARIANT_OPTIONS[variant]))
        self.core.train(train)
        ms.zero_grads(self.core)
        torch.manual_seed(self.seed)

    def features(self, variant: str) -> torch.Tensor:
        """The core's output for one variant (the mode is already set)."""
        out = self.core(self.x, self.memory).features
        self.stats = {} if variant == "deep" else ms.stats_of(self.core) or {}
        return out

    def body(self, variant: str, train: bool) -> Callable[[], None]:
        """The timed call: forward + backward (training) or a no-grad forward (inference)."""
        def train_step() -> None:
            ms.output_loss(self.features(variant), self.w).backward()

        def infer_step() -> None:
            with torch.no_grad():
                self.features(variant)

        return train_step if train else infer_step


def timed_once(bench: Bench, variant: str, train: bool) -> float:
    """Seconds of one call (device time on CUDA, wall time on CPU)."""
    body = bench.body(variant, train)
    return time_calls(bench.device, body, lambda: bench.prepare(variant, train), reps=1,
                      warmup=0)[0]


def time_variants(bench: Bench, sizes: Sizes) -> dict[str, dict[str, list[float]]]:
    """Interleaved repeats: every repeat times every variant, training then inference."""
    times: dict[str, dict[str, list[float]]] = {v: {"train": [], "infer": []}
                                                for v in bench.variants}
    for rep in range(sizes.warmup + sizes.reps):
        t0 = time.perf_counter()
        for variant in bench.variants:
            for phase in ("train", "infer"):
                t = timed_once(bench, variant, phase == "train")
                if rep >= sizes.warmup:
                    times[variant][phase].append(t)
        label = "warm-up" if rep < sizes.warmup else f"repeat {rep - sizes.warmup + 1}/{sizes.reps}"
        progress(f"{bench.kind}: {label} ({time.perf_counter() - t0:.1f}s)")
    return times


# -- instrumented run: f's share ---------------------------------------------------------------
class FTimer:
    """Times f inside a DEQ step: its evaluations (module hooks) and its VJPs (autograd hooks)."""

    def __init__(self, cell: torch.nn.Module, device: torch.device) -> None:
        self.device = device
        self.eval_s = self.attach_s = self.vjp_s = 0.0
        self.evals = self.rows = self.attaches = self.vjps = 0
        self._t0 = self._vjp_t0 = 0.0
        self._handles = [cell.register_forward_pre_hook(self._pre),
                         cell.register_forward_hook(self._post)]

    def _now(self) -> float:
        sync(self.device)
        return time.perf_counter()

    def _pre(self, module: torch.nn.Module, args: tuple) -> None:
        self._t0 = self._now()

    def _post(self, module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        dt = self._now() - self._t0
        z = args[0]
        if torch.is_grad_enabled() and out.requires_grad:
            # The application of f at z* that attaches the gradient; its VJPs are hooked here.
            self.attach_s += dt
            self.attaches += 1
            if z.is_leaf and z.requires_grad:
                out.grad_fn.register_prehook(self._vjp_start)
                z.register_hook(self._vjp_stop)
        else:
            self.eval_s += dt
            self.evals += 1
            self.rows += z.shape[0]

    def _vjp_start(self, grad_outputs: tuple) -> None:
        self._vjp_t0 = self._now()

    def _vjp_stop(self, grad: torch.Tensor) -> None:
        self.vjp_s += self._now() - self._vjp_t0
        self.vjps += 1

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    @property
    def f_s(self) -> float:
        return self.eval_s + self.attach_s + self.vjp_s


def instrumented(bench: Bench, variant: str, train: bool) -> dict[str, Any]:
    """One call with f timed: f's time, the solver's remainder, f rows, per-sample steps."""
    bench.prepare(variant, train)
    timer = FTimer(bench.core.cell, bench.device)
    try:
        sync(bench.device)
        t0 = time.perf_counter()
        bench.body(variant, train)()
        sync(bench.device)
        total = time.perf_counter() - t0
    finally:
        timer.remove()
    batch = bench.x.shape[0]
    out = {"total_s": total, "f_eval_s": timer.eval_s, "f_attach_s": timer.attach_s,
           "f_vjp_s": timer.vjp_s, "f_share": ratio(timer.f_s, total),
           "solver_share": ratio(total - timer.f_s, total),
           "f_evals": timer.evals, "f_rows": timer.rows, "f_rows_full_batch": timer.evals * batch,
           "vjps": timer.vjps, "vjp_rows": timer.vjps * batch}
    out.update(ms.solver_summary(bench.stats))
    return out


# -- one model ---------------------------------------------------------------------------------
def build_bench(kind: str, preset: str, sizes: Sizes, device: torch.device, seed: int,
                copy_dir: str, quick: bool) -> tuple[Bench, dict[str, Any]]:
    """The model of one table block and what describes it: a preset's core on random inputs and
    random weights, or the trained copy-memory model on its test sequences."""
    variants = VARIANTS if torchdeq_solver.available() else VARIANTS[:-1]
    if kind == COPY:
        trained = trained_copy.load(copy_dir, quick)
        model, cfg = trained["model"].to(device), trained["config"]
        core = model.core
        with torch.no_grad():
            x = model.embedding(trained["test_x"][:sizes.batch].to(device)).detach()
        info = {"preset": "copy memory, trained", "weights": f"trained ({trained['step']} steps)",
                "train_command": trained["train_command"], "run_dir": trained["run_dir"],
                "T": cfg.T, "seq": x.shape[1]}
        memory = core.init_memory(sizes.batch, device)
        return Bench(kind, core, x, memory, ms.readout(core, device), seed, cfg.unrolled_depth,
                     variants), info
    core = ms.make_core(preset, seq=sizes.seq, device=device, mem_len=sizes.mem_len, seed=seed)
    x = ms.random_inputs(core, sizes.batch, sizes.seq, device)
    bench = Bench(kind, core, x, ms.steady_memory(core, sizes.batch, device),
                  ms.readout(core, device), seed, DEEP_DEPTH[kind], variants)
    return bench, {"preset": preset, "weights": ms.WEIGHTS}


def measure_model(kind: str, preset: str, sizes: Sizes, device: torch.device,
                  seed: int, copy_dir: str = trained_copy.DEFAULT_DIR,
                  quick: bool = False) -> dict[str, Any]:
    """Timings, instrumented runs, ratios and targets of one model."""
    bench, info = build_bench(kind, preset, sizes, device, seed, copy_dir, quick)
    core = bench.core
    modes = core.modes
    result: dict[str, Any] = {
        **info, "mem_len": ms.mem_len_of(core), "deep_depth": bench.deep_depth,
        "solver": {"train_forward": repr(modes.forward), "backward": repr(modes.backward),
                   "infer_forward": repr(modes.eval_forward or modes.forward)}}
    times = time_variants(bench, sizes)
    result["times_s"] = times
    med = {v: {p: median_of(ts) for p, ts in phases.items()} for v, phases in times.items()}
    result["median_s"] = med
    result["spread_s"] = {v: {p: spread(ts) for p, ts in phases.items()}
                          for v, phases in times.items()}
    result["instrumented"] = {
        v: {p: instrumented(bench, v, p == "train") for p in ("train", "infer")}
        for v in bench.variants if v != "deep"}
    progress(f"{kind}: instrumented runs done")
    result["ratios"] = _ratios(med)
    result["ratio_spreads"] = _ratio_spreads(times)
    result["compaction_rows_saved"] = {
        p: _rows_saved(result["instrumented"], p) for p in ("train", "infer")}
    paper = PAPER.get(kind, {})
    result["targets"] = {p: {"ratio": result["ratios"][f"deq_over_deep_{p}"],
                             "limit": TARGETS[p], "paper": paper.get(p),
                             "pass": _le(result["ratios"][f"deq_over_deep_{p}"], TARGETS[p])}
                         for p in ("train", "infer")}
    return result


def median_of(times: list[float]) -> float:
    """The median repeat's time (the lower one of an even count: a time that was measured)."""
    return times[median_index(times)]


def _ratio_spreads(times: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """Per-repeat spreads of DEQ / deep and torchdeq / DEQ (the variants of one repeat ran back
    to back, so their ratio shares the machine's state)."""
    out: dict[str, Any] = {}
    for p in ("train", "infer"):
        out[f"deq_over_deep_{p}"] = spread([ratio(a, b) for a, b in
                                            zip(times["deq"][p], times["deep"][p])])
        if "deq_torchdeq" in times:
            out[f"torchdeq_over_deq_{p}"] = spread([ratio(a, b) for a, b in
                                                    zip(times["deq_torchdeq"][p], times["deq"][p])])
    return out


def _ratios(med: dict[str, dict[str, float]]) -> dict[str, Optional[float]]:
    """DEQ / deep, and each solver variant against the default DEQ (masking, compaction)."""
    out: dict[str, Optional[float]] = {}
    for p in ("train", "infer"):
        out[f"deq_over_deep_{p}"] = ratio(med["deq"][p], med["deep"][p])
        out[f"no_compact_over_deq_{p}"] = ratio(med["deq_no_compact"][p], med["deq"][p])
        out[f"no_mask_over_deq_{p}"] = ratio(med["deq_no_mask"][p], med["deq"][p])
        out[f"no_compact_over_deep_{p}"] = ratio(med["deq_no_compact"][p], med["deep"][p])
        out[f"no_mask_over_deep_{p}"] = ratio(med["deq_no_mask"][p], med["deep"][p])
        if "deq_torchdeq" in med:
            out[f"torchdeq_over_deq_{p}"] = ratio(med["deq_torchdeq"][p], med["deq"][p])
            out[f"torchdeq_over_deep_{p}"] = ratio(med["deq_torchdeq"][p], med["deep"][p])
    return out


def _rows_saved(inst: dict[str, dict[str, dict[str, Any]]], phase: str) -> Optional[float]:
    """1 - f rows with compaction / f rows without it, in the forward solve."""
    r = ratio(inst["deq"][phase]["f_rows"], inst["deq_no_compact"][phase]["f_rows"])
    return None if r is None else 1.0 - r


def _le(value: Optional[float], limit: float) -> Optional[bool]:
    return None if value is None else value <= limit


# -- the run -------------------------------------------------------------------------------------
def resolve_sizes(args: argparse.Namespace, device: torch.device) -> Sizes:
    """Paper sizes on CUDA; smaller on CPU (the paper sizes take far too long there)."""
    if args.quick:
        default = Sizes(batch=2, seq=8, mem_len=None, reps=1, warmup=0)
    elif device.type == "cuda":
        default = Sizes(batch=ms.PAPER_BATCH, seq=ms.PAPER_SEQ, mem_len=None, reps=10, warmup=2)
    else:
        default = Sizes(batch=4, seq=50, mem_len=None, reps=5, warmup=1)
    seq = args.seq or default.seq
    paper = device.type == "cuda" and not args.quick and seq == ms.PAPER_SEQ
    # The preset's memory (150) at the paper sizes; as long as the segment otherwise.
    mem_len = args.mem_len if args.mem_len is not None else (None if paper else seq)
    return Sizes(batch=args.batch or default.batch, seq=seq, mem_len=mem_len,
                 reps=args.reps or default.reps,
                 warmup=args.warmup if args.warmup is not None else default.warmup)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.runtime_table",
                                     description=__doc__.split("\n\n")[0])
    ms.add_common_args(parser)
    parser.add_argument("--reps", type=int, default=None, help="timed repeats per variant")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up rounds")
    parser.add_argument("--models", nargs="+", choices=sorted([*DEEP_DEPTH, COPY]), default=None,
                        help="models to time (default: all; copy_memory is the trained, "
                             "converging one)")
    parser.add_argument("--copy-dir", default=trained_copy.DEFAULT_DIR,
                        help="run directory of the trained copy-memory model (trained there "
                             "first if it holds no finished run)")
    parser.add_argument("--copy-batch", type=int, default=None,
                        help="test sequences per step of the copy-memory model (default 64; "
                             "--quick: 4)")
    return parser


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Time both models, print the table, write JSON; returns the results."""
    args, device, results = ms.start_run(build_parser(), "python -m benchmarks.runtime_table",
                                         argv)
    sizes = resolve_sizes(args, device)
    results["sizes"] = sizes.__dict__
    results["settings"] = ("matched accuracy = the paper's solver settings of the presets: "
                           "train forward tol sqrt(T)*1e-5, backward sqrt(T)*1e-8, inference "
                           "forward sqrt(T)*1e-2 (absolute residual), presets' iteration limits")
    results["timing"] = ("median of interleaved repeats after warm-up; CUDA events on GPU, "
                         "perf_counter on CPU; train = forward+backward, infer = eval no_grad "
                         "forward; solver share from a separate instrumented run")
    names = {**ms.preset_names(args.quick), COPY: COPY}
    kinds = args.models or list(names)
    copy_sizes = replace(sizes, batch=args.copy_batch or (4 if args.quick else 64))
    t0 = time.perf_counter()
    results["models"] = {
        k: measure_model(k, names[k], copy_sizes if k == COPY else sizes, device, args.seed,
                         args.copy_dir, args.quick) for k in kinds}
    results["load_average_end"] = ms.load_average()
    # A busy machine gets figures but no verdict.
    results["busy"] = machine_busy(results["load_average_start"], results["load_average_end"])
    if results["busy"]:
        for model in results["models"].values():
            for t in model["targets"].values():
                t["pass"] = None
    ms.finish_run(results, format_table(results), args.out, t0)
    return results


def format_table(results: dict[str, Any]) -> str:
    """The readable table: times, ratios, solver share, rows saved and step counts per model."""
    s = results["sizes"]
    lines = [f"Runtime table (DEQ vs deep weight-tied model and vs torchdeq's solver in the same "
             f"DEQ), device: {results['device']}",
             f"presets: batch {s['batch']}, seq {s['seq']}; median of {s['reps']} interleaved "
             f"repeats (min..max of the ratio over repeats in brackets); {results['settings']}"]
    if results.get("busy"):
        lines.append(f"WARNING: the machine was busy ({results['busy']}); no verdicts")
    for kind, res in results["models"].items():
        med, inst, sp = res["median_s"], res["instrumented"], res.get("ratio_spreads", {})
        lines += ["", f"{kind} ({res['preset']}{_memory(res)}; weights {res['weights']}; deep = "
                      f"{res['deep_depth']} layers):",
                  f"  {'variant':<16}{'train s':>9}{'x deep':>8}{'infer s':>9}{'x deep':>8}"
                  f"{'f share tr/inf':>16}{'f rows tr/inf':>15}{'nstep mean/max (tr)':>21}"
                  f"{'resid fwd/bwd (tr)':>20}"]
        for v in med:
            row = (f"  {v:<16}{med[v]['train']:>9.3f}{_x(med[v]['train'], med['deep']['train']):>8}"
                   f"{med[v]['infer']:>9.3f}{_x(med[v]['infer'], med['deep']['infer']):>8}")
            if v in inst:
                tr, inf = inst[v]["train"], inst[v]["infer"]
                row += (f"{_pct(tr['f_share']) + '/' + _pct(inf['f_share']):>16}"
                        f"{str(tr['f_rows']) + '/' + str(inf['f_rows']):>15}"
                        f"{_nstep(tr):>21}{_resid(tr):>20}")
            lines.append(row)
        saved = res["compaction_rows_saved"]
        lines.append(f"  solver share of DEQ time (train/infer): "
                     f"{_pct(inst['deq']['train']['solver_share'])}/"
                     f"{_pct(inst['deq']['infer']['solver_share'])}; "
                     f"inference nstep mean/max {_nstep(inst['deq']['infer'])}; "
                     f"f rows saved by compaction (train/infer): {_pct(saved['train'])}/"
                     f"{_pct(saved['infer'])}")
        if "deq_torchdeq" in med:
            lines.append(f"  torchdeq's solver / deq_ext's in the same DEQ: train "
                         f"{_x(med['deq_torchdeq']['train'], med['deq']['train'])} "
                         f"{_bracket(sp.get('torchdeq_over_deq_train'))}, infer "
                         f"{_x(med['deq_torchdeq']['infer'], med['deq']['infer'])} "
                         f"{_bracket(sp.get('torchdeq_over_deq_infer'))}")
        for p, t in res["targets"].items():
            verdict = "-" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
            paper = "" if t["paper"] is None else f" (paper {t['paper']}x)"
            lines.append(f"  target DEQ/deep {p} <= {t['limit']}x: {_x(t['ratio'], 1.0)} "
                         f"{_bracket(sp.get(f'deq_over_deep_{p}'))} {verdict}{paper}")
    return "\n".join(lines)


def _bracket(sp: Optional[dict[str, Any]]) -> str:
    return "" if not sp or sp.get("min") is None else f"[{sp['min']:.2f}..{sp['max']:.2f}]"


def _resid(run: dict[str, Any]) -> str:
    parts = [run.get(f"{name}_nstep", {}).get("abs_residual_mean") for name in ("forward",
                                                                                 "backward")]
    return "/".join("-" if p is None else f"{p:.1e}" for p in parts)


def _memory(res: dict[str, Any]) -> str:
    return f", Transformer-XL memory {res['mem_len']}" if res["mem_len"] else ""


def _nstep(run: dict[str, Any]) -> str:
    st = run.get("forward_nstep")
    return "-" if st is None else f"{st['mean']:.1f}/{st['max']}"


def _x(num: Optional[float], den: Optional[float]) -> str:
    r = ratio(num, den)
    return "-" if r is None else f"{r:.2f}x"


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


if __name__ == "__main__":
    main()
