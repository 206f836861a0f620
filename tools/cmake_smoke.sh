#!/usr/bin/env bash
# Builds the extension with CMake (CPU kernels only) from csrc/build_config.json,
# then imports that module and runs one solve with it. Proves that CMakeLists.txt
# and setup.py build the same module from the same list of sources.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cmake_bin="$(python -c 'import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, "cmake"))')"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
PATH="$CUDA_HOME/bin:$PATH" "$cmake_bin" -S "$root" -B "$work/build" -G Ninja \
  -DDEQ_EXT_WITH_CUDA=OFF -DDEQ_EXT_OUTPUT_DIR="$work/pkg/deq_ext" > "$work/configure.log"
"$cmake_bin" --build "$work/build" > "$work/build.log" || { tail -50 "$work/build.log"; exit 1; }
# A copy of the Python package next to the CMake-built module.
cp "$root"/deq_ext/*.py "$work/pkg/deq_ext/"
cp -r "$root/deq_ext/solvers" "$work/pkg/deq_ext/"
cd "$work/pkg"
python - <<'PY'
import torch, deq_ext
info = deq_ext.build_info()
assert info["loaded"] and not info["cuda"], info
if "parallel backend: OpenMP" in torch.__config__.parallel_info():
    assert info["openmp"], "torch uses OpenMP but the CMake build does not: CPU kernels on one thread"
assert "/pkg/deq_ext/" in deq_ext.__file__, f"imported the wrong deq_ext: {deq_ext.__file__}"
res = deq_ext.broyden(lambda z: 0.5 * torch.tanh(z) + 1.0, torch.zeros(3, 7), tol=1e-6)
assert bool(res.converged.all()), res.status
print("cmake build OK:", info, res.summary())
PY
