"""The paper's Figure 2 (left) from training runs: ``python -m benchmarks.figures RUN_DIR...``.

Each RUN_DIR holds the ``metrics.jsonl`` that ``train/`` writes. The figure plots, against the
training step, the mean forward and backward Broyden iterations of every logged DEQ step (the
paper plots them against the epoch, divided by the sequence length), one line pair per run; the
plotted numbers are written next to the PNG as JSON. Steps of the warm-up (``pretrain``) or of an
unrolled run carry no solver iterations and are left out.

Not made yet: Figure 2 (right: residuals of the DEQ against the deep weight-tied model's
layer-to-layer change), Figure 3 (loss against the inference tolerance and iteration limit) and
Figure 4 (relative change across the depth of unrolled models).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Optional, Sequence


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` (a clear error when it is missing)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir!r} (a train/ run's --out-dir)")
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def iteration_series(records: list[dict[str, Any]]) -> dict[str, list[float]]:
    """``step``, ``fwd_iter`` and ``bwd_iter`` of the logged DEQ training steps."""
    rows = [r for r in records if r.get("event") == "train" and r.get("mode") == "deq"
            and "fwd_iter" in r]
    return {"step": [r["step"] for r in rows], "fwd_iter": [r["fwd_iter"] for r in rows],
            "bwd_iter": [r.get("bwd_iter") for r in rows]}


def figure2(run_dirs: Sequence[str], out_dir: str) -> dict[str, Any]:
    """Write ``figure2_iterations.png`` and ``.json`` to ``out_dir``; returns the plotted data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {os.path.basename(os.path.normpath(d)) or d: iteration_series(read_metrics(d))
            for d in run_dirs}
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, series in data.items():
        line, = ax.plot(series["step"], series["fwd_iter"], label=f"{name} forward")
        ax.plot(series["step"], series["bwd_iter"], "--", color=line.get_color(),
                label=f"{name} backward")
    ax.set_xlabel("training step")
    ax.set_ylabel("Broyden iterations (mean per solve)")
    ax.set_title("Figure 2 (left): solver iterations during training")
    ax.legend(fontsize=8)
    os.makedirs(out_dir, exist_ok=True)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "figure2_iterations.png"), dpi=120)
    plt.close(fig)
    with open(os.path.join(out_dir, "figure2_iterations.json"), "w") as fh:
        json.dump({"runs": data}, fh, indent=1)
    return data


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="directories with metrics.jsonl")
    parser.add_argument("--out", default="benchmarks/results/figures",
                        help="where the PNG and JSON go (default benchmarks/results/figures)")
    args = parser.parse_args(argv)
    try:
        figure2(args.runs, args.out)
    except FileNotFoundError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {os.path.join(args.out, 'figure2_iterations.png')}")


if __name__ == "__main__":
    main()
