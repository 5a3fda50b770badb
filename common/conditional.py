"""Conditional requests (RFC 9110 §13.1.2): whether a request's ``If-None-Match`` names a validator.

Shared by inventory, which answers the catalogue's revalidations, and the gateway, which answers them from
its cache of public pages.
"""

from __future__ import annotations

from starlette.types import Scope


def if_none_match_names(scope: Scope, etag: bytes) -> bool:
    """True when the request's ``If-None-Match`` is ``*`` or lists ``etag``, compared weakly as the RFC
    requires for this header (``W/"x"`` names ``"x"``), over every ``If-None-Match`` line it sent."""
    wanted = etag.removeprefix(b"W/")
    for name, value in scope.get("headers", ()):
        if name == b"if-none-match":
            for tag in value.split(b","):
                tag = tag.strip()
                if tag == b"*" or tag.removeprefix(b"W/") == wanted:
                    return True
    return False
