"""Fixtures of the model tests."""

from tests.fixtures import one_thread  # noqa: F401  (autouse)
