"""Fixtures shared by the inventory and orders suites (each conftest imports them by name)."""

from __future__ import annotations

import pytest

from tests.inventory.support import FakeClock, Tokens
from tests.support.tokens import TestIssuer


@pytest.fixture(scope="session")
def issuer() -> TestIssuer:
    return TestIssuer()


@pytest.fixture(scope="session")
def tokens(issuer: TestIssuer) -> Tokens:
    return Tokens(issuer)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
