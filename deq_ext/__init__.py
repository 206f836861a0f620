"""deq_ext: batched, per-sample masked Broyden solvers for Deep Equilibrium Models.

    >>> import torch, deq_ext
    >>> A = 0.5 * torch.eye(8)
    >>> res = deq_ext.broyden(lambda z: z @ A + 1.0, torch.zeros(4, 8), tol=1e-6)
    >>> res.status  # Status.CONVERGED (1) for every sample

See :func:`deq_ext.broyden` for the options, :mod:`deq_ext.reference` for the
exact semantics of every compiled op, and :func:`deq_ext.build_info` for what
was compiled.
"""

from __future__ import annotations

from . import compat, reference
from ._extension import available as extension_available
from ._extension import build_info
from .jacobian import jac_reg, spectral_radius
from .layer import DEQ, SolverSettings, SolverStats, deq_fixed_point, paper_settings, state_steps
from .mixing import mixes_samples, sample_mixers
from .result import SolverResult
from .shine import ShineFallback
from .solvers import SOLVERS, anderson, broyden, fixed_point, register_solver, solve, unregister_solver
from .solvers._graph import GraphCaptureError
from .solvers._memory import WorkspaceError, set_cpu_workspace_budget
from .states import StateSpec
from .status import Status

__version__ = "0.1.0"

__all__ = [
    "DEQ",
    "GraphCaptureError",
    "SOLVERS",
    "SolverSettings",
    "SolverStats",
    "anderson",
    "compat",
    "deq_fixed_point",
    "paper_settings",
    "SolverResult",
    "ShineFallback",
    "Status",
    "broyden",
    "build_info",
    "extension_available",
    "fixed_point",
    "jac_reg",
    "mixes_samples",
    "reference",
    "register_solver",
    "sample_mixers",
    "solve",
    "spectral_radius",
    "state_steps",
    "StateSpec",
    "unregister_solver",
    "WorkspaceError",
    "set_cpu_workspace_budget",
]
