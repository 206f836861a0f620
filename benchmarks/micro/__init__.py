"""Kernel microbenchmarks of deq_ext (pytest-benchmark), kept out of the default test run.

What is timed (``test_ops.py``, ``test_iteration.py``):

* every extension op on its own: ``residual_status_``, ``broyden_reduce``,
  ``broyden_expand_``, ``fixed_point_step_``, ``anderson_store_``, ``anderson_mix_``;
* one whole solver iteration outside f: Broyden (``residual_status_`` + ``broyden_reduce`` +
  ``broyden_expand_``, the sequence the driver issues), Anderson (``residual_status_`` +
  ``anderson_store_`` + ``anderson_mix_``) and fixed point (``residual_status_`` +
  ``fixed_point_step_``);

each for the compiled ``deq_ext._C`` and the pure-PyTorch twin ``deq_ext.reference``, and the
Broyden iteration also for torchdeq 0.1.0 (its ``matvec``/``rmatvec`` update and its
``update_state`` bookkeeping), on CPU and CUDA (CUDA cases skip without a GPU). The sweep
varies one axis at a time around a base point: B, D, m, dtype and the fraction of converged
samples (:mod:`.cases`). Every call is timed on cold caches, with the state restored before it
(:mod:`.harness`). Every benchmark's ``extra_info`` holds the bytes one call moves (the
documented formula in :mod:`.cases`), the achieved GB/s (``gbps`` from the median time,
``gbps_mean`` from the mean), the device copy bandwidth measured once per session and the
fraction of it achieved; the JSON's ``machine_info["deq_ext"]`` holds the provenance
(versions, build, command, load average), torch's thread count and the copy bandwidth.

The recorded CPU run (``benchmarks/results/micro-cpu.json``), from the repository root::

    python -m pytest benchmarks/micro -p no:cacheprovider -q -o addopts="" \\
        --micro-sizes=full --benchmark-json=benchmarks/results/micro-cpu.json -k cpu

(``-o addopts=""`` drops the ``--benchmark-skip`` that ``pyproject.toml`` adds for the default
test run; 178 CPU cases, about 3 minutes on 2 cores, a 1.1 MB JSON.) The CI smoke run, every case
once with tiny sizes and no timing, is ``tests/test_microbench_smoke.py``; by hand::

    python -m pytest benchmarks/micro -p no:cacheprovider -q -o addopts="" \\
        --benchmark-disable --micro-sizes=tiny

Options (``conftest.py``): ``--micro-sizes tiny|full`` (default full), ``--micro-threads N``
(``torch.set_num_threads``; 0, the default, keeps torch's choice) and ``--micro-budget SECONDS``
(time spent on each case; ``tools/gpu_check.sh`` uses 0.2 to fit its time limit).
"""
