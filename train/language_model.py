"""Word-level language modeling: ``python -m train.language_model --data DIR``.

DIR holds Penn Treebank (``ptb.{train,valid,test}.txt`` or ``{train,valid,test}.txt``) or
WikiText-103 (``wiki.{train,valid,test}.tokens``). The model is a preset of :mod:`models`
(``--model-preset``) with the vocabulary size of the corpus, and any field of its configuration
changed with ``--model.<dotted name>`` flags or a ``"model"`` object in ``--config FILE`` (the
recipes in ``configs/`` are such files); training perplexity is logged, and validation and test
perplexity at each evaluation. Language models train in float32 by default (``--amp off``), as the
authors' runs did.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import torch
from torch import nn

from models import DEQLanguageModel, LMConfig, get_preset
from models.overrides import apply_overrides

from .config import TrainConfig, parse_config
from .data_lm import Corpus, batchify, n_segments, segment, unigram_perplexity
from .loop import Task, init_distributed, seed_everything, train
from .model_options import model_options
from .records import run_record, write_record


@dataclass
class LMRunConfig(TrainConfig):
    """Language-model run (beyond :class:`TrainConfig`).

    Attributes:
        data: the corpus directory.
        model_preset: a :data:`models.PRESETS` name; its vocabulary size is replaced by the
            corpus's (adaptive-softmax cutoffs at or above it are dropped).
        model: changes to the preset's configuration by dotted field name (the --model.* flags,
            or a "model" object in the JSON file).
        epochs: if > 0, train for this many passes over the training stream (sets steps).
        lr_decay_epochs: the step schedule's milestones in epochs (comma-separated; sets
            lr_decay_at).
        tgt_len: segment length in training (0: the preset's ``seq_len``).
        eval_tgt_len: segment length in evaluation (0: ``tgt_len``).
        eval_batch_size: rows of the evaluation streams.
        eval_segments: segments evaluated at intermediate evaluations (0: all; the final
            evaluation always reads the whole splits).
        dropout: the core's variational dropout rate; None: the preset's.
        results: write a JSON summary of the run here (command, device, versions,
            configuration, final valid/test perplexity and the unigram baseline).
    """

    amp: str = "off"  # float32, as the authors trained (bf16's rounding floors the residual)

    steps: int = 20_000
    batch_size: int = 32
    lr: float = 2.5e-4
    lr_warmup: int = 1000
    pretrain_steps: int = 2000
    eval_every: int = 2000
    log_every: int = 50
    data: str = "data/ptb"
    model_preset: str = "deq_transformer_small"
    tgt_len: int = 0
    eval_tgt_len: int = 0
    eval_batch_size: int = 10
    eval_segments: int = 0
    dropout: Optional[float] = None
    model: Optional[dict] = None
    epochs: int = 0
    lr_decay_epochs: str = ""
    results: Optional[str] = None


class LMTask(Task):
    """Segments of the training stream in order, one per step; memory carried between them.

    Step s reads segment ``s mod n_segments``; the memory is reset at the start of each pass.
    Under DDP each rank reads its own ``batch_size`` rows of a ``batch_size * world``-row stream.
    """

    eval_splits = ("valid", "test")

    def __init__(self, cfg: LMRunConfig, corpus: Corpus, device: torch.device, rank: int,
                 world: int) -> None:
        self.cfg, self.device = cfg, device
        preset = get_preset(cfg.model_preset)
        self.model = DEQLanguageModel(model_config(cfg, len(corpus.vocab)))
        self.tgt_len = cfg.tgt_len or preset.seq_len
        self.eval_tgt_len = cfg.eval_tgt_len or self.tgt_len
        rows = batchify(corpus.streams["train"], cfg.batch_size * world)
        self.train_data = rows[rank * cfg.batch_size:(rank + 1) * cfg.batch_size].to(device)
        self.eval_data = {s: batchify(corpus.streams[s], cfg.eval_batch_size).to(device)
                          for s in ("valid", "test")}
        self.n_train = n_segments(self.train_data, self.tgt_len)
        self.memory: Optional[tuple[torch.Tensor, ...]] = None

    def train_loss(self, model: nn.Module, step: int, rank: int, world: int) -> torch.Tensor:
        i = step % self.n_train
        if i == 0:
            self.memory = None
        tokens, targets = segment(self.train_data, i, self.tgt_len)
        out = model(tokens, targets, self.memory)
        self.memory = tuple(m.detach() for m in out.memory)
        # AR/TAR, when the model has them, are part of what is minimized (and logged).
        return out.loss.float() if out.penalty is None else out.loss.float() + out.penalty

    def evaluate(self, split: str, final: bool) -> dict[str, float]:
        data = self.eval_data[split]
        count = n_segments(data, self.eval_tgt_len)
        if not final and self.cfg.eval_segments:
            count = min(count, self.cfg.eval_segments)
        memory, total, tokens_seen = None, 0.0, 0
        for i in range(count):
            tokens, targets = segment(data, i, self.eval_tgt_len)
            out = self.model(tokens, targets, memory)
            memory = out.memory
            total += float(out.nll.float().sum())
            tokens_seen += targets.numel()
        loss = total / max(1, tokens_seen)
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": float(tokens_seen)}

    def state_dict(self) -> dict[str, Any]:
        return {"memory": self.memory}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        memory = state.get("memory")
        self.memory = None if memory is None else tuple(m.to(self.device) for m in memory)


def model_config(cfg: LMRunConfig, vocab: int) -> LMConfig:
    """The preset's configuration with the run's changes and the corpus's vocabulary size.

    Adaptive-softmax cutoffs at or above the vocabulary size are dropped.
    """
    model_cfg = get_preset(cfg.model_preset).config
    if cfg.dropout is not None:
        model_cfg = replace(model_cfg, core=replace(model_cfg.core, dropout=cfg.dropout))
    try:
        model_cfg = apply_overrides(model_cfg, cfg.model or {})
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    changes = cfg.gradient_changes()
    if changes:  # --grad-mode and friends win over the preset and --model.modes.*
        model_cfg = replace(model_cfg, modes=replace(model_cfg.modes, **changes))
    return replace(model_cfg, vocab_size=vocab,
                   cutoffs=tuple(c for c in model_cfg.cutoffs if c < vocab))


def parse_args(argv: Optional[Sequence[str]] = None) -> LMRunConfig:
    """The run's configuration from the command line (and ``--config FILE``)."""
    return parse_config(LMRunConfig, argv, __doc__.splitlines()[0], nested=model_options())


def apply_epochs(cfg: LMRunConfig, steps_per_epoch: int) -> None:
    """Turn ``epochs`` and ``lr_decay_epochs`` into steps (no-op when they are unset)."""
    if cfg.epochs > 0:
        cfg.steps = cfg.epochs * steps_per_epoch
    if cfg.lr_decay_epochs.strip():
        cfg.lr_decay_at = ",".join(str(int(e) * steps_per_epoch)
                                   for e in cfg.lr_decay_epochs.split(",") if e.strip())


def main(argv: Optional[Sequence[str]] = None, stop_at: Optional[int] = None) -> dict[str, Any]:
    """Run from command-line arguments; returns the loop's summary (``final``: last evaluation).

    ``stop_at`` ends the run early at that step (with a checkpoint), as an interruption would.
    """
    cfg = parse_args(argv)
    try:
        corpus = Corpus(cfg.data)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world, device = init_distributed(cfg.device)
    seed_everything(cfg.seed)
    task = LMTask(cfg, corpus, device, rank, world)
    apply_epochs(cfg, task.n_train)
    if rank == 0:
        n_params = sum(p.numel() for p in task.model.parameters())
        print(f"language model: {cfg.data} vocab={len(corpus.vocab)} "
              f"train tokens={corpus.streams['train'].numel()} preset={cfg.model_preset} "
              f"params={n_params} tgt_len={task.tgt_len} device={device} world={world}",
              flush=True)
    # The model was built from cfg.seed on every rank; dropout masks now differ per rank.
    seed_everything(cfg.seed + rank)
    summary = train(cfg, task, rank, world, device, stop_at=stop_at)
    # The baseline to beat: a unigram model of the training split, on the test split.
    summary["unigram_test_ppl"] = unigram_perplexity(corpus.streams["train"],
                                                     corpus.streams["test"], len(corpus.vocab))
    final = summary["final"]
    if rank == 0 and final:
        print(f"final valid ppl {final['valid_ppl']:.2f}, test ppl {final['test_ppl']:.2f} "
              f"(unigram baseline {summary['unigram_test_ppl']:.2f}), "
              f"wall {summary['wall_s']:.1f}s", flush=True)
        if cfg.results is not None:
            summary["params"] = n_params
            write_record(cfg.results, run_record("train.language_model", cfg, summary, device,
                                                 argv, unigram_test_ppl=summary["unigram_test_ppl"]))
    return summary


if __name__ == "__main__":
    main()
