"""The image DEQ (models/mdeq.py) and its digits training script (train/digits.py).

A short run on a subset learns; the model's shapes, errors and modes; the fixed point is solved
per sample (samples independent, so compaction is safe); the implicit gradient equals the
gradient through the converged unroll; the data split; the run's JSON record; Jacobian
regularization when deq_ext has it, and a clear error when it does not.
"""

from __future__ import annotations

import json

import pytest
import torch

import models.mdeq as mdeq
import train.digits as digits
from deq_ext import SolverSettings, Status
from models.mdeq import MDEQClassifier, MDEQConfig, StateLayout
from models.modes import ModeConfig
from train.data_digits import digits_splits

TINY = ["--preset", "tiny"]
TIGHT = SolverSettings(max_iter=80, tol=1e-11, stop_mode="rel")


def images(batch: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 8, 8, generator=gen).to(dtype)


def contractive_model(seed: int = 0, **modes) -> MDEQClassifier:
    """A float64 MDEQ whose cell contracts (the fusion's GroupNorm gains scaled down), so that
    its fixed point is reached to 1e-11 and also by plain unrolling."""
    torch.manual_seed(seed)
    model = MDEQClassifier(MDEQConfig(channels=(4, 8), groups=2),
                           ModeConfig(forward=TIGHT, backward=TIGHT, **modes)).double()
    with torch.no_grad():
        for norm in model.core.cell.post:
            norm.weight.mul_(0.25)
    return model


# -- the model ---------------------------------------------------------------------------------
def test_state_layout_packs_and_unpacks_every_resolution() -> None:
    layout = StateLayout((3, 5), (8, 4))
    assert layout.dim == 3 * 64 + 5 * 16
    gen = torch.Generator().manual_seed(1)
    maps = [torch.randn(2, 3, 8, 8, generator=gen), torch.randn(2, 5, 4, 4, generator=gen)]
    z = layout.pack(maps)
    assert z.shape == (2, layout.dim)
    back = layout.unpack(z)
    assert [tuple(m.shape) for m in back] == [(2, 3, 8, 8), (2, 5, 4, 4)]
    for a, b in zip(maps, back):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"\(batch, 272\)"):
        layout.unpack(z[:, 1:])


@pytest.mark.parametrize("channels", [(6,), (4, 8), (4, 8, 8)])
@pytest.mark.parametrize("mode", ["deq", "unrolled", "pretrain"])
def test_logits_and_state_shapes(channels, mode) -> None:
    torch.manual_seed(0)
    model = MDEQClassifier(MDEQConfig(channels=channels, groups=2), ModeConfig(mode=mode))
    x = images(5)
    logits = model(x)
    assert logits.shape == (5, 10) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    z = model.core(model.injection(x))
    sides = [8 // 2 ** i for i in range(len(channels))]
    assert z.shape == (5, sum(c * s * s for c, s in zip(channels, sides)))
    stats = model.core.solver_stats
    assert (len(stats) == 1 and stats[0]["forward"].nstep.shape == (5,)) if mode == "deq" \
        else stats == []


def test_bad_images_and_settings_are_rejected() -> None:
    model = MDEQClassifier(MDEQConfig(), ModeConfig())
    with pytest.raises(ValueError, match=r"\(batch >= 1, 1, 8, 8\).*\(4, 8, 8\)"):
        model(torch.zeros(4, 8, 8))
    with pytest.raises(ValueError, match=r"\(2, 1, 7, 7\)"):
        model(torch.zeros(2, 1, 7, 7))
    with pytest.raises(TypeError, match="float64"):
        model(torch.zeros(2, 1, 8, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="list"):
        model([[0.0]])
    with pytest.raises(ValueError, match="groups"):
        MDEQConfig(channels=(6, 12), groups=4)
    with pytest.raises(ValueError, match="divisible"):
        MDEQConfig(channels=(4, 4, 4, 4, 4))
    with pytest.raises(ValueError, match="channels"):
        MDEQConfig(channels=())
    with pytest.raises(ValueError, match="subseq_len"):
        MDEQClassifier(MDEQConfig(), ModeConfig(subseq_len=4))
    with pytest.raises(ValueError, match="subseq_len"):
        model.set_mode("deq", subseq_len=4)
    with pytest.raises(ValueError, match="jac_reg_samples"):
        MDEQClassifier(MDEQConfig(), ModeConfig(), jac_reg_samples=-1)


def test_the_fixed_point_is_reached_and_equals_the_converged_unroll() -> None:
    model = contractive_model().eval()
    x = images(3, dtype=torch.float64)
    with torch.no_grad():
        inj = model.injection(x)
        z_star = model.core(inj)
        status = model.core.solver_stats[0]["forward"].status
        residual = (model.core.cell(z_star, inj) - z_star).norm(dim=1) / z_star.norm(dim=1)
        model.set_mode("unrolled", unrolled_depth=200)
        z_unrolled = model.core(inj)
    assert (status == Status.CONVERGED).all()
    assert (residual < 1e-10).all()
    torch.testing.assert_close(z_unrolled, z_star, atol=1e-9, rtol=0)


def test_each_sample_is_solved_on_its_own() -> None:
    """GroupNorm, not batch statistics: a sample's logits do not depend on the rest of the batch
    (what the solver's active-set compaction relies on). In training mode, where batch
    statistics would show."""
    model = contractive_model().train()
    x = images(6, seed=3, dtype=torch.float64)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(6)])
        shuffled = model(x.flip(0)).flip(0)
    torch.testing.assert_close(alone, together, atol=1e-9, rtol=0)
    torch.testing.assert_close(shuffled, together, atol=1e-9, rtol=0)


