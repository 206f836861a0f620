"""Loads the compiled extension ``deq_ext._C`` once and picks each op's implementation.

If the extension is missing (the package was not compiled, or was compiled
against another torch) the ops fall back to the pure-PyTorch twins in
:mod:`deq_ext.reference`, with one warning saying so.
"""

from __future__ import annotations

import warnings
from types import ModuleType
from typing import Any

from . import reference

_C: ModuleType | None
_LOAD_ERROR: str | None
try:
    from . import _C  # type: ignore[attr-defined, no-redef]

    _LOAD_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the install
    _C = None
    _LOAD_ERROR = str(exc)

_warned = False


def available() -> bool:
    """True when the compiled extension was imported."""
    return _C is not None


def build_info() -> dict[str, Any]:
    """What was compiled: ``{'cpu', 'cuda', 'cuda_archs', 'torch_version', 'openmp', ...}``.

    ``openmp`` says whether the CPU kernels were compiled with OpenMP, which
    they need to run on torch's threads when torch parallelizes with OpenMP.
    ``cuda_archs`` lists the compute capabilities the CUDA kernels were built
    for (for example ``['8.0', '9.0']``); it is empty when CUDA was not built.
    When the extension could not be loaded, ``loaded`` is False and ``error``
    says why.
    """
    if _C is None:
        return {"loaded": False, "cpu": False, "cuda": False, "cuda_archs": [], "error": _LOAD_ERROR}
    info = dict(_C.build_info())
    archs = info.get("cuda_archs", "")
    info["cuda_archs"] = [a for a in archs.split("+") if a] if archs else []
    info["loaded"] = True
    return info


def ops(force_reference: bool = False) -> ModuleType:
    """The module whose ``residual_status_``, ``broyden_reduce``, ``broyden_expand_`` to call."""
    global _warned
    if force_reference:
        return reference
    if _C is None:
        if not _warned:
            warnings.warn(
                "deq_ext: the compiled extension is not available, using the pure-PyTorch "
                f"reference ops (much slower). Reason: {_LOAD_ERROR}. "
                "Build it with `pip install --no-build-isolation -e .`.",
                RuntimeWarning,
                stacklevel=3,
            )
            _warned = True
        return reference
    return _C
