"""The DEQ layer: a fixed point in the forward pass, implicit differentiation in the backward.

Forward: ``z* = f(z*, *inputs)`` is solved without keeping any graph of the
iterations. One more application ``f(z*, *inputs)`` is recorded to attach the
gradient. Backward (Bai et al. 2019, Theorem 1): the adjoint system
``y = J_f(z*)^T y + dL/dz*`` is solved with the same per-sample masked solver,
using vector-Jacobian products of f at z*; ``y`` then flows through that one
recorded application of f to the inputs and the parameters. The memory kept for
backward is one application of f, whatever the number of solver iterations.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .result import SolverResult
from .solvers import solve
from .status import Status


@dataclass(frozen=True)
class SolverSettings:
    """How one of the two solves (forward fixed point, backward adjoint) is run.

    ``options`` are passed on to the solver (e.g. ``line_search``,
    ``stall_patience``). The defaults follow torchdeq's; for the paper's scheme
    see :func:`paper_settings`.
    """

    method: str = "broyden"
    max_iter: int = 40
    tol: float = 1e-3
    stop_mode: str = "abs"
    memory: Optional[int] = None
    options: dict = field(default_factory=dict)

    def solver_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the solver; ``memory=None`` (the solver's default) is left out,
        so methods without a history (fixed point) accept the same settings."""
        kw = {k: v for k, v in asdict(self).items() if k not in ("method", "options")}
        if kw["memory"] is None:
            del kw["memory"]
        kw.update(self.options)
        return kw


DEFAULT_FORWARD = SolverSettings(max_iter=40, tol=1e-3)
DEFAULT_BACKWARD = SolverSettings(max_iter=40, tol=1e-6)


def paper_settings(seq_len: int, training: bool = True) -> tuple[SolverSettings, SolverSettings]:
    """(forward, backward) settings of the DEQ paper for sequences of length T.

    Training: forward tol sqrt(T)*1e-5, backward tol sqrt(T)*1e-8 (absolute
    residual, section 5); at inference the forward tolerance is relaxed to
    sqrt(T)*1e-2.
    """
    root = math.sqrt(seq_len)
    fwd = SolverSettings(max_iter=30, tol=root * (1e-5 if training else 1e-2), stop_mode="abs")
    bwd = SolverSettings(max_iter=35, tol=root * 1e-8, stop_mode="abs")
    return fwd, bwd


def _warn_if_backward_diverged(status: torch.Tensor, stacklevel: int) -> None:
    diverged = status == Status.DIVERGED
    if bool(diverged.any()):
        warnings.warn(
            f"deq_ext: the backward (adjoint) solve diverged for samples "
            f"{torch.nonzero(diverged).flatten().tolist()} (non-finite gradients?); "
            "their gradient is the best finite iterate of the adjoint solve",
            RuntimeWarning, stacklevel=stacklevel)


@dataclass
class SolverStats:
    """Per-sample statistics of one solve, as device tensors (no sync to keep them).

    A sync-free backward solve (``stop_early=False``) cannot check for diverged
    samples without reading the device: its warning is issued by :meth:`summary`.
    """

    nstep: torch.Tensor
    nfev: torch.Tensor
    abs_residual: torch.Tensor
    rel_residual: torch.Tensor
    status: torch.Tensor
    check_backward_divergence: bool = field(default=False, repr=False, compare=False)

    @classmethod
    def of(cls, res: SolverResult) -> "SolverStats":
        return cls(res.nstep, res.nfev, res.abs_residual, res.rel_residual, res.status)

    def summary(self) -> dict[str, float]:
        """Batch means for logging (reads from the device)."""
        if self.check_backward_divergence:
            self.check_backward_divergence = False
            _warn_if_backward_diverged(self.status, stacklevel=3)
        return {
            "nstep": float(self.nstep.double().mean()),
            "nfev": float(self.nfev.double().mean()),
            "abs_residual": float(self.abs_residual.double().mean()),
            "rel_residual": float(self.rel_residual.double().mean()),
            "converged": float((self.status == Status.CONVERGED).double().mean()),
        }


SettingsLike = Union[SolverSettings, dict, None]


def _settings(value: SettingsLike, default: SolverSettings) -> SolverSettings:
    if value is None:
        return default
    if isinstance(value, SolverSettings):
        return value
    if isinstance(value, dict):
        known = {"method", "max_iter", "tol", "stop_mode", "memory"}
        opts = {k: v for k, v in value.items() if k not in known}
        return replace(default, **{k: v for k, v in value.items() if k in known},
                       options={**default.options, **opts})
    raise TypeError(f"solver settings must be a SolverSettings or a dict, got {type(value).__name__}")


