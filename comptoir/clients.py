"""Client credentials for service tokens: one random secret per process, kept under DATA_DIR/secrets.

Each process receives its own secret (``<PROCESS>_CLIENT_SECRET``); the auth service receives only
their SHA-256 digests (``AUTH_SERVICE_CLIENTS``), which is all it needs to check them.
"""

from __future__ import annotations

import hashlib
import json
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


def client_env(data_dir: Path) -> dict[str, str]:
    secrets = client_secrets(data_dir)
    env = {f"{process.upper()}_CLIENT_SECRET": secret for process, secret in secrets.items()}
    env["AUTH_SERVICE_CLIENTS"] = json.dumps({process: digest(secret) for process, secret in secrets.items()})
    return env
