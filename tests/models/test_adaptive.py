"""The output layer is tied to the embedding; the adaptive softmax is a normalized distribution."""

from __future__ import annotations

import pytest
import torch

from models import TiedAdaptiveEmbedding

from .helpers import tiny_model, tokens


@pytest.mark.parametrize("cutoffs,div_val", [((), 1), ((10, 30), 1), ((10, 30), 2)])
def test_log_probs_are_normalized_and_match_the_nll(cutoffs, div_val):
    torch.manual_seed(0)
    emb = TiedAdaptiveEmbedding(50, 16, cutoffs, div_val)
    with torch.no_grad():
        for p in emb.parameters():  # non-trivial cluster entries and biases
            p.normal_(0.0, 0.3)
    h = torch.randn(4, 5, 16)
    targets = torch.randint(0, 50, (4, 5))
    targets[0, :3] = torch.tensor([3, 15, 45])  # one in each cluster
    lp = emb.log_probs(h)
    assert lp.shape == (4, 5, 50)
    torch.testing.assert_close(lp.logsumexp(-1), torch.zeros(4, 5), atol=1e-5, rtol=0)
    nll = emb.nll(h, targets)
    torch.testing.assert_close(nll, -lp.gather(-1, targets[..., None]).squeeze(-1))
    assert emb(targets).shape == (4, 5, 16)


@pytest.mark.parametrize("lm", [dict(), dict(cutoffs=(16, 40), div_val=2)])
def test_output_layer_is_tied_to_the_embedding(lm):
    model = tiny_model("transformer", lm=lm)
    own = {id(p) for m in (model.embedding, model.core, model.out_proj) for p in m.parameters()}
    assert {id(p) for p in model.parameters()} == own, "no output matrix besides the embedding"
    # Token 63 is a target but never an input: its embedding row learns through the output only.
    seq = tokens(2, 6, vocab=16)
    tgt = torch.full((2, 6), 63)
    model(seq, tgt).loss.backward()
    assert model.embedding.tables[-1].weight.grad[-1].abs().sum() > 0
    with torch.no_grad():
        h = model(seq).hidden
        before = model.log_probs(h)[..., 63].clone()
        row = model.embedding.tables[-1].weight[-1]
        row += torch.randn_like(row)
        assert (model.log_probs(h)[..., 63] - before).abs().max() > 1e-3


@pytest.mark.parametrize("div_val", [1, 2])
def test_every_parameter_gets_a_gradient_when_a_cluster_has_no_targets(div_val):
    """DistributedDataParallel needs a gradient for every parameter in every step: a tail cluster
    without targets (and without inputs) takes part in the loss with weight 0."""
    torch.manual_seed(0)
    emb = TiedAdaptiveEmbedding(50, 16, (10, 30), div_val)
    h = torch.randn(3, 4, 16, requires_grad=True)
    targets = torch.randint(0, 10, (3, 4))  # head cluster only
    nll = emb.nll(h, targets)
    plain = emb.log_probs(h).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(nll, -plain)  # the zero-weighted terms change no value
    nll.sum().backward()
    for name, p in emb.named_parameters():
        assert p.grad is not None, name
