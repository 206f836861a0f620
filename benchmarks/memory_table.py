"""Training memory of the DEQ against the same f unrolled L times (paper, Tables 2 and 3).

``python -m benchmarks.memory_table [--device auto|cpu|cuda] [--quick] [--out PATH]``

Both models at the paper's small sizes (``deq_transformer_small``, ``deq_trellisnet_small``),
sequence length 150, batch 15, embeddings and softmax excluded (the core only, on random
embedding-sized inputs, with a full Transformer-XL memory). Rows: the DEQ; the deep weight-tied
model (same parameters) unrolled L = 16, 60, 70 layers; the same with gradient checkpointing.
The figure is the DEQ's share of each deep model's memory.

What is measured:

* **CPU**: bytes autograd saves for backward during the forward pass (saved-tensor hooks,
  distinct storages counted once; parameters count where an op saves them). The unrolled and
  checkpointed rows need no data-dependent op, so they run on the meta device (shapes only, no
  compute); the script checks on a small case that meta and real runs save the same bytes. The
  DEQ runs for real (its solver needs values) and keeps one application of f whatever the
  iterations. Not in saved bytes, reported as separate columns: the solver's workspace (its state
  tensors, computed by constructing the solver's state on the meta device, so it follows the real
  allocations: for Broyden with history m, U and V of (B, m, D) plus a few (B, D) and (B,)
  tensors; the forward and the backward solve run one after the other, so the larger counts) and
  the transient of checkpointing (one layer's activations recomputed in backward, about the
  per-layer saved bytes of the unrolled model). The no-grad activations of one f evaluation inside
  the solver and the parameters' gradients are not counted on CPU.
* **GPU**: ``torch.cuda.max_memory_allocated`` during one forward + backward of the core, minus
  the memory allocated before it (parameters, inputs, memory). This includes everything above:
  solver workspace, transients, gradients.

Weights are random (untrained): memory does not depend on them, except through the DEQ's
iteration count, which does not change what the DEQ keeps.
"""

from __future__ import annotations

import argparse
import gc
import time
from typing import Any, Callable, Optional

import torch

from deq_ext.bench.env import progress, ratio
from deq_ext.solvers import broyden_workspace
from models.modes import SequenceCore

from . import model_setup as ms

DEPTHS = (16, 60, 70)      # Table 3 (16-layer transformer), Table 2 (60), Table 3 (70 TrellisNet)
QUICK_DEPTHS = (4, 60)     # tiny presets: cheap, and the target row still exists
TARGET_DEPTH = 60          # the target: DEQ <= 12% of the 60-layer model
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


def cpu_row_bytes(real: SequenceCore, meta: SequenceCore, batch: int, seq: int,
                  mode: str, depth: Optional[int], checkpoint: bool) -> int:
    """Saved bytes of one row: the DEQ for real, the unrolled rows on the meta device."""
    core = real if mode == "deq" else meta
    ms.set_mode(core, mode, depth, checkpoint)
    x, memory, w = inputs_for(core, batch, seq)
    return saved_bytes(lambda: ms.core_loss(core, x, memory, w))


def cuda_row_bytes(core: SequenceCore, batch: int, seq: int, mode: str, depth: Optional[int],
                   checkpoint: bool) -> int:
    """Peak GPU bytes of one forward + backward of the row's model."""
    ms.set_mode(core, mode, depth, checkpoint)
    x, memory, w = inputs_for(core, batch, seq)
    ms.zero_grads(core)

    def step() -> None:
        ms.core_loss(core, x, memory, w).backward()

    peak = cuda_peak_bytes(step, x.device)
    ms.zero_grads(core)
    return peak


def meta_check(preset: str, seed: int) -> dict[str, Any]:
    """Saved bytes of a small real CPU run against the same run on the meta device."""
    real, meta = build_pair(preset, 8, None, torch.device("cpu"), seed)
    out = {"batch": 2, "seq": 8, "depth": 2}
    for ckpt in (False, True):
        counts = [cpu_row_bytes(core, core, 2, 8, "unrolled", 2, ckpt) for core in (real, meta)]
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

    def row(mode: str, depth: Optional[int] = None, ckpt: bool = False) -> int:
        t0 = time.perf_counter()
        if cpu:
            n = cpu_row_bytes(real, meta, batch, seq, mode, depth, ckpt)
        else:
            n = cuda_row_bytes(real, batch, seq, mode, depth, ckpt)
        label = mode + (f" L={depth}" if depth else "") + (" checkpointed" if ckpt else "")
        progress(f"{kind}: {label}: {n / MIB:.1f} MiB ({time.perf_counter() - t0:.1f}s)")
        return n

    if not cpu:
        row("unrolled", 1)  # warm-up: cuBLAS workspaces and allocator pools, not recorded
    deq = row("deq")
    result["deq_solves"] = ms.solver_summary(ms.stats_of(real))
    workspace = solver_workspace(preset, batch, seq, ms.mem_len_of(real))
    result["solver_workspace"] = workspace
    result["not_counted"] = _not_counted(cpu)
    per_layer = {L: row("unrolled", L) for L in (1, 2)}
    result["reference"] = {"unrolled_1": per_layer[1], "unrolled_2": per_layer[2],
                           "per_layer_bytes": per_layer[2] - per_layer[1]}
    rows = [{"row": "deq", "depth": None, "bytes": deq}]
    for ckpt in (False, True):
        for L in sizes["depths"]:
            rows.append({"row": "checkpointed" if ckpt else "unrolled", "depth": L,
                         "bytes": row("unrolled", L, ckpt)})
    ws = workspace["peak_bytes"]
    for r in rows:
        r["deq_share"] = ratio(deq, r["bytes"])
        if cpu:
            r["deq_share_with_workspace"] = ratio(deq + ws, r["bytes"])
        if r["row"] == "checkpointed":
            # What checkpointing allocates again in backward: one layer's activations.
            transient = result["reference"]["per_layer_bytes"]
            r["recompute_transient_bytes"] = transient
            if cpu:  # both with their transients: the DEQ's workspace, the recomputed layer
                r["deq_share_with_transients"] = ratio(deq + ws, r["bytes"] + transient)
    result["rows"] = rows
    result["targets"] = _targets(rows, cpu)
    return result


