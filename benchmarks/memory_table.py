"""Training memory of the DEQ against the same f unrolled L times (paper, Tables 2 and 3).

``python -m benchmarks.memory_table [--device auto|cpu|cuda] [--quick] [--out PATH]``

Both models at the paper's small sizes (``deq_transformer_small``, ``deq_trellisnet_small``),
sequence length 150, batch 15, embeddings and softmax excluded (the core only, on random
embedding-sized inputs, with a full Transformer-XL memory). Rows: the DEQ whose solves run to
their iteration limits (random weights never converge: the worst case); the DEQ whose solves stop
after :data:`CONVERGED_STEPS` steps, as a trained model's converge (the same settings, the
iteration limits lowered to those steps: the history then holds what a converging solve's holds);
the DEQ with ``chunk=None`` (the whole batch in one solve, as before chunks existed; the
default ``chunk="auto"`` solves these CPU batches 4 at a time and CUDA batches whole; the table
also gives the default's time against this row's: on the CPU two steps each, one counting the
saved bytes and one under the tracker, which slow every operator alike); the deep weight-tied model (same
parameters) unrolled at the paper's depths (16 and 18 layers for
the transformer, 60 and 70 for the TrellisNet); the same with gradient checkpointing. The figure
is the DEQ's share of each deep model's memory, as a user meets it: the **peak** memory of one
training step (forward and backward) above what existed before it, so the solver's workspace
(Broyden's history and buffers), the recomputations of checkpointing and the parameters'
gradients all count. Each DEQ row also gives the bytes of Broyden's history held at the peak and
their share of it. The DEQ runs with the layer's default history (``SolverSettings.memory=None``:
a restarting ring of 16 pairs forward and 8 backward, bfloat16 under the float32 state).

A second part, ``max_iter``, sets the same solve (and the same DEQ training step) with
``max_iter`` 200 against 20 on a problem that converges in fewer steps than either: the peak of
the solve and of the step must not grow with ``max_iter`` (target: at most 1.5x).

What is measured:

* **CPU**: the high-water mark of tensor storage during the step, tracked operator by operator
  (:mod:`benchmarks.peak_memory`; the CPU allocator keeps no peak statistic). The unrolled and
  checkpointed rows need no data-dependent op, so they run on the meta device (shapes only, no
  compute); the script checks on a small case that meta and real runs give the same peak. The DEQ
  runs for real (its solver needs values). Secondary column: the bytes autograd saves for
  backward in the forward pass (saved-tensor hooks, distinct storages counted once), the measure
  of earlier versions of this table, which leaves the workspace out.
  The history at the peak: the storages of the solves' history chunks (``(B, C, D)`` tensors)
  live at that moment.
* **GPU**: ``torch.cuda.max_memory_allocated`` during the step, minus the memory allocated before
  it (parameters, inputs, memory). The history at the peak is estimated: the larger of the two
  solves' history for the steps they took (from their shapes).

The solver's workspace is also reported from its shapes (its state tensors, constructed on the
meta device exactly as a solve allocates them), to show what the history costs.

Weights are random (untrained): memory does not depend on them, except through the DEQ's
iteration counts (the history grows with the steps taken), which the two DEQ rows bracket.
"""

from __future__ import annotations

import argparse
import gc
import math
import time
from dataclasses import replace
from typing import Any, Callable, Optional

import torch

import deq_ext
from deq_ext.bench import load_average, machine_busy, progress, ratio
from deq_ext.chunks import auto_chunk
from deq_ext.solvers import broyden_workspace
from models.modes import SequenceCore

from . import model_setup as ms
from .peak_memory import PeakTracker

