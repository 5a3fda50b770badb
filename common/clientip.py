"""The client's address: the socket peer, or the right-most untrusted X-Forwarded-For hop."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(spec: str) -> list[Network]:
    """Comma-separated CIDRs; a bare address is a /32 (or /128)."""
    return [ipaddress.ip_network(part.strip(), strict=False) for part in spec.split(",") if part.strip()]


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def is_trusted(address: str, trusted: Sequence[Network]) -> bool:
    parsed = _address(address)
    return parsed is not None and any(parsed in network for network in trusted)


def resolve_client_ip(peer: str | None, forwarded_for: str | None, trusted: Sequence[Network]) -> str | None:
    """Walk X-Forwarded-For from the right while the hop is a trusted proxy; the first other hop is the client.

    Without a trusted peer the header is ignored entirely, so a client cannot choose its own address.
    """
    if peer is None or not trusted or not forwarded_for or not is_trusted(peer, trusted):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        parsed = _address(hop)
        if parsed is None:
            return peer  # a garbled chain is not evidence of anything
        if not any(parsed in network for network in trusted):
            return str(parsed)
    return str(_address(hops[0])) if hops else peer


def throttle_key(address: str | None) -> str:
    """What a per-address limit counts: an IPv4 address, or an IPv6 address's /64. One subscriber holds a
    whole /64 (2^64 addresses), so counting its addresses one by one would give it a fresh budget per request."""
    if address is None:
        return "unknown"
    parsed = _address(address)
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network((parsed, 64), strict=False))
    return address
