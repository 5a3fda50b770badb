"""The gateway: the only process client apps reach."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from common.app import ComptoirAPI
from common.clientip import Network, is_trusted, parse_networks
from common.deploychecks import enforce
from common.errors import NO_SUCH_RESOURCE, TYPE_PREFIX, problem_response
from common.http import PooledTransport
from common.logging import configure_logging
from common.revocation import RevocationPoller, RevocationSet
from common.service_tokens import ServiceTokenClient
from common.tokens import ACCESS, JWKS_PATH, KeySource, RemoteJWKS, TokenVerifier
from gateway.auth import GatewayAuth
from gateway.cache import PublicCache
from gateway.checks import gateway_checks
from gateway.config import MULTIPART_OVERHEAD_BYTES, GatewaySettings
from gateway.cors import Cors, CorsOnEveryAnswer
from gateway.events import SecurityEvents
from gateway.health import HEALTH_PATH, HealthCache
from gateway.health import router as health_router
from gateway.limits import RateLimits
from gateway.openapi import OPENAPI_PATH, OpenAPICache
from gateway.openapi import router as openapi_router
from gateway.pipeline import Pipeline
from gateway.proxy import Proxy
from gateway.routes import IMAGE_UPLOAD_PATH

# Paths under /api/v1 that the gateway answers itself.
OWN_PATHS = frozenset({HEALTH_PATH, OPENAPI_PATH})


# Probes and Prometheus reach a pod by its address, not by a public host name.
_PROBES = frozenset({"/healthz", "/readyz", "/metrics"})
_FORWARDED = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"forwarded"})


def host_allowed(host: bytes | None, allowed: tuple[str, ...]) -> bool:
    if not allowed:
        return True
    if host is None:
        return False
    name = host.decode("latin-1").strip().lower()
    name = name.rsplit(":", 1)[0] if not name.endswith("]") else name
    return any(name == entry or (entry.startswith(".") and name.endswith(entry)) for entry in allowed)


def forwarded_https(scope: Scope, proxies: Sequence[Network]) -> bool:
    """The request came through a trusted TLS-terminating proxy that says the client used HTTPS (the
    right-most ``X-Forwarded-Proto`` value: the one the nearest proxy wrote)."""
    peer = scope["client"][0] if scope.get("client") else None
    if peer is None or not is_trusted(peer, proxies):
        return False
    values = b",".join(v for k, v in scope.get("headers", ()) if k == b"x-forwarded-proto")
    return values.rsplit(b",", 1)[-1].strip().lower() == b"https"


HTTPS_REQUIRED_TYPE = TYPE_PREFIX + "https-required"


async def https_required(scope: Scope, receive: Receive, send: Send) -> None:
    """A plain-HTTP request in production behind a TLS-terminating proxy: a read is sent to its HTTPS
    address (308); anything else is refused, never served in the clear (its credentials have already
    crossed the network: the client must be fixed, not silently followed)."""
    host = next((v for k, v in scope.get("headers", ()) if k == b"host"), None)
    if scope.get("method") in ("GET", "HEAD") and host:
        # The name without the plain-HTTP port (kept inside an IPv6 literal's brackets): HTTPS is on its own.
        name = host if host.endswith(b"]") or b":" not in host else host.rsplit(b":", 1)[0]
        target = b"https://" + name + (scope.get("raw_path") or scope.get("path", "/").encode("latin-1"))
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        headers = {"Location": target.decode("latin-1")}
        await problem_response(
            308, scope=scope, detail="Use HTTPS.", headers=headers, title="HTTPS required", type_=HTTPS_REQUIRED_TYPE
        )(scope, receive, send)
        return
    detail = "Use HTTPS: this gateway takes only requests its TLS-terminating proxy received over HTTPS."
    await problem_response(403, scope=scope, detail=detail, title="HTTPS required", type_=HTTPS_REQUIRED_TYPE)(
        scope, receive, send
    )


class _Dispatch:
    """``/api/v1/...`` goes straight to the pipeline; everything else to the gateway's own endpoints.
    ``https_from``: in production behind a TLS-terminating proxy, its addresses (a request is served only
    when it says HTTPS)."""

    def __init__(
        self,
        pipeline: Pipeline,
        own: ASGIApp,
        allowed_hosts: tuple[str, ...] = (),
        https_from: Sequence[Network] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.own = own
        self.allowed_hosts = allowed_hosts
        self.https_from = https_from

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and self.allowed_hosts and path not in _PROBES:
            host = next((v for k, v in scope.get("headers", ()) if k == b"host"), None)
            if not host_allowed(host, self.allowed_hosts):
                await problem_response(400, scope=scope, detail="Unknown Host.")(scope, receive, send)
                return
        if self.https_from is not None and scope["type"] == "http":
            if path not in _PROBES and not forwarded_https(scope, self.https_from):
                self.pipeline.note_client_ip(scope)  # the refusal's access-log line names the client too
                await https_required(scope, receive, send)
                return
            if path == "/metrics" and any(k in _FORWARDED for k, _ in scope.get("headers", ())):
                # Prometheus scrapes the gateway's own port directly; a request its TLS proxy forwarded (it
                # says so in these headers) is a client's, and the counters are not theirs to read.
                await problem_response(404, scope=scope, detail=NO_SUCH_RESOURCE)(scope, receive, send)
                return
        if scope["type"] == "http" and path.startswith("/api/v1/") and path not in OWN_PATHS:
            await self.pipeline(scope, receive, send)
        else:
            if scope["type"] == "http" and "comptoir.client_ip" not in scope:
                self.pipeline.note_client_ip(scope)
            await self.own(scope, receive, send)


class GatewayApp(ComptoirAPI):
    proxy: Proxy
    pipeline: Pipeline
    openapi_cache: OpenAPICache
    health_cache: HealthCache

    def build_middleware_stack(self) -> ASGIApp:
        own = FastAPI.build_middleware_stack(self)
        settings: GatewaySettings | None = getattr(self.state, "settings", None)
        hosts = settings.hosts if settings is not None else ()
        https_from = None
        if settings is not None and settings.is_production and settings.tls_terminating_proxy:
            https_from = parse_networks(settings.trusted_proxies)
        return CorsOnEveryAnswer(self.wrap(_Dispatch(self.pipeline, own, hosts, https_from)), self.pipeline.cors)


def create_app(
    settings: GatewaySettings | None = None, *, key_source: KeySource | None = None, enforce_checks: bool = True
) -> GatewayApp:
    settings = settings or GatewaySettings()
    configure_logging(level=settings.log_level, fmt=settings.log_format, service="gateway")
    if enforce_checks:
        enforce(gateway_checks(settings), production=settings.is_production)
    proxy = Proxy(settings)
    # Every HTTP call the gateway makes goes through common.upstream's client: the forwarding (proxy.py)
    # and, here, JWKS, revocations, service tokens and security events (pools made at start-up).
    auth_client = PooledTransport(settings.auth_internal_url)
    audit_client = PooledTransport(settings.audit_internal_url)
    keys = key_source or RemoteJWKS(
        JWKS_PATH,
        auth_client,
        refresh_seconds=settings.jwks_refresh_seconds,
        min_refetch_seconds=settings.jwks_min_refetch_seconds,
    )
    verifier = TokenVerifier(keys, issuer=settings.token_issuer, audience=settings.token_audience, token_use=ACCESS)
    revocations = RevocationSet()
    service_tokens = ServiceTokenClient(auth_client, client_id="gateway", client_secret=settings.client_secret)
    poller = RevocationPoller(auth_client, service_tokens, revocations, interval=settings.revocation_poll_seconds)
    limits = RateLimits(settings)
    events = SecurityEvents(audit_client, service_tokens)
    pipeline = Pipeline(
        proxy=proxy,
        auth=GatewayAuth(verifier, revocations, cache_size=settings.token_cache_size),
        limits=limits,
        cors=Cors(
            settings.origins, allow_credentials=settings.cors_allow_credentials, max_age=settings.cors_max_age_seconds
        ),
        trusted_proxies=parse_networks(settings.trusted_proxies),
        storage_failure=settings.rate_limit_storage_failure,
        events=events,
        cache=(
            PublicCache(settings.public_cache_seconds, max_entries=settings.public_cache_entries)
            if settings.public_cache_seconds > 0
            else None
        ),
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await proxy.start()
        if settings.client_secret:
            poller.start()
            events.start()
        try:
            yield
        finally:
            await poller.stop()
            await events.stop()
            await proxy.close()
            await auth_client.aclose()
            await audit_client.aclose()
            await limits.aclose()

    app = GatewayApp(
        service="gateway",
        settings=settings,
        body_limits=[(IMAGE_UPLOAD_PATH, settings.image_upload_max_bytes + MULTIPART_OVERHEAD_BYTES)],
        multipart_paths=IMAGE_UPLOAD_PATH,
        title="Comptoir gateway",
        lifespan=lifespan,
        openapi_url=None,
    )
    app.proxy = proxy
    app.pipeline = pipeline
    app.openapi_cache = OpenAPICache()
    app.health_cache = HealthCache()
    app.state.settings = settings
    app.state.revocations = revocations
    app.state.service_tokens = service_tokens
    app.state.security_events = events
    # Reported, not gating: with Redis down every replica would turn unready at once, and the
    # storage-failure policy (closed-for-auth by default) already decides what is served.
    app.state.readiness_advisories["rate_limit_storage"] = limits.healthy
    app.include_router(health_router)
    app.include_router(openapi_router)
    return app