def _not_counted(cpu: bool) -> list[str]:
    if not cpu:
        return ["nothing: the peak covers saved tensors, solver workspace, transients and "
                "gradients; parameters, inputs and memory are subtracted"]
    return ["solver workspace (separate column: solver_workspace, shares with_workspace)",
            "checkpointing's recomputed layer in backward (recompute_transient_bytes)",
            "no-grad activations of one f evaluation inside the solver",
            "gradients of the parameters (the same for every row)"]


def _targets(rows: list[dict[str, Any]], cpu: bool) -> dict[str, Any]:
    """DEQ <= 12% of the 60-layer unrolled model's memory (without and with the workspace)."""
    deep = next((r for r in rows if r["row"] == "unrolled" and r["depth"] == TARGET_DEPTH), None)
    if deep is None:
        return {}
    out = {"share": deep["deq_share"], "limit": TARGET_SHARE,
           "pass": deep["deq_share"] <= TARGET_SHARE}
    if cpu:
        with_ws = deep["deq_share_with_workspace"]
        out.update(share_with_workspace=with_ws, pass_with_workspace=with_ws <= TARGET_SHARE)
    return out


# -- the run ---------------------------------------------------------------------------------
def resolve_sizes(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Paper sizes (batch 15, sequence 150, preset memory) unless ``--quick`` or overridden."""
    quick = args.quick
    return {"batch": args.batch or (2 if quick else ms.PAPER_BATCH),
            "seq": args.seq or (8 if quick else ms.PAPER_SEQ),
            "mem_len": args.mem_len if args.mem_len is not None else (8 if quick else None),
            "depths": args.depths or list(QUICK_DEPTHS if quick else DEPTHS)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory_table",
                                     description=__doc__.split("\n\n")[0])
    ms.add_common_args(parser)
    parser.add_argument("--depths", type=int, nargs="+", default=None,
                        help=f"unrolled depths L (default: {' '.join(map(str, DEPTHS))})")
    return parser


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Measure both models, print the table, write JSON; returns the results."""
    args, device, results = ms.start_run(build_parser(), "python -m benchmarks.memory_table",
                                         argv)
    sizes = resolve_sizes(args, device)
    results["device_type"] = device.type
    results["measure"] = ("cpu: bytes saved for backward (saved-tensor hooks); unrolled rows on "
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
        head = f"  {'model':<14}{'L':>4}{'MiB':>11}{'DEQ share':>11}"
        head += f"{'+workspace':>12}{'recompute MiB':>15}" if cpu else ""
        lines.append(head)
        for r in res["rows"]:
            line = (f"  {r['row']:<14}{r['depth'] or '-':>4}{r['bytes'] / MIB:>11.1f}"
                    f"{_pct(r['deq_share']):>11}")
            if cpu:
                rt = r.get("recompute_transient_bytes")
                line += f"{_pct(r['deq_share_with_workspace']):>12}"
                line += f"{'' if rt is None else f'{rt / MIB:.1f}':>15}"
            lines.append(line)
        ws = res["solver_workspace"]
        lines.append(f"  solver workspace (not in saved bytes{'' if cpu else '; in the peak'}): "
                     f"forward {ws['forward']['bytes'] / MIB:.1f} MiB "
                     f"(m={ws['forward']['history_m']}), "
                     f"backward {ws['backward']['bytes'] / MIB:.1f} MiB "
                     f"(m={ws['backward']['history_m']}); D={ws['forward']['D']}")
        t = res["targets"]
        if t:
            verdict = "PASS" if t["pass"] else "FAIL"
            extra = (f"; with workspace {_pct(t['share_with_workspace'])} "
                     f"{'PASS' if t['pass_with_workspace'] else 'FAIL'}") if cpu else ""
            lines.append(f"  target DEQ <= {TARGET_SHARE:.0%} of L={TARGET_DEPTH}: "
                         f"{_pct(t['share'])} {verdict}{extra}")
    return "\n".join(lines)


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


if __name__ == "__main__":
    main()
