"""The DEQ paper's Figures 2-4 from our runs: ``python -m benchmarks.figures [RUN_DIR...]``.

Each figure is a PNG with the plotted numbers next to it as JSON (same name), in ``--out``.

* Figure 2 (``--figure 2``, the default when RUN_DIRs are given; needs them). Each RUN_DIR holds
  the ``metrics.jsonl`` that ``train/`` writes.

  - left, ``figure2_iterations``: against the training step, the mean forward and backward Broyden
    iterations of every logged DEQ step (the paper plots them against the epoch, divided by the
    sequence length), one line pair per run. Steps of the warm-up (``pretrain``) or of an
    unrolled run carry no solver iterations and are left out.
  - right, ``figure2_residuals``: against the training step, the DEQ's mean relative residuals
    ``||f(z) - z|| / ||f(z)||`` at the end of its forward and backward solves (``fwd_res``,
    ``bwd_res``), and the deep weight-tied model's change at its last layer
    ``||z[L] - z[L-1]|| / ||z[L-1]||`` (``layer_change``, logged by ``--mode unrolled`` runs).
    Runs logged before these fields existed have none; the right half is then skipped (an error
    with ``--figure 2right``). When ``--checkpoint`` is given and no unrolled run is, the change
    at the last layer of that copy-memory DEQ's own weights unrolled to its ``unrolled_depth``
    is drawn as one point at the checkpoint's step.

* Figure 3 (``--figure 3``), ``figure3_inference``: the trained copy-memory model's test loss
  (cross-entropy per step, all test sequences unless ``--sequences``) when its forward solve at
  inference runs at each tolerance (limit 30 iterations) and at each iteration limit (tolerance
  1e-12, so the limit is what stops it). The model is the finished run in ``--checkpoint``
  (default ``out/bench-copy-memory``, where :mod:`benchmarks.trained_copy` trains it).

* Figure 4 (``--figure 4``), ``figure4_depth``: the relative change ``||z[i+1] - z[i]|| / ||z[i]||``
  across the depth i of the weight-tied model (the cell applied ``--depth`` times from z = 0, in
  float64), at several sequence lengths: the trained copy-memory model on fresh sequences with
  delays of 1/3, 1, 2 and 4 times its training delay, and the random-weight core of the
  ``deq_transformer_tiny`` preset on random inputs of 8, 32 and 128 positions.

``--figure all`` makes every figure (Figure 2 only when RUN_DIRs are given).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional, Sequence

from deq_ext.bench import progress, provenance

FIGURES = ("2", "2left", "2right", "3", "4", "all")
DEFAULT_TOLS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
DEFAULT_MAX_ITERS = (1, 2, 4, 8, 16, 30)
DEFAULT_DEPTH = 30
DELAY_FACTORS = (1 / 3, 1.0, 2.0, 4.0)  # Figure 4's copy-memory delays, times the trained T
LM_LENGTHS = (8, 32, 128)               # Figure 4's tiny LM segment lengths
DEPTH_BATCH = 64                        # sequences per Figure 4 curve
FRESH_SEED = 777                        # Figure 4's copy sequences: neither train nor test
DEFAULT_CHECKPOINT = os.path.join("out", "bench-copy-memory")  # benchmarks.trained_copy's run


# -- reading runs ------------------------------------------------------------------------------
def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` (a clear error when it is missing)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir!r} (a train/ run's --out-dir)")
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def run_name(run_dir: str) -> str:
    """A run's label: its directory's name."""
    return os.path.basename(os.path.normpath(run_dir)) or run_dir


def train_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The logged training steps in step order, one per step: a run restarted (or resumed)
    in the same directory appends to its log, and its latest record of a step is the one kept."""
    latest = {r["step"]: r for r in records if r.get("event") == "train"}
    return [latest[step] for step in sorted(latest)]


def iteration_series(records: list[dict[str, Any]]) -> dict[str, list[float]]:
    """``step``, ``fwd_iter`` and ``bwd_iter`` of the logged DEQ training steps."""
    rows = [r for r in train_records(records) if r.get("mode") == "deq" and "fwd_iter" in r]
    return {"step": [r["step"] for r in rows], "fwd_iter": [r["fwd_iter"] for r in rows],
            "bwd_iter": [r.get("bwd_iter") for r in rows]}


