"""Fixtures of the multi-process tests: the tiny CTR world (shared with tests/ctr)."""

from tests.ctr.conftest import tiny_world  # noqa: F401  (re-exported fixture)
