"""Loads the compiled extension once and picks the ops a solve calls.

Importing ``deq_ext._C`` registers every op in PyTorch's dispatcher as
``torch.ops.deq_ext.<name>`` (CPU kernels, and CUDA kernels when they were built),
with a schema that marks the tensors it writes; their fake implementations for
torch.compile are registered here (:mod:`deq_ext._fake`). If the extension is
missing (the package was not compiled, or was compiled against another torch) the
ops fall back to the pure-PyTorch twins in :mod:`deq_ext.reference`, with one
warning saying so.

The test-only module ``deq_ext._C_emu`` (built with ``DEQ_EXT_BUILD_EMU=1``) holds
the CUDA kernels compiled as host C++ on the CUDA emulation, registered as
``torch.ops.deq_ext_emu.<name>`` for CPU tensors; :func:`emulated_ops` returns
them and :func:`use_ops` routes solves through them.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import os
import warnings
from types import ModuleType, SimpleNamespace
from typing import Any, Iterator, Optional

import torch

from . import _fake, reference

# Every op, by the name it has in the dispatcher, in reference.py and in the schemas.
OP_NAMES = ("residual_status_", "broyden_reduce", "broyden_expand_", "fixed_point_step_",
            "anderson_store_", "anderson_mix_")

_C: Optional[ModuleType]
_LOAD_ERROR: Optional[str]
try:
    from . import _C  # type: ignore[attr-defined, no-redef]

    _LOAD_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the install
    _C = None
    _LOAD_ERROR = str(exc)

_warned = False
_override: Optional[Any] = None


def _overloads(namespace: str) -> SimpleNamespace:
    """The ops of ``torch.ops.<namespace>`` as their default overloads (the cheapest call)."""
    ns = getattr(torch.ops, namespace)
    return SimpleNamespace(**{name: getattr(ns, name).default for name in OP_NAMES})


_COMPILED: Optional[SimpleNamespace] = None
if _C is not None:
    _fake.register("deq_ext", OP_NAMES)
    _COMPILED = _overloads("deq_ext")


def available() -> bool:
    """True when the compiled extension was imported."""
    return _C is not None


def build_info() -> dict[str, Any]:
    """What was compiled: ``{'cpu', 'cuda', 'cuda_archs', 'torch_version', 'openmp', ...}``.

    ``openmp`` says whether the CPU kernels were compiled with OpenMP, which
    they need to run on torch's threads when torch parallelizes with OpenMP.
    ``cuda_archs`` lists the compute capabilities the CUDA kernels were built
    for (for example ``['8.0', '9.0']``); it is empty when CUDA was not built.
    ``emulation`` says whether the test-only CUDA emulation module was built (it is
    not imported by this call). ``cpu_kernels`` says which clones of the CPU loops run:
    ``'avx2'`` (AVX2 + FMA, on x86-64 CPUs that have them) or ``'baseline'`` (elsewhere, or
    with ``DEQ_EXT_CPU_BASELINE=1`` in the environment).
    When the extension could not be loaded, ``loaded`` is False and ``error``
    says why.
    """
    if _C is None:
        return {"loaded": False, "cpu": False, "cuda": False, "cuda_archs": [],
                "emulation": False, "error": _LOAD_ERROR}
    info = dict(_C.build_info())
    archs = info.get("cuda_archs", "")
    info["cuda_archs"] = [a for a in archs.split("+") if a] if archs else []
    # Looked for next to this package only (not through other import hooks), never imported.
    info["emulation"] = importlib.machinery.PathFinder.find_spec(
        f"{__package__}._C_emu", [os.path.dirname(__file__)]) is not None
    info["loaded"] = True
    return info


def ops(force_reference: bool = False) -> Any:
    """The ops a solve calls: ``residual_status_``, ``broyden_reduce``, ... as attributes.

    The dispatcher ops of the extension, or :mod:`deq_ext.reference` when asked
    for or when the extension is missing; inside :func:`use_ops`, the ops given there.
    """
    global _warned
    if force_reference:
        return reference
    if _override is not None:
        return _override
    if _COMPILED is None:
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
    return _COMPILED


_EMU: Optional[ModuleType] = None
_EMU_OPS: Optional[SimpleNamespace] = None


def emulation_module() -> Optional[ModuleType]:
    """``deq_ext._C_emu`` (schedule controls and counters) when it was built, else None."""
    global _EMU, _EMU_OPS
    if _EMU is None and _C is not None:
        try:
            from . import _C_emu  # type: ignore[attr-defined]
        except ImportError:
            return None
        _fake.register("deq_ext_emu", OP_NAMES)
        _EMU, _EMU_OPS = _C_emu, _overloads("deq_ext_emu")
    return _EMU


def emulated_ops() -> Optional[SimpleNamespace]:
    """The CUDA kernels on the CPU emulation (``torch.ops.deq_ext_emu``), or None if not built."""
    emulation_module()
    return _EMU_OPS


@contextlib.contextmanager
def use_ops(op_set: Any) -> Iterator[None]:
    """Within the block, solves (and :func:`ops`) use ``op_set`` instead of the compiled ops.

    For tests: ``with use_ops(emulated_ops()): deq_ext.broyden(...)`` runs a whole
    solve through the emulated CUDA kernels.
    """
    global _override
    previous, _override = _override, op_set
    try:
        yield
    finally:
        _override = previous