def residual_series(records: list[dict[str, Any]]) -> dict[str, dict[str, list[Any]]]:
    """The logged DEQ steps' ``fwd_res``/``bwd_res`` (under ``deq``) and the unrolled steps'
    ``layer_change`` (under ``unrolled``; the shallow ``pretrain`` warm-up is left out); a key
    only when the run logged such steps."""
    train = train_records(records)
    deq = [r for r in train if r.get("mode") == "deq" and "fwd_res" in r]
    unrolled = [r for r in train if r.get("mode") == "unrolled" and "layer_change" in r]
    out: dict[str, dict[str, list[Any]]] = {}
    if deq:
        out["deq"] = {"step": [r["step"] for r in deq], "fwd_res": [r["fwd_res"] for r in deq],
                      "bwd_res": [r.get("bwd_res") for r in deq]}
    if unrolled:
        out["unrolled"] = {"step": [r["step"] for r in unrolled],
                           "layer_change": [r["layer_change"] for r in unrolled]}
    return out


# -- output ------------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out_dir: str, name: str, data: dict[str, Any]) -> str:
    """Write ``name.png`` and ``name.json`` to ``out_dir``; returns the PNG's path."""
    os.makedirs(out_dir, exist_ok=True)
    fig.tight_layout()
    png = os.path.join(out_dir, f"{name}.png")
    fig.savefig(png, dpi=120)
    _pyplot().close(fig)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as fh:
        json.dump(data, fh, indent=1)
    progress(f"wrote {png} and {name}.json")
    return png


def _record(argv: Sequence[str]) -> dict[str, Any]:
    import torch

    return provenance(torch.device("cpu"), "python -m benchmarks.figures", list(argv))


# -- Figure 2 ----------------------------------------------------------------------------------
def figure2(run_dirs: Sequence[str], out_dir: str) -> dict[str, Any]:
    """Write ``figure2_iterations.png`` and ``.json`` to ``out_dir``; returns the plotted data."""
    plt = _pyplot()
    data = {run_name(d): iteration_series(read_metrics(d)) for d in run_dirs}
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, series in data.items():
        line, = ax.plot(series["step"], series["fwd_iter"], label=f"{name} forward")
        ax.plot(series["step"], series["bwd_iter"], "--", color=line.get_color(),
                label=f"{name} backward")
    ax.set_xlabel("training step")
    ax.set_ylabel("Broyden iterations (mean per solve)")
    ax.set_title("Figure 2 (left): solver iterations during training")
    ax.legend(fontsize=8)
    _save(fig, out_dir, "figure2_iterations", {"runs": data})
    return data


def checkpoint_layer_change(run_dir: str, sequences: int = DEPTH_BATCH) -> dict[str, Any]:
    """The change at the last layer of a copy-memory checkpoint's DEQ weights unrolled to its
    ``unrolled_depth``, on its first ``sequences`` test sequences (float64)."""
    from . import figure_data as fd

    trained = fd.copy_memory_model(run_dir, sequences)
    depth = trained["config"].unrolled_depth
    x = trained["model"].embedding(trained["test_x"]).detach()
    changes = fd.depth_changes(trained["model"].core, x, depth)
    return {"run_dir": run_dir, "step": trained["step"], "depth": depth,
            "layer_change": changes[-1], "sequences": len(x)}


