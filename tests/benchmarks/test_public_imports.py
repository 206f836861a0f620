"""The project's benchmarks use deq_ext as a user would: through its public names only.

"Private" here: a module path or name with a segment that starts with ``_`` (dunders such as
``__version__`` aside), a name missing from the ``__all__`` of the module that defines one,
and anything of ``deq_ext.bench`` other than the names of ``deq_ext.bench.__all__`` taken from
the package itself (its submodules are implementation). Imports and attribute chains rooted
at ``deq_ext`` are both checked.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FILES = sorted((ROOT / "benchmarks").rglob("*.py"))


def _private(segment: str) -> bool:
    return segment.startswith("_") and not (segment.startswith("__") and segment.endswith("__"))


def _problems_with(module: str, names: list[str]) -> list[str]:
    """Why importing ``names`` from ``module`` (a deq_ext module) is not public, if it is not."""
    parts = module.split(".")
    if any(_private(p) for p in parts):
        return [f"private module {module}"]
    out = [f"private name {module}.{n}" for n in names if _private(n)]
    if parts[:2] == ["deq_ext", "bench"]:
        if len(parts) > 2:
            return out + [f"{module}: import from deq_ext.bench, not its submodules"]
        public = set(importlib.import_module("deq_ext.bench").__all__)
        return out + [f"deq_ext.bench.{n} is not in deq_ext.bench.__all__"
                      for n in names if n not in public]
    public = getattr(importlib.import_module(module), "__all__", None)
    if public is not None:
        # A public submodule of a package counts as public even where __all__ omits it.
        out += [f"{module}.{n} is not in {module}.__all__" for n in names
                if n not in public and not n.startswith("__") and not _is_module(f"{module}.{n}")]
    return out


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _attribute_chain(node: ast.Attribute) -> list[str]:
    chain: list[str] = []
    cur: ast.AST = node
    while isinstance(cur, ast.Attribute):
        chain.append(cur.attr)
        cur = cur.value
    if isinstance(cur, ast.Name):
        chain.append(cur.id)
        return chain[::-1]
    return []


def private_uses(source: str) -> list[str]:
    """Every non-public use of deq_ext in ``source``."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "deq_ext":
            found += _problems_with(node.module, [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "deq_ext" and "." in alias.name:
                    parent, _, leaf = alias.name.rpartition(".")
                    found += _problems_with(parent, [leaf])
        elif isinstance(node, ast.Attribute):
            chain = _attribute_chain(node)
            if chain[:1] == ["deq_ext"] and len(chain) > 1:
                # deq_ext.a.b.c: the longest prefix that is a module, then the name taken from it.
                for cut in range(len(chain) - 1, 0, -1):
                    module = ".".join(chain[:cut])
                    try:
                        importlib.import_module(module)
                    except ImportError:
                        continue
                    found += _problems_with(module, [chain[cut]])
                    break
    return sorted(set(found))


def test_the_check_sees_private_uses():
    assert private_uses("from deq_ext import _extension") == ["private name deq_ext._extension"]
    assert private_uses("from deq_ext.solvers._base import SolverOptions")[0].startswith("private module")
    assert private_uses("import deq_ext.bench.env")
    assert private_uses("from deq_ext.bench.env import sync")
    assert private_uses("from deq_ext.bench import solves")
    assert private_uses("from deq_ext.solvers import get_solver_options")  # not in its __all__
    assert private_uses("import deq_ext\ndeq_ext._extension.ops()")
    assert private_uses("import deq_ext\ndeq_ext.bench.env.sync(d)")
    assert not private_uses("import deq_ext\nfrom deq_ext import DEQ, Status\n"
                            "from deq_ext.bench import sync, Problem\n"
                            "from deq_ext.solvers import broyden_workspace\n"
                            "deq_ext.reference.broyden_reduce\nv = deq_ext.__version__")


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_benchmarks_import_only_public_deq_ext_names(path):
    assert not private_uses(path.read_text()), f"{path.relative_to(ROOT)}: {private_uses(path.read_text())}"