class _ImplicitGrad(torch.autograd.Function):
    """Identity on f(z*) in the forward pass; solves the adjoint system in the backward pass."""

    @staticmethod
    def forward(ctx, fz: torch.Tensor, z_leaf: torch.Tensor, backward_solve: Callable) -> torch.Tensor:
        ctx.backward_solve = backward_solve
        ctx.save_for_backward(fz, z_leaf)
        return fz.detach().clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if torch.is_grad_enabled():  # create_graph=True: the adjoint solve builds no graph
            raise RuntimeError("deq_ext: higher-order gradients through a DEQ's implicit backward "
                               "are not supported (backward with create_graph=True)")
        fz, z_leaf = ctx.saved_tensors
        return ctx.backward_solve(fz, z_leaf, grad), None, None


def _needs_more_than(out: torch.Tensor, leaf: torch.Tensor) -> bool:
    """Whether ``out``'s graph reaches a leaf other than ``leaf``: parameters or inputs to
    differentiate. A frozen f applied to inputs without grad needs no adjoint solve."""
    stack, seen = [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node holds its leaf
        if variable is not None:
            if variable is not leaf:
                return True
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def _reusable_backward() -> contextlib.AbstractContextManager:
    """The adjoint solve takes one VJP through the recorded f per iteration (retain_graph).
    A torch.compile'd f would otherwise donate its saved buffers to the first backward and
    refuse the second, so the recording is compiled without donated buffers."""
    config = torch._functorch.config
    if hasattr(config, "donated_buffer"):
        return config.patch(donated_buffer=False)
    return contextlib.nullcontext()


def _check_inputs(z0: torch.Tensor, inputs: tuple) -> None:
    B = z0.shape[0]
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            continue
        if x.dim() == 0 or x.shape[0] != B:
            raise ValueError(
                f"input {i} has shape {tuple(x.shape)} but every tensor input of a DEQ layer must be "
                f"batched on dim 0 with z's batch size {B}; pass unbatched tensors as attributes of f")
        if x.requires_grad and not (x.is_floating_point() or x.is_complex()):
            raise TypeError(f"input {i} is an integer tensor that requires grad ({x.dtype})")


@torch.compiler.disable  # one deliberate graph break: the solves' loops depend on the data
def deq_fixed_point(
    f: Callable[..., torch.Tensor],
    z0: torch.Tensor,
    *inputs: Any,
    forward: SettingsLike = None,
    backward: SettingsLike = None,
    grad_mode: str = "implicit",
    phantom_steps: int = 1,
    phantom_damping: float = 1.0,
    compact: bool = True,
    stats: Optional[dict] = None,
) -> torch.Tensor:
    """Functional DEQ: returns z* = f(z*, *inputs), differentiable w.r.t. inputs and f's parameters.

    Args:
        f: ``f(z, *inputs) -> z``; each sample must only depend on its own row
            of z and of the inputs, unless ``compact=False``.
        z0: initial guess ``(B, ...)`` (zeros are the usual choice).
        inputs: tensors batched on dim 0 (size B), or non-tensors passed as is.
        forward, backward: :class:`SolverSettings` (or a dict of its fields and
            solver options) of the fixed-point solve and of the adjoint solve.
        grad_mode: ``'implicit'`` (exact, Theorem 1) or ``'phantom'`` (backprop
            through ``phantom_steps`` damped steps from z*; 1 step and damping 1
            is the one-step / Jacobian-free gradient).
        compact: in the forward solve, evaluate f only on the active samples.
            Set False for an f that mixes samples (e.g. batch statistics). A
            ``compact`` among the forward settings' options overrides it; the
            backward solve is never compacted.
        stats: if given, ``stats['forward']`` and, after backward,
            ``stats['backward']`` receive :class:`SolverStats`.
    """
    fwd = _settings(forward, DEFAULT_FORWARD)
    bwd = _settings(backward, DEFAULT_BACKWARD)
    if grad_mode not in ("implicit", "phantom"):
        raise ValueError(f"grad_mode must be 'implicit' or 'phantom', got {grad_mode!r}")
    if grad_mode == "phantom" and (phantom_steps < 1 or not 0 < phantom_damping <= 1):
        raise ValueError("phantom gradients need phantom_steps >= 1 and 0 < phantom_damping <= 1")
    if not isinstance(z0, torch.Tensor):
        raise TypeError(f"z0 must be a torch.Tensor, got {type(z0).__name__}")
    _check_inputs(z0, inputs)

    # A ``compact`` in the forward settings' options is the more specific choice: it wins.
    res = solve(f, z0.detach(), method=fwd.method, inputs=inputs,
                **{"compact": compact, **fwd.solver_kwargs()})
    if stats is not None:
        stats["forward"] = SolverStats.of(res)
    z_star = res.z
    if not torch.is_grad_enabled():
        return z_star

    if grad_mode == "phantom":
        z = z_star
        for _ in range(phantom_steps):
            z = (1 - phantom_damping) * z + phantom_damping * f(z, *inputs)
        return z

    z_leaf = z_star.detach().requires_grad_()
    with _reusable_backward():
        fz = f(z_leaf, *inputs)
    if not fz.requires_grad or not _needs_more_than(fz, z_leaf):
        return fz.detach()

    def backward_solve(fz: torch.Tensor, z_leaf: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        def adjoint(y: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():
                (vjp,) = torch.autograd.grad(fz, z_leaf, y, retain_graph=True, allow_unused=True)
            return grad if vjp is None else vjp + grad

        # Start from dL/dz*, the first term of the Neumann series: from y = 0 a dL/dz* already
        # below an absolute tolerance would end the solve at once with a zero gradient. Samples
        # with non-finite entries start at 0 (the solver rejects a non-finite start) and are
        # flagged by the solve.
        finite = torch.isfinite(grad.reshape(grad.shape[0], -1)).all(dim=1)
        y0 = torch.where(finite.view(-1, *[1] * (grad.dim() - 1)), grad, torch.zeros_like(grad))
        # The adjoint's VJPs run through the graph of f on the whole batch: never compacted.
        options = {**bwd.solver_kwargs(), "compact": False}
        with _reusable_backward():  # f's compiled backward may be built lazily, here
            out = solve(adjoint, y0, method=bwd.method, **options)
        sync_free = not options.get("stop_early", True)
        if stats is not None:
            stats["backward"] = SolverStats.of(out)
            stats["backward"].check_backward_divergence = sync_free
        if not sync_free:
            _warn_if_backward_diverged(out.status, stacklevel=3)
        return out.z

    return _ImplicitGrad.apply(fz, z_leaf, backward_solve)


class DEQ(nn.Module):
    """A deep equilibrium layer around ``f(z, *inputs) -> z``.

    ``f`` is usually an ``nn.Module`` (registered as a submodule so its
    parameters train with the DEQ). Forward and backward solves are configured
    separately; the per-sample statistics of the last solves are kept in
    :attr:`forward_stats` and :attr:`backward_stats`.

    Example:
        >>> cell = MyCell(d)                      # cell(z, x) -> z
        >>> deq = DEQ(cell, forward=dict(tol=1e-4), backward=dict(tol=1e-6))
        >>> z_star = deq(x, z0=torch.zeros_like(x))
        >>> loss(z_star).backward()
    """

    def __init__(self, f: Callable[..., torch.Tensor], *, forward: SettingsLike = None,
                 backward: SettingsLike = None, grad_mode: str = "implicit",
                 phantom_steps: int = 1, phantom_damping: float = 1.0,
                 compact: bool = True) -> None:
        super().__init__()
        self.f = f
        self.forward_settings = _settings(forward, DEFAULT_FORWARD)
        self.backward_settings = _settings(backward, DEFAULT_BACKWARD)
        self.grad_mode = grad_mode
        self.phantom_steps, self.phantom_damping = phantom_steps, phantom_damping
        self.compact = compact
        self._stats: dict[str, SolverStats] = {}

    @property
    def forward_stats(self) -> Optional[SolverStats]:
        """Per-sample statistics of the last forward solve."""
        return self._stats.get("forward")

    @property
    def backward_stats(self) -> Optional[SolverStats]:
        """Per-sample statistics of the last backward (adjoint) solve."""
        return self._stats.get("backward")

    # Eager under torch.compile, like the solve: traced code would pass deq_fixed_point the
    # module behind a compiled f instead of the compiled f.
    @torch.compiler.disable
    def forward(self, *inputs: Any, z0: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Solve for z* given the inputs; ``z0`` defaults to zeros shaped like the first input."""
        if z0 is None:
            if not inputs or not isinstance(inputs[0], torch.Tensor):
                raise ValueError("z0 is required when the first input is not a tensor shaped like z")
            z0 = torch.zeros_like(inputs[0], dtype=inputs[0].dtype if inputs[0].is_floating_point()
                                  else torch.get_default_dtype())
        # Cleared, not replaced: the backward of an earlier call still writes into this dict.
        self._stats.clear()
        return deq_fixed_point(
            self.f, z0, *inputs, forward=self.forward_settings, backward=self.backward_settings,
            grad_mode=self.grad_mode, phantom_steps=self.phantom_steps,
            phantom_damping=self.phantom_damping, compact=self.compact, stats=self._stats)

    def extra_repr(self) -> str:
        f, b = self.forward_settings, self.backward_settings
        return (f"forward=({f.method}, max_iter={f.max_iter}, tol={f.tol}, {f.stop_mode}), "
                f"backward=({b.method}, max_iter={b.max_iter}, tol={b.tol}, {b.stop_mode}), "
                f"grad_mode={self.grad_mode}, compact={self.compact}")
