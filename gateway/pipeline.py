"""The gateway's request pipeline for ``/api/v1/...``: route, CORS, client identity, token, rate limit, forward.

Raw ASGI on purpose: it runs on every request (DESIGN.md, "Performance facts").
"""

from __future__ import annotations

from typing import Any

from starlette.types import Receive, Scope, Send

from common.clientip import Network, resolve_client_ip, throttle_key
from common.errors import BEARER_CHALLENGE, NO_SUCH_RESOURCE, problem_response, rejected_token_challenge
from common.tokens import InvalidToken
from gateway.auth import GatewayAuth
from gateway.cache import PublicCache
from gateway.cors import Cors
from gateway.events import EVENTS_NOT_RECORDED, SecurityEvents
from gateway.limits import LimitStorageUnavailable, RateLimits
from gateway.methods import allowed_methods, method_not_allowed
from gateway.proxy import Proxy, with_headers
from gateway.routes import Route, is_forbidden_path, is_public, match, route_table

AUTH_PREFIX = "/api/v1/auth"
_SAFE = frozenset({"GET", "HEAD", "OPTIONS"})
# The request headers the pipeline itself reads.
_WANTED = frozenset({b"origin", b"authorization", b"x-forwarded-for", b"access-control-request-method"})


class Pipeline:
    def __init__(
        self,
        *,
        proxy: Proxy,
        auth: GatewayAuth,
        limits: RateLimits,
        cors: Cors,
        trusted_proxies: list[Network],
        storage_failure: str,
        events: SecurityEvents | None = None,
        cache: PublicCache | None = None,
    ) -> None:
        self.proxy = proxy
        self.auth = auth
        self.limits = limits
        self.cors = cors
        self.trusted = trusted_proxies
        self.storage_failure = storage_failure
        self.events = events
        self.cache = cache
        self.routes = route_table()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        headers: dict[bytes, bytes] = {}
        credentials = 0
        for key, value in scope.get("headers", ()):
            if key in _WANTED:
                if key == b"authorization":
                    credentials += 1
                if key not in headers:
                    headers[key] = value
                elif key == b"x-forwarded-for":
                    # Repeated lines are one list (RFC 9110 §5.3): a proxy may add its own line after the
                    # client's, and the right-most hops are the ones that count.
                    headers[key] += b", " + value

        # Resolved first: every answer's access-log line, refusals included, names the client, not its proxy.
        client_ip = self._client_ip(scope, headers)
        scope["comptoir.client_ip"] = client_ip
        route: Route | None = None
        if is_forbidden_path(path, scope.get("raw_path")):
            await self._refusal_event(
                scope, method, path, client_ip, "gateway.path.blocked", "internal or obfuscated path"
            )
        else:
            route = match(self.routes, path)
        if route is None:
            await problem_response(404, scope=scope, detail=NO_SUCH_RESOURCE)(scope, receive, send)
            return
        scope["comptoir.route"] = route.prefix + "/*"

        extra: list[tuple[bytes, bytes]] = [(b"vary", b"Origin")]
        origin = headers.get(b"origin")
        if origin is not None:
            if method == "OPTIONS" and b"access-control-request-method" in headers:
                await self._preflight(scope, receive, send, origin)
                return
            if self.cors.allowed(origin):
                extra.extend(self.cors.response_headers(origin))

        send_with_extra = with_headers(send, extra)

        # Before authentication and rate limiting: which methods a path has is the same answer for anyone.
        known = allowed_methods(path)
        if known is None:
            # No public path looks like this one (a typo, a trailing slash): the API reference lists them
            # all, so saying so before authentication reveals nothing, and a client learns its mistake.
            await problem_response(404, scope=scope, detail=NO_SUCH_RESOURCE)(scope, receive, send_with_extra)
            return
        if method not in known[0]:
            await method_not_allowed(scope, receive, send_with_extra, known[1])
            return

        claims = None
        authorization = headers.get(b"authorization")
        if credentials > 1:
            # Which one counts would be a guess, and the service behind might guess differently.
            await self._refusal_event(
                scope, method, path, client_ip, "gateway.token.rejected", "several authorization headers"
            )
            await self._unauthorized(
                scope, receive, send_with_extra, "Send one Authorization header, not several.", True
            )
            return
        if authorization is not None:
            try:
                claims = await self.auth.authenticate(authorization)
            except InvalidToken as exc:
                await self._refusal_event(scope, method, path, client_ip, "gateway.token.rejected", exc.reason)
                if authorization.partition(b" ")[0].lower() != b"bearer":
                    # Another scheme (Basic, Token...) is no bearer token at all: the bare challenge says which
                    # scheme to use, without an error code (RFC 6750 §3.1).
                    await self._unauthorized(scope, receive, send_with_extra, "Send a bearer access token.")
                    return
                await self._unauthorized(
                    scope, receive, send_with_extra, "The access token is invalid or expired.", True
                )
                return
        elif not is_public(method, path):
            await self._unauthorized(scope, receive, send_with_extra, "Authentication required.")
            return
        scope["comptoir.claims"] = claims

        address = f"ip:{throttle_key(client_ip)}"
        identity = f"user:{claims.sub}" if claims is not None else address
        try:
            decision = await self.limits.check(
                method, path, identity, authenticated=claims is not None, address=address
            )
        except LimitStorageUnavailable:
            if self.storage_failure == "closed" or (
                self.storage_failure == "closed-for-auth" and path.startswith(AUTH_PREFIX)
            ):
                await problem_response(
                    503,
                    scope=scope,
                    detail="Rate limiting is unavailable; try again shortly.",
                    headers={"Retry-After": "5"},
                )(scope, receive, send_with_extra)
                return
            decision = None
        if decision is not None:
            extra.extend(decision.headers())
            if not decision.allowed:
                if path.startswith(AUTH_PREFIX):
                    self._event(scope, "gateway.rate_limit.exceeded", limit=decision.limit)
                await problem_response(
                    429,
                    scope=scope,
                    detail="Too many requests; retry after the time in Retry-After.",
                    extra={"retry_after": max(1, decision.reset_seconds)},
                )(scope, receive, send_with_extra)
                return

        if self.cache is not None:
            key = self.cache.key_of(scope)
            if key is not None:
                if await self.cache.serve(key, scope, send_with_extra):
                    return
                await self.proxy.forward(
                    scope, receive, self.cache.recording(key, route.prefix, send_with_extra), route, client_ip
                )
                return
            if method not in _SAFE:
                answered = [0]

                async def noting(message: Any) -> None:
                    if message["type"] == "http.response.start":
                        answered[0] = message["status"]
                    await send(message)

                try:
                    await self.proxy.forward(scope, receive, noting, route, client_ip, extra)
                finally:
                    # A write refused (4xx) changed nothing: dropping the entries for it would let any client
                    # empty the cache at will. Any other outcome, unknown ones included, may have changed them.
                    if not 400 <= answered[0] < 500:
                        self.cache.invalidate(route.prefix)
                return
        # The extra headers go into the upstream's answer directly; ``send_with_extra`` adds them to the
        # gateway's own answers (and to what the public cache records and serves, which it must not store).
        await self.proxy.forward(scope, receive, send, route, client_ip, extra)

    def _client_ip(self, scope: Scope, headers: dict[bytes, bytes]) -> str | None:
        peer = scope["client"][0] if scope.get("client") else None
        xff = headers.get(b"x-forwarded-for")
        return resolve_client_ip(peer, xff.decode("latin-1") if xff else None, self.trusted)

    def note_client_ip(self, scope: Scope) -> None:
        """For what the gateway answers outside the pipeline (its own endpoints, the HTTPS refusals): their
        access-log lines name the client too, resolved as the pipeline resolves it."""
        lines = [v for k, v in scope.get("headers", ()) if k == b"x-forwarded-for"]
        headers = {b"x-forwarded-for": b", ".join(lines)} if lines else {}
        scope["comptoir.client_ip"] = self._client_ip(scope, headers)

    async def _refusal_event(
        self, scope: Scope, method: str, path: str, client_ip: str | None, action: str, reason: str
    ) -> None:
        """The security event of a request refused before rate limiting (a rejected token, a probe of a blocked
        path), if its address has events left: refusals count in a bucket of their own per address (the
        anonymous limit, as ``refused:<address>``). Without it one address put thousands of events a second
        into the audit chain. The answer itself does not change past the limit: a client whose token expired
        still gets the 401 that tells it to refresh, and the address's own limit (logins) is untouched."""
        try:
            decision = await self.limits.check(method, path, f"refused:{throttle_key(client_ip)}", authenticated=False)
        except LimitStorageUnavailable:
            decision = None  # recorded, as before limits existed
        if decision is not None and not decision.allowed:
            EVENTS_NOT_RECORDED.labels(action).inc()
            return
        self._event(scope, action, reason=reason)

    def _event(self, scope: Scope, action: str, **details: Any) -> None:
        if self.events is not None:
            self.events.record(scope, action, **details)

    async def _preflight(self, scope: Scope, receive: Receive, send: Send, origin: bytes) -> None:
        allowed = self.cors.preflight_headers(origin, _header(scope, b"access-control-request-headers"))
        if not self.cors.allowed(origin) or allowed is None:
            response = problem_response(403, scope=scope, detail="Cross-origin request not allowed.")
            response.headers["vary"] = "Origin"
            await response(scope, receive, send)
            return
        headers = [(b"vary", b"Origin"), (b"content-length", b"0"), *allowed]
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    async def _unauthorized(
        self, scope: Scope, receive: Receive, send: Send, detail: str, rejected: bool = False
    ) -> None:
        """401; ``rejected``: a credential was sent and is refused, which the challenge says (RFC 6750)."""
        challenge = rejected_token_challenge(detail) if rejected else BEARER_CHALLENGE
        response = problem_response(401, scope=scope, detail=detail, headers={"WWW-Authenticate": challenge})
        await response(scope, receive, send)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value  # type: ignore[no-any-return]
    return None
