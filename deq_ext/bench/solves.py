"""The solvers under test and the timed, interleaved solves that compare them."""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import torch

import deq_ext

from .config import Config
from .env import median_index, progress, ratio, spread, sync
from .limits import passes_bytes
from .problem import Problem, TimedF

SOLVER_EXT = "deq_ext"
SOLVER_REF = "deq_ext[reference]"
SOLVER_TD = "torchdeq"
SOLVER_FULL = "deq_ext[no compact]"
SOLVER_CHECK4 = "deq_ext[check_every=4]"
SOLVER_NOSYNC = "deq_ext[no sync]"
SOLVER_GRAPH = "deq_ext[graph]"

# Rows whose f is not timed: a CUDA-graph replay does not call the Python f, so its calls, rows
# and time would be those of the capture only (its total time is measured all the same).
UNTIMED_F = frozenset({SOLVER_GRAPH})
# Rows that need a solver option that may not exist yet, or not for these settings: a TypeError
# (unknown option) or ValueError (unsupported combination) from the solver in the warm-up drops
# the row with a logged note, kept in the results, instead of failing the run.
OPTIONAL = frozenset({SOLVER_GRAPH})

Runner = Callable[[Problem, Config, TimedF], tuple[torch.Tensor, torch.Tensor]]
"""Solves the problem with f = the timed wrapper; returns (z, iterations per sample)."""


def _method_options(cfg: Config) -> dict[str, Any]:
    if cfg.method == "fixed_point":
        return {}
    # A history of the state dtype, as torchdeq's: the rows compare the solvers, and the bytes
    # of the passes (passes_bytes) count the history at that width. (Broyden's own default
    # under a float32 state is bfloat16; benchmarks.history_precision measures what it saves.)
    return {"memory": cfg.memory, "history_dtype": cfg.torch_dtype}


def _run_deq_ext(use_reference: bool, compact: bool, **extra: Any) -> Runner:
    """deq_ext's solver; ``extra``: more solver options (``check_every``, ``stop_early``: how
    often it reads the device; ``graph``: CUDA-graph replay)."""
    def run(problem: Problem, cfg: Config, timed: TimedF) -> tuple[torch.Tensor, torch.Tensor]:
        opts = dict(method=cfg.method, max_iter=cfg.max_iter, tol=cfg.tol, stop_mode="abs",
                    use_reference=use_reference, **_method_options(cfg), **extra)
        if compact:
            # x and rho as batched inputs: f is then only evaluated on the active samples.
            res = deq_ext.solve(timed, problem.z0, inputs=(problem.x, problem.rho), **opts)
        else:
            res = deq_ext.solve(lambda z: timed(z, problem.x, problem.rho), problem.z0,
                                compact=False, **opts)
        return res.z, res.nstep
    return run


def _run_torchdeq(problem: Problem, cfg: Config, timed: TimedF) -> tuple[torch.Tensor, torch.Tensor]:
    from torchdeq.solver import anderson_solver, broyden_solver, fixed_point_iter

    f = lambda z: timed(z, problem.x, problem.rho)  # noqa: E731
    common = dict(max_iter=cfg.max_iter, tol=cfg.tol, stop_mode="abs")
    if cfg.method == "broyden":
        z, _, _ = broyden_solver(f, problem.z0, LBFGS_thres=cfg.memory, **common)
    elif cfg.method == "anderson":
        z, _, _ = anderson_solver(f, problem.z0, m=cfg.memory, **common)
    else:
        z, _, _ = fixed_point_iter(f, problem.z0, **common)
    # The whole batch iterates together: every sample took the loop's step count
    # (one evaluation before the loop, one per step, no line search).
    steps = torch.full((cfg.batch,), timed.calls - 1, dtype=torch.int64)
    return z, steps


def torchdeq_available() -> bool:
    try:
        from torchdeq.solver import anderson_solver, broyden_solver, fixed_point_iter  # noqa: F401
    except ImportError:
        return False
    return True


