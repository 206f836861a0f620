"""Each extension op alone: compiled ``deq_ext._C`` against the ``deq_ext.reference`` twin.

One benchmark per (op, implementation, sweep point); the ops and their byte formulas are in
:mod:`.cases`. Benchmarks are grouped by op and point, so pytest-benchmark's table puts the
two implementations of the same call next to each other.
"""

from __future__ import annotations

import pytest

from .cases import OPS, Point
from .harness import Env, parametrize, run_case


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    parametrize(metafunc, OPS, "op")


def test_op(benchmark, op: str, impl: str, point: Point, env: Env) -> None:
    run_case(benchmark, op, impl, point, OPS[op].build, env)
