"""The solver loop as a GPU needs it, checked on the CPU: few ops and launches per iteration, no
allocation and no moved buffer inside the loop body, power-of-two buckets and late counts that
change no bit of the results, and a sync-free solve (and DEQ training step) on the meta device.

Ops are counted with a dispatch mode (what PyTorch's dispatcher sees, f's own ops left out);
kernel launches with the CUDA emulation's counter (the .cu kernels, run on the CPU).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import deq_ext
from deq_ext import _extension
from deq_ext.solvers import _base, _counts
from deq_ext.solvers._buckets import bucket_size
from deq_ext.solvers._history import History
from deq_ext.status import Status

from .conftest import emulation_or_skip
from .helpers import same_bits

pytestmark = pytest.mark.usefixtures("compiled")


class _Heterogeneous:
    """f(z, x, rate) = rate * tanh(z) + x, elementwise: row-independent bit for bit, and samples
    converge at very different speeds (rate per sample)."""

    def __init__(self) -> None:
        self.inside = False
        self.calls = 0
        self.rows = 0

    def __call__(self, z, x, rate):
        self.inside = True
        try:
            self.calls += 1
            self.rows += z.shape[0]
            return rate.view(-1, *[1] * (z.dim() - 1)) * torch.tanh(z) + x
        finally:
            self.inside = False


def _problem(B: int = 16, D: int = 24, dtype=torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=gen, dtype=dtype)
    rate = torch.linspace(0.05, 0.6, B, dtype=dtype)[torch.randperm(B, generator=gen)]
    return _Heterogeneous(), torch.zeros(B, D, dtype=dtype), (x, rate)


class _OpLog(TorchDispatchMode):
    """Every aten op outside f, tagged with the solver phase it ran in; whether it allocated."""

    def __init__(self, f: _Heterogeneous) -> None:
        super().__init__()
        self.f = f
        self.phase = "setup"
        self.ops: list[tuple[str, str, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.f.inside:
            inputs = {t.untyped_storage().data_ptr() for t in _tensors(args, kwargs)}
            fresh = any(t.untyped_storage().data_ptr() not in inputs for t in _tensors(out))
            self.ops.append((self.phase, func.overloadpacket.__name__, fresh))
        return out


def _tensors(*objs) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for obj in objs:
        if isinstance(obj, torch.Tensor):
            out.append(obj)
        elif isinstance(obj, (list, tuple)):
            out += _tensors(*obj)
        elif isinstance(obj, dict):
            out += _tensors(*obj.values())
    return out


@pytest.fixture
def phases(monkeypatch):
    """Tags the op log with the solver method running: 'iterate' (the loop body), 'rebucket',
    'prepare' (the history's growth), 'loop' for the rest of the loop, 'setup' before it. Each
    phase's calls are counted, with what the call returned."""
    log: dict = {"calls": []}

    def tag(cls, name, phase):
        original = getattr(cls, name)

        def tagged(self, *args, **kwargs):
            mode = log.get("mode")
            if mode is not None:
                mode.phase = phase
            out = original(self, *args, **kwargs)
            if mode is not None:
                mode.phase = "loop"
            log["calls"].append((phase, out))
            return out

        monkeypatch.setattr(cls, name, tagged)

    for name in ("iterate", "rebucket", "finish", "result"):
        tag(_base.MaskedSolve, name, name)
    tag(History, "reserve", "grow")  # the methods' prepare() grows their history
    return log


def _iterations(log: dict) -> int:
    return sum(1 for name, _ in log["calls"] if name == "iterate")


@pytest.mark.parametrize("method,budget", [("broyden", 8), ("anderson", 8), ("fixed_point", 8)])
def test_ops_per_iteration_in_the_default_settings(phases, method, budget):
    """At most 8 aten ops per iteration over a whole solve (setup included), compaction on."""
    f, z0, inputs = _problem()
    mode = _OpLog(f)
    phases["mode"] = mode
    with mode:
        res = deq_ext.solve(f, z0, method=method, inputs=inputs, tol=1e-10, max_iter=60)
    assert bool(res.converged.all())
    iterations = _iterations(phases)
    per_iteration = len(mode.ops) / iterations
    assert per_iteration <= budget, (method, per_iteration, sorted(
        {name for _, name, _ in mode.ops}))
    # The body issues the method's ops, the residual op and the bucket's gather and scatter.
    body = [name for phase, name, _ in mode.ops if phase == "iterate"]
    assert len(body) / iterations <= 5, sorted(set(body))


@pytest.mark.parametrize("method", ["broyden", "anderson", "fixed_point"])
def test_the_loop_allocates_only_at_bucket_changes_and_growth(phases, method):
    """No op of the loop body makes a new tensor (f's own outputs aside); in the rest of the
    loop, only a new bucket (its rows, gathered inputs and buffers) and a new history chunk
    allocate: nothing per iteration."""
    f, z0, inputs = _problem(B=16)
    mode = _OpLog(f)
    phases["mode"] = mode
    with mode:
        deq_ext.solve(f, z0, method=method, inputs=inputs, tol=1e-10, max_iter=60)
    mode.phase = "after"
    fresh = [phase for phase, _, new in mode.ops if new]
    assert fresh.count("iterate") == 0
    assert fresh.count("loop") == 0  # (final statuses: "finish"; the result: "result")
    # (the log keeps every bucket alive: distinct ids are distinct buckets; the first is the
    # whole batch, made before the loop)
    new_buckets = len({id(out) for name, out in phases["calls"] if name == "rebucket"}) - 1
    growths = sum(1 for name, out in phases["calls"] if name == "grow" and out)
    # Broyden's ring (m = max_iter) grows chunk by chunk; Anderson's (m = 5) is one chunk.
    assert new_buckets >= 2 and growths >= {"broyden": 2, "anderson": 1, "fixed_point": 0}[method]
    assert fresh.count("rebucket") <= 8 * new_buckets
    assert fresh.count("grow") == 2 * growths  # a chunk of each of the two buffers


def test_state_tensors_never_move(monkeypatch):
    """Every state tensor keeps its storage from the first iteration to the last (the history
    only gains chunks): a captured CUDA graph always reads and writes the live buffers."""
    seen: list[dict] = []
    iterate = _base.MaskedSolve.iterate

    def watching(self, bucket):
        iterate(self, bucket)
        ptrs = {k: v.data_ptr() for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        hist = self.history_of()
        if hist is not None:
            ptrs.update({f"{n}{i}": t.data_ptr() for n in hist.names for i, t in enumerate(hist[n])})
        seen.append(ptrs)

    monkeypatch.setattr(_base.MaskedSolve, "iterate", watching)
    f, z0, inputs = _problem()
    for method, kw in (("broyden", {}), ("broyden", {"line_search": True}), ("anderson", {}),
                       ("fixed_point", {})):
        seen.clear()
        deq_ext.solve(f, z0, method=method, inputs=inputs, tol=1e-10, max_iter=40,
                      per_sample=method != "fixed_point", trace=True, **kw)
        first = seen[0]
        for ptrs in seen[1:]:
            for name, ptr in first.items():
                assert ptrs[name] == ptr, f"{method}{kw}: '{name}' moved"


@pytest.mark.parametrize("method,launches", [("broyden", 3), ("anderson", 3), ("fixed_point", 2)])
def test_kernel_launches_per_iteration(phases, method, launches):
    """One launch per fused op: 3 per Broyden and Anderson iteration, 2 per fixed-point one
    (counted on the CUDA emulation, which runs the .cu kernels)."""
    emu = emulation_or_skip()
    f, z0, inputs = _problem(B=8, D=40)
    start = emu.stats()["launches"]
    with _extension.use_ops(_extension.emulated_ops()):
        res = deq_ext.solve(f, z0, method=method, inputs=inputs, tol=1e-10, max_iter=40)
    assert bool(res.converged.all())
    # The first residual update, then the iterations.
    assert emu.stats()["launches"] - start == 1 + launches * _iterations(phases)


def test_bucket_sizes():
    assert [bucket_size(n, 32) for n in (32, 17, 16, 9, 8, 5, 2, 1, 0)] == \
        [32, 32, 16, 16, 8, 8, 2, 1, 1]
    assert [bucket_size(n, 24) for n in (24, 17, 16, 3)] == [24, 24, 16, 4]


def test_f_runs_on_power_of_two_buckets():
    """f sees the whole batch until the active count falls to a power of two below it, then
    at most twice the active rows, and the rows change only at those bucket changes."""
    seen: list[int] = []

    def f(z, x, rate):
        seen.append(z.shape[0])
        return rate.view(-1, 1) * torch.tanh(z) + x

    _, z0, inputs = _problem(B=24)
    res = deq_ext.broyden(f, z0, inputs=inputs, tol=1e-10, max_iter=80)
    assert bool(res.converged.all())
    assert set(seen) <= {24, 16, 8, 4, 2, 1} and len(set(seen)) >= 3
    assert seen == sorted(seen, reverse=True)  # buckets only shrink
    # Rows evaluated vs. the active rows (nfev): never more than twice.
    assert sum(seen) <= 2 * int(res.nfev.sum())


@pytest.mark.parametrize("method,kw", [("broyden", {}), ("broyden", {"line_search": True}),
                                       ("anderson", {}), ("fixed_point", {})])
def test_buckets_and_late_counts_change_no_bit(monkeypatch, method, kw):
    """Compacting in buckets, not compacting, and reading the counts one check late (as on a
    GPU) give the same bits: finished samples are frozen, f is row-independent."""
    f, z0, inputs = _problem(B=12)

    def run(**extra):
        return deq_ext.solve(f, z0, method=method, inputs=inputs, tol=1e-11, max_iter=60,
                             **kw, **extra)

    base = run(compact=False)
    results = {"buckets": run(), "check_every=3": run(check_every=3)}
    monkeypatch.setitem(_counts.LAG, "cpu", 1)
    results["late"] = run()
    results["late, no compaction"] = run(compact=False)
    for what, res in results.items():
        for field in ("z", "status", "nstep", "nfev", "abs_residual", "rel_residual"):
            assert same_bits(getattr(res, field), getattr(base, field)), (what, field)


def test_late_counts_cost_one_masked_iteration(monkeypatch):
    """Read one check late, the loop learns that every sample has stopped one iteration later:
    one more (masked) evaluation of f, the same results."""
    f, z0, inputs = _problem(B=8)
    deq_ext.broyden(f, z0, inputs=inputs, tol=1e-10, max_iter=60)
    now = f.calls
    monkeypatch.setitem(_counts.LAG, "cpu", 1)
    f.calls = 0
    deq_ext.broyden(f, z0, inputs=inputs, tol=1e-10, max_iter=60)
    assert f.calls == now + 1


def test_sync_free_solve_on_the_meta_device():
    """stop_early=False reads nothing from the device: the whole loop runs on meta tensors."""
    z0 = torch.empty(4, 10, device="meta")
    x = torch.empty(4, 10, device="meta")
    for method in ("broyden", "anderson", "fixed_point"):
        res = deq_ext.solve(lambda z, x: torch.tanh(z) + x, z0, method=method, inputs=(x,),
                            max_iter=5, stop_early=False)
        assert res.z.device.type == "meta" and res.z.shape == (4, 10)
    with pytest.raises(ValueError, match="stop_early=False"):
        deq_ext.broyden(lambda z: z, z0)


def test_sync_free_deq_training_step_on_the_meta_device():
    lin = torch.nn.Linear(10, 10, device="meta")
    settings = dict(max_iter=4, stop_early=False)
    deq = deq_ext.DEQ(lambda z, x: torch.tanh(lin(z)) + x, forward=settings, backward=settings)
    x = torch.empty(3, 10, device="meta", requires_grad=True)
    deq(x).sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.device.type == "meta"
    assert x.grad is not None and x.grad.shape == (3, 10)


def test_graph_needs_cuda():
    with pytest.raises(ValueError, match="graph=True .* CUDA device"):
        deq_ext.broyden(lambda z: z, torch.zeros(2, 3), graph=True)
    with pytest.raises(TypeError, match="graph must be True or False"):
        deq_ext.broyden(lambda z: z, torch.zeros(2, 3), graph="yes")


def test_compact_takes_auto_true_false():
    f, z0, inputs = _problem(B=4)
    with pytest.raises(ValueError, match="compact must be True, False or 'auto'"):
        deq_ext.broyden(f, z0, inputs=inputs, compact="sometimes")
    for compact in ("auto", True, False, None):
        res = deq_ext.broyden(f, z0, inputs=inputs, compact=compact, tol=1e-8)
        assert bool((res.status == Status.CONVERGED).all())
