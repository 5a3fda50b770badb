"""The checkpoint key: Ed25519, kept under DATA_DIR (never in the database).

A checkpoint signs the canonical JSON of ``{"purpose", "kind", "sequence", "head_hash", "signed_at"}``
(services/audit/chain.py's ``canonical_json``). Someone who can rewrite every row and every hash in
the database still cannot sign a checkpoint for the rewritten chain, so verification, which trusts
only the public keys it gets from outside the database (this key's file and
``AUDIT_CHECKPOINT_TRUSTED_KEYS``), notices the rewrite.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from services.audit.chain import canonical_json

log = structlog.get_logger("comptoir.audit.signing")

PURPOSE = "comptoir.audit.checkpoint.v1"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def public_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id_of(raw_public: bytes) -> str:
    return hashlib.sha256(raw_public).hexdigest()[:16]


def checkpoint_message(*, kind: str, sequence: int, head_hash: str, signed_at: str) -> bytes:
    body = {"purpose": PURPOSE, "kind": kind, "sequence": sequence, "head_hash": head_hash, "signed_at": signed_at}
    return canonical_json(body).encode("utf-8")


@dataclass(frozen=True)
class SigningKey:
    private: Ed25519PrivateKey

    @property
    def public_key(self) -> str:
        return b64(public_bytes(self.private.public_key()))

    @property
    def key_id(self) -> str:
        return key_id_of(public_bytes(self.private.public_key()))

    def sign(self, message: bytes) -> str:
        return b64(self.private.sign(message))


class TrustedKeys:
    """Public keys by key id, from outside the database."""

    def __init__(self, keys: Iterable[Ed25519PublicKey] = ()) -> None:
        self.keys = {key_id_of(public_bytes(k)): k for k in keys}

    def __bool__(self) -> bool:
        return bool(self.keys)

    def knows(self, key_id: str) -> bool:
        return key_id in self.keys

    def verify(self, key_id: str, signature: str, message: bytes) -> bool:
        key = self.keys.get(key_id)
        if key is None:
            return False
        try:
            key.verify(unb64(signature), message)
        except (InvalidSignature, ValueError):
            return False
        return True


def parse_public_keys(text: str) -> list[Ed25519PublicKey]:
    keys = []
    for part in text.split(","):
        part = part.strip()
        if part:
            keys.append(Ed25519PublicKey.from_public_bytes(unb64(part)))
    return keys


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def load_key(path: Path) -> SigningKey | None:
    if not path.exists():
        return None
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("audit.checkpoint.key_permissions", path=str(path), mode=oct(mode))
    private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(private, Ed25519PrivateKey):
        raise ValueError(f"{path} does not hold an Ed25519 private key")
    return SigningKey(private)


def load_or_create_key(path: Path) -> SigningKey:
    """The key at ``path``; generated (mode 0600, directory 0700) if there is none yet."""
    existing = load_key(path)
    if existing is not None:
        return existing
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_new(path, pem, 0o600)
    except FileExistsError:  # another process won the race: use its key
        key = load_key(path)
        if key is None:
            raise RuntimeError(f"the audit checkpoint key at {path} vanished while it was being created") from None
        return key
    except OSError as exc:
        raise RuntimeError(
            f"cannot create the audit checkpoint key at {path} ({exc.strerror}): give DATA_DIR a writable, "
            "persistent volume or point AUDIT_CHECKPOINT_KEY_FILE at a mounted key"
        ) from exc
    key = SigningKey(private)
    public_path = path.with_suffix(".pub")
    with contextlib.suppress(FileExistsError):
        _write_new(public_path, (key.public_key + "\n").encode(), 0o644)
    log.info("audit.checkpoint.key_created", path=str(path), key_id=key.key_id)
    return key


def read_trusted_dir(directory: Path | None) -> list[Ed25519PublicKey]:
    """The public keys kept as ``<key id>.pub`` files (what ``comptoir restore`` puts back from a backup)."""
    if directory is None or not directory.is_dir():
        return []
    keys = []
    for path in sorted(directory.glob("*.pub")):
        try:
            keys.append(Ed25519PublicKey.from_public_bytes(unb64(path.read_text(encoding="ascii").strip())))
        except (ValueError, UnicodeDecodeError):
            log.warning("audit.checkpoint.trusted_key_unreadable", path=str(path))
    return keys


def write_trusted_key(directory: Path, public_key: str) -> str:
    """Keep a public key (base64url raw Ed25519) as trusted; returns its key id."""
    raw = unb64(public_key)
    Ed25519PublicKey.from_public_bytes(raw)  # refuse anything that is not a key
    key_id = key_id_of(raw)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / f"{key_id}.pub"
    if not path.exists():
        _write_new(path, (b64(raw) + "\n").encode(), 0o644)
    return key_id


def trusted_keys(key_path: Path, extra: str, trusted_dir: Path | None = None) -> TrustedKeys:
    """The public half of the local key (if there is one), the configured extra keys and the kept ones."""
    keys = parse_public_keys(extra) + read_trusted_dir(trusted_dir)
    local = load_key(key_path)
    if local is not None:
        keys.append(local.private.public_key())
    return TrustedKeys(keys)


def append_log(path: Path, entry: dict[str, Any]) -> None:
    """Append one checkpoint as a JSON line to the file outside the database (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_log(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                log.warning("audit.checkpoint.log_unreadable_line", path=str(path))
                continue
            if isinstance(entry, dict):
                yield entry
