"""The documentation stays in the repository, its links resolve, its code runs, and it covers the
public API.

Every Python block of a document runs, in order and in one namespace per document, unless its
first line is a comment starting with ``# fragment`` (a signature listing, or code that needs the
reader's own f and data). Every ``python -m NAME`` in a document names a module that exists.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

import deq_ext
import deq_ext.bench

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md")),
        *(ROOT / d / "README.md" for d in ("models", "train", "benchmarks", "configs"))]
IDS = [str(p.relative_to(ROOT)) for p in DOCS]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")
# Packages of the test extra that a document's code may need; without them, its blocks skip.
OPTIONAL = {"torchdeq", "matplotlib", "sklearn"}


def test_every_document_exists():
    missing = [i for i, p in zip(IDS, DOCS) if not p.exists()]
    assert not missing, missing


def test_every_public_name_is_in_the_api_reference():
    api = (ROOT / "docs" / "api.md").read_text()
    missing = [name for name in deq_ext.__all__ if name not in api]
    assert not missing, f"not in docs/api.md: {missing}"
    missing = [name for name in deq_ext.bench.__all__ if f"`{name}" not in api]
    assert not missing, f"deq_ext.bench names not in docs/api.md: {missing}"


def _anchors(doc: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file (lowercase, punctuation dropped, '-' for ' ')."""
    text = FENCE.sub("", doc.read_text())
    out = set()
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_relative_links_resolve_inside_the_repository(doc):
    text = doc.read_text()
    assert "../shared" not in text, doc
    broken = []
    for target in LINK.findall(FENCE.sub("", text)):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists() or (file != ROOT and ROOT not in file.parents):
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_python_m_names_modules_that_exist(doc):
    found = re.findall(r"(?:python3?|torchrun)\b[^\n`]*?\s-m\s+([A-Za-z_][\w.]*)(<?)", doc.read_text())
    names = {name for name, placeholder in found if not placeholder}  # `-m benchmarks.<name>`
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    missing = sorted(n for n in names if importlib.util.find_spec(n) is None)
    assert not missing, f"{doc.relative_to(ROOT)}: python -m of missing modules {missing}"


def _python_blocks(doc: Path) -> list[str]:
    return [code for lang, code in FENCE.findall(doc.read_text())
            if lang == "python" and not code.lstrip().startswith("# fragment")]


@pytest.mark.parametrize("doc", [d for d in DOCS if d.exists() and _python_blocks(d)],
                         ids=lambda d: str(d.relative_to(ROOT)))
def test_python_blocks_run_as_written(doc, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    namespace: dict = {"__name__": "__doc_example__"}
    for i, code in enumerate(_python_blocks(doc)):
        try:
            exec(compile(code, f"{doc.name}[python block {i}]", "exec"), namespace)
        except ModuleNotFoundError as err:
            if err.name and err.name.split(".")[0] in OPTIONAL:
                pytest.skip(f"{doc.name} needs {err.name}")
            raise