def select_solvers(cfg: Config, graph: Optional[bool] = None) -> dict[str, Runner]:
    """The solvers to run, in the order they are run in each round.

    ``graph``: include the CUDA-graph row (``graph=True``); by default on CUDA only.
    """
    solvers: dict[str, Runner] = {SOLVER_EXT: _run_deq_ext(use_reference=False, compact=cfg.compact)}
    if cfg.compact:
        # The same solver evaluating f on the whole batch: what compaction saves.
        solvers[SOLVER_FULL] = _run_deq_ext(use_reference=False, compact=False)
    # Fewer device reads: every 4th iteration, or none (max_iter steps, f on the whole batch).
    solvers[SOLVER_CHECK4] = _run_deq_ext(use_reference=False, compact=cfg.compact, check_every=4)
    solvers[SOLVER_NOSYNC] = _run_deq_ext(use_reference=False, compact=cfg.compact,
                                          stop_early=False)
    if cfg.reference:
        solvers[SOLVER_REF] = _run_deq_ext(use_reference=True, compact=cfg.compact)
    if graph is None:
        graph = cfg.torch_device.type == "cuda"
    if graph:
        solvers[SOLVER_GRAPH] = _run_deq_ext(use_reference=False, compact=cfg.compact, graph=True)
    if cfg.torchdeq:
        if torchdeq_available():
            solvers[SOLVER_TD] = _run_torchdeq
        else:
            progress("torchdeq is not importable: skipping it (pip install torchdeq)")
    return solvers


def solve_once(runner: Runner, problem: Problem, cfg: Config, time_f: bool = True) -> dict[str, Any]:
    """One timed solve: total, f and solver time, f calls/rows, loop iterations, steps and the
    outcome; with ``time_f=False`` only the total, the steps and the outcome (f's figures None).

    The host waits for the device once before and once after the solve, never inside it: on
    CUDA, f is timed with events (:class:`TimedF`). ``iterations`` counts the loop's iterations
    as f calls less the one before the loop (the bench runs no line search).
    """
    device = cfg.torch_device
    timed = TimedF(problem.f, device, clock=None if time_f else "none")
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        z, steps = runner(problem, cfg, timed)
    sync(device)
    total = time.perf_counter() - t0
    with torch.no_grad():
        res = problem.residual(z)
    fig: dict[str, Any] = {"total_s": total, "f_s": None, "solver_s": None, "f_calls": None,
                           "f_rows": None, "iterations": None}
    if time_f:
        f_s = timed.seconds
        iterations = max(timed.calls - 1, 1)
        fig.update(f_s=f_s, solver_s=total - f_s, f_calls=timed.calls, f_rows=timed.rows,
                   iterations=iterations, total_ms_per_iter=total / iterations * 1e3,
                   solver_ms_per_iter=(total - f_s) / iterations * 1e3)
    fig["passes_bytes"] = (passes_bytes(steps, problem.z0.shape[1], cfg.memory,
                                        cfg.torch_dtype.itemsize)
                           if cfg.method == "broyden" else None)
    steps = steps.double()
    fig.update(nstep_mean=float(steps.mean()), nstep_max=float(steps.max()),
               converged=int((res < cfg.tol).sum()), max_abs_residual=float(res.max()))
    return fig


