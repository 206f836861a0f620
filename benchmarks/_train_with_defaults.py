"""One training run under the DEQ layer's current (``new``) or previous (``old``) Broyden defaults.

``python -m benchmarks._train_with_defaults --defaults old|new --task digits|copy_memory
--record PATH -- <arguments of python -m train.digits / train.copy_memory>``

The child process of :mod:`benchmarks.training_defaults`: each run gets a process of its own, so a
patch never outlives its run.

``new`` changes nothing: a Broyden solve of the DEQ layer (``SolverSettings.memory=None``) keeps a
ring of :data:`deq_ext.layer.DEFAULT_MEMORY` pairs (16 forward, 8 backward, at most ``max_iter``)
that restarts when full (``restart=True``), stored in bfloat16 under a float32 state.

``old`` brings back the defaults from before that change, patched in this process before anything
is built:

* ``deq_ext.layer.DEFAULT_MEMORY``: both entries :data:`OLD_MEMORY`, so that
  ``SolverSettings.resolved`` (which takes the min with ``max_iter``) gives ``memory = max_iter``:
  every pair of the solve, the solver's own default. ``resolved`` still passes ``restart=True``,
  which never fires with ``m = max_iter``: a Broyden step (``_BroydenSolve.step``) restarts an
  active sample whose pair count ``npairs`` has reached m, a step adds at most one pair, and step
  ``it`` (``0 <= it < max_iter``, the loop of ``MaskedSolve.run``) starts from at most
  ``it < m`` pairs. The spy below counts the restarts of every solve to check it (``restarts``
  must be 0).
* ``deq_ext.solvers.broyden.default_history_dtype``: the state dtype (float32) instead of
  bfloat16 (``_checked`` looks the function up in its module at every solve).

Checks, recorded in the JSON written to ``--record`` (the child exits with status 3 when one
fails):

* ``precheck``: before training, a tiny DEQ (:class:`deq_ext.DEQ`, 32 values per sample) whose
  forward and backward solves both run to their 20-step limit, under the spy: every solve's ring
  size, history dtype and restarts (``new`` must restart both rings, ``old`` neither); and
  ``deq_ext.solvers.broyden_workspace``'s history bytes per stored value (2: bfloat16, 4: float32)
  for the ring ``resolved`` gives.
* ``training``: the same spy over the whole training run: every Broyden solve, by phase
  (``train``, ``eval``, ``final_eval``) and direction (``forward``, ``backward``), with its ring
  size, ``restart`` flag, history dtype and iteration limit, the samples' mean steps and the
  restarts of active samples.

The spy changes no result: it wraps ``SolverSettings.resolved`` (to learn the direction of the
solve that follows), ``_BroydenSolve.__init__``, ``step`` and ``result`` (to read the solve's
state) and the task's ``evaluate`` (to learn the phase).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from collections import Counter, defaultdict
from typing import Any, Callable, Optional, Sequence

import torch

from deq_ext import DEQ, SolverSettings, Status
from deq_ext.bench import write_json

# The modules themselves: ``deq_ext.solvers.broyden`` as an attribute is the solver function.
layer = importlib.import_module("deq_ext.layer")
broyden_mod = importlib.import_module("deq_ext.solvers.broyden")

DEFAULTS = ("old", "new")
TASKS = {"digits": "DigitsTask", "copy_memory": "CopyTask"}
# The ring size ``old`` asks for: larger than any iteration limit, so resolved's min gives max_iter.
OLD_MEMORY = 1 << 30
# The tiny DEQ of the pre-check: its solves run to this limit (tolerance out of reach).
PRECHECK_ITER = 20
PRECHECK_D = 32
PRECHECK_B = 4


def _state_dtype_history(state_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The history dtype before the change: the state dtype (float32 under float32)."""
    del device
    return state_dtype


def apply_defaults(which: str) -> dict[str, Any]:
    """Put the layer's Broyden defaults ``which`` in place in this process; returns what they are."""
    if which not in DEFAULTS:
        raise ValueError(f"defaults must be one of {DEFAULTS}, got {which!r}")
    if which == "old":
        layer.DEFAULT_MEMORY.update(forward=OLD_MEMORY, backward=OLD_MEMORY)  # in place: every alias
        broyden_mod.default_history_dtype = _state_dtype_history
    return {"defaults": which, "DEFAULT_MEMORY": dict(layer.DEFAULT_MEMORY),
            "history_dtype_under_float32": str(
                broyden_mod.default_history_dtype(torch.float32, torch.device("cpu")))}


