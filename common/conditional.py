"""Conditional requests (RFC 9110 §13.1.2): whether a request's ``If-None-Match`` names a validator.

Shared by inventory, which answers the catalogue's revalidations, and the gateway, which answers them from
its cache of public pages.
"""

from __future__ import annotations

from starlette.types import Scope


def if_none_match_names(scope: Scope, etag: bytes) -> bool:
    """True when the request's ``If-None-Match`` is ``*`` or lists ``etag`` (strong comparison)."""
    for name, value in scope.get("headers", ()):
        if name == b"if-none-match":
            tags = [tag.strip() for tag in value.split(b",")]
            return b"*" in tags or etag in tags
    return False
