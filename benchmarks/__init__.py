"""The project's benchmarks (run from the repository root; see benchmarks/README.md): the solver
benchmark with the project's targets and verdicts (``solver_bench``), kernel microbenchmarks
(``micro``), the paper's memory and runtime tables, the training-step, history and compile
benchmarks, the figures and the summary of recorded runs (``results/``). They use deq_ext
through its public names only (``tests/benchmarks/test_public_imports.py``)."""
