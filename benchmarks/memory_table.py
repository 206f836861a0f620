"""Training memory of the DEQ against the same f unrolled L times (paper, Tables 2 and 3).

``python -m benchmarks.memory_table [--device auto|cpu|cuda] [--quick] [--out PATH]``

Both models at the paper's small sizes (``deq_transformer_small``, ``deq_trellisnet_small``),
sequence length 150, batch 15, embeddings and softmax excluded (the core only, on random
embedding-sized inputs, with a full Transformer-XL memory). Rows: the DEQ; the deep weight-tied
model (same parameters) unrolled at the paper's depths (16 and 18 layers for the transformer, 60
and 70 for the TrellisNet); the same with gradient checkpointing. The figure is the DEQ's share of
each deep model's memory, as a user meets it: the **peak** memory of one training step (forward
and backward) above what existed before it, so the solver's workspace (Broyden's history and
buffers), the recomputations of checkpointing and the parameters' gradients all count.

What is measured:

* **CPU**: the high-water mark of tensor storage during the step, tracked operator by operator
  (:mod:`benchmarks.peak_memory`; the CPU allocator keeps no peak statistic). The unrolled and
  checkpointed rows need no data-dependent op, so they run on the meta device (shapes only, no
  compute); the script checks on a small case that meta and real runs give the same peak. The DEQ
  runs for real (its solver needs values). Secondary column: the bytes autograd saves for
  backward in the forward pass (saved-tensor hooks, distinct storages counted once), the measure
  of earlier versions of this table, which leaves the workspace out.
* **GPU**: ``torch.cuda.max_memory_allocated`` during the step, minus the memory allocated before
  it (parameters, inputs, memory).

The solver's workspace is also reported from its shapes (its state tensors, constructed on the
meta device exactly as a solve allocates them), to show what the history costs.

Weights are random (untrained): memory does not depend on them, except through the DEQ's
iteration count, which does not change what the DEQ keeps (the history is allocated whole).
"""

from __future__ import annotations

import argparse
import gc
import time
from typing import Any, Callable, Optional

import torch

from deq_ext.bench import progress, ratio
from deq_ext.solvers import broyden_workspace
from models.modes import SequenceCore

from . import model_setup as ms
from .peak_memory import PeakTracker

# The paper's depths: Table 3's 16-layer transformer, Table 4's 18; Table 2's 60-layer and Tables
# 3/4's 70-layer TrellisNet. The target compares the DEQ with the depth of the paper's memory row.
DEPTHS = {"transformer": (16, 18), "trellisnet": (60, 70)}
QUICK_DEPTHS = {"transformer": (4, 16), "trellisnet": (4, 60)}  # tiny presets; target row kept
TARGET_DEPTH = {"transformer": 16, "trellisnet": 60}
TARGET_SHARE = 0.12
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
        ws = broyden_workspace(z0, inputs=tuple(ins), **{**settings.solver_kwargs(),
                                                        "compact": compact})
        m = settings.memory or settings.max_iter  # broyden(): memory defaults to max_iter
        out[name] = {"bytes": ws["total"], "history_m": m, "B": batch, "D": ws["D"],
                     "history_bytes": ws["history"]}
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


