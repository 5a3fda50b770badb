"""Client credentials for service tokens: one random secret per process, kept under DATA_DIR/secrets.

Each process receives its own secret (``<PROCESS>_CLIENT_SECRET``); the auth service receives only
their SHA-256 digests (``AUTH_SERVICE_CLIENTS``), which is all it needs to check them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

from comptoir.config import PROCESSES
from comptoir.secrets import load_json, new_password, secrets_dir, write_private_json


def client_secrets(data_dir: Path) -> dict[str, str]:
    path = secrets_dir(data_dir) / "service-clients.json"
    saved = load_json(path)
    if not all(isinstance(saved.get(p), str) and saved[p] for p in PROCESSES):
        saved = {p: saved.get(p) or new_password() for p in PROCESSES}
        write_private_json(path, saved)
    return {p: str(saved[p]) for p in PROCESSES}


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class ClientSecretsMismatch(ValueError):
    """The operator's AUTH_SERVICE_CLIENTS does not match the client secrets the processes would use."""


class OperatorSecrets(BaseSettings):
    """The client credentials the operator set, read as the processes read them: the environment first,
    then ``.env`` (where `comptoir secrets >> .env` puts them)."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    gateway_client_secret: str = ""
    auth_client_secret: str = ""
    inventory_client_secret: str = ""
    orders_client_secret: str = ""
    audit_client_secret: str = ""
    auth_service_clients: str = ""

    def as_env(self) -> dict[str, str]:
        return {name.upper(): value for name, value in self.model_dump().items() if value}


def client_env(data_dir: Path, operator: Mapping[str, str]) -> dict[str, str]:
    """The client credentials the processes get: the operator's where set (as ``comptoir check --deploy``
    judges them), generated ones under DATA_DIR/secrets for the rest; auth gets the digests of the secrets in
    use, or the operator's AUTH_SERVICE_CLIENTS when it matches them (a mismatch would leave a service
    without service tokens, silently: it is refused here)."""
    generated = client_secrets(data_dir)
    secrets = {process: operator.get(f"{process.upper()}_CLIENT_SECRET") or generated[process] for process in PROCESSES}
    digests = {process: digest(secret) for process, secret in secrets.items()}
    given = operator.get("AUTH_SERVICE_CLIENTS")
    if given:
        try:
            stated = json.loads(given)
        except ValueError:
            stated = None
        wrong = [p for p in PROCESSES if not isinstance(stated, dict) or stated.get(p) != digests[p]]
        if wrong:
            raise ClientSecretsMismatch(
                f"AUTH_SERVICE_CLIENTS does not hold the digest of the client secret {', '.join(wrong)} would use: "
                "set every <PROCESS>_CLIENT_SECRET and AUTH_SERVICE_CLIENTS from one `comptoir secrets` output, "
                "or none of them"
            )
    env = {f"{process.upper()}_CLIENT_SECRET": secret for process, secret in secrets.items()}
    env["AUTH_SERVICE_CLIENTS"] = given or json.dumps(digests)
    return env
