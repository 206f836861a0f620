#!/usr/bin/env bash
# Builds the wheel from a fresh copy of the committed tree (as a fresh clone would; CPU kernels,
# for speed), installs it into a fresh virtual environment and checks that it adds one top-level
# name, deq_ext (models/ and train/ are repository code, run from the repository root). From
# outside the repository it runs one DEQ solve; then the repository's models and training script
# against the installed deq_ext. The venv sees the system's site-packages only for torch and numpy.
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
site="$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
ls -A "$site" > "$work/site-before.txt"
"$work/venv/bin/python" -m pip install --disable-pip-version-check --no-deps --no-index -q "$wheel"
ls -A "$site" > "$work/site-after.txt"
cd "$work"
"$work/venv/bin/python" - "$work/venv" "$wheel" "$work/site-before.txt" "$work/site-after.txt" <<'PY'
import sys, zipfile
venv, wheel, before, after = sys.argv[1:]
# One top-level name: in the wheel's files and in what installing it added to site-packages.
tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
assert {t for t in tops if not t.endswith(".dist-info")} == {"deq_ext"}, sorted(tops)
added = set(open(after).read().split()) - set(open(before).read().split())
added = {a for a in added if a != "__pycache__"}
assert {a for a in added if not a.endswith(".dist-info")} == {"deq_ext"}, sorted(added)
import torch, deq_ext
assert deq_ext.__file__.startswith(venv), f"deq_ext imported from {deq_ext.__file__}, not the wheel"
info = deq_ext.build_info()
assert info["loaded"] and not info["emulation"], info  # the test-only module is not shipped
from deq_ext import _C
assert _C.__file__.startswith(venv), f"deq_ext._C loaded from {_C.__file__}"
res = deq_ext.broyden(lambda z: 0.5 * torch.tanh(z) + 1.0, torch.zeros(3, 7).t(), tol=1e-6)
assert bool(res.converged.all()), res.status
print("wheel OK:", deq_ext.__version__, info["cpu"], res.summary(), "adds", sorted(added))
PY
"$work/venv/bin/deq-ext-bench" --help > /dev/null
# The repository's models and training script against the installed deq_ext: a folder holding
# models/ and train/ but no deq_ext/, so that the wheel's deq_ext is the one imported.
mkdir "$work/repo" && cp -r "$work/src/models" "$work/src/train" "$work/repo/"
cd "$work/repo"
"$work/venv/bin/python" - "$work/venv" <<'PY'
import sys, deq_ext, models
assert deq_ext.__file__.startswith(sys.argv[1]), deq_ext.__file__
print("models from the repository:", type(models.build_model("deq_transformer_tiny")).__name__)
PY
"$work/venv/bin/python" -m train.copy_memory --help > "$work/help.txt"
grep -q "Copy memory" "$work/help.txt"
echo "deq-ext-bench --help and, from the repository, python -m train.copy_memory --help OK"
