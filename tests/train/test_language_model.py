"""The language-model pipeline on a small corpus written by the test."""

from __future__ import annotations

import random

import pytest
import torch

from train.data_lm import EOS, UNK, Corpus, batchify, find_corpus_files, n_segments, segment
from train.language_model import main

WORDS = "the cat sat on a mat and dog ran to red house".split()


def write_corpus(root, names=("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"),
                 lines=(400, 40, 40)) -> str:
    """A tiny corpus with learnable structure: each word is mostly followed by the next one."""
    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    for name, n in zip(names, lines):
        with open(root / name, "w") as fh:
            for _ in range(n):
                i = rng.randrange(len(WORDS))
                fh.write(" ".join(WORDS[(i + k) % len(WORDS)] for k in range(rng.randint(3, 9))))
                fh.write("\n")
    return str(root)


def test_vocabulary_and_streams(tmp_path) -> None:
    d = tmp_path / "c"
    d.mkdir()
    (d / "train.txt").write_text("a b a\n\nc a\n")
    (d / "valid.txt").write_text("a z\n")
    (d / "test.txt").write_text("b\n")
    corpus = Corpus(str(d))
    v = corpus.vocab
    assert v.words[:2] == ["a", EOS]            # by training frequency: a x3, <eos> x3 (a first)
    assert set(v.words) == {"a", "b", "c", EOS, UNK}
    ids = corpus.streams["train"].tolist()
    assert [v.words[i] for i in ids] == ["a", "b", "a", EOS, EOS, "c", "a", EOS]
    assert [v.words[i] for i in corpus.streams["valid"].tolist()] == ["a", UNK, EOS]


def test_batching_and_segments() -> None:
    stream = torch.arange(23)
    data = batchify(stream, 2)                  # rows are consecutive pieces, tail dropped
    assert data.tolist() == [list(range(11)), list(range(11, 22))]
    assert n_segments(data, 4) == 3             # 10 input positions in segments of 4
    x, y = segment(data, 2, 4)
    assert x.tolist() == [[8, 9], [19, 20]] and y.tolist() == [[9, 10], [20, 21]]
    joined = torch.cat([segment(data, i, 4)[0] for i in range(3)], 1)
    assert torch.equal(joined, data[:, :-1])


def test_wikitext_names_are_found(tmp_path) -> None:
    d = write_corpus(tmp_path / "wt", names=("wiki.train.tokens", "wiki.valid.tokens",
                                             "wiki.test.tokens"), lines=(5, 2, 2))
    assert sorted(find_corpus_files(d)) == ["test", "train", "valid"]


def test_missing_data_gives_a_clear_message(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as err:
        main(["--data", str(tmp_path / "nowhere")])
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert "does not exist" in msg
    for name in ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt", "wiki.train.tokens",
                 "wiki.valid.tokens", "wiki.test.tokens"):
        assert name in msg
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "train.txt").write_text("a\n")
    with pytest.raises(FileNotFoundError, match="no valid, test file"):
        find_corpus_files(str(tmp_path / "partial"))


TINY = ["--model-preset", "deq_transformer_tiny", "--tgt-len", "8", "--batch-size", "4",
        "--eval-batch-size", "4", "--lr", "1e-2", "--lr-warmup", "0", "--progress", "false",
        "--log-every", "5"]


@pytest.mark.parametrize("preset", ["deq_transformer_tiny", "deq_trellisnet_tiny"])
def test_tiny_run_lowers_the_loss_and_reports_perplexity(tmp_path, preset: str) -> None:
    data = write_corpus(tmp_path / "ptb")
    args = TINY + ["--data", data, "--steps", "30", "--pretrain-steps", "5",
                   "--model-preset", preset]
    out = main(args)
    losses = out["losses"]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    final = out["final"]
    for split in ("valid", "test"):
        assert final[f"{split}_ppl"] == pytest.approx(torch.tensor(final[f"{split}_loss"]).exp()
                                                      .item(), rel=1e-6)
        assert final[f"{split}_ppl"] < 14 * 0.7       # well below the uniform guess (14 words)


def test_resume_gives_the_same_losses(tmp_path) -> None:
    # Resuming mid-pass needs the memory carried into the next segment, saved with the task.
    # Dropout on: the resumed run must also continue the random stream.
    data = write_corpus(tmp_path / "ptb")
    args = TINY + ["--data", data, "--steps", "10", "--pretrain-steps", "3", "--dropout", "0.2"]
    full = main(args)["losses"]
    assert full != main(args + ["--seed", "1"])["losses"]
    out_dir = str(tmp_path / "run")
    part = main(args + ["--out-dir", out_dir], stop_at=6)
    assert part["losses"] == full[:6]
    resumed = main(args + ["--out-dir", out_dir, "--resume", "auto"])
    assert resumed["start"] == 6
    assert resumed["losses"] == full[6:]                 # bit for bit
