#!/usr/bin/env bash
# One command for a GPU machine: build deq_ext with CUDA for the visible GPU, run the CUDA cases
# of the test suite (the CPU and cuda-emu cases run in CI), the solver benchmark (with the
# check_every / sync-free rows), the kernel microbenchmarks, the memory and runtime tables and the
# eager-vs-compiled training step, leave everything in one folder (default $OUT, else
# ./gpu_check_out), and print a short summary last.
#
#   bash tools/gpu_check.sh [OUT_DIR]
#
# Needs python3 with a CUDA build of torch, nvcc, pytest and pytest-benchmark; torchdeq and
# matplotlib are optional (their comparisons / the plot are skipped without them). Every step has
# a time limit so that the whole run ends within 10 minutes on one H100; a step that hits its
# limit reports rc=124 and the next one still runs (the limits add up to 585 s).
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-${OUT:-$root/gpu_check_out}}"
mkdir -p "$out"
cd "$root"
export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}"
export MAX_JOBS="${MAX_JOBS:-8}"
# Compile for the visible GPU only: a third of the build time of the default sm_80 + sm_90.
arch="$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))' 2>/dev/null)"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-${arch:-8.0;9.0}}"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))" \
  > "$out/torch.txt" 2>&1

summary=()
# step NAME LIMIT_S LOG COMMAND...: run COMMAND under a time limit, log to LOG, record rc and time.
step() {
  local name="$1" limit="$2" log="$3"
  shift 3
  local start rc
  start=$(date +%s)
  timeout "$limit" "$@" > "$out/$log" 2>&1
  rc=$?
  summary+=("$(printf '%-9s rc=%-4s %4ss  (limit %ss, log %s)' "$name" "$rc" "$(( $(date +%s) - start ))" "$limit" "$log")")
  return $rc
}

step build 180 build.log env DEQ_EXT_FORCE_CUDA=1 python3 setup.py build_ext --inplace
python3 -c "import deq_ext, json; print(json.dumps(deq_ext.build_info()))" > "$out/build_info.json" 2>&1
step tests 90 pytest.log env DEQ_EXT_EXPECT_CUDA=1 python3 -m pytest -q -p no:cacheprovider -rs \
  -m cuda --junitxml="$out/pytest.xml" tests
step bench 50 bench.log python3 -m deq_ext.bench --device cuda --out "$out/bench-cuda.json"
step bench_block 25 bench-block.log python3 -m deq_ext.bench --device cuda --problem block \
  --no-bandwidth --no-sweep --out "$out/bench-cuda-solver-bound.json"
step micro 80 micro.log python3 -m pytest benchmarks/micro -p no:cacheprovider -q -o addopts="" \
  --micro-sizes=full --micro-budget=0.2 -k cuda --benchmark-json="$out/micro-cuda.json"
step memory 40 memory.log python3 -m benchmarks.memory_table --device cuda \
  --out "$out/memory-table-cuda.json"
step runtime 80 runtime.log python3 -m benchmarks.runtime_table --device cuda \
  --models transformer trellisnet --out "$out/runtime-table-cuda.json"
step compile 40 compile.log python3 -m benchmarks.compile_step --device cuda --repeat 5 \
  --out "$out/compile-step-cuda.json"

{
  echo "== deq_ext GPU check: $(cat "$out/torch.txt"), arch $TORCH_CUDA_ARCH_LIST"
  echo "build_info: $(cat "$out/build_info.json")"
  echo "tests: $(tail -n 1 "$out/pytest.log")"
  printf '%s\n' "${summary[@]}"
  echo
  python3 -m benchmarks.summary "$out"
} | tee "$out/summary.txt"
! grep -q 'rc=[1-9]' "$out/summary.txt"
