"""What the authors' code does and the paper's text does not say: the TrellisNet's width and
output slice, its weight drop, word dropout, AR/TAR, and the attention sublayer's residual."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import DEQTrellisNetCore, ModeConfig, TransformerConfig, TrellisNetConfig
from models.regularization import Shared, weight_drop
from models.transformer import DEQTransformerCell

from .helpers import tiny_model, tokens


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_trellisnet_h_is_nhid_plus_nout_and_the_output_is_its_last_nout_channels():
    cfg = TrellisNetConfig(d_hidden=5, d_output=3, d_input=4)
    core = DEQTrellisNetCore(cfg, ModeConfig(mode="unrolled", unrolled_depth=3)).double()
    assert cfg.h_size == 8 and core.d_out == 3
    assert tuple(core.cell.conv.weight.shape) == (32, 8, 2)
    assert tuple(core.injection.weight.shape) == (32, 4, 2)
    x = torch.randn(2, 6, 4, generator=_gen(0), dtype=torch.float64)
    out = core(x)
    assert out.state.shape == (2, 16, 6)
    # z = [h, c]: h is channels 0..7, its last 3 (5..7) are the output.
    torch.testing.assert_close(out.features, out.state[:, 5:8].transpose(1, 2), atol=0, rtol=0)
    assert TrellisNetConfig(d_hidden=5, d_input=4).output_width == 4  # nout defaults to ninp


def test_trellisnet_lm_reads_the_output_channels_without_a_projection():
    model = tiny_model("trellisnet")  # d_hidden 8, d_output 16 = d_embed
    assert isinstance(model.out_proj, torch.nn.Identity)
    out = model(tokens(2, 5), tokens(2, 5, seed=2))
    state = model.core(model.embedding(tokens(2, 5))).state
    torch.testing.assert_close(out.hidden, state[:, 8:24].transpose(1, 2), atol=1e-6, rtol=0)


def test_weight_drop_drops_only_the_temporal_taps_and_redraws_every_call():
    torch.manual_seed(0)
    conv = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv1d(40, 60, 3))
    v = conv.parametrizations.weight.original1.detach()
    g = conv.parametrizations.weight.original0.detach()
    w1 = weight_drop(conv, 0.5, active=True).detach()
    w2 = weight_drop(conv, 0.5, active=True).detach()
    # Recover which entries of v were kept: w = g * (v * keep) / ||v * keep||.
    kept = w1 != 0
    assert kept[..., -1].all(), "the current step's tap is never dropped"
    frac = 1 - kept[..., :-1].float().mean().item()
    assert 0.45 < frac < 0.55
    scale = torch.tensor([2.0, 2.0, 1.0])  # kept earlier taps are scaled by 1/(1-p), not the last
    dropped_v = v * kept * scale
    expect = g * dropped_v / dropped_v.flatten(1).norm(dim=1).view(-1, 1, 1)
    torch.testing.assert_close(w1, expect, atol=1e-6, rtol=1e-5)
    assert not torch.equal(w1, w2)
    torch.testing.assert_close(weight_drop(conv, 0.5, active=False), conv.weight)
    with pytest.raises(ValueError, match="weight dropout"):
        weight_drop(conv, 1.0, active=True)


def test_trellisnet_weight_drop_reaches_f_and_the_injection_in_training_only():
    model = tiny_model("trellisnet", core=dict(weight_dropout=0.5))
    core = model.core
    x = model.embedding(tokens(2, 5))
    memory = core.init_memory(2, x.device)
    a, b = core.inject(x, memory), core.inject(x, memory)
    assert not torch.equal(a, b), "a new DropConnect draw per forward pass"
    shared = core.draw_masks(2, x.device)[-1]
    assert isinstance(shared, Shared) and (shared.value == 0).any()
    core.eval()
    torch.testing.assert_close(core.inject(x, memory), core.inject(x, memory), atol=0, rtol=0)
    assert torch.equal(core.draw_masks(2, x.device)[-1].value, core.cell.conv.weight)


def test_word_dropout_drops_every_occurrence_of_a_word_together():
    model = tiny_model("transformer", lm=dict(word_dropout=0.5)).train()
    seen = []
    model.core.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    seq = torch.randint(0, 6, (4, 12), generator=_gen(3))  # few distinct words, many repeats
    torch.manual_seed(1)
    model(seq)
    x = seen[0]
    emb = model.embedding(seq).detach()
    dropped = (x == 0).all(-1)
    assert dropped.any() and (~dropped).any()
    for word in seq.unique():
        where = seq == word
        assert dropped[where].all() or not dropped[where].any(), f"word {int(word)} split"
    torch.testing.assert_close(x[~dropped], emb[~dropped] * 2.0)
    model.eval()
    seen.clear()
    model(seq)
    torch.testing.assert_close(seen[0], emb)


def test_ar_and_tar_penalties_follow_their_formulas():
    model = tiny_model("trellisnet", lm=dict(ar_alpha=2.0, tar_beta=1.0)).train()
    out = model(tokens(3, 7), tokens(3, 7, seed=2))
    h = out.hidden  # no output dropout: the raw and the dropped output are the same
    expect = 2.0 * h.pow(2).mean() + 1.0 * (h[:, 1:] - h[:, :-1]).pow(2).mean()
    torch.testing.assert_close(out.penalty, expect)
    assert float(out.loss.detach()) == pytest.approx(float(out.nll.detach().mean()))  # the NLL
    out.penalty.backward()
    assert model.core.injection.bias.grad.abs().sum() > 0
    model.eval()
    assert model(tokens(3, 7)).penalty is None
    assert tiny_model("trellisnet").train()(tokens(3, 7)).penalty is None


@pytest.mark.parametrize("pre_ln", [False, True])
def test_attention_sublayer_adds_z_before_its_layer_norm_unless_asked_not_to(pre_ln):
    cfg = TransformerConfig(d_model=8, n_head=2, d_head=4, d_inner=16, pre_ln=pre_ln,
                            attn_residual=True)
    torch.manual_seed(0)
    cell = DEQTransformerCell(cfg).double()
    g = _gen(5)
    z = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    inj = torch.randn(2, 5, 24, generator=g, dtype=torch.float64)
    z_hist = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)
    inj_hist = torch.randn(2, 3, 24, generator=g, dtype=torch.float64)

    def by_hand(residual: bool) -> torch.Tensor:
        seq = torch.cat([z_hist, z], 1)
        if pre_ln:
            seq = cell.ln_attn(seq)
        q, k, v = (cell.qkv(seq) + torch.cat([inj_hist, inj], 1)).split(8, -1)
        a = cell.attn(q[:, 3:], k, v) + (z if residual else 0)
        ff = lambda h: cell.ff_out(F.relu(cell.ff_in(h)))  # noqa: E731
        if pre_ln:
            return a + ff(cell.ln_ff(a))
        h = cell.ln_attn(a)
        return cell.ln_ff(h + ff(h))

    torch.testing.assert_close(cell(z, inj, z_hist, inj_hist), by_hand(True))
    cell.attn_residual = False
    torch.testing.assert_close(cell(z, inj, z_hist, inj_hist), by_hand(False))
    assert (by_hand(True) - by_hand(False)).abs().max() > 1e-3
    assert TransformerConfig(d_model=8, n_head=2, d_head=4, d_inner=16).attn_residual


def test_positional_dropout_mask_acts_on_the_encodings_channels():
    torch.manual_seed(0)
    cell = DEQTransformerCell(TransformerConfig(d_model=8, n_head=2, d_head=4, d_inner=16))
    g = _gen(6)
    z, inj = torch.randn(1, 4, 8, generator=g), torch.randn(1, 4, 24, generator=g)
    hist = (torch.zeros(1, 0, 8), torch.zeros(1, 0, 24))
    ones = Shared(torch.ones(8))
    torch.testing.assert_close(cell(z, inj, *hist, pos_mask=ones), cell(z, inj, *hist))
    zeros = Shared(torch.zeros(8))  # no positional information left at all
    pos_free = cell(z, inj, *hist, pos_mask=zeros)
    assert (pos_free - cell(z, inj, *hist)).abs().max() > 1e-4


def test_every_transformer_dropout_mask_reaches_the_output():
    torch.manual_seed(0)
    cfg = TransformerConfig(d_model=8, n_head=2, d_head=4, d_inner=16)
    cell = DEQTransformerCell(cfg).double()
    g = _gen(7)
    z = torch.randn(2, 4, 8, generator=g, dtype=torch.float64)
    inj = torch.randn(2, 4, 24, generator=g, dtype=torch.float64)
    hist = (torch.zeros(2, 0, 8, dtype=torch.float64), torch.zeros(2, 0, 24, dtype=torch.float64))
    plain = cell(z, inj, *hist)
    half = lambda *shape: (torch.arange(shape[-1]) % 2).to(torch.float64).expand(*shape)  # noqa: E731
    masks = {"attn_mask": half(2, 1, 8), "ff_mask": half(2, 1, 16), "ff_out_mask": half(2, 1, 8),
             "pos_mask": Shared(half(8))}
    for name, mask in masks.items():
        out = cell(z, inj, *hist, **{name: mask})
        assert (out - plain).abs().max() > 1e-6, f"{name} has no effect"
