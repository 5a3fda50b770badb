"""Every setting a process reads is documented in the README's settings table (the README must stay true)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from comptoir.config import RunSettings
from gateway.config import GatewaySettings
from services.audit.config import Settings as AuditSettings
from services.auth.config import Settings as AuthSettings
from services.inventory.config import Settings as InventorySettings
from services.orders.config import Settings as OrdersSettings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
SETTINGS = README.split("## Settings", 1)[1].split("\n## ", 1)[0]
DOCUMENTED = set(re.findall(r"`([<>A-Z0-9_]+)`", SETTINGS))


def names(settings: type[BaseSettings], field: str) -> list[str]:
    """The environment names a field is read from, and the README's shorthands for them: ``<P>_X`` (every
    process), ``<S>_X`` (every service), and ``_X`` after a sibling with the same prefix."""
    info = settings.model_fields[field]
    prefix = str(settings.model_config.get("env_prefix") or "")
    upper = field.upper()
    found = [(prefix + field).upper(), f"<P>_{upper}", f"<S>_{upper}"]
    if isinstance(info.validation_alias, AliasChoices):
        found += [str(choice).upper() for choice in info.validation_alias.choices]
    elif isinstance(info.validation_alias, str):
        found.append(info.validation_alias.upper())
    parts = upper.split("_")
    found += ["_" + "_".join(parts[i:]) for i in range(1, len(parts))]
    return found


@pytest.mark.parametrize(
    "settings",
    [GatewaySettings, AuthSettings, InventorySettings, OrdersSettings, AuditSettings, RunSettings],
    ids=lambda s: s.__module__,
)
def test_every_setting_is_in_the_readme(settings: type[BaseSettings]) -> None:
    missing = [field for field in settings.model_fields if not DOCUMENTED.intersection(names(settings, field))]
    assert missing == [], f"{settings.__module__}: document these in README.md's settings table: {missing}"