def cpu_row(real: SequenceCore, meta: SequenceCore, batch: int, seq: int,
            mode: str, depth: Optional[int], checkpoint: bool) -> dict[str, int]:
    """Peak and saved bytes of one training step: the DEQ for real, unrolled rows on meta."""
    core = real if mode == "deq" else meta
    ms.set_mode(core, mode, depth, checkpoint)
    x, memory, w = inputs_for(core, batch, seq)
    ms.zero_grads(core)
    saved: dict[str, int] = {}
    with PeakTracker() as tracker:
        loss_holder: list[torch.Tensor] = []
        saved["bytes"] = saved_bytes(lambda: loss_holder.append(ms.core_loss(core, x, memory, w)))
        loss_holder.pop().backward()
    ms.zero_grads(core)
    return {"peak_bytes": tracker.peak, "saved_bytes": saved["bytes"]}


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

    def row(mode: str, depth: Optional[int] = None, ckpt: bool = False) -> dict[str, Any]:
        t0 = time.perf_counter()
        if cpu:
            n = cpu_row(real, meta, batch, seq, mode, depth, ckpt)
        else:
            n = cuda_row(real, batch, seq, mode, depth, ckpt)
        label = mode + (f" L={depth}" if depth else "") + (" checkpointed" if ckpt else "")
        progress(f"{kind}: {label}: peak {n['peak_bytes'] / MIB:.1f} MiB "
                 f"({time.perf_counter() - t0:.1f}s)")
        return {"row": "checkpointed" if ckpt else mode, "depth": depth, **n}

    if not cpu:
        row("unrolled", 1)  # warm-up: cuBLAS workspaces and allocator pools, not recorded
    deq = row("deq")
    result["deq_solves"] = ms.solver_summary(ms.stats_of(real))
    result["solver_workspace"] = solver_workspace(preset, batch, seq, ms.mem_len_of(real))
    result["not_counted"] = _not_counted(cpu)
    rows = [deq]
    for ckpt in (False, True):
        for L in sizes["depths"][kind]:
            rows.append(row("unrolled", L, ckpt))
    for r in rows:
        r["deq_share"] = ratio(deq["peak_bytes"], r["peak_bytes"])
        if cpu:
            r["deq_share_saved"] = ratio(deq["saved_bytes"], r["saved_bytes"])
    result["rows"] = rows
    result["targets"] = _targets(rows, sizes["target_depth"][kind])
    return result


def _not_counted(cpu: bool) -> list[str]:
    if not cpu:
        return ["parameters, inputs and memory (allocated before the step)"]
    return ["parameters, inputs and memory (allocated before the step)",
            "scratch memory an operator allocates and frees inside its C++ body",
            "the allocator's rounding and caching"]


def _targets(rows: list[dict[str, Any]], depth: int) -> dict[str, Any]:
    """DEQ <= 12% of the unrolled model's peak memory at the paper's depth."""
    deep = next((r for r in rows if r["row"] == "unrolled" and r["depth"] == depth), None)
    if deep is None:
        return {}
    out = {"depth": depth, "share": deep["deq_share"], "limit": TARGET_SHARE,
           "pass": deep["deq_share"] <= TARGET_SHARE}
    if "deq_share_saved" in deep:
        out["share_saved_bytes"] = deep["deq_share_saved"]
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
    ms.finish_run(results, format_table(results), args.out, t0)
    return results


def format_table(results: dict[str, Any]) -> str:
    """The readable table: one block per model, MiB and the DEQ's shares."""
    cpu = results["device_type"] == "cpu"
    s = results["sizes"]
    lines = [f"Memory table ({results['measure']})",
             f"device: {results['device']}; batch {s['batch']}, seq {s['seq']}; "
             f"embeddings excluded; {results['weights']}"]
    for kind, res in results["models"].items():
        lines.append("")
        memory = f", Transformer-XL memory {res['mem_len']}" if res["mem_len"] else ""
        lines.append(f"{kind} ({res['preset']}{memory}):")
        head = f"  {'model':<14}{'L':>4}{'peak MiB':>11}{'DEQ share':>11}"
        head += f"{'saved MiB':>11}{'DEQ share':>11}" if cpu else ""
        lines.append(head)
        for r in res["rows"]:
            line = (f"  {r['row']:<14}{r['depth'] or '-':>4}{r['peak_bytes'] / MIB:>11.1f}"
                    f"{_pct(r['deq_share']):>11}")
            if cpu:
                line += f"{r['saved_bytes'] / MIB:>11.1f}{_pct(r['deq_share_saved']):>11}"
            lines.append(line)
        ws = res["solver_workspace"]
        lines.append(f"  solver workspace (in the DEQ's peak): "
                     f"forward {ws['forward']['bytes'] / MIB:.1f} MiB "
                     f"(m={ws['forward']['history_m']}), "
                     f"backward {ws['backward']['bytes'] / MIB:.1f} MiB "
                     f"(m={ws['backward']['history_m']}); D={ws['forward']['D']}")
        t = res["targets"]
        if t:
            verdict = "PASS" if t["pass"] else "FAIL"
            extra = (f" (saved bytes only: {_pct(t['share_saved_bytes'])})"
                     if "share_saved_bytes" in t else "")
            lines.append(f"  target DEQ peak <= {TARGET_SHARE:.0%} of L={t['depth']}: "
                         f"{_pct(t['share'])} {verdict}{extra}")
    return "\n".join(lines)


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


if __name__ == "__main__":
    main()
