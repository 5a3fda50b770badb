"""What per-address limits count: an IPv4 address, or an IPv6 address's /64."""

from __future__ import annotations

import pytest

from common.clientip import throttle_key


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("198.51.100.7", "198.51.100.7"),
        ("2001:db8:5:6::1", "2001:db8:5:6::/64"),
        ("2001:db8:5:6:ffff:ffff:ffff:ffff", "2001:db8:5:6::/64"),
        ("::ffff:198.51.100.7", "198.51.100.7"),
        (None, "unknown"),
        ("not an address", "not an address"),
    ],
)
def test_an_ipv6_address_counts_as_its_64_and_an_ipv4_as_itself(address: str | None, key: str) -> None:
    assert throttle_key(address) == key