def figure2_right(run_dirs: Sequence[str], out_dir: str, checkpoint: Optional[str] = None,
                  argv: Sequence[str] = ()) -> dict[str, Any]:
    """Write ``figure2_residuals.png``/``.json``; returns the plotted data. A ValueError when no
    run logged residuals or layer changes. ``checkpoint`` (a copy-memory run dir) adds its
    unrolled weights' last-layer change when no unrolled run is among ``run_dirs``."""
    plt = _pyplot()
    runs = {run_name(d): residual_series(read_metrics(d)) for d in run_dirs}
    runs = {name: series for name, series in runs.items() if series}
    if not runs:
        raise ValueError(
            f"no run in {list(run_dirs)} logged residuals (fwd_res/bwd_res of DEQ steps) or an "
            "unrolled model's layer_change; train/ logs them since they were added (rerun)")
    data: dict[str, Any] = {**_record(argv), "run_dirs": list(run_dirs), "runs": runs}
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, series in runs.items():
        if "deq" in series:
            s = series["deq"]
            line, = ax.plot(s["step"], s["fwd_res"], label=f"{name} DEQ forward residual")
            ax.plot(s["step"], s["bwd_res"], "--", color=line.get_color(),
                    label=f"{name} DEQ backward residual")
        if "unrolled" in series:
            s = series["unrolled"]
            ax.plot(s["step"], s["layer_change"], ":", marker=".",
                    label=f"{name} deep weight-tied, last layer's change")
    if checkpoint is not None and not any("unrolled" in s for s in runs.values()):
        point = checkpoint_layer_change(checkpoint)
        data["checkpoint_unrolled"] = point
        ax.plot([point["step"]], [point["layer_change"]], "k*", markersize=10,
                label=f"{run_name(checkpoint)} weights unrolled L={point['depth']}, last change")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("relative residual / relative change")
    ax.set_title("Figure 2 (right): DEQ residuals vs deep model's last-layer change", fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, out_dir, "figure2_residuals", data)
    return data


# -- Figure 3 ----------------------------------------------------------------------------------
def figure3(checkpoint: str, out_dir: str, tols: Sequence[float] = DEFAULT_TOLS,
            max_iters: Sequence[int] = DEFAULT_MAX_ITERS, sequences: Optional[int] = None,
            argv: Sequence[str] = ()) -> dict[str, Any]:
    """Write ``figure3_inference.png``/``.json``: the copy-memory model of ``checkpoint`` swept
    over the inference tolerance and iteration limit; returns the plotted data."""
    from . import figure_data as fd

    trained = fd.copy_memory_model(checkpoint, sequences)
    model, cfg = trained["model"], trained["config"]
    progress(f"figure 3: {len(tols)} tolerances and {len(max_iters)} iteration limits on "
             f"{len(trained['test_x'])} test sequences of {checkpoint}")
    sweep = fd.inference_sweep(model, trained["test_x"], trained["test_y"], tols, max_iters)
    data = {**_record(argv), "model": "copy-memory DEQ-Transformer, trained",
            "run_dir": checkpoint, "step": trained["step"], "T": cfg.T,
            "train_command": trained["train_command"], "sequences": len(trained["test_x"]),
            "train_forward": {"max_iter": cfg.fwd_iter, "tol": cfg.fwd_tol},
            "eval_tol": cfg.eval_tol, **sweep}
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
    t, m = sweep["tol_sweep"], sweep["iter_sweep"]
    left.plot(t["tol"], t["loss"], "o-")
    left.set_xscale("log")
    left.invert_xaxis()  # tighter to the right, as more work is done
    left.set_xlabel(f"forward tolerance ({sweep['stop_mode']} residual; limit {t['max_iter']})")
    right.plot(m["max_iter"], m["loss"], "o-")
    right.set_xlabel(f"forward iteration limit (tolerance {m['tol']:g})")
    for ax in (left, right):
        ax.set_yscale("log")
        ax.set_ylabel("test loss (cross-entropy per step)")
    fig.suptitle(f"Figure 3: copy memory (T={cfg.T}) at inference, "
                 f"{data['sequences']} test sequences", fontsize=10)
    _save(fig, out_dir, "figure3_inference", data)
    return data


# -- Figure 4 ----------------------------------------------------------------------------------
def copy_delays(trained_T: int) -> list[int]:
    """Figure 4's copy-memory delays: :data:`DELAY_FACTORS` times the trained one (>= 1, unique)."""
    return sorted({max(1, round(trained_T * f)) for f in DELAY_FACTORS})


