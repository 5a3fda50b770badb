from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from common.settings import CommonSettings, Environment, check_networks, unprefixed

IMAGE_UPLOAD_BYTES = 5 * 1024 * 1024
MULTIPART_OVERHEAD_BYTES = 64 * 1024

DEFAULT_ROUTE_LIMITS = (
    "POST /api/v1/auth/login=10/minute;"
    "POST /api/v1/auth/login/mfa=10/minute;"
    "POST /api/v1/auth/register=10/hour;"
    "POST /api/v1/auth/token/refresh=120/hour;"
    "POST /api/v1/auth/otp/request=5/hour;"
    "POST /api/v1/auth/otp/verify=20/hour;"
    "POST /api/v1/auth/password-reset/request=5/hour;"
    "POST /api/v1/auth/password-reset/confirm=10/hour"
)

# Development only (ENVIRONMENT=development, `make run`): limits a local fuzzer or a test script does not
# reach, so that localhost does not lock itself out of its own system. Production and test keep the
# seed's values above; an explicitly set limit always wins.
DEVELOPMENT_ANONYMOUS_LIMIT = "100000/hour"
DEVELOPMENT_AUTHENTICATED_LIMIT = "100000/hour"
DEVELOPMENT_ROUTE_LIMITS = (
    "POST /api/v1/auth/login=1000/minute;"
    "POST /api/v1/auth/login/mfa=1000/minute;"
    "POST /api/v1/auth/register=10000/hour;"
    "POST /api/v1/auth/token/refresh=10000/hour;"
    "POST /api/v1/auth/otp/request=1000/hour;"
    "POST /api/v1/auth/otp/verify=10000/hour;"
    "POST /api/v1/auth/password-reset/request=1000/hour;"
    "POST /api/v1/auth/password-reset/confirm=10000/hour"
)


