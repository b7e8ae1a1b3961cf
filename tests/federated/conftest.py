"""Fixtures of the federated tests."""

from __future__ import annotations

import pytest
from fed_helpers import synthetic_sites


@pytest.fixture(scope="session")
def sites():
    return synthetic_sites()
