"""Client credentials for service tokens: one random secret per process, kept under DATA_DIR/secrets.

Each process receives its own secret (``<PROCESS>_CLIENT_SECRET``); the auth service receives only
their SHA-256 digests (``AUTH_SERVICE_CLIENTS``), which is all it needs to check them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

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


def client_env(data_dir: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """The client credentials the processes get: the operator's where ``environ`` sets them (as
    ``comptoir check --deploy`` assumes), generated ones under DATA_DIR/secrets for the rest; auth's digests
    of the secrets in use unless ``AUTH_SERVICE_CLIENTS`` is set."""
    generated = client_secrets(data_dir)
    secrets = {process: environ.get(f"{process.upper()}_CLIENT_SECRET") or generated[process] for process in PROCESSES}
    env = {f"{process.upper()}_CLIENT_SECRET": secret for process, secret in secrets.items()}
    env["AUTH_SERVICE_CLIENTS"] = environ.get("AUTH_SERVICE_CLIENTS") or json.dumps(
        {process: digest(secret) for process, secret in secrets.items()}
    )
    return env