class GatewaySettings(CommonSettings):
    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_", env_file=".env", env_file_encoding="utf-8", extra="ignore", validate_by_name=True
    )

    auth_url: str = "http://127.0.0.1:8001"
    inventory_url: str = "http://127.0.0.1:8002"
    orders_url: str = "http://127.0.0.1:8003"
    audit_url: str = "http://127.0.0.1:8004"
    upstream_connect_timeout_seconds: float = Field(2.0, gt=0)
    # One deadline per forwarded request for everything before the answer's status line: a free pooled
    # connection, connecting, sending, and the upstream's first byte (then 504). Once the answer has
    # begun, its body may take longer, but never falls silent for `upstream_timeout_seconds`.
    upstream_deadline_seconds: float = Field(15.0, gt=0)
    upstream_timeout_seconds: float = Field(15.0, gt=0)
    upstream_pool_size: int = Field(100, ge=1)
    image_upload_max_bytes: int = Field(IMAGE_UPLOAD_BYTES, ge=1024)
    # A dead upstream: after this many consecutive connection failures or timeouts, answer 503 at once
    # for `circuit_open_seconds`, then let one request through to probe it (within the deadline above).
    circuit_failure_threshold: int = Field(5, ge=1)
    circuit_open_seconds: float = Field(10.0, gt=0)

    # Host names the gateway answers for (comma-separated; a leading dot allows subdomains). Empty
    # accepts any Host, which `comptoir check --deploy` refuses in production.
    allowed_hosts: str = Field("", validation_alias=unprefixed("ALLOWED_HOSTS"))
    # Worker processes of this gateway, sharing its port (one per core measures best). Above 1 the rate
    # limits must live in REDIS_URL, or each worker would count alone.
    workers: int = Field(1, ge=1, le=64)
    # How many gateway replicas the deployment runs: above 1, limits and revocations need REDIS_URL.
    replicas: int = Field(1, ge=1, validation_alias=unprefixed("GATEWAY_REPLICAS"))

    # Client identity: X-Forwarded-For is believed only from these peers (CIDRs, comma-separated).
    trusted_proxies: str = Field("", validation_alias=unprefixed("TRUSTED_PROXIES"))

    # CORS: exact origins (scheme://host[:port]), comma-separated; empty = no cross-origin access.
    cors_allowed_origins: str = Field("", validation_alias=unprefixed("CORS_ALLOWED_ORIGINS"))
    cors_allow_credentials: bool = True
    cors_max_age_seconds: int = Field(600, ge=0, le=86_400)

    # Rate limits (`limits` notation: "100/hour", "10/minute"); storage in memory, or Redis when set.
    redis_url: str = Field("", validation_alias=unprefixed("REDIS_URL"))
    rate_limits_enabled: bool = True
    anonymous_rate_limit: str = "100/hour"
    authenticated_rate_limit: str = "1000/hour"
    route_rate_limits: str = DEFAULT_ROUTE_LIMITS
    # When the limit storage (Redis) is unreachable: "closed-for-auth" refuses /api/v1/auth with 503 and
    # lets other routes through; "closed" refuses everything; "open" lets everything through.
    rate_limit_storage_failure: Literal["closed-for-auth", "closed", "open"] = "closed-for-auth"

    # Anonymous GET answers their service marked `public` (the catalogue) are kept this long and served
    # to everyone asking the same path and query (0 turns it off; at most 1 s, so changes show within it).
    public_cache_seconds: float = Field(0.5, ge=0, le=1)
    public_cache_entries: int = Field(2048, ge=1)

    # Verified access tokens are cached until they expire (revocation is still checked every time).
    token_cache_size: int = Field(10_000, ge=0)
    jwks_refresh_seconds: float = Field(300.0, gt=0)
    jwks_min_refetch_seconds: float = Field(5.0, gt=0)

    @field_validator("cors_allowed_origins")
    @classmethod
    def _explicit_origins(cls, value: str) -> str:
        for origin in (o.strip() for o in value.split(",") if o.strip()):
            if origin == "*" or origin == "null" or "*" in origin:
                raise ValueError("CORS_ALLOWED_ORIGINS must list explicit origins, never '*' or 'null'")
            scheme, sep, rest = origin.partition("://")
            if scheme not in ("http", "https") or not sep or not rest or "/" in rest:
                raise ValueError(f"not an origin (scheme://host[:port]): {origin!r}")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxy_networks(cls, value: str) -> str:
        return check_networks(value)  # the error is located at TRUSTED_PROXIES (common.settings names variables)

    @field_validator("redis_url")
    @classmethod
    def _redis_url_the_client_takes(cls, value: str) -> str:
        """redis:// and rediss:// go to the gateway's own client (gateway/redis_counters.py), which takes
        host, port, user, password and database number, and for rediss:// the system's CA bundle: an option
        it would ignore (a query string, say) is refused rather than silently dropped."""
        parts = urlsplit(value)
        if parts.scheme in ("redis", "rediss"):
            database = parts.path.lstrip("/")
            if parts.query or parts.fragment or (database and not database.isdigit()):
                raise ValueError(
                    "REDIS_URL takes redis[s]://[[user]:password@]host[:port][/database] with no options"
                    " (rediss:// checks the server's certificate against the system's CA bundle)"
                )
        return value

    @model_validator(mode="after")
    def _workers_share_limits(self) -> GatewaySettings:
        if self.workers > 1 and self.rate_limits_enabled and not self.redis_url:
            raise ValueError(
                f"GATEWAY_WORKERS={self.workers} needs REDIS_URL: each worker would keep its own rate-limit counts"
            )
        return self

    @model_validator(mode="after")
    def _development_limits(self) -> GatewaySettings:
        if self.environment is Environment.development:
            defaults = {
                "anonymous_rate_limit": DEVELOPMENT_ANONYMOUS_LIMIT,
                "authenticated_rate_limit": DEVELOPMENT_AUTHENTICATED_LIMIT,
                "route_rate_limits": DEVELOPMENT_ROUTE_LIMITS,
            }
            for name, value in defaults.items():
                if name not in self.model_fields_set:
                    setattr(self, name, value)
        return self

    @property
    def hosts(self) -> tuple[str, ...]:
        return tuple(h.strip().lower() for h in self.allowed_hosts.split(",") if h.strip())

    @property
    def origins(self) -> frozenset[str]:
        return frozenset(o.strip().lower() for o in self.cors_allowed_origins.split(",") if o.strip())
