"""What solving a DEQ in chunks of samples costs in time (the layer's ``chunk``).

``python -m benchmarks.chunk_cost [--device auto|cpu|cuda] [--quick] [--repeats N] [--out PATH]``

The memory table's models (the paper's small transformer and TrellisNet cores, batch 15,
sequence 150, random weights, so every solve runs to its limit) take one training step (forward
and backward of the core's loss) with the whole batch in one solve (``chunk=None``) and with the
default ``chunk="auto"`` (on the CPU, 4 chunks at these sizes; ``--chunk N``: N samples per
solve, e.g. on CUDA, where "auto" keeps the whole batch), alternating, ``--repeats`` times
each after one warm-up step each; the figure is the ratio of the medians, chunked over whole,
with the range of the per-repeat ratios. The peaks of the same steps are in the memory table
(``python -m benchmarks.memory_table``); on CUDA this also records each one's peak
(``max_memory_allocated``). Nothing here is tracked or hooked: plain steps.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any, Optional, Union

import torch

from deq_ext.bench import progress, ratio
from deq_ext.chunks import auto_chunk

from . import model_setup as ms


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_model(preset: str, batch: int, seq: int, repeats: int, device: torch.device,
               seed: int, chunk: Union[int, str] = "auto") -> dict[str, Any]:
    """Step times of one preset with the whole batch and with ``chunk``, alternated, and their
    ratio; on CUDA also each one's peak memory (``max_memory_allocated`` above the start)."""
    chunkings = {"whole": None, "chunked": chunk}
    core = ms.make_core(preset, seq=seq, device=device, seed=seed).train()
    ms.set_mode(core, "deq")
    x = ms.random_inputs(core, batch, seq, device)
    memory = ms.steady_memory(core, batch, device)
    w = ms.readout(core, device)
    times: dict[str, list[float]] = {name: [] for name in chunkings}
    peaks: dict[str, int] = {}
    for rep in range(repeats + 1):  # the first round warms up
        for name, value in chunkings.items():
            core.set_mode("deq", chunk=value)
            ms.zero_grads(core)
            _sync(device)
            if device.type == "cuda":
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            ms.core_loss(core, x, memory, w).backward()
            _sync(device)
            if rep:
                times[name].append(time.perf_counter() - t0)
            if device.type == "cuda":
                peaks[name] = torch.cuda.max_memory_allocated(device) - base
        if rep:
            progress(f"{preset}: repeat {rep}: whole {times['whole'][-1]:.2f}s, "
                     f"chunk={chunk!r} {times['chunked'][-1]:.2f}s")
    per_repeat = [a / b for a, b in zip(times["chunked"], times["whole"])]
    values = math.prod(core.state_shape(batch, seq)) // batch
    out = {"preset": preset, "chunk": chunk,
           "samples_per_solve": auto_chunk(batch, values, device) if chunk == "auto" else chunk,
           "step_s": times,
           "median_s": {name: statistics.median(ts) for name, ts in times.items()},
           "chunked_over_whole": ratio(statistics.median(times["chunked"]),
                                       statistics.median(times["whole"])),
           "chunked_over_whole_range": [min(per_repeat), max(per_repeat)]}
    if peaks:
        out["peak_bytes"] = peaks
        out["peak_ratio"] = ratio(peaks["chunked"], peaks["whole"])
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chunk_cost",
                                     description=__doc__.split("\n\n")[0])
    ms.add_common_args(parser)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per chunking")
    parser.add_argument("--chunk", default="auto",
                        help="the chunking set against the whole batch: 'auto' (the default "
                             "the layer runs) or a number of samples per solve")
    return parser


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Time both models, print the table, write JSON; returns the results."""
    args, device, results = ms.start_run(build_parser(), "python -m benchmarks.chunk_cost", argv)
    batch = args.batch or (4 if args.quick else ms.PAPER_BATCH)
    seq = args.seq or (8 if args.quick else ms.PAPER_SEQ)
    chunk = args.chunk if args.chunk == "auto" else int(args.chunk)
    results.update({"batch": batch, "seq": seq, "repeats": args.repeats, "chunk": chunk,
                    "what": f"one training step of the core (forward + backward), solves to the "
                            f"limit; chunk={chunk!r} against chunk=None, alternated"})
    t0 = time.perf_counter()
    results["models"] = {kind: time_model(preset, batch, seq, args.repeats, device, args.seed,
                                          chunk)
                         for kind, preset in ms.preset_names(args.quick).items()}
    ms.finish_run(results, format_table(results), args.out, t0)
    return results


def format_table(results: dict[str, Any]) -> str:
    lines = [f"Chunk cost: {results['what']}", f"device: {results['device']}; batch "
             f"{results['batch']}, seq {results['seq']}, {results['repeats']} repeats"]
    for kind, r in results["models"].items():
        lo, hi = r["chunked_over_whole_range"]
        n = r["samples_per_solve"]
        chunk = f"chunks of {n} samples" if n else "the whole batch"
        peak = (f"; peak {r['peak_ratio']:.2f}x the whole batch's" if "peak_ratio" in r else "")
        lines.append(f"  {kind} ({r['preset']}): whole {r['median_s']['whole']:.2f}s, "
                     f"chunk={r['chunk']!r} ({chunk}) {r['median_s']['chunked']:.2f}s: "
                     f"{r['chunked_over_whole']:.2f}x ({lo:.2f}..{hi:.2f}){peak}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
