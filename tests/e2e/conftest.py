"""e2e fixtures (helpers live in tests/e2e/helpers.py)."""

from __future__ import annotations

import pytest

from tests.e2e.helpers import IMPLS, program


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest) -> str:
    program(request.param)
    return str(request.param)
