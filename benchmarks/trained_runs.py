"""Trained image and language DEQs for the benchmarks, trained here once and loaded afterwards.

As :mod:`benchmarks.trained_copy` does for copy memory: the digits MDEQ (``python -m
train.digits``, a few minutes on 2 cores) and the CPU language model (``python -m
train.language_model --config configs/cpu_lm.json`` on the synthetic PTB-sized corpus, under a
minute) are trained into a run directory under ``out/`` (ignored by git) when it holds no
finished run, then loaded from its checkpoint. ``quick`` trains tiny versions (seconds; for
smoke tests).
"""

from __future__ import annotations

import os
from dataclasses import fields
from typing import Any, Optional

import torch

from deq_ext.bench import progress

DIGITS_DIR = os.path.join("out", "bench-digits")
LM_DIR = os.path.join("out", "bench-cpu-lm")
LM_RECIPE = os.path.join("configs", "cpu_lm.json")
# A quick corpus is written next to its run; the full one where the recipe expects it.
LM_DATA = os.path.join("data", "synthetic_ptb")


def _checkpoint(path: str) -> Optional[dict[str, Any]]:
    if not os.path.exists(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def _finished(ckpt: Optional[dict[str, Any]]) -> bool:
    return ckpt is not None and int(ckpt["step"]) >= int(ckpt["config"]["steps"])


def _config(cls: type, ckpt: dict[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in ckpt["config"].items() if k in known})


# -- digits ------------------------------------------------------------------------------------------
def digits_args(run_dir: str, quick: bool) -> list[str]:
    """The digits training command's arguments (recorded with the results)."""
    return ["--out-dir", run_dir, "--progress", "false"] + (["--preset", "tiny"] if quick else [])


def load_digits(run_dir: str = DIGITS_DIR, quick: bool = False) -> dict[str, Any]:
    """The trained digits classifier in DEQ mode, its config, test images and labels, and the
    command that trained it (trained first when ``run_dir`` holds no finished run)."""
    from train import digits
    from train.data_digits import digits_splits

    path = os.path.join(run_dir, "last.pt")
    ckpt = _checkpoint(path)
    if not _finished(ckpt):
        progress(f"training the digits model into {run_dir} (python -m train.digits "
                 f"{' '.join(digits_args(run_dir, quick))})")
        digits.main(digits_args(run_dir, quick))
        ckpt = _checkpoint(path)
    assert ckpt is not None, f"training wrote no checkpoint to {path}"
    cfg = _config(digits.DigitsConfig, ckpt)
    model = digits.build_model(cfg)
    model.load_state_dict(ckpt["model"])
    model.set_mode("deq")
    test_x, test_y = digits_splits(cfg.test_size, cfg.data_seed, cfg.train_size)["test"]
    return {"model": model, "config": cfg, "test_x": test_x, "test_y": test_y,
            "step": ckpt["step"],
            "train_command": "python -m train.digits " + " ".join(digits_args(run_dir, quick))}


# -- the CPU language model --------------------------------------------------------------------------
def lm_args(run_dir: str, data_dir: str, quick: bool) -> list[str]:
    """The language model's training command's arguments (recorded with the results)."""
    args = ["--config", LM_RECIPE, "--out-dir", run_dir, "--data", data_dir]
    if quick:
        args += ["--steps", "6", "--pretrain-steps", "3", "--batch-size", "4",
                 "--eval-batch-size", "4", "--eval-segments", "2", "--lr-warmup", "2"]
    return args


def load_cpu_lm(run_dir: str = LM_DIR, quick: bool = False) -> dict[str, Any]:
    """The CPU language model (configs/cpu_lm.json) in DEQ mode, trained on the synthetic corpus
    (written first if missing; a small one with ``quick``), with its training stream."""
    from models import DEQLanguageModel
    from train import language_model as lm
    from train.data_lm import Corpus, batchify
    from train.synthetic_corpus import write_corpus

    data_dir = os.path.join(run_dir, "corpus") if quick else LM_DATA
    if not os.path.exists(os.path.join(data_dir, "ptb.test.txt")):
        progress(f"writing the synthetic corpus into {data_dir}")
        write_corpus(data_dir, scale=0.01 if quick else 1.0)
    path = os.path.join(run_dir, "last.pt")
    ckpt = _checkpoint(path)
    args = lm_args(run_dir, data_dir, quick)
    if not _finished(ckpt):
        progress(f"training the CPU language model into {run_dir} (python -m "
                 f"train.language_model {' '.join(args)})")
        lm.main(args)
        ckpt = _checkpoint(path)
    assert ckpt is not None, f"training wrote no checkpoint to {path}"
    cfg = _config(lm.LMRunConfig, ckpt)
    corpus = Corpus(data_dir)
    model = DEQLanguageModel(lm.model_config(cfg, len(corpus.vocab)))
    model.load_state_dict(ckpt["model"])
    model.set_mode("deq")
    return {"model": model, "config": cfg, "train": batchify(corpus.streams["train"],
                                                              cfg.batch_size),
            "tgt_len": cfg.tgt_len, "step": ckpt["step"],
            "train_command": "python -m train.language_model " + " ".join(args)}