def test_implicit_gradient_equals_the_gradient_through_the_converged_unroll() -> None:
    model = contractive_model()
    x = images(3, seed=5, dtype=torch.float64)
    y = torch.tensor([1, 4, 7])

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    implicit = grads()
    assert (model.core.solver_stats[0]["backward"].status == Status.CONVERGED).all()
    model.set_mode("unrolled", unrolled_depth=120)
    unrolled = grads()
    for name, g in implicit.items():
        assert g.abs().sum() > 0, f"{name} got an all-zero gradient"
        torch.testing.assert_close(g, unrolled[name], atol=1e-8, rtol=1e-6, msg=name)


def test_eval_mode_uses_the_eval_forward_settings() -> None:
    never = dict(tol=1e-30, stop_mode="rel")  # every sample runs to max_iter
    model = MDEQClassifier(MDEQConfig(channels=(4, 8), groups=2),
                           ModeConfig(forward=SolverSettings(max_iter=3, **never),
                                      eval_forward=SolverSettings(max_iter=5, **never)))
    with torch.no_grad():
        model.train()(images(2))
        assert model.core.solver_stats[0]["forward"].nstep.tolist() == [3, 3]
        model.eval()(images(2))
        assert model.core.solver_stats[0]["forward"].nstep.tolist() == [5, 5]


