"""Verifying Comptoir's JWTs: user access tokens and service tokens.

The auth service alone holds the private keys; everyone else verifies with the public keys it
publishes at ``/.well-known/jwks.json``. Rules (RFC 8725):
- only the algorithms in ``ALLOWED_ALGORITHMS`` (EdDSA), and the key's own algorithm, never the header's;
- tokens that carry key material or key URLs in their header (``jku``, ``x5u``, ``jwk``, ``x5c``) are refused;
- ``kid`` is opaque input: it is only ever a dictionary key;
- ``iss``, ``aud``, ``exp``, ``nbf``, ``iat`` are checked against an injectable clock;
- the token type is explicit (header ``typ`` and claim ``token_use``): a refresh or service token is never
  an access token, and the other way round.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import jwt
import structlog

from common.http import Transport, TransportError

log = structlog.get_logger("comptoir.tokens")

JWKS_PATH = "/.well-known/jwks.json"
ALLOWED_ALGORITHMS = frozenset({"EdDSA"})
FORBIDDEN_HEADERS = frozenset({"jku", "x5u", "jwk", "x5c", "x5t", "x5t#S256", "crit"})

ACCESS = "access"
SERVICE = "service"
TOKEN_TYPES = {ACCESS: "at+jwt", SERVICE: "service+jwt"}
# The longest lifetime auth can give each (its settings' bounds): a token claiming more was not made by
# it, and a key that leaked must not yield tokens valid for months.
MAX_LIFETIME = {ACCESS: 86_400, SERVICE: 3_600}

ROLES = ("customer", "staff", "admin")
ROLE_RANK = {role: rank for rank, role in enumerate(ROLES)}

Clock = Callable[[], float]


class InvalidToken(Exception):
    """The token must not be accepted; ``reason`` is for logs and audit, never for the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Claims:
    sub: str
    token_use: str
    aud: str
    iss: str
    jti: str
    iat: int
    nbf: int
    exp: int
    role: str | None = None
    sid: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)
    kid: str | None = None  # the signing key's id (from the header)

    @property
    def is_service(self) -> bool:
        return self.token_use == SERVICE

    def has_role(self, minimum: str) -> bool:
        return self.role is not None and ROLE_RANK.get(self.role, -1) >= ROLE_RANK[minimum]


class KeySource(Protocol):
    async def key_for(self, kid: str) -> jwt.PyJWK | None: ...

    def is_published(self, kid: str) -> bool:
        """Whether ``kid`` is among the keys known now, without waiting for anything (called per request)."""
        ...


def parse_jwks(document: Mapping[str, Any]) -> dict[str, jwt.PyJWK]:
    """The usable signing keys of a JWKS document, by ``kid``; anything else is skipped."""
    keys: dict[str, jwt.PyJWK] = {}
    for entry in document.get("keys", []) if isinstance(document, Mapping) else []:
        if not isinstance(entry, Mapping):
            continue
        kid, alg = entry.get("kid"), entry.get("alg")
        if not isinstance(kid, str) or alg not in ALLOWED_ALGORITHMS or entry.get("use", "sig") != "sig":
            continue
        try:
            keys[kid] = jwt.PyJWK(dict(entry))
        except jwt.PyJWKError:
            log.warning("tokens.jwks.bad_key", kid=kid)
    return keys


class StaticKeys:
    """Keys known in-process (the auth service's own, or a test's)."""

    def __init__(self, jwks: Mapping[str, Any]) -> None:
        self.keys = parse_jwks(jwks)

    def replace(self, jwks: Mapping[str, Any]) -> None:
        self.keys = parse_jwks(jwks)

    async def key_for(self, kid: str) -> jwt.PyJWK | None:
        return self.keys.get(kid)

    def is_published(self, kid: str) -> bool:
        return kid in self.keys


