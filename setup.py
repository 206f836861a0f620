"""The compiled extension ``deq_ext._C`` (metadata and packages: pyproject.toml).

Install with ``pip install --no-build-isolation -e .`` (build isolation would
compile against a second, freshly downloaded torch); ``pip wheel --no-build-isolation
--no-deps .`` builds a wheel that carries ``deq_ext`` only (``models`` and ``train`` run from
the repository).

Environment switches:

* ``DEQ_EXT_FORCE_CPU=1``  build the CPU kernels only, even where CUDA is found.
* ``DEQ_EXT_FORCE_CUDA=1`` build the CUDA kernels too, and fail loudly if torch
  has no CUDA or nvcc is not found (instead of quietly building CPU only).
* ``DEQ_EXT_BUILD_EMU=1``  also build the test-only module ``deq_ext._C_emu``: the
  CUDA kernels compiled as host C++ on the CUDA emulation (csrc/emu), so the test
  suite runs them on a machine without a GPU. Needs neither nvcc nor CUDA torch.
* ``TORCH_CUDA_ARCH_LIST`` target architectures, e.g. ``"8.0;9.0"``. Left
  unset, the visible GPUs' architectures are used, or ``8.0;9.0`` (sm_80 and
  sm_90) when no GPU is visible.
* ``CUDA_HOME``            the CUDA toolkit (``/usr/local/cuda`` on our machines).
* ``MAX_JOBS``             parallel compile jobs for ninja.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CONFIG = json.loads((ROOT / "csrc" / "build_config.json").read_text())


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _cuda_archs(torch) -> str:
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if archs:
        return archs
    if torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return ";".join(f"{major}.{minor}" for major, minor in sorted(caps))
    return CONFIG["default_cuda_archs"]


def _want_cuda(torch, cuda_home: str | None) -> bool:
    if _flag("DEQ_EXT_FORCE_CPU"):
        return False
    found = torch.version.cuda is not None and cuda_home is not None
    if _flag("DEQ_EXT_FORCE_CUDA") and not found:
        raise RuntimeError(
            "DEQ_EXT_FORCE_CUDA=1 but CUDA cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cuda_home!r}. "
            "Install a CUDA build of torch and point CUDA_HOME at the toolkit."
        )
    return found


def _default_cuda_home() -> None:
    # Left unset, torch derives CUDA_HOME from the nvcc on PATH, which on our
    # machines is a wrapper outside the toolkit: the link then fails on -lcudart.
    if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
        if Path("/usr/local/cuda/bin/nvcc").exists():
            os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _openmp_flags(torch) -> list[str]:
    """OpenMP flags when torch's parallel backend is OpenMP, else none.

    at::parallel_for is then an ``omp parallel`` pragma in a header, compiled into
    the extension: without -fopenmp it silently runs on one thread.
    """
    if sys.platform == "win32" or "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return []
    return list(CONFIG["openmp_flags"])


def _wheel_cuda_includes() -> list[str]:
    """Header folders of the CUDA libraries that torch's pip packages ship (nvidia/*/include).

    torch's CUDA headers include cusparse.h and friends, which a bare toolkit
    such as /usr/local/cuda on our machines lacks. They go after every other
    include path (-idirafter), so a full toolkit's own headers still win.
    """
    try:
        import nvidia  # the namespace package of NVIDIA's pip wheels
    except ImportError:
        return []
    found = []
    for root in nvidia.__path__:
        found += sorted(str(p) for p in Path(root).glob("*/include") if p.is_dir())
    return found


def extensions():
    _default_cuda_home()
    import torch
    from torch.utils import cpp_extension

    with_cuda = _want_cuda(torch, cpp_extension.CUDA_HOME)
    torch_version = torch.__version__.split("+")[0]
    defines = [f"-DDEQ_EXT_TORCH_VERSION={torch_version}"]
    sources = list(CONFIG["cpu_sources"])
    openmp = _openmp_flags(torch)
    cxx_flags = CONFIG["cxx_flags"] + openmp
    extra = {"cxx": cxx_flags + defines}
    kind = cpp_extension.CppExtension
    if with_cuda:
        archs = _cuda_archs(torch)
        # cpp_extension reads the list from the environment when it adds -gencode flags.
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        token = "+".join(a.strip() for a in archs.replace(",", ";").replace(" ", ";").split(";") if a.strip())
        defines += ["-DDEQ_EXT_WITH_CUDA", f"-DDEQ_EXT_CUDA_ARCHS={token}"]
        late = _wheel_cuda_includes()
        extra = {
            "cxx": cxx_flags + defines + [f for d in late for f in ("-idirafter", d)],
            "nvcc": CONFIG["nvcc_flags"] + defines + [f"-Xcompiler=-idirafter,{d}" for d in late],
        }
        sources += CONFIG["cuda_sources"]
        kind = cpp_extension.CUDAExtension
        print(f"deq_ext: building CPU and CUDA kernels for architectures {archs}")
    else:
        print("deq_ext: building CPU kernels only")
    modules = [
        kind(
            name=CONFIG["module"],
            sources=sources,
            include_dirs=[str(ROOT / d) for d in CONFIG["include_dirs"]],
            extra_compile_args=extra,
            extra_link_args=openmp,
        )
    ]
    if _flag("DEQ_EXT_BUILD_EMU"):
        modules.append(_emulated_extension(cpp_extension, torch_version))
    return modules


def _emulated_extension(cpp_extension, torch_version: str):
    """deq_ext._C_emu: the .cu files with their launches rewritten, compiled as host C++."""
    sys.path.insert(0, str(ROOT / "csrc" / "emu"))
    from rewrite_launches import emulated_source

    out_dir = ROOT / "build" / "emu_src"
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = list(CONFIG["emu_sources"])
    for cu in CONFIG["cuda_sources"]:
        target = out_dir / (Path(cu).stem + ".cpp")
        text = emulated_source(ROOT / cu, display_name=cu)
        if not target.exists() or target.read_text() != text:  # keep ninja's timestamps
            target.write_text(text)
        sources.append(str(target.relative_to(ROOT)))
    print("deq_ext: building the CUDA emulation module deq_ext._C_emu (tests only)")
    return cpp_extension.CppExtension(
        name=CONFIG["emu_module"],
        sources=sources,
        include_dirs=[str(ROOT / d) for d in CONFIG["emu_include_dirs"]],
        extra_compile_args={"cxx": CONFIG["emu_cxx_flags"] + [f"-DDEQ_EXT_TORCH_VERSION={torch_version}"]},
    )


def build_ext_cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


# The metadata (name, version, dependencies, packages) is in pyproject.toml; this file only
# adds the compiled extensions, which need torch at build time.
setup(
    ext_modules=extensions(),
    cmdclass=build_ext_cmdclass(),
    zip_safe=False,
)
