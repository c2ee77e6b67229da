"""Fixtures for the evaluation tests (data builders live in report_data.py)."""

import pytest

from report_data import make_result


@pytest.fixture(scope="session")
def synthetic_result() -> dict:
    return make_result()
