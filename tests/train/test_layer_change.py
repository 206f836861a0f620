"""The residuals the training loop logs: the DEQ solves' and the unrolled model's last-layer change
(the numbers behind Figure 2, right)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from deq_ext import SolverStats
from train.copy_memory import main
from train.loop import LayerChange, solver_residuals

TINY = ["--preset", "tiny"]


class HalfPlusInput(nn.Module):
    """f(z, x) = z / 2 + x: from z = 0, z[i] = (2 - 2^(1-i)) x."""

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * z + x


def test_layer_change_is_the_last_layers_relative_change() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    cell = HalfPlusInput()
    with LayerChange(cell) as change:
        z = torch.zeros_like(x)
        for _ in range(3):  # z1 = x, z2 = 1.5 x, z3 = 1.75 x: ||z3 - z2|| / ||z2|| = 1/6
            z = cell(z, x)
    assert change.value() == pytest.approx(1 / 6, rel=1e-12)
    cell(z, x)  # after exit the hook is gone: a fourth layer (change 1/14) is not seen
    assert change.value() == pytest.approx(1 / 6, rel=1e-12)


def test_layer_change_of_a_single_layer_from_zero_is_none() -> None:
    cell = HalfPlusInput()
    with LayerChange(cell) as change:
        assert change.value() is None
        cell(torch.zeros(2, 3), torch.ones(2, 3))
    assert change.value() is None


def test_solver_residuals_average_the_relative_residuals_of_each_solve() -> None:
    def stats(rel: list[float]) -> SolverStats:
        r = torch.tensor(rel, dtype=torch.float64)
        return SolverStats(r, r, 10 * r, r, r)

    chunks = [{"forward": stats([1e-3, 3e-3]), "backward": stats([1e-5])},
              {"forward": stats([5e-3])}]
    model = SimpleNamespace(core=SimpleNamespace(solver_stats=chunks))
    out = solver_residuals(model)
    assert out["fwd_res"] == pytest.approx((2e-3 + 5e-3) / 2)
    assert out["bwd_res"] == pytest.approx(1e-5)
    assert solver_residuals(SimpleNamespace(core=SimpleNamespace(solver_stats=[]))) == {}


def _train_records(tmp_path, *extra: str) -> list[dict]:
    out_dir = tmp_path / "run"
    main(TINY + ["--out-dir", str(out_dir), *extra])
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "train"]


def test_a_deq_run_logs_its_solves_residuals(tmp_path) -> None:
    records = _train_records(tmp_path)
    pretrain = [r for r in records if r["mode"] == "pretrain"]
    deq = [r for r in records if r["mode"] == "deq"]
    assert pretrain and deq
    # The tiny preset solves to relative tolerances 1e-3 (forward) and 1e-4 (backward).
    assert all(0 < r["fwd_res"] < 1e-2 and 0 < r["bwd_res"] < 1e-3 for r in deq)
    # The depth-2 warm-up is an unroll: it logs its last layer's change, not residuals.
    assert all("fwd_res" not in r and 0 < r["layer_change"] < 1 for r in pretrain)


def test_an_unrolled_run_logs_its_last_layers_change(tmp_path) -> None:
    records = _train_records(tmp_path, "--mode", "unrolled")
    unrolled = [r for r in records if r["mode"] == "unrolled"]
    assert unrolled
    assert all("fwd_res" not in r and "fwd_iter" not in r for r in unrolled)
    # Measured 0.02-0.05 for the tiny preset's 3 layers: a contraction, far from 0 and 1.
    assert all(1e-4 < r["layer_change"] < 0.5 for r in unrolled)