def figure4(checkpoint: str, out_dir: str, depth: int = DEFAULT_DEPTH,
            lm_lengths: Sequence[int] = LM_LENGTHS, batch: int = DEPTH_BATCH,
            argv: Sequence[str] = ()) -> dict[str, Any]:
    """Write ``figure4_depth.png``/``.json``: the relative change across the depth of the
    weight-tied copy-memory model of ``checkpoint`` and of the random tiny LM core."""
    from . import figure_data as fd
    from .model_setup import random_inputs

    if depth < 2:
        raise ValueError(f"depth must be >= 2, got {depth}")
    trained = fd.copy_memory_model(checkpoint, 1)
    model, cfg = trained["model"], trained["config"]
    copy_curves = {}
    for T in copy_delays(cfg.T):
        progress(f"figure 4: copy memory, delay {T} ({T + 20} positions), depth {depth}")
        x = fd.copy_embeddings(model, T, FRESH_SEED, batch)
        copy_curves[str(T + 20)] = fd.depth_changes(model.core, x, depth)
    lm_curves = {}
    for seq in lm_lengths:
        progress(f"figure 4: {fd.TINY_PRESET} (random weights), {seq} positions, depth {depth}")
        core = fd.tiny_lm_core(seq)
        lm_curves[str(seq)] = fd.depth_changes(core, random_inputs(core, batch, seq, "cpu"), depth)
    data = {**_record(argv), "depth": depth, "layers": list(range(1, depth)), "batch": batch,
            "dtype": "float64", "copy_memory": {
                "model": "copy-memory DEQ-Transformer, trained", "run_dir": checkpoint,
                "step": trained["step"], "trained_T": cfg.T,
                "train_command": trained["train_command"],
                "inputs": f"copy-memory sequences (seed {FRESH_SEED}), delay = length - 20",
                "by_length": copy_curves},
            "tiny_lm": {"model": f"{fd.TINY_PRESET} core, random weights (seed 0)",
                        "inputs": "random embedding-sized inputs, empty memory",
                        "by_length": lm_curves}}
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    for ax, curves, title, delay in (
            (left, copy_curves, f"copy memory, trained (T={cfg.T})", True),
            (right, lm_curves, f"{fd.TINY_PRESET}, random weights", False)):
        for length, values in curves.items():
            label = f"{length} positions" + (f" (T={int(length) - 20})" if delay else "")
            ax.plot(data["layers"], values, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("layer i of the weight-tied model")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    left.set_ylabel("||z[i+1] - z[i]|| / ||z[i]||")
    fig.suptitle("Figure 4: relative change across depth (same cell applied again)", fontsize=10)
    _save(fig, out_dir, "figure4_depth", data)
    return data


# -- command line ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.figures",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR",
                        help="train/ run directories with metrics.jsonl (Figure 2)")
    parser.add_argument("--figure", choices=FIGURES, default=None,
                        help="which figure: 2 (both halves), 2left, 2right, 3, 4 or all "
                             "(default: 2 when RUN_DIRs are given)")
    parser.add_argument("--checkpoint", default=None,
                        help="finished copy-memory run dir for Figures 3 and 4 (default "
                             f"{DEFAULT_CHECKPOINT}); given, it also adds its unrolled point "
                             "to Figure 2 (right)")
    parser.add_argument("--out", default="benchmarks/results/figures",
                        help="where the PNGs and JSON go (default benchmarks/results/figures)")
    parser.add_argument("--sequences", type=int, default=None,
                        help="Figure 3: test sequences to evaluate (default all)")
    parser.add_argument("--depth", type=int, default=DEFAULT_DEPTH,
                        help=f"Figure 4: layers of the weight-tied model (default {DEFAULT_DEPTH})")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    figure = args.figure or ("2" if args.runs else None)
    if figure is None:
        parser.error("give RUN_DIRs (Figure 2) or --figure 3, 4 or all")
    wanted = {"2": ["2left", "2right"], "all": ["2left", "2right", "3", "4"]}.get(figure, [figure])
    if not args.runs and any(w.startswith("2") for w in wanted):
        if figure != "all":
            parser.error(f"--figure {figure} needs RUN_DIRs (train/ runs with metrics.jsonl)")
        progress("figure 2 skipped: no RUN_DIR given")
        wanted = [w for w in wanted if not w.startswith("2")]
    checkpoint = args.checkpoint or DEFAULT_CHECKPOINT
    try:
        for name in wanted:
            if name == "2left":
                figure2(args.runs, args.out)
            elif name == "2right":
                try:
                    figure2_right(args.runs, args.out, args.checkpoint, argv)
                except ValueError as err:
                    if figure == "2right":
                        raise
                    progress(f"figure 2 (right) skipped: {err}")
            elif name == "3":
                figure3(checkpoint, args.out, sequences=args.sequences, argv=argv)
            elif name == "4":
                figure4(checkpoint, args.out, depth=args.depth, argv=argv)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
