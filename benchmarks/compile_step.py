"""Eager against torch.compile'd training step of a DEQ language model.

``python -m benchmarks.compile_step [--preset NAME] [--backend inductor] [--batch B] [--seq T]
[--repeat N] [--device auto|cpu|cuda] [--out PATH]``

One training step (forward, loss, backward; no optimizer step) of the same model, run
three ways side by side, interleaved, after warm-up:

* ``eager``: plain PyTorch;
* ``compiled``: the step under ``torch.compile(backend=...)``: everything around the DEQ
  is compiled; the solves are one graph break, and f runs eagerly inside them;
* ``compiled_f``: the same, and the solver evaluates ``torch.compile(cell, dynamic=True)``
  (``ModeConfig.compile_cell``).

The compile time (the first call) is reported separately from the steady-state step time.
Every variant starts from the same weights and sees the same batch, so the losses agree.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from typing import Any, Callable, Optional

import torch

from deq_ext.bench import median, progress, provenance, ratio, sync, write_json
from models import DEQLanguageModel, get_preset

VARIANTS = ("eager", "compiled", "compiled_f")


def _model(variant: str, backend: str, base: DEQLanguageModel) -> DEQLanguageModel:
    model = copy.deepcopy(base)
    if variant == "compiled_f":
        model.core.set_mode("deq", compile_cell={"backend": backend, "dynamic": True})
    return model


def _step_fn(model: DEQLanguageModel, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        out = model(x, y, None)
        out.loss.backward()
        return out.loss.detach()
    return step


def run(preset: str = "deq_transformer_tiny", backend: str = "inductor", batch: int = 8,
        seq: int = 32, repeat: int = 5, device: str = "auto") -> dict[str, Any]:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    torch.manual_seed(0)
    config = get_preset(preset).config
    base = DEQLanguageModel(config).to(dev)
    vocab = config.vocab_size
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (batch, seq), generator=gen).to(dev)
    y = torch.randint(0, vocab, (batch, seq), generator=gen).to(dev)
    torch._dynamo.reset()
    steps: dict[str, Callable[[], torch.Tensor]] = {}
    first: dict[str, dict[str, float]] = {}
    for variant in VARIANTS:
        model = _model(variant, backend, base)
        step = _step_fn(model, x, y)
        if variant != "eager":
            step = torch.compile(step, backend=backend)
        sync(dev)
        t0 = time.perf_counter()
        loss = step()
        sync(dev)
        first[variant] = {"first_call_s": time.perf_counter() - t0, "loss": float(loss)}
        progress(f"{variant}: first call {first[variant]['first_call_s']:.1f} s, "
                 f"loss {first[variant]['loss']:.6f}")
        step()  # a second warm-up call: later compiles (dynamic shapes) happen here
        steps[variant] = step
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(repeat):
        for variant, step in steps.items():
            sync(dev)
            t0 = time.perf_counter()
            step()
            sync(dev)
            times[variant].append(time.perf_counter() - t0)
        progress(f"round {r + 1}/{repeat}: " + ", ".join(
            f"{v} {times[v][-1] * 1e3:.1f} ms" for v in VARIANTS))
    out: dict[str, Any] = {
        "preset": preset, "backend": backend, "batch": batch, "seq": seq, "repeat": repeat,
        "variants": {v: {**first[v], "step_s": median(times[v]), "runs_s": times[v]}
                     for v in VARIANTS},
    }
    out["ratios"] = {
        "compiled_speedup": ratio(out["variants"]["eager"]["step_s"],
                                  out["variants"]["compiled"]["step_s"]),
        "compiled_f_speedup": ratio(out["variants"]["eager"]["step_s"],
                                    out["variants"]["compiled_f"]["step_s"]),
    }
    return out


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="deq_transformer_tiny", help="model preset (models.PRESETS)")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend")
    ap.add_argument("--batch", type=int, default=8, help="sequences per batch")
    ap.add_argument("--seq", type=int, default=32, help="tokens per sequence")
    ap.add_argument("--repeat", type=int, default=5, help="timed rounds after the warm-up")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--out", help="write the results as JSON here")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    results = provenance(dev, "python -m benchmarks.compile_step", argv)
    results.update(run(args.preset, args.backend, args.batch, args.seq, args.repeat, args.device))
    v = results["variants"]
    print(f"training step of {args.preset} (B={args.batch}, T={args.seq}) on {results['device']}, "
          f"backend {args.backend}, median of {args.repeat}:")
    for name in VARIANTS:
        print(f"  {name:<11} {v[name]['step_s'] * 1e3:9.1f} ms/step  "
              f"(first call {v[name]['first_call_s']:.1f} s, loss {v[name]['loss']:.6f})")
    r = results["ratios"]
    print(f"  speedup over eager: compiled {r['compiled_speedup']:.2f}x, "
          f"compiled with compiled f {r['compiled_f_speedup']:.2f}x")
    if args.out:
        write_json(results, args.out)
        progress(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