@pytest.mark.parametrize("mode", ["deq", "unrolled", "pretrain"])
def test_gradients_reach_every_parameter(mode) -> None:
    torch.manual_seed(0)
    model = MDEQClassifier(MDEQConfig(channels=(4, 8), groups=2), ModeConfig(mode=mode))
    torch.nn.functional.cross_entropy(model(images(4)), torch.tensor([0, 1, 2, 3])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    if mode == "deq":
        assert model.core.solver_stats[0]["backward"].nstep.shape == (4,)


def test_the_modes_share_the_parameters_and_the_cell_is_registered_once() -> None:
    model = MDEQClassifier(MDEQConfig(), ModeConfig())
    params = [id(p) for p in model.parameters()]
    assert len(params) == len(set(params)) == len(model.state_dict())
    for mode in ("unrolled", "pretrain", "deq"):
        model.set_mode(mode)
        assert model.core.modes.mode == mode
        assert [id(p) for p in model.parameters()] == params


# -- the data ----------------------------------------------------------------------------------
def test_digits_split_is_seeded_disjoint_and_standardized() -> None:
    a = digits_splits(300, seed=7)
    b = digits_splits(300, seed=7)
    c = digits_splits(300, seed=8)
    (xtr, ytr), (xte, yte) = a["train"], a["test"]
    assert xtr.shape == (1497, 1, 8, 8) and xte.shape == (300, 1, 8, 8) and yte.shape == (300,)
    assert ytr.dtype == torch.int64 and set(ytr.tolist()) == set(range(10))
    assert torch.equal(xte, b["test"][0]) and not torch.equal(xte, c["test"][0])
    assert abs(float(xtr.mean())) < 1e-5 and abs(float(xtr.std()) - 1) < 1e-5
    # No test image among the training images (a few digits repeat in the data set: compare
    # each test image with its nearest training image and require most to differ).
    distances = torch.cdist(xte.flatten(1), xtr.flatten(1)).min(dim=1).values
    assert (distances > 0).float().mean() > 0.95
    assert digits_splits(300, seed=7, train_size=100)["train"][0].shape[0] == 100
    with pytest.raises(ValueError, match="test_size"):
        digits_splits(0, seed=0)
    with pytest.raises(ValueError, match="train_size"):
        digits_splits(300, seed=0, train_size=1600)


# -- the training script -----------------------------------------------------------------------
def test_a_short_run_learns(tmp_path) -> None:
    out = tmp_path / "run.json"
    summary = digits.main(TINY + ["--out", str(out)])
    final = summary["final"]
    assert final["test_accuracy"] > 0.6  # chance is 0.1
    losses = summary["losses"]
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])
    assert 1 <= final["test_fwd_steps_mean"] <= 12 and final["test_fwd_rel_residual_mean"] > 0
    solves = summary["train_solves"]
    assert solves["deq_steps"] == len(losses) == 30
    for key in ("forward_steps", "backward_steps", "forward_rel_residual", "backward_rel_residual"):
        assert key in solves["mean"]
    assert 1 <= solves["mean"]["backward_steps"] <= 12
    record = json.loads(out.read_text())
    assert record["command"] == "python -m train.digits " + " ".join(TINY + ["--out", str(out)])
    assert record["seed"] == 0 and record["wall_s"] == summary["wall_s"] > 0
    assert record["cpu_s"] == summary["cpu_s"] > 0
    assert record["final_test"] == final and record["train_solves"] == solves
    assert record["config"]["train_size"] == 256


def test_pretrain_then_deq_records_only_the_deq_steps() -> None:
    summary = digits.main(TINY + ["--steps", "6", "--pretrain-steps", "4"])
    assert summary["train_solves"]["deq_steps"] == 2


def test_jacobian_regularization_asked_for_without_support_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(mdeq, "deq_supports_jac_reg", lambda: False)
    monkeypatch.setattr(digits, "deq_supports_jac_reg", lambda: False)
    with pytest.raises(ValueError, match="jac-reg-weight.*no"):
        digits.main(TINY + ["--jac-reg-weight", "0.5"])
    with pytest.raises(RuntimeError, match="jac_reg_samples"):
        MDEQClassifier(MDEQConfig(), ModeConfig(), jac_reg_samples=1)
    digits.main(TINY + ["--steps", "2"])  # off: runs without it


@pytest.mark.skipif(not mdeq.deq_supports_jac_reg(), reason="deq_ext has no Jacobian regularization")
def test_jacobian_regularization_is_added_to_the_loss() -> None:
    weight = 0.5
    summary = digits.main(TINY + ["--steps", "4", "--jac-reg-weight", str(weight)])
    solves = summary["train_solves"]
    assert solves["mean"]["jac_loss"] > 0
    # The loss the optimizer saw is the cross-entropy plus the weighted estimate.
    mean_loss = sum(summary["losses"]) / len(summary["losses"])
    expected = solves["mean"]["cross_entropy"] + weight * solves["mean"]["jac_loss"]
    assert mean_loss == pytest.approx(expected, rel=1e-5)