# The paper's depths: Table 3's 16-layer transformer, Table 4's 18; Table 2's 60-layer and Tables
# 3/4's 70-layer TrellisNet. The target compares the DEQ with the depth of the paper's memory row.
DEPTHS = {"transformer": (16, 18), "trellisnet": (60, 70)}
QUICK_DEPTHS = {"transformer": (4, 16), "trellisnet": (4, 60)}  # tiny presets; target row kept
TARGET_DEPTH = {"transformer": 16, "trellisnet": 60}
# DEQ (solves to the limit) / unrolled at the target depth, and / checkpointed at that depth.
TARGET_SHARE = 0.14
TARGET_CHECKPOINTED = 0.6
# Steps per solve (forward, backward) of the converging DEQ row. The paper's Figure 2 (left)
# plots a trained DEQ-Transformer's Broyden iterations during training; these values stand for
# that late-training count and should be checked against the figure (not read off it here). With
# the default restarting rings (16 forward, 8 backward) any count above the ring length holds the
# same history, so the row's peak depends on them only below that.
CONVERGED_STEPS = (20, 25)
QUICK_CONVERGED_STEPS = (3, 3)  # the tiny presets' limits are 20: below their rings

# The max_iter part: max_iter 200 against 20 on a solve that converges in fewer steps.
MAX_ITERS = (200, 20)
MAX_ITER_WIDTH = 64  # values per token of its problem
TARGET_MAX_ITER_RATIO = 1.5
PAPER = {"trellisnet": {"deq_gb": 1.2, "deep_60_gb": 8.5, "share": 1.2 / 8.5},
         "transformer": {"deq_gb": 1.1, "deep_16_gb": 6.8, "share": 1.1 / 6.8}}
MIB = 2.0**20


# -- measurements ------------------------------------------------------------------------------
def saved_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs.

    Storages are keyed by their C++ object and kept alive until the end, so no address is reused
    and meta tensors (whose data pointers are all null) are told apart as well.
    """
    kept: dict[int, torch.UntypedStorage] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        kept.setdefault(st._cdata, st)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(st.nbytes() for st in kept.values())


def cuda_peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak device memory of ``step()`` above what was allocated before it."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def solver_workspace(preset: str, batch: int, seq: int, mem_len: int) -> dict[str, Any]:
    """State bytes of the forward and the backward (adjoint) Broyden solves, from their shapes.

    The solver state is constructed on the meta device exactly as a solve allocates it (no
    iteration runs, no memory is used). Forward: compaction on (so the gather buffer counts);
    backward: the adjoint solve on the whole batch, state in float32 like z.
    """
    meta = ms.make_core(preset, seq=seq, device="meta", mem_len=mem_len).train()
    x = torch.empty(batch, seq, ms.d_embed_of(meta), device="meta")
    z0, inputs = meta.cell_inputs(x, meta.init_memory(batch, torch.device("meta")))
    out: dict[str, Any] = {}
    for name, settings, ins, compact in (("forward", meta.modes.forward, inputs, True),
                                         ("backward", meta.modes.backward, (), False)):
        if settings.method != "broyden":
            raise ValueError(f"workspace is only computed for Broyden, not {settings.method}")
        settings = settings.resolved(name)  # as the DEQ layer runs it
        ws = broyden_workspace(z0, inputs=tuple(ins), **{**settings.solver_kwargs(),
                                                        "compact": compact})
        m = settings.memory or settings.max_iter  # broyden(): memory defaults to max_iter
        out[name] = {"bytes": ws["total"], "history_m": m, "max_iter": settings.max_iter,
                     "B": batch, "D": ws["D"],
                     "history_bytes": ws["history"], "history_chunk": ws["history_chunk"],
                     "settings": repr(settings)}
    out["peak_bytes"] = max(out["forward"]["bytes"], out["backward"]["bytes"])
    return out


def build_pair(preset: str, seq: int, mem_len: Optional[int], device: torch.device,
               seed: int) -> tuple[SequenceCore, SequenceCore]:
    """(real core on ``device``, the same core on the meta device), both in train mode."""
    cores = []
    for dev in (device, torch.device("meta")):
        cores.append(ms.make_core(preset, seq=seq, device=dev, mem_len=mem_len, seed=seed).train())
    return cores[0], cores[1]


def inputs_for(core: SequenceCore, batch: int,
               seq: int) -> tuple[torch.Tensor, tuple, torch.Tensor]:
    """Inputs, memory and loss readout on the core's device."""
    device = next(core.parameters()).device
    return (ms.random_inputs(core, batch, seq, device), ms.steady_memory(core, batch, device),
            ms.readout(core, device))