class RemoteJWKS:
    """The auth service's JWKS over HTTP: cached, refreshed periodically and on an unknown ``kid``.

    An unknown ``kid`` triggers at most one refetch per ``min_refetch_seconds`` (forged kids cannot
    turn the gateway into a load generator against auth), and a failed fetch keeps the last good
    keys, so a short auth outage does not stop verification.
    """

    def __init__(
        self,
        path: str,
        client: Transport,
        *,
        refresh_seconds: float = 300.0,
        min_refetch_seconds: float = 5.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.path = path
        self.client = client
        self.refresh_seconds = refresh_seconds
        self.min_refetch_seconds = min_refetch_seconds
        self.clock = clock
        self.keys: dict[str, jwt.PyJWK] = {}
        self.fetched_at: float | None = None
        self.attempted_at: float | None = None
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[bool] | None = None

    async def refresh(self, *, force: bool = False) -> bool:
        async with self._lock:
            now = self.clock()
            if not force and self.attempted_at is not None and now - self.attempted_at < self.min_refetch_seconds:
                return False
            self.attempted_at = now
            try:
                answer = await self.client.request("GET", self.path)
                if answer.status != 200:
                    raise ValueError(f"the auth service answered {answer.status}")
                keys = parse_jwks(answer.json())
            except (TransportError, ValueError) as exc:
                log.warning("tokens.jwks.fetch_failed", path=self.path, error=type(exc).__name__)
                return False
            if keys:
                self.keys = keys
                self.fetched_at = now
            return bool(keys)

    async def key_for(self, kid: str) -> jwt.PyJWK | None:
        if self._stale() or kid not in self.keys:
            await self.refresh()
        return self.keys.get(kid)

    def is_published(self, kid: str) -> bool:
        """From the keys known now; a stale list is refreshed in the background (a slow or hung auth never
        holds up a request whose token was verified before)."""
        if self._stale() and (self._background is None or self._background.done()):
            self._background = asyncio.get_running_loop().create_task(self.refresh())
        return kid in self.keys

    def _stale(self) -> bool:
        return self.fetched_at is None or self.clock() - self.fetched_at > self.refresh_seconds


class TokenVerifier:
    def __init__(
        self,
        keys: KeySource,
        *,
        issuer: str,
        audience: str,
        token_use: str = ACCESS,
        leeway_seconds: int = 0,
        clock: Clock = time.time,
        cache_size: int = 10_000,
    ) -> None:
        self.keys = keys
        # Signature-checked payloads by their exact token string: a repeated token (a client's access
        # token, a service token reused for minutes) skips the EdDSA check; the time, type and claim
        # checks still run on every use against the clock (revocation is checked by the callers).
        self.cache_size = cache_size
        self._verified: dict[str, tuple[Mapping[str, Any], str]] = {}  # token -> (payload, kid)
        self.issuer = issuer
        self.audience = audience
        self.token_use = token_use
        self.leeway = leeway_seconds
        self.clock = clock

    async def verify(self, token: str) -> Claims:
        cached = self._verified.get(token)
        if cached is not None:
            try:
                claims = self._claims(*cached)
                self.check_published(claims)
                return claims
            except InvalidToken:
                self._verified.pop(token, None)
                raise
        payload, kid = await self._check_signature(token)
        claims = self._claims(payload, kid)
        self._remember(token, (payload, kid))
        return claims

    def check_published(self, claims: Claims) -> None:
        """A token verified before is accepted only while its key is still published: once a leaked key is
        withdrawn (``comptoir keys rotate``, the file removed), what it signed stops at the next JWKS refresh,
        cached or not. Synchronous: no request waits on the key source here."""
        if claims.kid is None or not self.keys.is_published(claims.kid):
            raise InvalidToken("key withdrawn")

    def _remember(self, token: str, entry: tuple[Mapping[str, Any], str]) -> None:
        if self.cache_size <= 0:
            return
        if len(self._verified) >= self.cache_size:
            now = self.clock()
            for key in [k for k, (p, _) in self._verified.items() if not isinstance(p["exp"], int) or p["exp"] <= now]:
                del self._verified[key]
            while len(self._verified) >= self.cache_size:
                del self._verified[next(iter(self._verified))]  # oldest first
        self._verified[token] = entry

    async def _check_signature(self, token: str) -> tuple[Mapping[str, Any], str]:
        if not token or len(token) > 4096:
            raise InvalidToken("malformed")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise InvalidToken("malformed") from exc
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ALLOWED_ALGORITHMS:
            raise InvalidToken("algorithm not allowed")
        if FORBIDDEN_HEADERS & set(header):
            raise InvalidToken("header carries key material")
        if header.get("typ") != TOKEN_TYPES[self.token_use]:
            raise InvalidToken("wrong token type")
        if not isinstance(kid, str) or not 0 < len(kid) <= 128:
            raise InvalidToken("missing kid")
        key = await self.keys.key_for(kid)
        if key is None:
            raise InvalidToken("unknown kid")
        try:
            payload = jwt.decode(
                token,
                key=key.key,
                algorithms=[key.algorithm_name],
                audience=self.audience,
                issuer=self.issuer,
                options={
                    "require": ["iss", "aud", "sub", "jti", "iat", "nbf", "exp", "token_use"],
                    # Time is checked below against the injectable clock.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidTokenError as exc:
            raise InvalidToken(type(exc).__name__) from exc
        return payload, kid

    def _claims(self, payload: Mapping[str, Any], kid: str) -> Claims:
        if payload.get("token_use") != self.token_use:
            raise InvalidToken("wrong token use")
        now = self.clock()
        exp, nbf, iat = payload.get("exp"), payload.get("nbf"), payload.get("iat")
        if not (isinstance(exp, int) and isinstance(nbf, int) and isinstance(iat, int)) or any(
            isinstance(v, bool) for v in (exp, nbf, iat)
        ):
            raise InvalidToken("bad time claims")
        if now >= exp + self.leeway:
            raise InvalidToken("expired")
        if now < nbf - self.leeway or now < iat - self.leeway - 60:
            raise InvalidToken("not yet valid")
        if exp - iat > MAX_LIFETIME.get(self.token_use, MAX_LIFETIME[ACCESS]):
            raise InvalidToken("lifetime too long")
        sub, jti = payload.get("sub"), payload.get("jti")
        if not isinstance(sub, str) or not sub or not isinstance(jti, str) or not jti:
            raise InvalidToken("bad subject")
        role, sid = payload.get("role"), payload.get("sid")
        if self.token_use == ACCESS and (role not in ROLE_RANK or not isinstance(sid, str) or not sid):
            raise InvalidToken("bad access claims")
        aud = payload["aud"]
        return Claims(
            sub=sub,
            token_use=self.token_use,
            aud=aud if isinstance(aud, str) else self.audience,
            iss=str(payload["iss"]),
            jti=jti,
            iat=iat,
            nbf=nbf,
            exp=exp,
            role=role if isinstance(role, str) else None,
            sid=sid if isinstance(sid, str) else None,
            raw=dict(payload),
            kid=kid,
        )
