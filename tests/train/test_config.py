"""Configuration precedence and the learning-rate schedule."""

from __future__ import annotations

import json

import pytest

from train.config import TrainConfig, field_docs, parse_config
from train.copy_memory import PRESETS, CopyConfig
from train.loop import PlateauAnnealing, lr_factor


def test_precedence_defaults_preset_file_flags(tmp_path) -> None:
    assert parse_config(CopyConfig, [], "x", PRESETS).T == CopyConfig().T
    assert parse_config(CopyConfig, ["--preset", "paper"], "x", PRESETS).T == 400
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"T": 7, "lr": 0.5}))
    cfg = parse_config(CopyConfig, ["--preset", "paper", "--config", str(path), "--lr", "0.1"],
                       "x", PRESETS)
    assert (cfg.T, cfg.lr, cfg.d_model) == (7, 0.1, PRESETS["paper"]["d_model"])
    assert parse_config(CopyConfig, ["--out-dir", "none", "--progress", "false"], "x").progress \
        is False


def test_unknown_field_in_file_is_an_error(tmp_path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"nope": 1}))
    with pytest.raises(SystemExit):
        parse_config(CopyConfig, ["--config", str(path)], "x")


def test_bad_values_raise() -> None:
    with pytest.raises(ValueError):
        TrainConfig(mode="pretrain")
    with pytest.raises(ValueError):
        TrainConfig(schedule="exponential")
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lamb")
    with pytest.raises(ValueError, match="lr_decay_at"):
        TrainConfig(lr_decay_at="0,5")


def test_schedule_warmup_then_cosine() -> None:
    cfg = TrainConfig(steps=110, lr_warmup=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.55)
    assert lr_factor(110, cfg) == pytest.approx(0.1)
    lin = TrainConfig(steps=10, schedule="linear", min_lr_ratio=0.0)
    assert lr_factor(5, lin) == pytest.approx(0.5)
    assert lr_factor(3, TrainConfig(schedule="constant")) == 1.0


def test_plateau_anneals_when_the_loss_is_above_the_best_before_the_patience_window() -> None:
    cfg = TrainConfig(schedule="plateau", lr=1.0, lr_decay=0.25, plateau_patience=2,
                      plateau_min_lr=0.1)
    plateau = PlateauAnnealing(cfg)
    # Too few evaluations to look back past the window: never anneals.
    assert [plateau.observe(x) for x in (5.0, 4.0, 6.0)] == [False, False, False]
    assert plateau.observe(3.0) is False        # below the best of [5.0]
    assert plateau.observe(4.5) is True         # above min(5.0, 4.0): a plateau
    assert plateau.factor == 0.25
    assert plateau.observe(9.0) is True and plateau.factor == 0.0625
    assert plateau.observe(9.0) is False        # the rate (0.0625) is at its floor (0.1)
    again = PlateauAnnealing(cfg)
    again.load_state_dict(plateau.state_dict())
    assert (again.factor, again.losses) == (plateau.factor, plateau.losses)
    # Other schedules watch but never anneal.
    assert not any(PlateauAnnealing(TrainConfig()).observe(x) for x in (1.0, 2.0, 3.0) * 5)
    with pytest.raises(ValueError, match="plateau_patience"):
        TrainConfig(plateau_patience=-1)


def test_a_run_with_the_plateau_schedule_anneals_and_logs_it(tmp_path) -> None:
    from train.copy_memory import main

    out = tmp_path / "run"
    main(["--preset", "tiny", "--steps", "12", "--eval-every", "1", "--schedule", "plateau",
          "--plateau-patience", "0", "--lr-decay", "0.5", "--plateau-min-lr", "0",
          "--lr-warmup", "0", "--log-every", "1", "--out-dir", str(out), "--progress", "false"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["event"] == "eval"]
    annealed = [r for r in evals if "lr_annealed_to" in r]
    assert annealed, "no evaluation annealed the rate"
    # An annealing evaluation after step k halves the rate of step k + 1 already.
    lr = {r["step"]: r["lr"] for r in records if r["event"] == "train"}
    first = annealed[0]
    k = first["step"]
    assert k + 1 in lr, "the annealing came at the last step"
    assert lr[k + 1] == pytest.approx(0.5 * lr[k])
    assert first["lr_annealed_to"] == pytest.approx(lr[k + 1])


@pytest.mark.parametrize("script", ["train.copy_memory", "train.language_model"])
def test_every_option_has_a_help_text(script: str, capsys) -> None:
    import importlib
    from dataclasses import fields

    module = importlib.import_module(script)
    cls = module.CopyConfig if script.endswith("copy_memory") else module.LMRunConfig
    docs = field_docs(cls)
    assert {f.name for f in fields(cls)} <= set(docs), "a field without a description"
    with pytest.raises(SystemExit):
        module.main(["--help"])
    help_text = capsys.readouterr().out
    for f in fields(cls):
        if f.name == "model" and script.endswith("language_model"):
            assert "--model.core.d_inner" in help_text  # a dict field: one flag per entry
            continue
        flag = "--" + f.name.replace("_", "-")
        assert flag in help_text
        # The description's first words appear in the help (argparse rewraps the text).
        assert " ".join(docs[f.name].replace("``", "").split()[:2]) in " ".join(help_text.split())
