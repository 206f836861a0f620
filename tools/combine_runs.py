"""Combine the result records of repeated training runs (one per seed) into one JSON file.

``python tools/combine_runs.py OUT.json RUN.json [RUN.json ...]``

Each input is a record written by ``python -m train.copy_memory --results``. The output keeps
every run and adds, for each figure, the median and the range over the runs: a single run is
not a figure (CPU float reductions depend on threading, and training amplifies the difference).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

# (name in the summary, path into a run record)
FIGURES = {
    "test_loss": ("final_test", "test_loss"),
    "test_copy_accuracy": ("final_test", "test_copy_accuracy"),
    "test_f_rows_saved_by_compaction": ("final_test", "test_f_rows_saved_by_compaction"),
    "wall_s": ("wall_s",),
}


def _get(record: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        record = record[key]
    return record


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary = {}
    for name, path in FIGURES.items():
        values = [float(_get(r, path)) for r in runs]
        summary[name] = {"median": statistics.median(values), "min": min(values),
                         "max": max(values), "values": values}
    return {
        "command": "; ".join(r["command"] for r in runs),
        "device": runs[0]["device"],
        "versions": runs[0]["versions"],
        "seeds": [r["config"]["seed"] for r in runs],
        "summary": summary,
        "runs": runs,
    }


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    runs = [json.loads(Path(p).read_text()) for p in argv[2:]]
    out = combine(runs)
    Path(argv[1]).write_text(json.dumps(out, indent=2) + "\n")
    for name, s in out["summary"].items():
        print(f"{name}: median {s['median']:.4g} (range {s['min']:.4g} .. {s['max']:.4g}) "
              f"over seeds {out['seeds']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
