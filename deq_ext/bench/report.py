"""The human-readable report of a run of ``python -m deq_ext.bench``."""

from __future__ import annotations

import math
from typing import Any, Optional


def _fmt(v: Optional[float], spec: str = ".3f") -> str:
    """A figure, or ``n/a`` when it is missing (an untimed f) or NaN."""
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _range(sp: Optional[dict[str, Any]]) -> str:
    if not sp or sp.get("min") is None:
        return "-"
    return f"{sp['min']:.3f}..{sp['max']:.3f}"


def _bracket(sp: Optional[dict[str, Any]]) -> str:
    return "" if not sp or sp.get("min") is None else f"[{sp['min']:.2f}..{sp['max']:.2f}]"


def _problem_sizes(problem: dict[str, Any]) -> str:
    if problem["kind"] == "block":
        return f"W {problem['block']}x{problem['block']}"
    return f"width {problem['width']}, hidden {problem['hidden']}"


def _active_fraction_lines(section: Optional[dict[str, Any]]) -> list[str]:
    if not section:
        return []
    z = section["sizes"]
    head = (f"  {'active':>8}{'deq_ext iter':>14}{'deq_ext passes':>16}{'reference passes':>18}"
            f"{'torchdeq iter':>15}")
    lines = ["", f"ms per iteration against active samples (B={z['batch']} D={z['dim']} m={z['m']}; "
                 f"torchdeq step {section['torchdeq_step_ms']:.3f} ms)", head]
    for p in section["points"]:
        lines.append(f"  {p['active']:>4}/{z['batch']:<3}{_fmt(p.get('deq_ext_iteration_ms')):>14}"
                     f"{_fmt(p.get('deq_ext_passes_ms')):>16}{_fmt(p['reference_passes_ms']):>18}"
                     f"{_fmt(p['torchdeq_iteration_ms']):>15}")
    return lines


def _per_iteration_lines(results: dict[str, Any]) -> list[str]:
    """Per loop iteration: total and solver time, and the passes' bandwidth floor where known."""
    rows = [(n, s) for n, s in results["solves"].items() if s.get("iterations")]
    if not rows:
        return []
    bw = (results.get("bandwidth") or {}).get("copy")
    floor = (f"floor: the fused passes' bytes at the copy bandwidth ({bw['gbps']:.1f} GB/s)"
             if bw else "no floor without the bandwidth section")
    head = (f"  {'solver':<24}{'iterations':>11}{'total ms':>10}{'solver ms':>11}{'floor ms':>10}"
            f"{'solver/floor':>14}")
    lines = ["", f"per loop iteration (f calls - 1; {floor})", head]
    for name, s in rows:
        lines.append(f"  {name:<24}{s['iterations']:>11d}{_fmt(s.get('total_ms_per_iter')):>10}"
                     f"{_fmt(s.get('solver_ms_per_iter')):>11}{_fmt(s.get('floor_ms_per_iter')):>10}"
                     f"{_fmt(s.get('solver_over_floor'), '.2f'):>14}")
    return lines


