"""The wheel and the editable install provide one top-level name, ``deq_ext``.

``models/``, ``train/`` and ``benchmarks/`` are repository code run from the repository root; a
top-level ``models`` or ``train`` in site-packages would collide with a user's own packages.
This reads the package selection of pyproject.toml the way setuptools does (both installs use
it); ``tools/wheel_smoke.sh`` checks a built wheel and what installing it adds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python 3.11")
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_only_deq_ext_is_packaged():
    from setuptools import find_packages

    find = _pyproject()["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(where=str(ROOT), include=find["include"], exclude=find.get("exclude", ()))
    assert "deq_ext" in packages and "deq_ext.bench" in packages and "deq_ext.solvers" in packages
    top_level = {name.split(".")[0] for name in packages}
    assert top_level == {"deq_ext"}, f"packaged top-level names: {sorted(top_level)}"


def test_console_scripts_live_in_deq_ext():
    scripts = _pyproject()["project"].get("scripts", {})
    outside = {name: target for name, target in scripts.items() if not target.startswith("deq_ext.")}
    assert not outside, f"console scripts outside deq_ext: {outside}"