def history_label(batch: int, dim: int) -> Callable[[torch.Tensor], Optional[str]]:
    """Labels a solve's history chunks: ``(b, C, D)`` tensors of at most the DEQ's batch (b < B
    in a solve of a chunk of samples) and of its state size (no other tensor of a step has
    that shape: the state itself is ``(B, T, d)``)."""
    def label(t: torch.Tensor) -> Optional[str]:
        return "history" if t.dim() == 3 and t.shape[0] <= batch and t.shape[2] == dim \
            and t.shape[1] < dim else None
    return label


def cpu_row(real: SequenceCore, meta: SequenceCore, batch: int, seq: int,
            mode: str, depth: Optional[int], checkpoint: bool) -> dict[str, int]:
    """Peak and saved bytes of one training step: the DEQ for real, unrolled rows on meta;
    for the DEQ also the history's bytes at the peak."""
    core = real if mode == "deq" else meta
    ms.set_mode(core, mode, depth, checkpoint)
    x, memory, w = inputs_for(core, batch, seq)
    # Two runs: the saved-bytes hooks keep what they count alive until the forward pass ends,
    # which would add to the peak what a chunked DEQ frees as it goes.
    ms.zero_grads(core)
    loss_holder: list[torch.Tensor] = []
    saved = saved_bytes(lambda: loss_holder.append(ms.core_loss(core, x, memory, w)))
    loss_holder.pop().backward()
    ms.zero_grads(core)
    dim = math.prod(core.state_shape(batch, seq)) // batch
    with PeakTracker(history_label(batch, dim)) as tracker:
        ms.core_loss(core, x, memory, w).backward()
    ms.zero_grads(core)
    out = {"peak_bytes": tracker.peak, "saved_bytes": saved}
    if mode == "deq":
        out["history_bytes"] = tracker.peak_labelled.get("history", 0)
    return out


def cuda_row(core: SequenceCore, batch: int, seq: int, mode: str, depth: Optional[int],
             checkpoint: bool) -> dict[str, int]:
    """Peak GPU bytes of one forward + backward of the row's model."""
    ms.set_mode(core, mode, depth, checkpoint)
    x, memory, w = inputs_for(core, batch, seq)
    ms.zero_grads(core)

    def step() -> None:
        ms.core_loss(core, x, memory, w).backward()

    peak = cuda_peak_bytes(step, x.device)
    ms.zero_grads(core)
    return {"peak_bytes": peak}


def meta_check(preset: str, seed: int) -> dict[str, Any]:
    """Peak and saved bytes of a small real CPU run against the same run on the meta device."""
    real, meta = build_pair(preset, 8, None, torch.device("cpu"), seed)
    out: dict[str, Any] = {"batch": 2, "seq": 8, "depth": 2}
    for ckpt in (False, True):
        counts = [cpu_row(core, core, 2, 8, "unrolled", 2, ckpt) for core in (real, meta)]
        out["checkpointed" if ckpt else "unrolled"] = {"real": counts[0], "meta": counts[1]}
    out["equal"] = all(out[k]["real"] == out[k]["meta"] for k in ("unrolled", "checkpointed"))
    return out