class SolveSpy:
    """Records every Broyden solve of the process while installed (see the module's docstring)."""

    def __init__(self) -> None:
        self.direction: Optional[str] = None  # of the next solve (set by resolved)
        self.phase = "train"
        self.configs: Counter[tuple] = Counter()
        self.steps: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
        self.restarts: Counter[tuple[str, str]] = Counter()
        self._undo: list[Callable[[], None]] = []

    def _patch(self, owner: Any, name: str, wrapper: Callable[[Callable], Callable]) -> None:
        own = name in owner.__dict__  # else inherited: the class gets its own, removed after
        original = getattr(owner, name)
        setattr(owner, name, wrapper(original))
        self._undo.append(lambda: setattr(owner, name, original) if own else delattr(owner, name))

    def install(self, task_cls: Optional[type] = None) -> "SolveSpy":
        spy = self

        def resolved(orig: Callable) -> Callable:
            def wrapped(settings: SolverSettings, direction: str) -> SolverSettings:
                spy.direction = direction
                return orig(settings, direction)
            return wrapped

        def init(orig: Callable) -> Callable:
            def wrapped(solve: Any, f: Any, z0: torch.Tensor, opts: Any, **kw: Any) -> None:
                orig(solve, f, z0, opts, **kw)
                if f is None:  # broyden_workspace: sizes only, no solve
                    return
                solve._spy_key = (spy.phase, spy.direction or "unknown")
                spy.direction = None  # one resolved call, one solve
                spy.configs[(*solve._spy_key, int(solve.max_iter), int(solve.m),
                             bool(solve.restart), str(solve.history.dtype))] += 1
            return wrapped

        def step(orig: Callable) -> Callable:
            def wrapped(solve: Any) -> None:
                if solve.restart:  # the samples whose full ring this step restarts
                    full = (solve.npairs >= solve.m) & (solve.status == Status.ACTIVE)
                    spy.restarts[solve._spy_key] += int(full.sum())
                orig(solve)
            return wrapped

        def result(orig: Callable) -> Callable:
            def wrapped(solve: Any, *args: Any, **kw: Any) -> Any:
                res = orig(solve, *args, **kw)
                acc = spy.steps[solve._spy_key]
                acc[0] += int(res.nstep.sum())
                acc[1] += int(res.nstep.numel())
                acc[2] += 1
                return res
            return wrapped

        def evaluate(orig: Callable) -> Callable:
            def wrapped(task: Any, split: str, final: bool) -> Any:
                spy.phase = "final_eval" if final else "eval"
                try:
                    return orig(task, split, final)
                finally:
                    spy.phase = "train"
            return wrapped

        self._patch(SolverSettings, "resolved", resolved)
        self._patch(broyden_mod._BroydenSolve, "__init__", init)
        self._patch(broyden_mod._BroydenSolve, "step", step)
        self._patch(broyden_mod._BroydenSolve, "result", result)
        if task_cls is not None:
            self._patch(task_cls, "evaluate", evaluate)
        return self

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()

    def summary(self) -> dict[str, Any]:
        """Per ``phase/direction``: solves, samples, mean steps per sample, restarts of active
        samples, and the configurations seen (ring size, restart, history dtype, limit)."""
        out: dict[str, Any] = {}
        for key in sorted(set(self.steps) | set(self.restarts)):
            total, samples, solves = self.steps[key]
            configs = [{"max_iter": c[2], "memory": c[3], "restart": c[4], "history_dtype": c[5],
                        "solves": n} for c, n in sorted(self.configs.items()) if c[:2] == key]
            out["/".join(key)] = {"solves": solves, "samples": samples,
                                  "steps_mean": total / samples if samples else None,
                                  "restarts": self.restarts[key], "configs": configs}
        return out


def expected_memory(which: str, direction: str, max_iter: int) -> int:
    """The ring size a layer solve of ``direction`` must get under ``which``."""
    if which == "old":
        return max_iter
    return min(layer.DEFAULT_MEMORY[direction], max_iter)


