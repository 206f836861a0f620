"""Benchmarks beyond ``python -m deq_ext.bench``: kernel microbenchmarks (``benchmarks/micro``)
and the paper's memory and runtime tables. Recorded runs live in ``benchmarks/results``."""
