"""The recipes in configs/: each parses, and runs two steps (a warm-up step, then a DEQ step) at
tiny scale with its sizes overridden from the command line."""

from __future__ import annotations

import json
import math
import pathlib

import pytest

from models import get_preset
from train import copy_memory, language_model
from train.loop import lr_factor

from .test_language_model import write_corpus

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"
LM_RECIPES = sorted(p.name for p in CONFIGS.glob("*.json") if not p.name.startswith("copy"))
PAPER_LM_RECIPES = [n for n in LM_RECIPES if n != "cpu_lm.json"]

TINY_TRANSFORMER = ["--model.d_embed", "16", "--model.core.d_model", "16",
                    "--model.core.n_head", "2", "--model.core.d_head", "8",
                    "--model.core.d_inner", "32", "--model.core.mem_len", "8"]
TINY_TRELLISNET = ["--model.d_embed", "16", "--model.core.d_hidden", "8",
                   "--model.core.d_output", "16", "--model.modes.pretrain_depth", "2"]
TINY_RUN = ["--steps", "2", "--epochs", "0", "--pretrain-steps", "1", "--batch-size", "2",
            "--tgt-len", "8", "--eval-tgt-len", "8", "--eval-batch-size", "2",
            "--progress", "false", "--threads", "1",
            "--model.modes.forward.max_iter", "6", "--model.modes.backward.max_iter", "6",
            "--model.modes.eval_forward.max_iter", "6"]


def test_there_is_a_recipe_for_every_row():
    names = {p.name for p in CONFIGS.glob("*.json")}
    assert names == {"copy_memory_t400.json", "ptb_deq_trellisnet.json",
                     "wt103_deq_transformer_small.json", "wt103_deq_transformer_medium.json",
                     "wt103_deq_transformer_medium_full.json", "wt103_deq_trellisnet.json",
                     "cpu_lm.json"}


@pytest.mark.parametrize("name", PAPER_LM_RECIPES)
def test_language_model_recipe_parses_and_names_a_paper_preset(name):
    cfg = language_model.parse_args(["--config", str(CONFIGS / name)])
    preset = get_preset(cfg.model_preset)
    assert preset.paper_params is not None
    assert cfg.amp == "off" and cfg.clip > 0 and cfg.batch_size > 1
    assert cfg.steps > 1000 or cfg.epochs > 1


@pytest.mark.parametrize("name", LM_RECIPES)
def test_language_model_recipe_runs_one_step_at_tiny_scale(name, tmp_path):
    data = write_corpus(tmp_path / "corpus", lines=(60, 10, 10))
    cfg = json.loads((CONFIGS / name).read_text())
    tiny = TINY_TRELLISNET if "trellisnet" in cfg["model_preset"] else TINY_TRANSFORMER
    argv = ["--config", str(CONFIGS / name), "--data", data, "--out-dir", str(tmp_path / "run")]
    summary = language_model.main(argv + TINY_RUN + tiny + ["--model.modes.subseq_len", "4"])
    assert len(summary["losses"]) == 2 and all(math.isfinite(v) for v in summary["losses"])
    assert math.isfinite(summary["final"]["test_ppl"])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    modes = [r["mode"] for r in records if r["event"] == "train"]
    assert modes[-1] == "deq"


def test_copy_memory_recipe_runs_one_step_at_tiny_scale(tmp_path):
    cfg = copy_memory.parse_config(copy_memory.CopyConfig,
                                   ["--config", str(CONFIGS / "copy_memory_t400.json")], "")
    assert (cfg.T, cfg.train_size, cfg.test_size) == (400, 20_000, 2_000)
    summary = copy_memory.main(["--config", str(CONFIGS / "copy_memory_t400.json"), "--T", "5",
                                "--train-size", "32", "--test-size", "8", "--eval-size", "8",
                                "--steps", "2", "--pretrain-steps", "1", "--batch-size", "4",
                                "--fwd-iter", "5", "--bwd-iter", "5", "--progress", "false",
                                "--out-dir", str(tmp_path / "run"), "--threads", "1"])
    assert len(summary["losses"]) == 2 and all(math.isfinite(v) for v in summary["losses"])


