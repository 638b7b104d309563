"""Hypothesis profiles for the PROXY protocol tests, chosen with ``HYPOTHESIS_PROFILE``.

``ci`` (default) keeps the suite fast; ``long`` is for a deliberate soak run.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "long", max_examples=20_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
