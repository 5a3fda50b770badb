"""Signing keys: Ed25519 private keys that only the auth service holds, published as a JWKS.

Keys live in ``DATA_DIR/keys`` (directory 0700, files 0600), one PEM file per key named
``<not_before>-<random>.pem``: a key signs from ``not_before`` on, until a newer key takes over; it is
published from the moment it exists (so verifiers learn it before it signs) until every access token
it signed has expired. ``comptoir keys rotate`` adds a key whose ``not_before`` lies
``key_activation_delay_seconds`` ahead; the running service re-reads the directory every few seconds,
so rotation needs no restart. Alternatively the keys come from a setting (PEM, the last one signs).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.service_tokens import CachedServiceTokens
from common.tokens import ACCESS, SERVICE, TOKEN_TYPES

log = structlog.get_logger("comptoir.auth.keys")

Clock = Callable[[], float]

KEY_FILE = re.compile(r"^(\d{10,12})-([0-9a-f]{8})\.pem$")
OTP_KEY_FILE = "otp-hmac.key"
# Verifiers may run a little behind or ahead of us.
CLOCK_SKEW_SECONDS = 60


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private_key: Ed25519PrivateKey = field(repr=False)
    not_before: float
    jwk: dict[str, str]
    public: jwt.PyJWK = field(repr=False)

    @classmethod
    def of(cls, private_key: Ed25519PrivateKey, not_before: float) -> SigningKey:
        raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        x = b64url(raw)
        # RFC 7638 thumbprint: the kid names the key itself, so two files can never disagree about it.
        canonical = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": x}, separators=(",", ":"), sort_keys=True)
        kid = b64url(hashlib.sha256(canonical.encode()).digest())
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA", "use": "sig"}
        return cls(kid=kid, private_key=private_key, not_before=not_before, jwk=jwk, public=jwt.PyJWK(dict(jwk)))


def private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 from the first byte; never overwrite an existing file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


@contextlib.contextmanager
def directory_lock(directory: Path) -> Iterator[None]:
    """Serialise key generation between processes (several workers start at once)."""
    fd = os.open(directory / ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _pem(private_key: Ed25519PrivateKey) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_pem(data: bytes) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("signing keys must be Ed25519 private keys")
    return key


def key_files(directory: Path) -> list[tuple[float, Path]]:
    found = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            match = KEY_FILE.match(entry.name)
            if match and entry.is_file():
                found.append((float(match.group(1)), Path(entry.path)))
    return sorted(found)


def add_key(directory: Path, *, not_before: float) -> SigningKey:
    """Write a new private key that signs from ``not_before`` on."""
    private_dir(directory)
    private_key = Ed25519PrivateKey.generate()
    path = directory / f"{int(not_before):010d}-{secrets.token_hex(4)}.pem"
    write_private(path, _pem(private_key))
    return SigningKey.of(private_key, not_before)


def retirement_times(starts: list[float], now: float) -> list[float | None]:
    """When each key (sorted by start) stopped signing: the start of the next key that has begun."""
    result: list[float | None] = []
    for i in range(len(starts)):
        later = [s for s in starts[i + 1 :] if s <= now]
        result.append(later[0] if later else None)
    return result


def rotate(directory: Path, *, activation_delay: float, retire_after: float, now: float | None = None) -> SigningKey:
    """``comptoir keys rotate``: add a key that signs after ``activation_delay``; delete keys no token needs.

    A key is deleted once it has been retired for longer than ``retire_after`` (the longest token
    lifetime plus clock skew): nothing it signed can still be valid.
    """
    now = time.time() if now is None else now
    private_dir(directory)
    with directory_lock(directory):
        key = add_key(directory, not_before=now + activation_delay)
        files = key_files(directory)
        retired = retirement_times([start for start, _ in files], now)
        for (_start, path), retired_at in zip(files, retired, strict=True):
            if retired_at is not None and now - retired_at > retire_after:
                path.unlink(missing_ok=True)
    return key


class KeyStore:
    """The auth service's keys, re-read from the directory every ``scan_interval`` seconds."""

    def __init__(
        self,
        *,
        directory: Path | None,
        pem_keys: str = "",
        clock: Clock = time.time,
        publish_after_retirement: float,
        scan_interval: float = 2.0,
    ) -> None:
        self.directory = directory
        self.pem_keys = pem_keys
        self.clock = clock
        self.publish_after_retirement = publish_after_retirement
        self.scan_interval = scan_interval
        self._by_file: dict[Path, SigningKey] = {}
        self._keys: list[SigningKey] = []
        self._scanned_at: float | None = None

    @property
    def from_settings(self) -> bool:
        return bool(self.pem_keys.strip())

    def load(self) -> None:
        """Read the keys; on first start (an empty directory) generate the first one."""
        if self.from_settings:
            blocks = re.findall(r"-----BEGIN PRIVATE KEY-----.+?-----END PRIVATE KEY-----", self.pem_keys, re.DOTALL)
            if not blocks:
                raise ValueError("AUTH_SIGNING_KEYS holds no PEM private key")
            self._keys = [SigningKey.of(_load_pem(block.encode()), 0.0) for block in blocks]
            self._scanned_at = self.clock()
            return
        if self.directory is None:
            raise ValueError("signing keys need a key directory or AUTH_SIGNING_KEYS")
        private_dir(self.directory)
        if not key_files(self.directory):
            with directory_lock(self.directory):
                if not key_files(self.directory):
                    key = add_key(self.directory, not_before=self.clock())
                    log.info("auth.keys.generated", kid=key.kid)
        self.scan()

    def scan(self) -> None:
        if self.from_settings or self.directory is None:
            return
        keys = []
        seen: dict[Path, SigningKey] = {}
        for start, path in key_files(self.directory):
            key = self._by_file.get(path)
            if key is None:
                try:
                    key = SigningKey.of(_load_pem(path.read_bytes()), start)
                except (OSError, ValueError) as exc:
                    log.warning("auth.keys.unreadable", file=path.name, error=type(exc).__name__)
                    continue
                log.info("auth.keys.loaded", kid=key.kid, not_before=int(start))
            seen[path] = key
            keys.append(key)
        if keys:
            self._by_file = seen
            self._keys = keys
        self._scanned_at = self.clock()

    def _fresh(self) -> list[SigningKey]:
        if self._scanned_at is None or self.clock() - self._scanned_at >= self.scan_interval:
            self.scan()
        return self._keys

    def signing_key(self) -> SigningKey:
        keys = self._fresh()
        if not keys:
            raise RuntimeError("no signing key loaded")
        if self.from_settings:
            return keys[-1]
        now = self.clock()
        started = [k for k in keys if k.not_before <= now]
        return started[-1] if started else keys[0]

    def published(self) -> list[SigningKey]:
        keys = self._fresh()
        if self.from_settings:
            return list(keys)  # the operator removes a retired key from the setting when it is time
        now = self.clock()
        retired = retirement_times([k.not_before for k in keys], now)
        return [
            key
            for key, retired_at in zip(keys, retired, strict=True)
            if retired_at is None or now - retired_at <= self.publish_after_retirement
        ]

    def jwks(self) -> dict[str, Any]:
        return {"keys": [dict(key.jwk) for key in self.published()]}

    async def key_for(self, kid: str) -> jwt.PyJWK | None:
        """``common.tokens.KeySource``: auth verifies its own tokens with the keys it publishes."""
        for key in self.published():
            if key.kid == kid:
                return key.public
        return None

    def is_published(self, kid: str) -> bool:
        return any(key.kid == kid for key in self.published())


