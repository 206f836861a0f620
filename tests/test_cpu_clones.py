"""The CPU loops run as AVX2 clones where the CPU has AVX2 + FMA, else as baseline clones.

Both clones come from one body; this runs the op comparisons against the twin in a process
that forces the baseline (``DEQ_EXT_CPU_BASELINE=1``), so the path a CPU without AVX2 takes is
tested on machines that have it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import deq_ext

_CHECK = textwrap.dedent("""
    import torch, deq_ext
    from deq_ext import reference
    from tests.helpers import EXPAND_ARGS, MIX_ARGS, REDUCE_ARGS, anderson_state, args_of
    from tests.helpers import assert_states_match, clone_state, history_state, with_reduced_scalars
    print(deq_ext.build_info()["cpu_kernels"])
    ops = torch.ops.deq_ext
    for dtype, hist in ((torch.float64, torch.float64), (torch.float32, torch.float32),
                        (torch.float32, torch.bfloat16)):
        st = history_state(3, 5, 4096 + 37, dtype, "cpu", seed=7)
        st["U"], st["V"] = [t.to(hist) for t in st["U"]], [t.to(hist) for t in st["V"]]
        st = with_reduced_scalars(st, gen_seed=3)
        want, before = clone_state(st), clone_state(st)
        ops.broyden_reduce(*args_of(st, REDUCE_ARGS))
        reference.broyden_reduce(*args_of(want, REDUCE_ARGS))
        ops.broyden_expand_(*args_of(st, EXPAND_ARGS))
        reference.broyden_expand_(*args_of(want, EXPAND_ARGS))
        for k in ("U", "V"):
            st[k], want[k], before[k] = ([t.to(dtype) for t in x[k]] for x in (st, want, before))
        if hist == dtype:
            assert_states_match(st, want, before, dtype)
        else:
            torch.testing.assert_close(st["z"], want["z"], rtol=2e-5, atol=2e-5)
        ast = anderson_state(3, 4, 4096 + 37, dtype, "cpu", seed=8)
        ast["nhist"].clamp_(min=1)
        aw = clone_state(ast)
        ops.anderson_mix_(*args_of(ast, MIX_ARGS), 0.8)
        reference.anderson_mix_(*args_of(aw, MIX_ARGS), 0.8)
        torch.testing.assert_close(ast["z"], aw["z"], rtol=1e-6, atol=1e-6)
    print("ok")
""")


def _run(env_extra: dict) -> list[str]:
    env = {**os.environ, **env_extra}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _CHECK], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()


def test_build_info_names_the_cpu_clones():
    assert deq_ext.build_info()["cpu_kernels"] in ("avx2", "baseline")


def test_baseline_clones_match_the_twin():
    assert _run({"DEQ_EXT_CPU_BASELINE": "1"}) == ["baseline", "ok"]


def test_default_clones_match_the_twin():
    lines = _run({})
    assert lines[-1] == "ok" and lines[0] == deq_ext.build_info()["cpu_kernels"]
