"""The training scripts' --grad-mode, --backward-init and --phantom-steps: they reach the DEQ
layer (its backward statistics show which backward ran), and bad values are clear errors."""

from __future__ import annotations

import math

import pytest

import train.digits as digits
from models.modes import ModeConfig
from train import copy_memory, language_model
from train.config import TrainConfig, parse_config

from .test_language_model import TINY as LM_TINY
from .test_language_model import write_corpus

COPY_TINY = ["--preset", "tiny", "--steps", "8", "--pretrain-steps", "6"]


def _copy_model(*flags: str) -> copy_memory.CopyModel:
    cfg = parse_config(copy_memory.CopyConfig, [*COPY_TINY, *flags], "x", copy_memory.PRESETS)
    model = copy_memory.CopyModel(cfg)
    model.set_mode("deq")
    return model


def test_the_flags_set_the_mode_config_and_are_left_alone_unless_given():
    default = _copy_model().core.modes
    assert (default.grad_mode, default.backward_init, default.phantom_steps) == \
        ("implicit", None, 1)
    assert default.adjoint_settings() is default.backward
    modes = _copy_model("--grad-mode", "shine", "--backward-init", "shine",
                        "--phantom-steps", "3").core.modes
    assert (modes.grad_mode, modes.backward_init, modes.phantom_steps) == ("shine", "shine", 3)
    assert modes.adjoint_settings().options["init"] == "shine"


def test_a_copy_memory_run_trains_with_shine_gradients():
    summary = copy_memory.main([*COPY_TINY, "--grad-mode", "shine"])
    assert len(summary["losses"]) == 8
    assert all(math.isfinite(x) for x in summary["losses"])


def test_digits_runs_record_each_backward(tmp_path):
    base = ["--preset", "tiny", "--steps", "3"]
    shine = digits.main(base + ["--grad-mode", "shine"])["train_solves"]["mean"]
    assert 0 <= shine["backward_shine_fallback"] <= 1
    warm = digits.main(base + ["--backward-init", "shine"])["train_solves"]["mean"]
    assert "backward_shine_fallback" not in warm and warm["backward_steps"] >= 1
    phantom = digits.main(base + ["--grad-mode", "phantom", "--phantom-steps", "2"])
    assert "backward_steps" not in phantom["train_solves"]["mean"]  # no adjoint solve


def test_digits_model_gets_the_backward_settings_with_init():
    cfg = parse_config(digits.DigitsConfig, ["--preset", "tiny", "--backward-init", "shine"], "x",
                       digits.PRESETS)
    model = digits.build_model(cfg)
    assert model.core.deq.backward_settings.options["init"] == "shine"
    model.set_mode("deq", backward_init="grad")
    assert model.core.deq.backward_settings.options["init"] == "grad"


def test_the_language_model_flags_win_over_the_preset(tmp_path):
    data = write_corpus(tmp_path / "ptb")
    cfg = language_model.parse_args(LM_TINY + ["--data", data, "--grad-mode", "phantom",
                                               "--phantom-steps", "2", "--backward-init", "shine",
                                               "--model.modes.grad_mode", "implicit"])
    modes = language_model.model_config(cfg, 20).modes
    assert (modes.grad_mode, modes.phantom_steps, modes.backward_init) == ("phantom", 2, "shine")
    plain = language_model.parse_args(LM_TINY + ["--data", data])
    assert language_model.model_config(plain, 20).modes.grad_mode == "implicit"


def test_bad_values_are_clear_errors():
    with pytest.raises(ValueError, match="grad_mode"):
        TrainConfig(grad_mode="adjoint")
    with pytest.raises(ValueError, match="backward_init"):
        TrainConfig(backward_init="zero")
    with pytest.raises(ValueError, match="phantom_steps"):
        TrainConfig(phantom_steps=0)
    with pytest.raises(ValueError, match="grad_mode"):
        ModeConfig(grad_mode="adjoint")
    with pytest.raises(ValueError, match="backward_init"):
        ModeConfig(backward_init="zero")
    with pytest.raises(ValueError, match="only Broyden"):
        digits.main(["--preset", "tiny", "--steps", "1", "--solver", "anderson",
                     "--grad-mode", "shine"])



def test_a_preset_selects_the_mode_through_its_overrides():
    from models import get_preset
    from models.overrides import apply_overrides

    cfg = apply_overrides(get_preset("deq_transformer_tiny").config,
                          {"modes": {"grad_mode": "shine", "backward_init": "shine"}})
    assert (cfg.modes.grad_mode, cfg.modes.backward_init) == ("shine", "shine")
    with pytest.raises(ValueError, match="backward_init"):
        apply_overrides(get_preset("deq_transformer_tiny").config,
                        {"modes.backward_init": "zero"})
