"""Pooled HTTP clients for service-to-service calls (created in lifespan, closed there)."""

from __future__ import annotations

import httpx

from common.middleware import REQUEST_ID_HEADER


def create_client(
    base_url: str,
    *,
    timeout: float = 5.0,
    connect_timeout: float = 2.0,
    max_connections: int = 50,
) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=httpx.Timeout(timeout, connect=connect_timeout),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        follow_redirects=False,
        headers={"user-agent": "comptoir-internal"},
    )


def forward_headers(request_id: str | None) -> dict[str, str]:
    """Headers that carry the caller's context to the next service."""
    return {REQUEST_ID_HEADER.decode(): request_id} if request_id else {}
