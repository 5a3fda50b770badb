"""A test issuer: its own Ed25519 key, minting tokens that the real verification code checks."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm

from common.tokens import StaticKeys

ISSUER = "urn:comptoir:auth"
AUDIENCE = "urn:comptoir:api"


class TestIssuer:
    __test__ = False  # not a test class

    def __init__(self, kid: str = "test-key-1") -> None:
        self.kid = kid
        self.private_key = Ed25519PrivateKey.generate()

    def jwk(self) -> dict[str, Any]:
        jwk = json.loads(OKPAlgorithm.to_jwk(self.private_key.public_key()))
        return jwk | {"kid": self.kid, "alg": "EdDSA", "use": "sig"}

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.jwk()]}

    def keys(self) -> StaticKeys:
        return StaticKeys(self.jwks())

    def sign(self, claims: dict[str, Any], *, typ: str = "at+jwt", headers: dict[str, Any] | None = None) -> str:
        return jwt.encode(
            claims, self.private_key, algorithm="EdDSA", headers={"kid": self.kid, "typ": typ, **(headers or {})}
        )

    def access_claims(
        self, *, sub: str | None = None, role: str = "customer", sid: str | None = None, ttl: int = 3600, **extra: Any
    ) -> dict[str, Any]:
        now = int(time.time())
        return {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": sub or str(uuid.uuid4()),
            "role": role,
            "sid": sid or str(uuid.uuid4()),
            "jti": str(uuid.uuid4()),
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "token_use": "access",
        } | extra

    def access(self, **kwargs: Any) -> str:
        return self.sign(self.access_claims(**kwargs))

    def service(self, *, caller: str, audience: str, ttl: int = 300) -> str:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": audience,
            "sub": caller,
            "jti": str(uuid.uuid4()),
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "token_use": "service",
        }
        return self.sign(claims, typ="service+jwt")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
