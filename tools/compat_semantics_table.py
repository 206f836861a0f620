"""Loss and gradient error of the locuslab adapters at the official tolerances, both semantics.

The client is the tiny official-style DEQ-Transformer of tests/compat_client.py (solvers passed
in, backward hook with a second solve). For each seed it computes the loss and the parameter
gradients of one batch at the official settings (forward ``threshold=30``, backward
``threshold=40``, ``eps=1e-3``, ``stop_mode="rel"`` forward and backward) with
``semantics="official"`` and ``"deq_ext"``, and compares them with a tightly converged float64
reference (the official Broyden forward and backward, ``eps=1e-12``, 100 steps; seeds whose reference
does not reach 1e-10 are left out and listed). Prints one
JSON line per configuration and a Markdown table (median and max over the seeds).

Run from the repository root: ``python tools/compat_semantics_table.py [--seeds 8]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deq_ext import compat  # noqa: E402
from tests.compat_client import loss_and_grads  # noqa: E402

_TIGHT_LOWEST: list[float] = []


def TIGHT(f, x0, threshold, stop_mode="rel"):
    """The reference solve; records its lowest residual so unconverged seeds can be dropped."""
    out = compat.broyden(f, x0, threshold, eps=1e-12, stop_mode=stop_mode, semantics="official")
    _TIGHT_LOWEST.append(out["lowest"])
    return out


def _reference(seed: int):
    """The tight float64 loss and gradients, or None when a reference solve missed 1e-10."""
    _TIGHT_LOWEST.clear()
    ref = loss_and_grads(seed, TIGHT, TIGHT, f_thres=100, b_thres=100)
    return ref if max(_TIGHT_LOWEST) < 1e-10 else None


def _errors(seed: int, f_name: str, b_name: str, semantics: str, dtype: torch.dtype,
            ref: tuple[float, list[torch.Tensor]]) -> tuple[float, float]:
    f_solver = functools.partial(getattr(compat, f_name), semantics=semantics)
    b_solver = functools.partial(getattr(compat, b_name), semantics=semantics)
    loss, grads = loss_and_grads(seed, f_solver, b_solver, dtype=dtype)
    ref_loss, ref_grads = ref
    flat = torch.cat([g.double().flatten() for g in grads])
    ref_flat = torch.cat([g.flatten() for g in ref_grads])
    return abs(loss - ref_loss), float((flat - ref_flat).norm() / ref_flat.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8, help="number of seeds (models and batches)")
    args = parser.parse_args()
    refs = {s: r for s in range(args.seeds) if (r := _reference(s)) is not None}
    print(json.dumps({"seeds_tried": args.seeds, "seeds_with_a_converged_reference": sorted(refs)}))
    rows = []
    for dtype in (torch.float64, torch.float32):
        for f_name, b_name in (("anderson", "broyden"), ("broyden", "broyden")):
            for semantics in ("official", "deq_ext"):
                errs = [_errors(s, f_name, b_name, semantics, dtype, ref) for s, ref in refs.items()]
                row = {"dtype": str(dtype).replace("torch.", ""), "forward": f_name, "backward": b_name,
                       "semantics": semantics, "seeds": len(refs),
                       "loss_err_median": statistics.median(e[0] for e in errs),
                       "loss_err_max": max(e[0] for e in errs),
                       "grad_rel_err_median": statistics.median(e[1] for e in errs),
                       "grad_rel_err_max": max(e[1] for e in errs)}
                print(json.dumps(row))
                rows.append(row)
    print("\n| dtype | forward / backward | semantics | abs. loss error (median, max) "
          "| rel. gradient error (median, max) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['forward']} / {r['backward']} | {r['semantics']} "
              f"| {r['loss_err_median']:.1e}, {r['loss_err_max']:.1e} "
              f"| {r['grad_rel_err_median']:.1e}, {r['grad_rel_err_max']:.1e} |")


if __name__ == "__main__":
    main()