def test_model_fields_come_from_preset_then_file_then_flags(tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"model_preset": "deq_transformer_tiny",
                                  "model": {"core": {"d_inner": 40, "dropout": 0.2},
                                            "modes.forward.max_iter": 7}}))
    cfg = language_model.parse_args(["--config", str(recipe), "--model.core.d_inner", "48",
                                     "--model.cutoffs", "10,20", "--model.core.pre_ln", "true"])
    model = language_model.model_config(cfg, vocab=64)
    assert model.core.d_inner == 48                      # the flag beats the file
    assert model.core.dropout == 0.2                     # the file beats the preset
    assert model.modes.forward.max_iter == 7 and model.core.pre_ln
    assert model.core.d_model == 16                      # the preset's
    assert model.cutoffs == (10, 20) and model.vocab_size == 64
    assert language_model.model_config(cfg, vocab=15).cutoffs == (10,)  # cutoffs < vocab


@pytest.mark.parametrize("argv,message", [
    (["--model.core.d_hidden", "8"], "is a TrellisNetConfig field"),
    (["--model.modes.subseq_history", "some"], "subseq_history must be one of"),
    (["--model.core.d_inner", "1.5"], "invalid int value"),
])
def test_bad_model_options_are_rejected(argv, message, capsys):
    with pytest.raises((SystemExit, ValueError), match=None if "invalid" in message else message):
        cfg = language_model.parse_args(["--model-preset", "deq_transformer_tiny"] + argv)
        language_model.model_config(cfg, vocab=64)
    assert "invalid" not in message or message in capsys.readouterr().err


def test_unknown_model_fields_in_a_file_are_rejected(tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"model_preset": "deq_transformer_tiny",
                                  "model": {"core": {"nope": 1}}}))
    cfg = language_model.parse_args(["--config", str(recipe)])
    with pytest.raises(SystemExit, match="unknown model option 'core.nope'"):
        language_model.model_config(cfg, vocab=64)


def test_help_describes_every_model_field(capsys):
    with pytest.raises(SystemExit):
        language_model.parse_args(["--help"])
    text = capsys.readouterr().out
    from train.model_options import model_options
    options = model_options()
    for name in ("model.d_embed", "model.core.d_inner", "model.core.d_hidden",
                 "model.core.attn_residual", "model.modes.subseq_history",
                 "model.modes.backward.max_iter", "model.word_dropout", "model.ar_alpha"):
        assert name in options and f"--{name}" in text
    assert all(help_text for _, help_text in options.values()), "every option has a description"


def test_epochs_and_the_step_schedule():
    cfg = language_model.parse_args(["--epochs", "3", "--lr-decay-epochs", "1,2", "--lr-warmup", "0",
                                     "--schedule", "step", "--lr-decay", "0.5"])
    language_model.apply_epochs(cfg, steps_per_epoch=10)
    assert cfg.steps == 30 and cfg.milestones == (10, 20)
    assert [lr_factor(s, cfg) for s in (0, 9, 10, 19, 20, 29)] == [1, 1, 0.5, 0.5, 0.25, 0.25]
    with pytest.raises(ValueError, match="lr_decay_at"):
        language_model.parse_args(["--lr-decay-at", "ten"])
    with pytest.raises(ValueError, match="optimizer"):
        language_model.parse_args(["--optimizer", "lamb"])


def test_language_models_train_in_float32_by_default():
    assert language_model.parse_args([]).amp == "off"
    assert copy_memory.CopyConfig().amp == "auto"  # the copy-memory default is unchanged


@pytest.mark.parametrize("name,cls", [("adamw", "AdamW"), ("adam", "Adam"), ("sgd", "SGD")])
def test_the_optimizer_is_the_one_asked_for(name, cls):
    import torch

    from train.loop import make_optimizer

    cfg = language_model.parse_args(["--optimizer", name, "--weight-decay", "0.5", "--lr", "2"])
    opt = make_optimizer(cfg, [torch.nn.Parameter(torch.ones(2))])
    assert type(opt).__name__ == cls
    assert opt.param_groups[0]["weight_decay"] == 0.5 and opt.param_groups[0]["lr"] == 2
