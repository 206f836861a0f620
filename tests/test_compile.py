"""torch.compile of training steps of models that hold a DEQ, under eager, aot_eager, inductor.

What compiles: everything around the DEQ, and f itself when it is given compiled
(``DEQ(torch.compile(cell, dynamic=True))``, or ``ModeConfig.compile_cell`` for the
models). The solves are one deliberate graph break: their loops depend on the data.
Each test checks that compiled graphs really ran (outer step and f) and that the loss
and every gradient equal eager's.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deq_ext

from .models.helpers import TIGHT32, TIGHT64, grads, tiny_model, tokens

BACKENDS = ["eager", "aot_eager", "inductor"]
DTYPES = [torch.float64, torch.float32]
COMPARE = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}


class CountingBackend:
    """A torch.compile backend that delegates to ``name`` and counts graphs and their runs."""

    def __init__(self, name: str) -> None:
        self.real = torch._dynamo.lookup_backend(name)
        self.graphs = self.calls = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        compiled = self.real(gm, example_inputs)

        def run(*args):
            self.calls += 1
            return compiled(*args)

        run._boxed_call = getattr(compiled, "_boxed_call", False)  # aot backends take a list
        return run


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Cell(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin, self.inj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, z, x):
        return torch.tanh(0.5 * self.lin(z) + self.inj(x))


class CellModel(nn.Module):
    def __init__(self, cell: nn.Module, d: int, dtype: torch.dtype) -> None:
        super().__init__()
        tight = TIGHT64 if dtype == torch.float64 else TIGHT32
        self.encoder, self.head = nn.Linear(d, d), nn.Linear(d, 3)
        self.deq = deq_ext.DEQ(cell, **tight)

    def forward(self, x, y):
        z = self.deq(torch.relu(self.encoder(x)))
        return nn.functional.cross_entropy(self.head(z), y)


def _step(model, *args):
    loss = model(*args)
    loss.backward()
    return loss


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_training_step_of_a_cell_deq_matches_eager(backend, dtype):
    torch.manual_seed(0)
    d = 10
    eager = CellModel(Cell(d), d, dtype).to(dtype)
    compiled = copy.deepcopy(eager)
    inner, outer = CountingBackend(backend), CountingBackend(backend)
    compiled.deq.f = torch.compile(compiled.deq.f, backend=inner, dynamic=True)
    x = torch.randn(9, d, dtype=dtype)
    y = torch.randint(0, 3, (9,))

    want = _step(eager, x, y)
    got = torch.compile(_step, backend=outer)(compiled, x, y)
    torch.testing.assert_close(got, want, **COMPARE[dtype])
    for (name, g), (_, w) in zip(compiled.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(g.grad, w.grad, **COMPARE[dtype], msg=name)
    assert outer.calls > 0, "no compiled graph of the step ran"
    assert inner.calls > 0, "f was not run compiled inside the solve"
    assert compiled.deq.forward_stats.status.eq(deq_ext.Status.CONVERGED).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_training_step_of_the_tiny_deq_transformer_matches_eager(backend, dtype):
    tight = TIGHT64 if dtype == torch.float64 else TIGHT32
    eager = tiny_model("transformer", dtype=dtype, **tight)
    compiled = copy.deepcopy(eager)
    inner, outer = CountingBackend(backend), CountingBackend(backend)
    compiled.core.set_mode("deq", compile_cell={"backend": inner, "dynamic": True})
    x, y = tokens(3, 7), tokens(3, 7, seed=2)

    def step(model):
        out = model(x, y, None)
        out.loss.backward()
        return out.loss

    want = step(eager)
    got = torch.compile(step, backend=outer)(compiled)
    torch.testing.assert_close(got, want, **COMPARE[dtype])
    g, w = grads(compiled), grads(eager)
    assert g.keys() == w.keys() and len(g) > 5
    for name in w:
        torch.testing.assert_close(g[name], w[name], **COMPARE[dtype], msg=name)
    assert outer.calls > 0 and inner.calls > 0
    assert compiled.core.solver_stats[0]["backward"].status.eq(deq_ext.Status.CONVERGED).all()


def test_the_compiled_cell_is_not_a_submodule():
    model = tiny_model("transformer", compile_cell={"dynamic": True})
    before = set(model.state_dict())
    model.core.solver_cell()
    assert set(model.state_dict()) == before
