"""``graph=True``: the solver loop replayed as CUDA graphs (needs a GPU; skipped without one).

Replays run the eager loop's kernels on its buffers: the results are the same bits, forward and
backward, with and without compaction buckets; a capture that cannot work is a clear error.
The CPU-side parts (graph=True refused without CUDA, a body that allocates nothing and moves no
buffer) are tested in test_loop.py.
"""

from __future__ import annotations

import pytest
import torch

import deq_ext

from .helpers import same_bits

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

FIELDS = ("z", "status", "nstep", "nfev", "abs_residual", "rel_residual")


def _problem(B: int = 32, D: int = 256, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))[0].float().cuda()
    x = torch.randn(B, D, generator=gen).cuda()
    rate = torch.linspace(0.1, 0.9, B).cuda()

    def f(z, x, rate):
        return rate[:, None] * torch.tanh(z @ W) + x

    return f, torch.zeros(B, D, device="cuda"), (x, rate)


@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("method,kw", [("broyden", {}), ("broyden", {"line_search": True}),
                                       ("anderson", {}), ("fixed_point", {})])
def test_replay_gives_the_eager_bits(method, kw, compact):
    f, z0, inputs = _problem()
    opts = dict(method=method, inputs=inputs, compact=compact, tol=1e-5, max_iter=40,
                check_every=4, trace=True, **kw)
    eager = deq_ext.solve(f, z0, **opts)
    graphed = deq_ext.solve(f, z0, graph=True, **opts)
    for field in FIELDS:
        assert same_bits(getattr(graphed, field), getattr(eager, field)), field
    assert same_bits(graphed.abs_trace, eager.abs_trace)


def test_layer_forward_and_backward_replayed():
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 128).cuda()
    with torch.no_grad():
        lin.weight.mul_(0.5)
    x = torch.randn(16, 128, device="cuda")

    def grads(graph: bool):
        settings = dict(max_iter=30, tol=1e-6, graph=graph)
        deq = deq_ext.DEQ(lambda z, x: torch.tanh(lin(z)) + x, forward=settings,
                          backward=settings)
        lin.zero_grad()
        out = deq(x)
        out.pow(2).mean().backward()
        return out.detach(), lin.weight.grad.clone(), deq.backward_stats.vjp_rows

    z_e, g_e, rows_e = grads(False)
    z_g, g_g, rows_g = grads(True)
    assert same_bits(z_g, z_e) and same_bits(g_g, g_e)
    assert rows_g >= rows_e  # replays run whole graphs of check_every iterations


def test_a_capture_that_cannot_work_names_the_cause():
    f, z0, inputs = _problem(B=4, D=16)

    def reads_the_device(z, x, rate):
        if float(z.abs().max()) > 1e9:  # a host read: not capturable
            raise AssertionError("unreachable")
        return f(z, x, rate)

    with pytest.raises(deq_ext.GraphCaptureError, match="graph=True needs an f with"):
        deq_ext.broyden(reads_the_device, z0, inputs=inputs, graph=True, tol=1e-12, max_iter=20)


def test_adapters_replay_too():
    """The locuslab (deq_ext semantics) and torchdeq adapters take graph=True: same results."""
    from deq_ext import compat

    f, z0, inputs = _problem(B=8, D=64)

    def g(z):
        return f(z, *inputs)

    eager = compat.torchdeq_broyden(g, z0, max_iter=30, tol=1e-5)
    graphed = compat.torchdeq_broyden(g, z0, max_iter=30, tol=1e-5, graph=True)
    assert same_bits(graphed[0], eager[0])
    z3 = z0.view(8, 64, 1)
    out = compat.broyden(lambda z: g(z.view(8, 64)).view(8, 64, 1), z3, 30, eps=1e-5,
                         semantics="deq_ext", graph=True)
    ref = compat.broyden(lambda z: g(z.view(8, 64)).view(8, 64, 1), z3, 30, eps=1e-5,
                         semantics="deq_ext")
    assert same_bits(out["result"], ref["result"])
