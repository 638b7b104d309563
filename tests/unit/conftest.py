"""Unit tests share one process: no test inherits another's logging set-up."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """``logsetup.configure`` binds structlog to the ``sys.stderr`` of the moment, which
    pytest's capture closes after the test that called it."""
    yield
    structlog.reset_defaults()
