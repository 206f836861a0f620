"""The documentation stays in the repository and covers the public API."""

from __future__ import annotations

import re
from pathlib import Path

import deq_ext

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_public_name_is_in_the_api_reference():
    api = (ROOT / "docs" / "api.md").read_text()
    missing = [name for name in deq_ext.__all__ if name not in api]
    assert not missing, f"not in docs/api.md: {missing}"


def test_docs_link_to_nothing_outside_the_repository():
    for doc in DOCS:
        text = doc.read_text()
        assert "../shared" not in text, doc
        for target in re.findall(r"\]\(([^)#]+)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            assert (doc.parent / target).resolve().exists(), f"{doc.name}: broken link {target}"
            assert ROOT in (doc.parent / target).resolve().parents, f"{doc.name}: {target}"
