"""Secrets that ``comptoir`` generates for the local installation, kept under DATA_DIR/secrets (0700/0600)."""

from __future__ import annotations

import base64
import json
import os
import secrets
from pathlib import Path
from typing import Any


def secrets_dir(data_dir: Path) -> Path:
    path = data_dir / "secrets"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


def load_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def write_private_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically with mode 0600 from the first byte."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
    os.replace(tmp, path)


def new_password() -> str:
    return secrets.token_urlsafe(32)


def backup_key_path(data_dir: Path) -> Path:
    """Where development keeps its generated backup key (never created by merely asking)."""
    return data_dir / "secrets" / "backup.key"


def development_backup_key(data_dir: Path) -> tuple[str, bool]:
    """The development backup key (urlsafe base64 of 32 bytes), generated on first use like the other
    secrets of a checkout; returns it and whether it was created now. Production sets BACKUP_ENCRYPTION_KEY."""
    path = secrets_dir(data_dir) / "backup.key"
    if path.exists():
        return path.read_text(encoding="ascii").strip(), False
    encoded = base64.urlsafe_b64encode(os.urandom(32)).decode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(encoded + "\n")
    return encoded, True
