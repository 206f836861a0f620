"""Per-sample solver status codes (mirrors ``csrc/common/broyden_math.h``)."""

from __future__ import annotations

import enum


class Status(enum.IntEnum):
    """Why a sample stopped iterating, or that it has not."""

    ACTIVE = 0
    """Still iterating (only seen inside a solve)."""
    CONVERGED = 1
    """The stop-mode residual fell below ``tol``."""
    DIVERGED = 2
    """f returned non-finite values, or the residual blew up past ``diverge_ratio`` x best."""
    STALLED = 3
    """No new lowest residual for ``stall_patience`` iterations."""
    MAX_ITER = 4
    """Ran out of iterations before reaching ``tol``."""


# Column layout of the per-sample scalars written by the reduction pass.
DZ_DG, DZ_G, DEN, VG, VALID = range(5)
NUM_SCALARS = 5

# Added to ||f(z)|| in the relative residual, as torchdeq and locuslab/deq do.
REL_EPS = 1e-9

# Layout of the (2,) counts the residual/status op writes after every update.
PENDING_COUNT, ACTIVE_COUNT = range(2)
NUM_COUNTS = 2
