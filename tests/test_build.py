"""What was compiled, and that the CUDA build was not silently skipped in CI."""

from __future__ import annotations

import os

import torch

import deq_ext


def test_extension_is_loaded():
    info = deq_ext.build_info()
    assert info["loaded"], info.get("error")
    assert info["cpu"] is True
    assert info["torch_version"] == torch.__version__.split("+")[0]


def test_cuda_build_matches_expectation():
    """With DEQ_EXT_EXPECT_CUDA=1 (set by .ci/run and tools/gpu_check.sh), the CUDA kernels must
    have been compiled, for TORCH_CUDA_ARCH_LIST when it is set, else for setup.py's default."""
    info = deq_ext.build_info()
    if info["cuda"]:
        assert info["cuda_archs"], "CUDA kernels built but no architecture recorded"
        assert all(a[0].isdigit() for a in info["cuda_archs"]), info["cuda_archs"]
    if os.environ.get("DEQ_EXT_EXPECT_CUDA") == "1":
        assert info["cuda"], "CI expected the CUDA kernels to be compiled"
        wanted = os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0"
        for arch in wanted.replace(",", ";").replace(" ", ";").split(";"):
            if arch.strip():
                assert arch.strip() in info["cuda_archs"], (arch, info["cuda_archs"])


def test_cpu_kernels_are_built_for_torch_threads():
    """With torch's OpenMP backend, at::parallel_for is an omp pragma compiled into the extension:
    a build without -fopenmp would run every CPU kernel on one thread, silently."""
    info = deq_ext.build_info()
    if "parallel backend: OpenMP" in torch.__config__.parallel_info():
        assert info["openmp"] is True, info