class TokenIssuer:
    """Signs access tokens and service tokens with the current key."""

    def __init__(
        self, keys: KeyStore, *, issuer: str, audience: str, access_ttl: int, service_ttl: int, clock: Clock
    ) -> None:
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.access_ttl = access_ttl
        self.service_ttl = service_ttl
        self.clock = clock

    def _sign(self, claims: dict[str, Any], typ: str) -> str:
        key = self.keys.signing_key()
        return jwt.encode(claims, key.private_key, algorithm="EdDSA", headers={"kid": key.kid, "typ": typ})

    def access_token(self, *, user_id: str, role: str, sid: str) -> tuple[str, int]:
        """(token, exp)."""
        now = int(self.clock())
        exp = now + self.access_ttl
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": user_id,
            "role": role,
            "sid": sid,
            "jti": str(uuid.uuid4()),
            "iat": now,
            "nbf": now,
            "exp": exp,
            "token_use": ACCESS,
        }
        return self._sign(claims, TOKEN_TYPES[ACCESS]), exp

    def service_token(self, *, client: str, audience: str) -> str:
        now = int(self.clock())
        claims = {
            "iss": self.issuer,
            "aud": audience,
            "sub": client,
            "jti": str(uuid.uuid4()),
            "iat": now,
            "nbf": now,
            "exp": now + self.service_ttl,
            "token_use": SERVICE,
        }
        return self._sign(claims, TOKEN_TYPES[SERVICE])


def load_otp_key(directory: Path, configured: str) -> bytes:
    """The HMAC key of stored OTP codes: the setting, or a random key kept next to the signing keys."""
    if configured:
        return configured.encode()
    private_dir(directory)
    path = directory / OTP_KEY_FILE
    with directory_lock(directory):
        if not path.exists():
            write_private(path, secrets.token_bytes(32))
    data = path.read_bytes()
    if len(data) < 32:
        raise ValueError(f"{path} is shorter than 32 bytes")
    return data


class LocalServiceTokens(CachedServiceTokens):
    """Service tokens minted in-process: auth asks nobody."""

    def __init__(self, issuer: TokenIssuer, *, client: str = "auth", refresh_margin_seconds: float = 30.0) -> None:
        super().__init__(clock=lambda: issuer.clock(), refresh_margin_seconds=refresh_margin_seconds)
        self.issuer = issuer
        self.client = client

    async def _obtain(self, audience: str) -> tuple[str, float]:
        return self.issuer.service_token(client=self.client, audience=audience), self.issuer.service_ttl
