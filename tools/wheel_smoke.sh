#!/usr/bin/env bash
# Builds the wheel from a fresh copy of the committed tree (as a fresh clone would; CPU kernels,
# for speed), installs it into a fresh virtual environment and, from outside the repository,
# runs one DEQ solve, the model and training imports and the training script's --help. Proves
# that a wheel carries deq_ext, models and train and works on its own. The venv sees the
# system's site-packages only for torch and numpy.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir "$work/src"
git -C "$root" archive HEAD | tar -x -C "$work/src"
cd "$work/src"
DEQ_EXT_FORCE_CPU=1 python -m pip wheel --disable-pip-version-check --no-build-isolation \
  --no-deps -w "$work/dist" . > "$work/wheel.log" 2>&1 || { tail -40 "$work/wheel.log"; exit 1; }
wheel="$(ls "$work"/dist/deq_ext-*.whl)"
echo "built $(basename "$wheel") ($(du -h "$wheel" | cut -f1))"
python -m venv --system-site-packages "$work/venv"
"$work/venv/bin/python" -m pip install --disable-pip-version-check --no-deps --no-index -q "$wheel"
cd "$work"
"$work/venv/bin/python" - "$work/venv" <<'PY'
import sys, torch, deq_ext, models, train
venv = sys.argv[1]
for mod in (deq_ext, models, train):
    assert mod.__file__.startswith(venv), f"{mod.__name__} imported from {mod.__file__}, not the wheel"
info = deq_ext.build_info()
assert info["loaded"] and not info["emulation"], info  # the test-only module is not shipped
from deq_ext import _C
assert _C.__file__.startswith(venv), f"deq_ext._C loaded from {_C.__file__}"
res = deq_ext.broyden(lambda z: 0.5 * torch.tanh(z) + 1.0, torch.zeros(3, 7).t(), tol=1e-6)
assert bool(res.converged.all()), res.status
model = models.build_model("deq_transformer_tiny")
print("wheel OK:", deq_ext.__version__, info["cpu"], res.summary(), type(model).__name__)
PY
"$work/venv/bin/python" -m train.copy_memory --help > "$work/help.txt"
grep -q "Copy memory" "$work/help.txt"
"$work/venv/bin/deq-copy-memory" --help > /dev/null
echo "console scripts and python -m train.copy_memory --help OK"
