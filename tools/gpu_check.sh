#!/usr/bin/env bash
# One command for a GPU machine: build deq_ext with CUDA for the visible GPU,
# run the whole test suite (CUDA cases included), run the benchmark, and leave
# everything in one folder (default $OUT, else ./gpu_check_out), summary last.
#
#   bash tools/gpu_check.sh [OUT_DIR]
#
# Needs python3 with a CUDA build of torch, nvcc, pytest; torchdeq is optional
# (its comparisons are skipped without it). Budget: about 10 minutes on an H100.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-${OUT:-$root/gpu_check_out}}"
mkdir -p "$out"
cd "$root"
export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}"
export MAX_JOBS="${MAX_JOBS:-8}"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))" \
  > "$out/torch.txt" 2>&1

start=$(date +%s)
DEQ_EXT_FORCE_CUDA=1 python3 setup.py build_ext --inplace > "$out/build.log" 2>&1
build_rc=$?
build_s=$(( $(date +%s) - start ))
python3 -c "import deq_ext, json; print(json.dumps(deq_ext.build_info()))" > "$out/build_info.json" 2>&1

start=$(date +%s)
DEQ_EXT_EXPECT_CUDA=1 python3 -m pytest -q -p no:cacheprovider -rs \
  --junitxml="$out/pytest.xml" tests > "$out/pytest.log" 2>&1
test_rc=$?
test_s=$(( $(date +%s) - start ))

start=$(date +%s)
python3 -m deq_ext.bench --device cuda --out "$out/bench-cuda.json" > "$out/bench.log" 2>&1
bench_rc=$?
bench_s=$(( $(date +%s) - start ))

echo "== deq_ext GPU check: $(cat "$out/torch.txt")"
echo "build  rc=$build_rc  ${build_s}s  $(cat "$out/build_info.json")"
echo "tests  rc=$test_rc  ${test_s}s  $(tail -n 1 "$out/pytest.log")"
echo "bench  rc=$bench_rc  ${bench_s}s"
sed -n '/^ratios/,$p' "$out/bench.log"
[ "$build_rc" -eq 0 ] && [ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
