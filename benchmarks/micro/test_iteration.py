"""One whole solver iteration outside f, per method and implementation.

Broyden: ``residual_status_`` + ``broyden_reduce`` + ``broyden_expand_`` (what the driver
issues per iteration), compiled, reference twin and torchdeq 0.1.0's update on the same
values. Anderson: ``residual_status_`` + ``anderson_store_`` + ``anderson_mix_``. Fixed point:
``residual_status_`` + ``fixed_point_step_``. Details in :mod:`.cases`.
"""

from __future__ import annotations

import pytest

from .cases import ITERATIONS, Point
from .harness import Env, parametrize, run_case


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    parametrize(metafunc, ITERATIONS, "method")


def test_iteration(benchmark, method: str, impl: str, point: Point, env: Env) -> None:
    run_case(benchmark, f"{method}_iteration", impl, point, ITERATIONS[method].build, env)
