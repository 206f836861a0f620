"""Fixtures of the training tests."""

from tests.fixtures import one_thread  # noqa: F401  (autouse)