def problems(which: str, solves: dict[str, Any], must_restart: bool = False) -> list[str]:
    """What in a spy summary contradicts the defaults ``which`` (empty: all as expected).

    ``old``: every ring holds ``max_iter`` pairs in float32 and never restarts. ``new``: rings of
    ``min(DEFAULT_MEMORY[direction], max_iter)`` pairs in bfloat16 with ``restart=True``; with
    ``must_restart`` (solves run past their ring) each direction restarted at least once.
    """
    out = []
    dtype = "torch.float32" if which == "old" else "torch.bfloat16"
    if not solves:
        out.append("no Broyden solve was seen")
    for key, entry in solves.items():
        direction = key.split("/")[1]
        if direction not in ("forward", "backward"):
            out.append(f"{key}: a solve outside the layer's resolved settings")
            continue
        for c in entry["configs"]:
            want = expected_memory(which, direction, c["max_iter"])
            if c["memory"] != want:
                out.append(f"{key}: ring of {c['memory']} pairs, expected {want}")
            if c["history_dtype"] != dtype:
                out.append(f"{key}: history dtype {c['history_dtype']}, expected {dtype}")
            if which == "new" and not c["restart"]:
                out.append(f"{key}: restart off")
        if which == "old" and entry["restarts"]:
            out.append(f"{key}: {entry['restarts']} restarts with memory = max_iter")
        if which == "new" and must_restart and not entry["restarts"]:
            out.append(f"{key}: no restart although the solves ran past the ring")
    return out


def precheck(which: str) -> dict[str, Any]:
    """A tiny DEQ whose forward and backward solves run to their limit, under the spy; and the
    history bytes per value that ``broyden_workspace`` reports for each resolved ring."""
    gen = torch.Generator().manual_seed(0)
    weight = 2.0 * torch.randn(PRECHECK_D, PRECHECK_D, generator=gen) / PRECHECK_D ** 0.5

    def f(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ weight) + x

    unreachable = SolverSettings(max_iter=PRECHECK_ITER, tol=1e-12, stop_mode="abs",
                                 options={"stall_patience": 0})
    deq = DEQ(f, forward=unreachable, backward=unreachable)
    x = torch.randn(PRECHECK_B, PRECHECK_D, generator=gen).requires_grad_()
    spy = SolveSpy().install()
    try:
        deq(x).square().sum().backward()
    finally:
        spy.uninstall()
    solves = spy.summary()
    workspace = {}
    z0 = torch.zeros(PRECHECK_B, PRECHECK_D)
    for direction in ("forward", "backward"):
        kw = unreachable.resolved(direction).solver_kwargs()
        ws = broyden_mod.broyden_workspace(z0, **kw)
        workspace[direction] = {
            "memory": kw["memory"], "restart": kw.get("restart", False),
            "history_bytes_per_value": ws["history"] / (2 * PRECHECK_B * kw["memory"] * PRECHECK_D)}
    found = problems(which, solves, must_restart=True)
    per_value = 4 if which == "old" else 2
    for direction, w in workspace.items():
        if w["history_bytes_per_value"] != per_value:
            found.append(f"broyden_workspace {direction}: {w['history_bytes_per_value']} bytes per "
                         f"stored value, expected {per_value}")
        if w["memory"] != expected_memory(which, direction, PRECHECK_ITER):
            found.append(f"resolved {direction}: memory {w['memory']}")
    return {"max_iter": PRECHECK_ITER, "solves": solves, "workspace": workspace,
            "problems": found, "ok": not found}


def run(which: str, task: str, train_args: Sequence[str]) -> dict[str, Any]:
    """Train ``task`` with ``train_args`` under the defaults ``which``; the run's figures and
    checks."""
    defaults = apply_defaults(which)
    module = importlib.import_module(f"train.{task}")
    pre = precheck(which)
    spy = SolveSpy().install(getattr(module, TASKS[task]))
    cpu0, t0 = time.process_time(), time.perf_counter()
    try:
        summary = module.main(list(train_args))
    finally:
        spy.uninstall()
    cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - t0
    solves = spy.summary()
    found = problems(which, solves)
    losses = summary.pop("losses")
    return {
        **defaults, "task": task, "train_args": list(train_args),
        "check": {"ok": pre["ok"] and not found, "precheck": pre,
                  "training": {"problems": found, "ok": not found}},
        "solves": solves,
        "summary": summary,
        "first_train_loss": losses[0] if losses else None,
        "last_train_loss": losses[-1] if losses else None,
        "final_train_loss_last_50_mean": statistics.fmean(losses[-50:]) if losses else None,
        "process_cpu_s": cpu_s, "process_wall_s": wall_s,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``--defaults --task --record -- <training arguments>``, run, write the record."""
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, train_args = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(prog="python -m benchmarks._train_with_defaults",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--defaults", choices=DEFAULTS, required=True)
    parser.add_argument("--task", choices=list(TASKS), required=True)
    parser.add_argument("--record", required=True, help="write the run's JSON record here")
    args = parser.parse_args(argv)
    record = run(args.defaults, args.task, train_args)
    write_json(record, args.record)
    if not record["check"]["ok"]:
        pre = record["check"]["precheck"]["problems"]
        print(f"deq_ext defaults {args.defaults!r} not in effect: "
              f"{pre + record['check']['training']['problems']}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
