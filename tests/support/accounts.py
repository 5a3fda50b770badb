"""What every new account sends at registration: the terms accepted, in the version auth asks for by default."""

from __future__ import annotations

from typing import Any

from services.auth.config import Settings

TERMS_VERSION: str = Settings.model_fields["terms_version"].default
CONSENT: dict[str, Any] = {"accept_terms": True, "terms_version": TERMS_VERSION}
