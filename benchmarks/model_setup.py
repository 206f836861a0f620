"""What the memory and runtime tables share: the core of a preset in each mode, its inputs, a loss.

The paper's Tables 2-4 measure the *model* (embeddings and softmax excluded), so both tables run
only the core of a language-model preset (:class:`models.modes.SequenceCore`) on random
embedding-sized inputs ``(B, T, d_embed)``, with a steady-state Transformer-XL memory, and take a
scalar loss on the core's output. The same core runs as the DEQ (``mode='deq'``) and as the deep
weight-tied baseline (``mode='unrolled'``, optionally checkpointed): the parameters are shared.

Solver settings are the presets' paper settings (section 5: forward tolerance sqrt(T)*1e-5,
backward sqrt(T)*1e-8, inference sqrt(T)*1e-2, absolute residual, with the presets' iteration
limits). The presets set the tolerances for their own sequence length; :func:`paper_modes`
rescales them to the benchmarked length T, as the paper's sqrt(T) rule does.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import replace
from typing import Any, Optional

import torch

from deq_ext import SolverSettings, SolverStats, Status
from deq_ext.bench import load_average, progress, provenance, write_json
from models import get_preset
from models.lm import build_core
from models.modes import Memory, ModeConfig, SequenceCore
from models.transformer import TransformerConfig

# The paper's small models (Tables 2 and 3) and the tiny presets used by the smoke tests.
PRESETS = {"transformer": "deq_transformer_small", "trellisnet": "deq_trellisnet_small"}
QUICK_PRESETS = {"transformer": "deq_transformer_tiny", "trellisnet": "deq_trellisnet_tiny"}

PAPER_BATCH, PAPER_SEQ = 15, 150  # paper, Table 2 footnote: "sequence length 150 and batch 15"


def preset_names(quick: bool) -> dict[str, str]:
    """Model kind -> preset name (tiny presets with ``quick``)."""
    return dict(QUICK_PRESETS if quick else PRESETS)


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but no CUDA device is visible")
    return device


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The CLI both table scripts share."""
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quick", action="store_true",
                        help="tiny presets and sizes (smoke tests)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: per device)")
    parser.add_argument("--seq", type=int, default=None,
                        help="sequence length (default: per device)")
    parser.add_argument("--mem-len", type=int, default=None,
                        help="Transformer-XL memory positions (default: the preset's at the "
                             "paper sizes, else the sequence length)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own choice)")


WEIGHTS = "random (untrained), init of the presets"


def start_run(parser: argparse.ArgumentParser, program: str,
              argv: Optional[list[str]]) -> tuple[argparse.Namespace, torch.device, dict[str, Any]]:
    """Parse the command line, pick the device and threads, and open the results record."""
    args_list = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(args_list)
    device = resolve_device(args.device)
    apply_threads(args.threads)
    results = provenance(device, program, args_list)
    results["numerics"] = numerics(device)
    results["weights"] = WEIGHTS
    return args, device, results


def finish_run(results: dict[str, Any], table: str, out: Optional[str], t0: float) -> None:
    """Close the record (wall time, load), print the table, write the JSON if asked."""
    results["wall_s"] = time.perf_counter() - t0
    results["load_average_end"] = load_average()
    report(results, table, out)


def report(results: dict[str, Any], table: str, out: Optional[str]) -> None:
    """Print the table and write the record as JSON to ``out`` if given."""
    print(table, flush=True)
    if out:
        write_json(results, out)
        progress(f"wrote {out}")


def cell(value: Optional[float], fmt: str) -> str:
    """A table cell: ``value`` formatted, or "-" when it is missing or NaN."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else format(value, fmt)


def apply_threads(threads: Optional[int]) -> None:
    """Set torch's CPU thread count when asked (provenance records the count in effect)."""
    if threads is not None:
        torch.set_num_threads(threads)


