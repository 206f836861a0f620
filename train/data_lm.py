"""Word-level corpora (Penn Treebank, WikiText-103) from local files, batched as one token stream.

As in the reference implementations (Transformer-XL, TrellisNet, locuslab/deq): every line's
whitespace-separated words followed by ``<eos>``, the vocabulary built from the training split and
sorted by frequency (adaptive softmax cutoffs rely on that order), each split one long stream cut
into ``batch_size`` parallel rows, read in segments of ``tgt_len`` with memory carried from one
segment to the next.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Iterator

import torch

EOS = "<eos>"
UNK = "<unk>"
SPLITS = ("train", "valid", "test")
# Accepted names per split: a plain layout, the PTB release's, WikiText-103's.
FILE_NAMES = {s: (f"{s}.txt", f"ptb.{s}.txt", f"wiki.{s}.tokens") for s in SPLITS}


def find_corpus_files(data_dir: str) -> dict[str, str]:
    """The train/valid/test files of ``data_dir``; a clear error naming what is expected."""
    found: dict[str, str] = {}
    missing = []
    for split, names in FILE_NAMES.items():
        for name in names:
            path = os.path.join(data_dir, name)
            if os.path.isfile(path):
                found[split] = path
                break
        else:
            missing.append(split)
    if missing:
        expected = "\n".join(f"  {s}: one of {', '.join(FILE_NAMES[s])}" for s in SPLITS)
        where = (f"directory {data_dir!r} does not exist" if not os.path.isdir(data_dir)
                 else f"no {', '.join(missing)} file in {data_dir!r}")
        raise FileNotFoundError(
            f"language-model data not found: {where}. Expected in that directory, per split:\n"
            f"{expected}\n(Penn Treebank: ptb.train.txt, ptb.valid.txt, ptb.test.txt; "
            f"WikiText-103: wiki.train.tokens, wiki.valid.tokens, wiki.test.tokens.)")
    return found


def read_words(path: str) -> Iterator[str]:
    """The file's words, ``<eos>`` at the end of every line (empty lines included)."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            yield from line.split()
            yield EOS


class Vocabulary:
    """Words sorted by training frequency (ties: first occurrence); ``<unk>`` for unseen words."""

    def __init__(self, counts: Counter) -> None:
        self.words = [w for w, _ in counts.most_common()]
        if UNK not in counts:
            self.words.append(UNK)
        self.index = {w: i for i, w in enumerate(self.words)}
        self.unk = self.index[UNK]

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, words: Iterator[str]) -> torch.Tensor:
        get, unk = self.index.get, self.unk
        return torch.tensor([get(w, unk) for w in words], dtype=torch.long)


class Corpus:
    """The three splits of a corpus directory as token-id streams, with their vocabulary."""

    def __init__(self, data_dir: str) -> None:
        files = find_corpus_files(data_dir)
        self.vocab = Vocabulary(Counter(read_words(files["train"])))
        self.streams = {s: self.vocab.encode(read_words(p)) for s, p in files.items()}


def batchify(stream: torch.Tensor, rows: int) -> torch.Tensor:
    """``(rows, n)``: the stream cut into ``rows`` consecutive pieces (the tail is dropped)."""
    n = stream.numel() // rows
    if n < 2:
        raise ValueError(f"a stream of {stream.numel()} tokens is too short for {rows} rows")
    return stream[:rows * n].view(rows, n)


def n_segments(data: torch.Tensor, tgt_len: int) -> int:
    """Segments of up to ``tgt_len`` inputs (each with its next-token targets) in ``data``."""
    return -(-(data.shape[1] - 1) // tgt_len)


def segment(data: torch.Tensor, i: int, tgt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment ``i``: inputs ``data[:, s:s+L]`` and targets ``data[:, s+1:s+L+1]``."""
    start = i * tgt_len
    length = min(tgt_len, data.shape[1] - 1 - start)
    return data[:, start:start + length], data[:, start + 1:start + 1 + length]


def unigram_perplexity(train: torch.Tensor, test: torch.Tensor, vocab_size: int) -> float:
    """Perplexity on ``test`` of the unigram model of ``train`` (add-one smoothed): what a model
    that ignores the context achieves, the baseline a language model must beat."""
    counts = torch.bincount(train, minlength=vocab_size).double() + 1.0
    log_p = (counts / counts.sum()).log()
    return float(torch.exp(-log_p[test].mean()))