def format_table(results: dict[str, Any]) -> str:
    """The human-readable report (ratios last)."""
    cfg = results["config"]
    lines = [
        f"deq_ext.bench  {results['timestamp']}",
        f"device: {results['device']}",
        f"torch {results['versions']['torch']} (cuda {results['versions']['torch_cuda']}), "
        f"deq_ext {results['versions']['deq_ext']}, torchdeq {results['versions']['torchdeq']}; "
        f"load average at start {results.get('load_average_start')}",
        f"problem '{results['problem']['kind']}': B={cfg['batch']} D={cfg['dim']} {cfg['dtype']} on "
        f"{cfg['device']}, f = {results['problem']['f']} ({_problem_sizes(results['problem'])}), "
        f"rho {cfg['rho_min']}..{cfg['rho_max']}",
        f"solve: {cfg['method']} max_iter={cfg['max_iter']} tol={cfg['tol']:g} (abs) memory={cfg['memory']} "
        f"compact={cfg['compact']}; each solver's median of {cfg['repeat']} interleaved round(s) "
        "after one warm-up, with the min..max of its total",
        "",
    ]
    head = (f"{'solver':<24}{'total s':>9}{'min..max':>14}{'f s':>9}{'solver s':>10}{'f calls':>9}"
            f"{'f rows':>8}{'nstep mean/max':>16}{'converged':>11}{'max |f(z)-z|':>14}")
    lines += [head, "-" * len(head)]
    for name, s in results["solves"].items():
        lines.append(
            f"{name:<24}{s['total_s']:>9.3f}{_range(s.get('total_s_spread')):>14}"
            f"{_fmt(s['f_s']):>9}{_fmt(s['solver_s']):>10}"
            f"{_fmt(s['f_calls'], '.0f'):>9}{_fmt(s['f_rows'], '.0f'):>8}"
            f"{s['nstep_mean']:>10.1f}/{s['nstep_max']:<5.0f}"
            f"{int(s['converged']):>6d}/{cfg['batch']:<4d}{s['max_abs_residual']:>14.2e}")
    for name, why in (results.get("skipped_solvers") or {}).items():
        lines.append(f"{name:<24}skipped: {why}")
    lines += _per_iteration_lines(results)
    bw = results.get("bandwidth")
    if bw:
        z = bw["sizes"]
        lines += ["", f"bandwidth (B={z['batch']} D={z['dim']} m={z['m']} {cfg['dtype']}, "
                      f"median of {z['reps']})"]
        c = bw["copy"]
        lines.append(f"  device copy ({z['copy_mib']} MiB)      {c['gbps']:>9.1f} GB/s")
        if "fused" in bw:
            fu = bw["fused"]
            lines.append(f"  fused reduce+expand_       {fu['gbps']:>9.1f} GB/s  "
                         f"{fu['seconds'] * 1e3:8.3f} ms/iter  ({fu['fraction_of_copy']:.0%} of copy; "
                         f"{fu['bytes'] / 2**20:.1f} MiB/iter)")
        else:
            lines.append(f"  fused passes skipped: {bw['fused_skipped']}")
        td = bw["torchdeq_step"]
        lines.append(f"  torchdeq-style step        {'':>14}  {td['seconds'] * 1e3:8.3f} ms/iter  "
                     f"({td['ops']})")
    lines += _active_fraction_lines(results.get("active_fraction"))
    r = results["ratios"]
    sp = results.get("ratio_spreads") or {}
    lines += ["", "ratios vs torchdeq (same run; per-round min..max in brackets)"]
    rows = [
        ("f share of torchdeq's solve time", r.get("torchdeq_f_share")),
        (f"deq_ext solver overhead (solver s / torchdeq's) {_bracket(sp.get('solver_overhead_ratio'))}",
         r.get("solver_overhead_ratio")),
        (f"deq_ext total speedup (torchdeq total / deq_ext's) {_bracket(sp.get('total_speedup'))}",
         r.get("total_speedup")),
        ("deq_ext f calls / torchdeq's", r.get("f_calls_ratio")),
        ("deq_ext f rows / torchdeq's", r.get("f_rows_ratio")),
        ("deq_ext f rows saved by compaction (vs no compact)", r.get("compaction_rows_saved")),
        ("deq_ext total speedup if its solver cost nothing but f (Amdahl limit)",
         r.get("amdahl_speedup_limit")),
        ("deq_ext solver time / bandwidth floor of its passes", r.get("solver_over_floor")),
        ("deq_ext total speedup from compaction", r.get("compaction_total_speedup")),
        ("deq_ext speedup from reading the device every 4th iteration", r.get("check_every_4_speedup")),
        ("deq_ext speedup from never reading it (max_iter steps)", r.get("no_sync_speedup")),
        ("CUDA-graph replay speedup (deq_ext total / deq_ext[graph]'s)", r.get("graph_speedup")),
        ("reference twin solver overhead", r.get("reference_solver_overhead_ratio")),
        ("reference twin total speedup", r.get("reference_total_speedup")),
        ("reference twin f rows / torchdeq's", r.get("reference_f_rows_ratio")),
        ("fused step speedup (torchdeq-style step / fused)", (bw or {}).get("step_speedup")),
    ]
    lines += [f"  {label:<72}{_fmt(v):>8}" for label, v in rows
              if label.startswith("deq") or v is not None]
    if results.get("busy"):
        lines += ["", f"WARNING: the machine was busy ({results['busy']}); the timings may be off"]
    return "\n".join(lines)
