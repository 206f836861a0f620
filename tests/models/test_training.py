"""Training: gradients reach every parameter in every mode, the modes share parameters, the
checkpointed unroll equals the plain one, and both models learn in a few CPU steps."""

from __future__ import annotations

import pytest
import torch

from deq_ext import SolverSettings
from models import MODES

from .helpers import KINDS, VARIANT_CHANGES, VARIANT_IDS, grads, tiny_model, tokens

ADAPTIVE = dict(cutoffs=(16, 40), div_val=2, emb_dropout=0.1, out_dropout=0.1)


@pytest.mark.parametrize("changes", VARIANT_CHANGES, ids=VARIANT_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_parameter(kind, changes, device):
    model = tiny_model(kind, device, dropout=0.1, lm=ADAPTIVE, **changes).train()
    seq, tgt = tokens(3, 7, device), tokens(3, 7, device, seed=2)
    tgt[0, :3] = torch.tensor([0, 20, 50])  # a target in each of the three softmax clusters
    first = model(seq, tgt)
    second = model(tokens(3, 7, device, seed=3), tgt, memory=first.memory)
    (first.loss + second.loss).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


@pytest.mark.parametrize("kind", KINDS)
def test_the_three_modes_share_parameters(kind):
    model = tiny_model(kind)
    params = [id(p) for p in model.parameters()]
    keys = list(model.state_dict())
    seq, tgt = tokens(2, 6), tokens(2, 6, seed=2)
    losses = {}
    for mode in MODES:
        model.set_mode(mode)
        losses[mode] = model(seq, tgt).loss.item()
        assert [id(p) for p in model.parameters()] == params and list(model.state_dict()) == keys
    assert len(set(losses.values())) == 3, "the modes should compute different functions"

    # A step taken in pretrain mode moves the DEQ: the parameters are the same tensors.
    model.eval()
    model.set_mode("deq")
    with torch.no_grad():
        before = model(seq).hidden
    model.train()
    model.set_mode("pretrain")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(seq, tgt).loss.backward()
    opt.step()
    model.eval()
    model.set_mode("deq")
    with torch.no_grad():
        assert (model(seq).hidden - before).abs().max() > 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_pretrain_is_the_two_layer_unroll(kind):
    model = tiny_model(kind, mode="pretrain").eval()
    seq = tokens(2, 6)
    with torch.no_grad():
        shallow = model(seq).hidden
        model.set_mode("unrolled", unrolled_depth=2)
        torch.testing.assert_close(model(seq).hidden, shallow, atol=0, rtol=0)
        model.set_mode("unrolled", unrolled_depth=3)
        assert (model(seq).hidden - shallow).abs().max() > 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_checkpointed_unroll_equals_the_plain_unroll(kind):
    seq, tgt = tokens(3, 6), tokens(3, 6, seed=2)
    results = []
    for ckpt in (False, True):
        # Same seed: same parameters and same dropout masks (drawn before the unroll).
        model = tiny_model(kind, dropout=0.2, mode="unrolled", checkpoint=ckpt).train()
        torch.manual_seed(5)
        loss = model(seq, tgt).loss
        loss.backward()
        results.append((loss.detach(), grads(model)))
    (loss_a, g_a), (loss_b, g_b) = results
    torch.testing.assert_close(loss_b, loss_a, atol=0, rtol=0)
    for name in g_a:
        torch.testing.assert_close(g_b[name], g_a[name], atol=1e-7, rtol=1e-5, msg=name)


def test_eval_mode_uses_the_eval_forward_settings():
    model = tiny_model("transformer", eval_forward=SolverSettings(max_iter=2, tol=1e-9))
    seq = tokens(2, 6)
    with torch.no_grad():
        model.eval()
        model(seq)
        assert model.core.solver_stats[0]["forward"].nstep.max() <= 2
        model.train()
        model(seq)
        assert model.core.solver_stats[0]["forward"].nstep.max() > 2


@pytest.mark.parametrize("kind", ["transformer", "trellisnet"])
def test_trains_for_a_few_steps_pretrain_then_deq(kind):
    model = tiny_model(kind, dropout=0.1, lm=dict(emb_dropout=0.1))
    stream = torch.arange(3 * 17).view(3, 17) % 7  # a learnable periodic stream
    seq, tgt = stream[:, :-1], stream[:, 1:]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            first = model(seq[:, :8], tgt[:, :8])
            second = model(seq[:, 8:], tgt[:, 8:], memory=first.memory)
        model.train()
        return (first.loss.item() + second.loss.item()) / 2

    start = eval_loss()
    for step in range(10):
        model.set_mode("pretrain" if step < 3 else "deq")
        memory = None
        for s in (slice(0, 8), slice(8, 16)):  # two segments, memory carried
            opt.zero_grad()
            out = model(seq[:, s], tgt[:, s], memory=memory)
            out.loss.backward()
            opt.step()
            memory = out.memory
    end = eval_loss()
    assert end < 0.7 * start, f"loss went from {start:.3f} to {end:.3f}"
