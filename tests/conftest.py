"""Hypothesis settings profiles for every property test in the suite.

The fuzz tests (tests/protocols/test_fuzz_*.py, tests/pac/test_dns_fuzz.py) name no example
count of their own: the profile decides. `ci`, the default, keeps a full test run fast; `long`
is for a deliberate hunt (tests/README.md has the command):

    HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest -p no:cacheprovider -q tests/protocols ...
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=200, deadline=None)
settings.register_profile("long", max_examples=20_000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