def numerics(device: torch.device) -> dict[str, object]:
    """Precision switches that change GPU timings (TF32 in matmuls and cuDNN convolutions)."""
    if device.type != "cuda":
        return {"dtype": "float32"}
    return {"dtype": "float32", "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32}


def scale_tol(settings: SolverSettings, factor: float) -> SolverSettings:
    """The same settings with the tolerance multiplied by ``factor``."""
    return replace(settings, tol=settings.tol * factor)


def paper_modes(preset_name: str, seq: int) -> ModeConfig:
    """The preset's ModeConfig with the paper tolerances rescaled from its length to ``seq``.

    The paper's tolerances grow as sqrt(T) because the absolute residual is a norm over T
    positions; the presets set them for their own training length (``Preset.seq_len``, or
    ``subseq_len`` when they solve in chunks). Tiny presets (no paper settings) are left as is.
    """
    preset = get_preset(preset_name)
    modes = preset.config.modes
    if modes.forward.stop_mode != "abs":  # not a paper-settings preset
        return modes
    solved = modes.subseq_len or preset.seq_len
    now = min(seq, modes.subseq_len) if modes.subseq_len else seq
    factor = math.sqrt(now / solved)
    eval_fwd = modes.eval_forward and scale_tol(modes.eval_forward, factor)
    return replace(modes, forward=scale_tol(modes.forward, factor),
                   backward=scale_tol(modes.backward, factor), eval_forward=eval_fwd)


def make_core(preset_name: str, *, seq: int, device: torch.device | str = "cpu",
              mem_len: Optional[int] = None, seed: int = 0) -> SequenceCore:
    """The core of a preset (no embedding, no softmax) in ``deq`` mode with paper settings.

    ``device='meta'`` builds it without memory (shapes only). ``mem_len`` overrides the
    transformer's memory length. The same seed gives the same weights on every real device.
    """
    cfg = get_preset(preset_name).config
    core_cfg = replace(cfg.core, d_input=cfg.d_embed)
    if mem_len is not None and isinstance(core_cfg, TransformerConfig):
        core_cfg = replace(core_cfg, mem_len=mem_len)
    torch.manual_seed(seed)
    with torch.device(device):
        core = build_core(core_cfg, paper_modes(preset_name, seq))
    return core


def mem_len_of(core: SequenceCore) -> int:
    """Memory positions the core carries (0 for the TrellisNet's short history padding)."""
    return getattr(core.cfg, "mem_len", 0)


def d_embed_of(core: SequenceCore) -> int:
    """Width of the core's input (the embedding width)."""
    return core.cfg.input_width


def set_mode(core: SequenceCore, mode: str, depth: Optional[int] = None,
             checkpoint: bool = False) -> None:
    """Switch the core to ``deq`` or ``unrolled`` (depth L, optionally checkpointed)."""
    changes: dict = {"checkpoint": checkpoint}
    if depth is not None:
        changes["unrolled_depth"] = depth
    core.set_mode(mode, **changes)


def random_inputs(core: SequenceCore, batch: int, seq: int, device: torch.device | str,
                  seed: int = 1) -> torch.Tensor:
    """Embedding-sized inputs ``(B, T, d_embed)``: the tables leave the embedding lookup out."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, d_embed_of(core), generator=gen)
    return x.to(device=device, dtype=core.state_dtype())


def steady_memory(core: SequenceCore, batch: int, device: torch.device | str,
                  seed: int = 2) -> Memory:
    """A full memory as in steady-state training: ``mem_len`` random positions of history.

    Built through the core's own ``next_memory`` from a random previous segment (random z and
    embeddings), so the shapes are those of training; the values need not be an equilibrium.
    """
    length = max(mem_len_of(core), 1)
    memory = core.init_memory(batch, torch.device(device))
    x_prev = random_inputs(core, batch, length, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    z_prev = torch.randn(core.state_shape(batch, length), generator=gen)
    z_prev = z_prev.to(device=device, dtype=core.state_dtype())
    with torch.no_grad():
        inj = core.inject(x_prev, memory)
        return tuple(t.detach() for t in core.next_memory(memory, x_prev, z_prev, inj))


def readout(core: SequenceCore, device: torch.device | str, seed: int = 3) -> torch.Tensor:
    """A fixed random unit direction ``(d_out,)``: the loss reads the core's output along it.

    A plain ``features.square().mean()`` would be degenerate: the post-LN transformer's output
    has a constant norm per position, so that loss has no gradient through the last layer norm
    (and the DEQ's adjoint solve would end at once). A random linear readout averaged over the
    positions gives per-position gradients of the size a language model's loss gives.
    """
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(core.d_out, generator=gen)
    return (w / w.norm()).to(device)


def output_loss(features: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A scalar loss on the core's output (the decoder and softmax are excluded)."""
    return (features.float() * w).sum(-1).mean()


def core_loss(core: SequenceCore, x: torch.Tensor, memory: Memory,
              w: torch.Tensor) -> torch.Tensor:
    """The loss of one segment through the core's own forward (any mode)."""
    return output_loss(core(x, memory).features, w)


# Solver options of the DEQ variants of the runtime table: the default (per-sample stopping,
# compaction), f on the whole batch (finished samples only masked), and no per-sample stopping.
VARIANT_OPTIONS: dict[str, dict[str, bool]] = {
    "deq": {},
    "deq_no_compact": {"compact": False},
    "deq_no_mask": {"compact": False, "per_sample": False},
}


def with_solver_options(modes: ModeConfig, options: dict[str, bool]) -> dict[str, Any]:
    """``set_mode`` changes that add ``options`` to every solve's settings of ``modes``."""
    def add(settings: Optional[SolverSettings]) -> Optional[SolverSettings]:
        return settings and replace(settings, options={**settings.options, **options})

    return {"forward": add(modes.forward), "backward": add(modes.backward),
            "eval_forward": add(modes.eval_forward)}


def with_solver_method(modes: ModeConfig, method: str) -> dict[str, Any]:
    """``set_mode`` changes that run every solve of ``modes`` with the registered solver
    ``method`` at the same iterations, tolerance, stop mode and history (no other options)."""
    def swap(settings: Optional[SolverSettings]) -> Optional[SolverSettings]:
        return settings and replace(settings, method=method, options={})

    return {"forward": swap(modes.forward), "backward": swap(modes.backward),
            "eval_forward": swap(modes.eval_forward)}


def zero_grads(module: torch.nn.Module) -> None:
    """Drop the gradients (so each measured step allocates its own)."""
    for p in module.parameters():
        p.grad = None


def solver_summary(stats: Optional[dict[str, SolverStats]]) -> dict[str, Any]:
    """Per-sample step counts, residuals and statuses of the forward (and backward) solves."""
    out: dict[str, Any] = {}
    for name, st in (stats or {}).items():
        summary = st.summary()
        codes = st.status.tolist()
        out[f"{name}_nstep"] = {
            "mean": summary["nstep"], "max": int(st.nstep.max()), "min": int(st.nstep.min()),
            "abs_residual_mean": summary["abs_residual"],
            "status": {s.name.lower(): codes.count(int(s)) for s in Status if codes.count(int(s))}}
    return out


def stats_of(core: SequenceCore) -> Optional[dict[str, SolverStats]]:
    """The solver statistics of the core's last DEQ forward (the first chunk), if any."""
    return core.solver_stats[0] if core.solver_stats else None

