"""Settings shared by every process.

Each process has one pydantic-settings class with its own env prefix (``AUTH_``, ``GATEWAY_`` ...).
The few settings that concern the whole installation (``ENVIRONMENT``, ``DATA_DIR``, ``LOG_LEVEL``)
are read without a prefix so that one variable configures all five processes.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Environment(StrEnum):
    development = "development"
    test = "test"
    production = "production"


def unprefixed(name: str) -> AliasChoices:
    """Read a setting from an unprefixed variable (and accept the field name in code)."""
    return AliasChoices(name, name.lower())


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore", validate_by_name=True)

    environment: Environment = Field(Environment.development, validation_alias=unprefixed("ENVIRONMENT"))
    data_dir: Path = Field(Path("var"), validation_alias=unprefixed("DATA_DIR"))
    log_level: str = Field("INFO", validation_alias=unprefixed("LOG_LEVEL"))
    log_format: str = Field("json", validation_alias=unprefixed("LOG_FORMAT"), pattern="^(json|console)$")
    # Plain HTTP is acceptable in production only behind a TLS-terminating proxy declared here
    # (with its address in TRUSTED_PROXIES).
    tls_terminating_proxy: bool = Field(False, validation_alias=unprefixed("TLS_TERMINATING_PROXY"))
    # Authenticated encryption key for `comptoir backup` (urlsafe base64 of 32 random bytes).
    backup_encryption_key: str = Field("", validation_alias=unprefixed("BACKUP_ENCRYPTION_KEY"), repr=False)
    # Bodies above this size are refused with 413 before they are read.
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    # HSTS is sent only when the installation is served over HTTPS, i.e. in production by default.
    hsts_seconds: int = Field(31_536_000, ge=0)

    # Tokens: the auth service signs, every other process verifies with its published keys.
    token_issuer: str = Field("urn:comptoir:auth", validation_alias=unprefixed("TOKEN_ISSUER"))
    token_audience: str = Field("urn:comptoir:api", validation_alias=unprefixed("TOKEN_AUDIENCE"))
    auth_internal_url: str = Field("http://127.0.0.1:8001", validation_alias=unprefixed("AUTH_INTERNAL_URL"))
    audit_internal_url: str = Field("http://127.0.0.1:8004", validation_alias=unprefixed("AUDIT_INTERNAL_URL"))
    # This process's own client secret for service tokens (client-credentials grant at auth).
    client_secret: str = Field("", repr=False)
    # How often the revocation feed is polled (the gateway must reject a revoked session within 1 s).
    revocation_poll_seconds: float = Field(0.25, gt=0, le=5)

    @property
    def is_production(self) -> bool:
        return self.environment is Environment.production

    @property
    def send_hsts(self) -> bool:
        return self.is_production and self.hsts_seconds > 0


class ServiceSettings(CommonSettings):
    """Settings of a service that owns a database schema."""

    database_url: str = Field("", description="Connection URL of this service's own database role (postgresql://...).")
    # A fixed pool by default: overflow connections are opened and closed with every burst, and each
    # costs PostgreSQL a fork, SCRAM and asyncpg's type introspection (measured: ~30 new connections/s
    # under load, 3 ms of PostgreSQL CPU per order; none with a fixed pool).
    db_pool_size: int = Field(10, ge=1, le=100)
    db_max_overflow: int = Field(0, ge=0, le=100)
    db_connect_timeout_seconds: float = Field(5.0, gt=0)
    db_statement_timeout_ms: int = Field(15_000, ge=100)
    readiness_timeout_seconds: float = Field(2.0, gt=0)
    # Audit outbox relay: batch size, idle poll interval, longest backoff, attempts before it alerts.
    # 500: measured (make bench-audit), half the relay CPU and a fifth less audit and PostgreSQL CPU per
    # event than 200 in a backlog; a batch is split into bodies of at most 4 MiB (common.relay).
    outbox_batch_size: int = Field(500, ge=1, le=1000)
    outbox_poll_seconds: float = Field(0.5, gt=0)
    outbox_max_backoff_seconds: float = Field(300.0, gt=0)
    outbox_alert_after_attempts: int = Field(10, ge=1)
    # How long a relay holds a claimed batch while it sends it (the send is abandoned after half of it);
    # a batch of a relay that died mid-send is sent again after this.
    outbox_lease_seconds: float = Field(30.0, ge=2)
    # Peers whose X-Forwarded-For is believed: the gateway's addresses (loopback for `comptoir run`).
    gateway_networks: str = Field("127.0.0.1/32,::1/128")
