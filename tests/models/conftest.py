"""Fixtures of the model tests."""

import pytest

from tests.fixtures import one_thread  # noqa: F401  (autouse)


def pytest_collection_modifyitems(items):
    """The unrolled and pretrain variants call no deq_ext op: their cuda-emu case would
    only repeat the cpu one (and the cuda-emu fixture rejects cases that launch no kernel)."""
    skip = pytest.mark.skip(reason="no deq_ext op in this model variant")
    for item in items:
        params = getattr(item, "callspec", None)
        params = params.params if params else {}
        if params.get("device") != "cuda-emu":
            continue
        mode = params.get("mode") or (params.get("changes") or {}).get("mode")
        if mode in ("unrolled", "pretrain"):
            item.add_marker(skip)
