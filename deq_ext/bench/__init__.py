"""Side-by-side benchmark of deq_ext's solvers: ``python -m deq_ext.bench``.

Every section is measured in one run, so that each ratio compares figures taken
on the same machine at the same time:

1. **Solves** (:mod:`.solves`). A batch with heterogeneous convergence
   (:mod:`.problem`: per-sample contraction rho_b from 0.3 to 0.95) is solved by
   deq_ext's compiled solver, by the same solver evaluating f on the whole batch
   (what compaction saves), by the same solver reading the device every 4th
   iteration and never (``check_every=4``, ``stop_early=False``), by the driver on the
   pure-PyTorch reference twin, and by torchdeq. f is wrapped in a timer, so each solve splits
   into the time spent inside
   f and the solver's own time.
2. **Bandwidth** (:mod:`.bandwidth`). The device copy bandwidth against the bytes
   the two fused passes of one Broyden iteration move, and those passes against one
   torchdeq-style update over the same history.
3. **Active fraction** (:mod:`.active`, plotted by :mod:`.plot`). Time per iteration
   against the fraction of samples still active.

The targets of the issues are checked from the measured figures (:mod:`.report`).
:mod:`.env` holds the clocks and the provenance record that the microbenchmarks and
the table scripts under ``benchmarks/`` share.
"""

from .cli import main

__all__ = ["main"]
