"""CI smoke run of the kernel microbenchmarks in ``benchmarks/micro`` (tiny sizes, seconds).

The microbenchmarks are outside ``testpaths`` and pyproject's ``--benchmark-skip`` would skip
them anyway, so they run here in a subprocess with ``-o addopts=""``: once with the timing
disabled (every case called once) and once timed on a few cases, to check the JSON record.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.micro import cases
from deq_ext import reference

ROOT = Path(__file__).resolve().parents[1]
BASE_CMD = [sys.executable, "-m", "pytest", "benchmarks/micro", "-q", "-p", "no:cacheprovider",
            "-o", "addopts=", "--micro-sizes=tiny"]

pytest.importorskip("pytest_benchmark")


def _run(args: list[str]) -> dict[str, int]:
    """Run the microbenchmarks with ``args``; the outcome counts of pytest's summary line."""
    proc = subprocess.run(BASE_CMD + args, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", summary)}


def _expected(device: str) -> int:
    """Cases that run (not skip) on ``device``: torchdeq's only where it is installed."""
    every = cases.specs(cases.OPS, "tiny", device) + cases.specs(cases.ITERATIONS, "tiny", device)
    has_torchdeq = importlib.util.find_spec("torchdeq") is not None
    return sum(1 for s in every if has_torchdeq or s.impl != "torchdeq")


def test_every_microbenchmark_runs_once():
    counts = _run(["--benchmark-disable"])
    n_cpu, n_cuda = _expected("cpu"), _expected("cuda")
    ran = n_cpu + (n_cuda if torch.cuda.is_available() else 0)
    assert n_cpu >= 150  # every op and iteration, both implementations, every sweep point
    assert counts.get("passed") == ran, counts
    assert counts.get("skipped", 0) == n_cpu + n_cuda - ran, counts
    assert not counts.get("failed") and not counts.get("error") and not counts.get("errors")


def test_timed_run_records_bandwidth(tmp_path):
    out = tmp_path / "micro.json"
    counts = _run(["-k", "cpu and float64", f"--benchmark-json={out}"])
    assert counts.get("passed", 0) >= len(cases.OPS) * 2 + 6, counts
    saved = json.loads(out.read_text())
    assert saved["machine_info"]["deq_ext"]["copy_bandwidth"]["cpu"]["gbps"] > 0
    impls = set()
    for bench in saved["benchmarks"]:
        info = bench["extra_info"]
        impls.add(info["impl"])
        assert info["bytes"] > 0 and info["gbps"] > 0, bench["name"]
        assert info["fraction_of_copy"] == pytest.approx(info["gbps"] / info["copy_gbps"])
        assert info["bytes"] == pytest.approx(info["gbps"] * 1e9 * bench["stats"]["median"])
        assert info["bytes"] == pytest.approx(info["gbps_mean"] * 1e9 * bench["stats"]["mean"])
    assert {"compiled", "reference"} <= impls


def test_fused_pass_bytes_match_bandwidth_formula():
    """reduce + expand rows (cases.py) agree with deq_ext.bench's fused_bytes."""
    p = cases.Point(device="cpu", batch=8, dim=100, m=7, dtype="float64", converged=0.5)
    ops = cases.OPS
    reduce_, expand = (ops[k].build(reference, p).nbytes
                       for k in ("broyden_reduce", "broyden_expand_"))
    residual = ops["residual_status_"].build(reference, p).nbytes
    assert reduce_ + expand + residual == cases.broyden_iteration_bytes(p)
    assert p.active == 4 and residual == 8 * 4 * 100 * 6