def bench_solvers(cfg: Config, problem: Problem, solvers: Optional[dict[str, Runner]] = None,
                  skipped: Optional[dict[str, str]] = None) -> dict[str, dict[str, Any]]:
    """Warm up every solver once, then run ``repeat`` interleaved rounds.

    Each solver reports its median round (by total time) whole, so that every figure in a row
    comes from one run, with the spread of its total time over the rounds and every round kept.
    ``solvers``: the runners (default :func:`select_solvers`). An optional row whose solver
    rejects its option (``TypeError``, ``ValueError``) in the warm-up is dropped, with the reason
    logged and put in ``skipped``.
    """
    solvers = dict(select_solvers(cfg) if solvers is None else solvers)
    for name, runner in list(solvers.items()):
        progress(f"warm-up {name}")
        try:
            solve_once(runner, problem, cfg, time_f=name not in UNTIMED_F)
        except (TypeError, ValueError) as exc:
            if name not in OPTIONAL:
                raise
            progress(f"skipping {name}: the solver rejects its option ({type(exc).__name__}: {exc})")
            del solvers[name]
            if skipped is not None:
                skipped[name] = str(exc)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in solvers}
    for r in range(cfg.repeat):
        for name, runner in solvers.items():
            fig = solve_once(runner, problem, cfg, time_f=name not in UNTIMED_F)
            runs[name].append(fig)
            f_part = ("f untimed" if fig["f_s"] is None else
                      f"f {fig['f_s']:.3f} s, {fig['f_calls']} calls")
            progress(f"round {r + 1}/{cfg.repeat} {name:<18} total {fig['total_s']:.3f} s, "
                     f"{f_part}, {fig['converged']}/{cfg.batch} converged")
    out: dict[str, dict[str, Any]] = {}
    for name, rs in runs.items():
        i = median_index([run["total_s"] for run in rs])
        out[name] = {**rs[i], "median_round": i,
                     "total_s_spread": spread([run["total_s"] for run in rs]), "runs": rs}
    return out


def _per_round(solves: dict[str, dict[str, Any]], num: str, den: str,
               key: str) -> dict[str, Any]:
    """The spread over rounds of ``solves[num][key] / solves[den][key]``, round by round (the
    solvers of one round ran back to back, so their ratio shares the machine's state)."""
    pairs = zip(solves[num]["runs"], solves[den]["runs"])
    return spread([ratio(a[key], b[key]) for a, b in pairs])


def solver_ratios(solves: dict[str, dict[str, Any]]) -> dict[str, Optional[float]]:
    """Every ratio relative to torchdeq, for the compiled solver and for the reference twin."""
    td = solves.get(SOLVER_TD)
    out: dict[str, Optional[float]] = {}
    for prefix, name in (("", SOLVER_EXT), ("reference_", SOLVER_REF)):
        mine = solves.get(name)
        if mine is None:
            continue
        get = (lambda k: td[k]) if td else (lambda k: None)
        out[prefix + "solver_overhead_ratio"] = ratio(mine["solver_s"], get("solver_s"))
        out[prefix + "total_speedup"] = ratio(get("total_s"), mine["total_s"])
        out[prefix + "f_calls_ratio"] = ratio(mine["f_calls"], get("f_calls"))
        out[prefix + "f_rows_ratio"] = ratio(mine["f_rows"], get("f_rows"))
        out[prefix + "f_time_ratio"] = ratio(mine["f_s"], get("f_s"))
    if td:
        out["torchdeq_f_share"] = ratio(td["f_s"], td["total_s"])
    for key, name in (("check_every_4_speedup", SOLVER_CHECK4), ("no_sync_speedup", SOLVER_NOSYNC),
                      ("graph_speedup", SOLVER_GRAPH)):
        if name in solves:
            out[key] = ratio(solves[SOLVER_EXT]["total_s"], solves[name]["total_s"])
    full = solves.get(SOLVER_FULL)
    if full is not None:
        kept = ratio(solves[SOLVER_EXT]["f_rows"], full["f_rows"])
        out["compaction_rows_saved"] = None if kept is None else 1 - kept
        out["compaction_total_speedup"] = ratio(full["total_s"], solves[SOLVER_EXT]["total_s"])
    return out


def ratio_spreads(solves: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-round spreads of the ratios that have targets or headline rows."""
    out: dict[str, dict[str, Any]] = {}
    if SOLVER_TD in solves:
        out["total_speedup"] = _per_round(solves, SOLVER_TD, SOLVER_EXT, "total_s")
        out["solver_overhead_ratio"] = _per_round(solves, SOLVER_EXT, SOLVER_TD, "solver_s")
    if SOLVER_FULL in solves:
        out["compaction_total_speedup"] = _per_round(solves, SOLVER_FULL, SOLVER_EXT, "total_s")
    return out

