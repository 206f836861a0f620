"""The CPU-scale language model: its corpus generator, and the pipeline beating the unigram
perplexity by half on a corpus the test writes."""

from __future__ import annotations

import json
import math
import pathlib

import torch

from train import language_model
from train.data_lm import Corpus, unigram_perplexity
from train.synthetic_corpus import PTB_WORDS, MarkovSource, write_corpus

from .test_language_model import write_corpus as write_small_corpus

CPU_RECIPE = pathlib.Path(__file__).resolve().parents[2] / "configs" / "cpu_lm.json"


def test_synthetic_corpus_has_ptb_proportions_and_is_seeded(tmp_path):
    write_corpus(str(tmp_path / "a"), seed=3, scale=0.01)
    write_corpus(str(tmp_path / "b"), seed=3, scale=0.01)
    for split, n in PTB_WORDS.items():
        text = (tmp_path / "a" / f"ptb.{split}.txt").read_text()
        assert text == (tmp_path / "b" / f"ptb.{split}.txt").read_text()
        assert abs(len(text.split()) - int(n * 0.01)) < 20


def test_the_source_is_far_more_predictable_than_its_unigram_law():
    source = MarkovSource(vocab=500, successors=4, noise=0.1, seed=0)
    stream = source.sample(60_000)
    counts = torch.zeros(500, 500, dtype=torch.float64)
    counts.index_put_((stream[:-1], stream[1:]), torch.ones(len(stream) - 1, dtype=torch.float64),
                      accumulate=True)
    joint = counts / counts.sum()
    cond = counts / counts.sum(1, keepdim=True).clamp_min(1)
    bigram_ppl = math.exp(-float((joint[joint > 0] * cond[joint > 0].log()).sum()))
    unigram_ppl = unigram_perplexity(stream, stream, 500)
    assert bigram_ppl < unigram_ppl / 4


def test_cpu_preset_pipeline_beats_the_unigram_perplexity_by_half(tmp_path):
    """The CPU recipe's model and schedule, shrunk, on a small corpus with strong structure."""
    data = write_small_corpus(tmp_path / "corpus", lines=(300, 40, 40))
    corpus = Corpus(data)
    unigram = unigram_perplexity(corpus.streams["train"], corpus.streams["test"],
                                 len(corpus.vocab))
    recipe = json.loads(CPU_RECIPE.read_text())
    assert recipe["model_preset"] == "deq_transformer_cpu"
    summary = language_model.main([
        "--config", str(CPU_RECIPE), "--data", data, "--out-dir", str(tmp_path / "run"),
        "--steps", "60", "--pretrain-steps", "10", "--lr-warmup", "5", "--batch-size", "4",
        "--tgt-len", "16", "--eval-tgt-len", "16", "--eval-batch-size", "4",
        "--eval-every", "0", "--threads", "1", "--results", str(tmp_path / "results.json"),
        "--model.d_embed", "32", "--model.core.d_model", "32", "--model.core.d_head", "16",
        "--model.core.d_inner", "64"])
    final = summary["final"]
    assert final["test_ppl"] < unigram / 2, (final["test_ppl"], unigram)
    assert summary["unigram_test_ppl"] == unigram
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["command"].startswith("python -m train.language_model --config")
    assert record["final_test"]["test_ppl"] == final["test_ppl"]
    assert record["unigram_test_ppl"] == unigram and record["params"] > 0


def test_the_training_loss_includes_ar_and_tar(tmp_path):
    from train.language_model import LMTask

    data = write_small_corpus(tmp_path / "c", lines=(40, 8, 8))
    cfg = language_model.parse_args(["--model-preset", "deq_trellisnet_tiny", "--data", data,
                                     "--batch-size", "2", "--tgt-len", "6",
                                     "--model.ar_alpha", "2", "--model.tar_beta", "1"])
    task = LMTask(cfg, Corpus(data), torch.device("cpu"), 0, 1)
    task.model.train()
    torch.manual_seed(0)
    loss = task.train_loss(task.model, 0, 0, 1)
    torch.manual_seed(0)
    tokens, targets = task.train_data[:, :6], task.train_data[:, 1:7]
    out = task.model(tokens, targets)
    assert out.penalty is not None and float(out.penalty.detach()) > 0
    torch.testing.assert_close(loss, out.loss + out.penalty)
