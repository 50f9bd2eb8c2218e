"""fewstep's stand-ins for the three names scheduler_common.py imports from diffusers' tests/others/test_utils.py:
the Hub push tests need diffusers' staging Hub, so they are always skipped here (no token, no network)."""

from __future__ import annotations

import pytest

TOKEN = None
USER = "__fewstep_offline__"


def is_staging_test(test_case):
    return pytest.mark.skip("needs diffusers' staging Hub")(test_case)
