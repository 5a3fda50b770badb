"""The privacy policy and the users' security guidelines are published and linked from the OpenAPI info."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.openapi import merge

ROOT = Path(__file__).resolve().parents[2]


def test_the_public_api_description_links_both_documents_and_they_exist() -> None:
    description = merge({})["info"]["description"]
    links = re.findall(r"\]\(([^)]+)\)", description)
    assert links == ["docs/privacy.md", "docs/security-for-users.md"]
    for link in links:
        text = (ROOT / link).read_text(encoding="utf-8")
        assert text.startswith("# ")


def test_the_privacy_policy_covers_retention_and_rights_and_links_the_guidelines() -> None:
    text = (ROOT / "docs/privacy.md").read_text(encoding="utf-8")
    for heading in ("## What is held, and why", "## How long", "## Your rights"):
        assert heading in text
    assert "(security-for-users.md)" in text
    for endpoint in ("/api/v1/auth/me/export", "DELETE /api/v1/auth/me"):
        assert endpoint in text
