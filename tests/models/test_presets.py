"""Named presets: they build, the transformer sizes match the paper's counts, tiny ones run."""

from __future__ import annotations

import pytest
import torch

from models import (
    PRESETS,
    DEQTransformerCore,
    DEQTrellisNetCore,
    ModeConfig,
    build_model,
    count_parameters,
    get_preset,
)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_on_the_meta_device(name):
    with torch.device("meta"):
        model = build_model(name)
    core = DEQTrellisNetCore if "trellisnet" in name else DEQTransformerCore
    assert isinstance(model.core, core)
    assert model.mode == "deq"
    preset = get_preset(name)
    assert preset.seq_len >= 1 and preset.description


@pytest.mark.parametrize("name", ["deq_transformer_small", "deq_transformer_medium"])
def test_transformer_presets_match_the_papers_non_embedding_size(name):
    preset = get_preset(name)
    total, non_embedding = count_parameters(name)
    assert non_embedding / 1e6 == pytest.approx(preset.paper_non_embedding, rel=0.05)
    if name == "deq_transformer_small":
        assert total / 1e6 == pytest.approx(preset.paper_params, rel=0.01)


def test_paper_presets_use_the_papers_tolerances():
    preset = get_preset("deq_transformer_small")
    modes = preset.config.modes
    assert modes.forward.tol == pytest.approx(150 ** 0.5 * 1e-5)
    assert modes.backward.tol == pytest.approx(150 ** 0.5 * 1e-8)
    assert modes.eval_forward.tol == pytest.approx(150 ** 0.5 * 1e-2)
    assert modes.pretrain_depth == 2


@pytest.mark.parametrize("name", ["deq_transformer_tiny", "deq_trellisnet_tiny"])
def test_tiny_presets_run_and_take_overrides(name):
    model = build_model(name, modes=ModeConfig(mode="pretrain"))
    assert model.mode == "pretrain"
    out = model(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))
    assert torch.isfinite(out.loss)


def test_unknown_preset_and_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("deq_transformer_huge")
    with pytest.raises(ValueError, match="mode"):
        ModeConfig(mode="infinite")
    model = build_model("deq_transformer_tiny")
    with pytest.raises(ValueError, match="mode"):
        model.set_mode("unroled")
    with pytest.raises(ValueError, match="subseq_len"):
        model.set_mode("deq", subseq_len=0)
