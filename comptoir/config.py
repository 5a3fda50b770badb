"""Settings of the command line (``comptoir run``, ``comptoir migrate`` ...)."""

from __future__ import annotations

from pydantic import Field, field_validator

from common.settings import CommonSettings, check_postgresql_url, unprefixed

SERVICES = ("auth", "inventory", "orders", "audit")
PROCESSES = ("gateway", *SERVICES)


class RunSettings(CommonSettings):
    # An owner/superuser URL of an existing PostgreSQL >= 14; empty means the embedded server.
    database_url: str = Field("", validation_alias=unprefixed("DATABASE_URL"))
    bind_host: str = Field("127.0.0.1", validation_alias=unprefixed("BIND_HOST"))
    gateway_port: int = Field(8000, ge=1, le=65535, validation_alias=unprefixed("GATEWAY_PORT"))
    auth_port: int = Field(8001, ge=1, le=65535, validation_alias=unprefixed("AUTH_PORT"))
    inventory_port: int = Field(8002, ge=1, le=65535, validation_alias=unprefixed("INVENTORY_PORT"))
    orders_port: int = Field(8003, ge=1, le=65535, validation_alias=unprefixed("ORDERS_PORT"))
    audit_port: int = Field(8004, ge=1, le=65535, validation_alias=unprefixed("AUDIT_PORT"))
    # Per-service runtime URLs on a real server; when unset, comptoir migrate generates the role's
    # password and keeps it under DATA_DIR/secrets/.
    auth_database_url: str = Field("", validation_alias=unprefixed("AUTH_DATABASE_URL"))
    inventory_database_url: str = Field("", validation_alias=unprefixed("INVENTORY_DATABASE_URL"))
    orders_database_url: str = Field("", validation_alias=unprefixed("ORDERS_DATABASE_URL"))
    audit_database_url: str = Field("", validation_alias=unprefixed("AUDIT_DATABASE_URL"))
    # Supervisor: the longest pause between restarts of a crashed process.
    restart_backoff_max_seconds: float = Field(30.0, gt=0, validation_alias=unprefixed("RESTART_BACKOFF_MAX_SECONDS"))
    # Read only to say where things are once every process is ready (the processes read their own).
    message_sender: str = Field("jsonl", validation_alias=unprefixed("AUTH_MESSAGE_SENDER"))
    allowed_hosts: str = Field("", validation_alias=unprefixed("ALLOWED_HOSTS"))

    @field_validator(
        "database_url", "auth_database_url", "inventory_database_url", "orders_database_url", "audit_database_url"
    )
    @classmethod
    def _postgresql(cls, value: str) -> str:
        # mysql://... would otherwise be tried as PostgreSQL on its default port, and fail far from its cause.
        return check_postgresql_url(value)

    def port_of(self, process: str) -> int:
        return int(getattr(self, f"{process}_port"))

    def url_of(self, process: str) -> str:
        """Where the other processes reach ``process`` on this machine (its chosen port)."""
        return f"http://{self.connect_host}:{self.port_of(process)}"

    def service_url_override(self, service: str) -> str:
        return str(getattr(self, f"{service}_database_url"))

    @property
    def connect_host(self) -> str:
        """Where the processes reach each other: a wildcard bind still answers on loopback."""
        return "127.0.0.1" if self.bind_host in ("0.0.0.0", "::", "") else self.bind_host  # noqa: S104
