"""Access-token checks at the gateway: signature once per token (cached until it expires), revocation and
that the token's key is still published always."""

from __future__ import annotations

import time
from collections.abc import Callable

from common.revocation import RevocationSet
from common.tokens import Claims, InvalidToken, TokenVerifier


class GatewayAuth:
    def __init__(
        self,
        verifier: TokenVerifier,
        revocations: RevocationSet,
        *,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.verifier = verifier
        self.revocations = revocations
        self.cache_size = cache_size
        self.clock = clock
        # The whole token string is the key: a cache hit means these exact bytes were verified before.
        self._cache: dict[str, Claims] = {}

    async def authenticate(self, authorization: bytes) -> Claims:
        """Claims of a valid, unrevoked access token; ``InvalidToken`` otherwise."""
        scheme, _, raw = authorization.partition(b" ")
        token = raw.strip().decode("latin-1")
        if scheme.lower() != b"bearer" or not token or " " in token:
            raise InvalidToken("malformed authorization header")
        claims = self._cache.get(token)
        if claims is None or claims.exp <= self.clock():
            if claims is not None:
                self._cache.pop(token, None)  # a concurrent request with the same token may have dropped it
            claims = await self.verifier.verify(token)
            self._remember(token, claims)
        else:
            try:
                self.verifier.check_published(claims)
            except InvalidToken:
                self._cache.pop(token, None)
                raise
        if self.revocations.is_revoked(claims.sid):
            raise InvalidToken("session revoked")
        return claims

    def _remember(self, token: str, claims: Claims) -> None:
        if self.cache_size <= 0:
            return
        if len(self._cache) >= self.cache_size:
            now = self.clock()
            for key in [k for k, c in self._cache.items() if c.exp <= now]:
                del self._cache[key]
            while len(self._cache) >= self.cache_size:
                del self._cache[next(iter(self._cache))]  # oldest insertion first
        self._cache[token] = claims