# -- one model -------------------------------------------------------------------------------
def measure_model(kind: str, preset: str, sizes: dict[str, Any], device: torch.device,
                  seed: int) -> dict[str, Any]:
    """Every row of one model's table, with the DEQ's shares."""
    batch, seq = sizes["batch"], sizes["seq"]
    cpu = device.type == "cpu"
    real, meta = build_pair(preset, seq, sizes["mem_len"], device, seed)
    result: dict[str, Any] = {
        "preset": preset, "mem_len": ms.mem_len_of(real),
        "parameter_bytes": sum(p.nbytes for p in real.parameters()),
        "solver": {"forward": repr(real.modes.forward), "backward": repr(real.modes.backward)},
    }

    def row(mode: str, depth: Optional[int] = None, ckpt: bool = False,
            name: Optional[str] = None) -> dict[str, Any]:
        t0 = time.perf_counter()
        if cpu:
            n = cpu_row(real, meta, batch, seq, mode, depth, ckpt)
        else:
            n = cuda_row(real, batch, seq, mode, depth, ckpt)
        label = (name or mode) + (f" L={depth}" if depth else "") + \
            (" checkpointed" if ckpt else "")
        n["step_s"] = time.perf_counter() - t0
        progress(f"{kind}: {label}: peak {n['peak_bytes'] / MIB:.1f} MiB "
                 f"({n['step_s']:.1f}s)")
        return {"row": name or ("checkpointed" if ckpt else mode), "depth": depth, **n}

    def deq_row(name: str) -> dict[str, Any]:
        r = row("deq", name=name)
        r["solves"] = ms.solver_summary(ms.stats_of(real))
        if "history_bytes" not in r:  # CUDA: estimated from the shapes and the steps taken
            r["history_bytes"] = history_estimate(preset, batch, seq, ms.mem_len_of(real),
                                                  r["solves"])
            r["history_estimated"] = True
        r["history_share"] = ratio(r["history_bytes"], r["peak_bytes"])
        return r

    if not cpu:
        row("unrolled", 1)  # warm-up: cuBLAS workspaces and allocator pools, not recorded
    limits = real.modes
    deq = deq_row("deq")
    real.set_mode("deq", **converged_modes(limits, sizes["converged_steps"]))
    converged = deq_row("deq_converged")
    real.set_mode("deq", forward=limits.forward, backward=limits.backward)
    real.set_mode("deq", chunk=None)
    whole = deq_row("deq_whole_batch")
    real.set_mode("deq", chunk="auto")
    result["deq_solves"] = deq["solves"]
    result["converged_steps"] = dict(zip(("forward", "backward"), sizes["converged_steps"]))
    result["solver_workspace"] = solver_workspace(preset, batch, seq, ms.mem_len_of(real))
    result["not_counted"] = _not_counted(cpu)
    rows = [deq, converged, whole]
    for ckpt in (False, True):
        for L in sizes["depths"][kind]:
            rows.append(row("unrolled", L, ckpt))
    for r in rows:
        r["deq_share"] = ratio(deq["peak_bytes"], r["peak_bytes"])
        r["deq_converged_share"] = ratio(converged["peak_bytes"], r["peak_bytes"])
        r["deq_whole_batch_share"] = ratio(whole["peak_bytes"], r["peak_bytes"])
        if cpu:
            r["deq_share_saved"] = ratio(deq["saved_bytes"], r["saved_bytes"])
    result["rows"] = rows
    result["auto_chunk"] = auto_chunk(batch, math.prod(real.state_shape(batch, seq)) // batch, device)
    result["default_vs_whole_time"] = ratio(deq["step_s"], whole["step_s"])
    result["targets"] = _targets(rows, sizes["target_depth"][kind])
    return result


def converged_modes(modes: Any, steps: tuple[int, int]) -> dict[str, Any]:
    """``set_mode`` changes that stop the forward and backward solves after ``steps`` (the
    iteration limits lowered, the history as the settings resolve it for the real limits)."""
    fwd = modes.forward.resolved("forward")
    bwd = modes.backward.resolved("backward")
    return {"forward": replace(fwd, max_iter=min(steps[0], fwd.max_iter),
                               memory=fwd.memory or fwd.max_iter),
            "backward": replace(bwd, max_iter=min(steps[1], bwd.max_iter),
                                memory=bwd.memory or bwd.max_iter)}


def history_estimate(preset: str, batch: int, seq: int, mem_len: int,
                     solves: dict[str, Any]) -> int:
    """The larger solve's history bytes for the steps it took (from the shapes: chunks of the
    history that cover ``max nstep + 1`` slots, at most the ring)."""
    ws = solver_workspace(preset, batch, seq, mem_len)
    out = 0
    for name in ("forward", "backward"):
        steps = solves.get(f"{name}_nstep", {}).get("max", 0)
        w = ws[name]
        if not w["history_bytes"]:
            continue
        per_slot = w["history_bytes"] // w["history_m"]
        chunk_slots = max(1, w["history_chunk"] // per_slot)
        slots = min(w["history_m"], math.ceil((steps + 1) / chunk_slots) * chunk_slots)
        out = max(out, slots * per_slot)
    return out


def _not_counted(cpu: bool) -> list[str]:
    if not cpu:
        return ["parameters, inputs and memory (allocated before the step)"]
    return ["parameters, inputs and memory (allocated before the step)",
            "scratch memory an operator allocates and frees inside its C++ body",
            "the allocator's rounding and caching"]


def _targets(rows: list[dict[str, Any]], depth: int) -> dict[str, Any]:
    """The DEQ whose solves run to the limit against the deep model at the paper's depth:
    <= 14% of the unrolled model's peak and <= 0.6x the checkpointed one's (the converging
    DEQ's shares alongside, without a verdict)."""
    out: dict[str, Any] = {}
    for kind, limit in (("unrolled", TARGET_SHARE), ("checkpointed", TARGET_CHECKPOINTED)):
        deep = next((r for r in rows if r["row"] == kind and r["depth"] == depth), None)
        if deep is None:
            continue
        t = {"depth": depth, "share": deep["deq_share"], "limit": limit,
             "pass": deep["deq_share"] <= limit,
             "converged_share": deep["deq_converged_share"],
             "whole_batch_share": deep["deq_whole_batch_share"]}
        if "deq_share_saved" in deep:
            t["share_saved_bytes"] = deep["deq_share_saved"]
        out[kind] = t
    return out


# -- max_iter 200 against 20, the same steps ----------------------------------------------------
def max_iter_problem(device: torch.device, quick: bool) -> tuple[Callable[..., torch.Tensor],
                                                                 torch.Tensor, torch.Tensor]:
    """A contractive position-wise tanh layer ``f(z, x) = 0.5 tanh(z_t W) + x`` over T tokens of
    64 values (``W`` orthogonal), its inputs and its start: Broyden converges to a relative
    residual of 1e-5 in 11 steps, fewer than either limit."""
    gen = torch.Generator().manual_seed(0)
    B, T = (4, 8) if quick else (16, 128)
    W = torch.linalg.qr(torch.randn(MAX_ITER_WIDTH, MAX_ITER_WIDTH, generator=gen))[0].to(device)
    x = torch.randn(B, T * MAX_ITER_WIDTH, generator=gen).to(device)

    def f(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.tanh(z.view(z.shape[0], -1, MAX_ITER_WIDTH) @ W).flatten(1) + x

    return f, x, torch.zeros_like(x)


def _peak(step: Callable[[], Any], device: torch.device) -> int:
    if device.type == "cuda":
        return cuda_peak_bytes(step, device)
    with PeakTracker() as tracker:
        step()
    return tracker.peak


def max_iter_part(device: torch.device, quick: bool) -> dict[str, Any]:
    """The peak of one solve and of one DEQ training step with ``max_iter`` 200 and 20 (default
    settings otherwise), on the same problem, which converges in the same steps under both."""
    f, x, z0 = max_iter_problem(device, quick)
    tol = 1e-5
    out: dict[str, Any] = {"problem": f"f(z, x) = 0.5 tanh(z_t W) + x per token of "
                                      f"{MAX_ITER_WIDTH} values, W orthogonal",
                           "batch": x.shape[0], "dim": x.shape[1], "tol": tol,
                           "stop_mode": "rel", "max_iter": {}}
    lin = torch.nn.Linear(MAX_ITER_WIDTH, MAX_ITER_WIDTH, bias=False, device=device)
    torch.nn.init.orthogonal_(lin.weight)

    def cell(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.tanh(lin(z.view(z.shape[0], -1, MAX_ITER_WIDTH))).flatten(1) + x

    for max_iter in MAX_ITERS:
        solve: dict[str, Any] = {}

        def run_solve() -> None:
            solve["res"] = deq_ext.broyden(f, z0, inputs=(x,), max_iter=max_iter, tol=tol,
                                           stop_mode="rel")

        solve_peak = _peak(run_solve, device)
        deq = deq_ext.DEQ(cell, forward=dict(max_iter=max_iter, tol=tol, stop_mode="rel"),
                          backward=dict(max_iter=max_iter))

        def run_step() -> None:
            deq(x, z0=z0).square().mean().backward()

        lin.zero_grad(set_to_none=True)
        step_peak = _peak(run_step, device)
        lin.zero_grad(set_to_none=True)
        res = solve["res"]
        fwd, bwd = deq.forward_stats, deq.backward_stats
        assert fwd is not None and bwd is not None
        out["max_iter"][str(max_iter)] = {
            "solve_peak_bytes": solve_peak, "solve_steps_max": int(res.nstep.max()),
            "solve_converged": bool(res.converged.all()),
            "step_peak_bytes": step_peak, "step_forward_steps_max": int(fwd.nstep.max()),
            "step_backward_steps_max": int(bwd.nstep.max())}
        progress(f"max_iter {max_iter}: solve peak {solve_peak / MIB:.2f} MiB "
                 f"({int(res.nstep.max())} steps), training step peak {step_peak / MIB:.2f} MiB")
    hi, lo = (out["max_iter"][str(m)] for m in MAX_ITERS)
    keys = ("solve_steps_max", "step_forward_steps_max", "step_backward_steps_max")
    out["same_steps"] = all(hi[k] == lo[k] for k in keys)
    for what in ("solve", "step"):
        r = ratio(hi[f"{what}_peak_bytes"], lo[f"{what}_peak_bytes"])
        out[f"{what}_ratio"] = r
        out[f"{what}_target"] = {"limit": TARGET_MAX_ITER_RATIO,
                                 "pass": bool(out["same_steps"] and r is not None
                                              and r <= TARGET_MAX_ITER_RATIO)}
    return out


# -- the run ---------------------------------------------------------------------------------
def resolve_sizes(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Paper sizes (batch 15, sequence 150, preset memory) unless ``--quick`` or overridden."""
    quick = args.quick
    depths = QUICK_DEPTHS if quick else DEPTHS
    if args.depths:
        depths = {kind: tuple(args.depths) for kind in depths}
    targets = {kind: TARGET_DEPTH[kind] if TARGET_DEPTH[kind] in ds else ds[0]
               for kind, ds in depths.items()}
    return {"batch": args.batch or (2 if quick else ms.PAPER_BATCH),
            "seq": args.seq or (8 if quick else ms.PAPER_SEQ),
            "mem_len": args.mem_len if args.mem_len is not None else (8 if quick else None),
            "depths": {kind: list(ds) for kind, ds in depths.items()},
            "converged_steps": QUICK_CONVERGED_STEPS if quick else CONVERGED_STEPS,
            "target_depth": targets}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory_table",
                                     description=__doc__.split("\n\n")[0])
    ms.add_common_args(parser)
    parser.add_argument("--depths", type=int, nargs="+", default=None,
                        help="unrolled depths L for both models (default: the paper's, "
                             "16 18 for the transformer and 60 70 for the TrellisNet)")
    return parser


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Measure both models, print the table, write JSON; returns the results."""
    args, device, results = ms.start_run(build_parser(), "python -m benchmarks.memory_table",
                                         argv)
    sizes = resolve_sizes(args, device)
    results["device_type"] = device.type
    results["measure"] = ("cpu: peak tensor storage of forward+backward, tracked per operator "
                          "(saved-for-backward bytes as a secondary column); unrolled rows on "
                          "the meta device" if device.type == "cpu" else
                          "cuda: peak allocated during forward+backward minus allocated before")
    results["sizes"] = sizes
    results["paper"] = PAPER
    t0 = time.perf_counter()
    if device.type == "cpu":
        results["meta_check"] = {kind: meta_check(p, args.seed)
                                 for kind, p in ms.preset_names(args.quick).items()}
    results["models"] = {kind: measure_model(kind, preset, sizes, device, args.seed)
                         for kind, preset in ms.preset_names(args.quick).items()}
    results["max_iter"] = max_iter_part(device, args.quick)
    results["machine_busy"] = machine_busy(results.get("load_average_start"),
                                           load_average())
    ms.finish_run(results, format_table(results), args.out, t0)
    return results


def format_table(results: dict[str, Any]) -> str:
    """The readable table: one block per model, MiB and the DEQ's shares; then max_iter."""
    cpu = results["device_type"] == "cpu"
    s = results["sizes"]
    lines = [f"Memory table ({results['measure']})",
             f"device: {results['device']}; batch {s['batch']}, seq {s['seq']}; "
             f"embeddings excluded; {results['weights']}"]
    for kind, res in results["models"].items():
        lines.append("")
        memory = f", Transformer-XL memory {res['mem_len']}" if res["mem_len"] else ""
        steps = res["converged_steps"]
        lines.append(f"{kind} ({res['preset']}{memory}); deq: solves to the limit, "
                     f"deq_converged: {steps['forward']} forward / {steps['backward']} "
                     f"backward steps:")
        head = f"  {'model':<17}{'L':>4}{'peak MiB':>11}{'history':>9}{'DEQ share':>11}" \
               f"{'conv. share':>12}"
        head += f"{'saved MiB':>11}{'DEQ share':>11}" if cpu else ""
        lines.append(head)
        for r in res["rows"]:
            hist = _pct(r.get("history_share")) if "history_share" in r else "-"
            line = (f"  {r['row']:<17}{r['depth'] or '-':>4}{r['peak_bytes'] / MIB:>11.1f}"
                    f"{hist:>9}{_pct(r['deq_share']):>11}{_pct(r['deq_converged_share']):>12}")
            if cpu:
                line += f"{r['saved_bytes'] / MIB:>11.1f}{_pct(r['deq_share_saved']):>11}"
            lines.append(line)
        ws = res["solver_workspace"]
        lines.append(f"  solver workspace (in the DEQ's peak, history as a full ring): "
                     f"forward {ws['forward']['bytes'] / MIB:.1f} MiB "
                     f"(m={ws['forward']['history_m']}), "
                     f"backward {ws['backward']['bytes'] / MIB:.1f} MiB "
                     f"(m={ws['backward']['history_m']}); D={ws['forward']['D']}")
        if res.get("default_vs_whole_time") is not None:
            n = res["auto_chunk"]
            lines.append(f"  deq (chunk='auto': {f'{n} samples per solve' if n else 'whole batch'}"
                         f") step time / deq_whole_batch's: "
                         f"{res['default_vs_whole_time']:.2f}x (the time of each row: "
                         + ("two steps, one counting saved bytes, one under the tracker)"
                            if cpu else "one step)"))
        for name, t in res["targets"].items():
            verdict = "PASS" if t["pass"] else "FAIL"
            limit = f"{t['limit']:.0%}" if name == "unrolled" else f"{t['limit']:.2f}x"
            extra = (f" (saved bytes only: {_pct(t['share_saved_bytes'])})"
                     if "share_saved_bytes" in t else "")
            lines.append(f"  target DEQ (to the limit) peak <= {limit} of {name} L={t['depth']}: "
                         f"{_pct(t['share'])} {verdict}{extra}; converging DEQ "
                         f"{_pct(t['converged_share'])}; whole batch (chunk=None) "
                         f"{_pct(t['whole_batch_share'])}")
    mi = results.get("max_iter")
    if mi:
        hi, lo = (mi["max_iter"][str(m)] for m in MAX_ITERS)
        lines.append(f"\nmax_iter {MAX_ITERS[0]} vs {MAX_ITERS[1]}, same steps "
                     f"({'yes' if mi['same_steps'] else 'NO'}: solve {hi['solve_steps_max']}, "
                     f"training step {hi['step_forward_steps_max']} forward / "
                     f"{hi['step_backward_steps_max']} backward); B={mi['batch']} D={mi['dim']}:")
        for what, label in (("solve", "solve peak"), ("step", "training step peak")):
            verdict = "PASS" if mi[f"{what}_target"]["pass"] else "FAIL"
            lines.append(f"  {label}: {hi[f'{what}_peak_bytes'] / MIB:.2f} vs "
                         f"{lo[f'{what}_peak_bytes'] / MIB:.2f} MiB = {mi[f'{what}_ratio']:.2f}x "
                         f"(target <= {TARGET_MAX_ITER_RATIO}x) {verdict}")
    if results.get("machine_busy"):
        lines.append(f"\nmachine busy ({results['machine_busy']}): the peaks are counts of "
                     "bytes, which the load does not change")
    return "\n".join(lines)


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


if __name__ == "__main__":
    main()
