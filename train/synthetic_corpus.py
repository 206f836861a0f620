"""A synthetic word-level corpus of Penn Treebank's size, for CPU runs without the real corpus.

``python -m train.synthetic_corpus OUT_DIR`` writes ``ptb.{train,valid,test}.txt`` with PTB's
split sizes (about 930K / 74K / 82K words with the line ends) over a 10K-word vocabulary. The
text comes from a seeded first-order Markov source: word frequencies follow a Zipf law, and each
word is followed by one of a few successors (their choice also Zipf-weighted), with a small
chance of any word. A model that learns the successors beats the unigram perplexity by far, one
that does not cannot: :func:`entropies` gives both bounds of the source.

It is *not* Penn Treebank: figures measured on it say that the pipeline learns, nothing about
the paper's PTB results.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Optional, Sequence

import torch

PTB_WORDS = {"train": 887_521, "valid": 70_390, "test": 78_669}  # PTB's words without <eos>


def _zipf(n: int, s: float) -> torch.Tensor:
    w = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** s
    return w / w.sum()


class MarkovSource:
    """Word i is followed by ``succ[i, j]`` with probability ``(1 - noise) * q[j]``, or by any
    word with probability ``noise`` (drawn from the Zipf unigram law)."""

    def __init__(self, vocab: int = 10_000, successors: int = 8, noise: float = 0.1,
                 seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.vocab, self.noise = vocab, noise
        self.unigram = _zipf(vocab, 1.0)
        self.q = _zipf(successors, 1.0)
        # Successors drawn from the Zipf law, so frequent words stay frequent.
        self.succ = torch.multinomial(self.unigram.float(), vocab * successors, replacement=True,
                                      generator=gen).view(vocab, successors)
        self.gen = gen

    def sample(self, n: int) -> torch.Tensor:
        """A stream of ``n`` word ids."""
        out = torch.empty(n, dtype=torch.long)
        cur = int(torch.multinomial(self.unigram.float(), 1, generator=self.gen))
        jumps = torch.rand(n, generator=self.gen) < self.noise
        picks = torch.multinomial(self.q.float(), n, replacement=True, generator=self.gen)
        randoms = torch.multinomial(self.unigram.float(), n, replacement=True, generator=self.gen)
        succ = self.succ.tolist()
        jumps_l, picks_l, randoms_l = jumps.tolist(), picks.tolist(), randoms.tolist()
        for t in range(n):
            cur = randoms_l[t] if jumps_l[t] else succ[cur][picks_l[t]]
            out[t] = cur
        return out


def entropies(stream: torch.Tensor, vocab: int) -> dict[str, float]:
    """Unigram perplexity of a stream (the best a model with no context can do on it)."""
    counts = torch.bincount(stream, minlength=vocab).double()
    p = counts[counts > 0] / counts.sum()
    return {"unigram_ppl": math.exp(float(-(p * p.log()).sum()))}


def write_corpus(out_dir: str, seed: int = 0, scale: float = 1.0, line_len: int = 20) -> None:
    """Write the three splits (``scale`` shrinks them, for tests) as lines of ``line_len`` words."""
    source = MarkovSource(seed=seed)
    os.makedirs(out_dir, exist_ok=True)
    for split, n in PTB_WORDS.items():
        words = source.sample(max(line_len, int(n * scale))).tolist()
        with open(os.path.join(out_dir, f"ptb.{split}.txt"), "w") as fh:
            for i in range(0, len(words), line_len):
                fh.write(" ".join(f"w{w}" for w in words[i:i + line_len]) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="where ptb.{train,valid,test}.txt are written")
    parser.add_argument("--seed", type=int, default=0, help="seed of the source and the text")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="fraction of PTB's split sizes to write (default 1)")
    args = parser.parse_args(argv)
    write_corpus(args.out_dir, args.seed, args.scale)


if __name__ == "__main__":
    main()
