"""Settings shared by every process.

Each process has one pydantic-settings class with its own env prefix (``AUTH_``, ``GATEWAY_`` ...).
The few settings that concern the whole installation (``ENVIRONMENT``, ``DATA_DIR``, ``LOG_LEVEL``)
are read without a prefix so that one variable configures all five processes.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from common.clientip import parse_networks


class Environment(StrEnum):
    development = "development"
    test = "test"
    production = "production"


def unprefixed(name: str) -> AliasChoices:
    """Read a setting from an unprefixed variable (and accept the field name in code)."""
    return AliasChoices(name, name.lower())


# The names `logging` and uvicorn both take.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def variable_names(settings_class: type[BaseSettings]) -> dict[str, str]:
    """Field name (and every alias) -> the environment variable the operator sets for it."""
    prefix = str(settings_class.model_config.get("env_prefix") or "")
    names: dict[str, str] = {}
    for name, field in settings_class.model_fields.items():
        alias = field.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias] if isinstance(alias, str) else []
        first = next((c for c in choices if isinstance(c, str)), None)
        variable = first or field.alias or f"{prefix}{name}".upper()
        for key in (name, *(c for c in choices if isinstance(c, str))):
            names[key] = variable
    return names


def _in_variables(text: str, names: dict[str, str]) -> str:
    """A validator's message speaks of fields (``webhook_secret``); the operator knows the variable."""
    fields = sorted((n for n in names if "_" in n and n.islower()), key=len, reverse=True)
    if not fields:
        return text
    pattern = re.compile(r"(?<![A-Za-z0-9_])(" + "|".join(map(re.escape, fields)) + r")(?![A-Za-z0-9_])")
    return pattern.sub(lambda m: names[m.group(1)], text)


_UNPARSABLE = re.compile(r'^error parsing value for field "(\w+)" from source "\w+"$')


def _unparsable(message: str, names: dict[str, str]) -> str:
    """pydantic-settings could not decode a list or mapping variable (it reads them as JSON)."""
    found = _UNPARSABLE.match(message)
    if found is None:
        return _in_variables(message, names)
    variable = names.get(found.group(1), found.group(1))
    return f'{variable}: not valid JSON (lists and mappings are written as JSON: ["a", "b"], {{"k": "v"}})'


def _naming_variables(settings_class: type[BaseSettings], exc: ValidationError) -> ValidationError:
    """The same errors, located and worded by environment variable instead of field name (inputs hidden:
    settings hold secrets)."""
    names = variable_names(settings_class)
    errors: list[Any] = []
    for error in exc.errors():
        loc = error["loc"]
        first = names.get(str(loc[0]), str(loc[0])) if loc else None
        errors.append(
            {
                "type": PydanticCustomError(error["type"], _in_variables(error["msg"], names)),
                "loc": (first, *loc[1:]) if first is not None else (),
                "input": None,  # settings hold secrets: never carried in the error
            }
        )
    return ValidationError.from_exception_data(exc.title, errors, hide_input=True)


def describe_settings_error(exc: ValueError) -> str:
    """One line for an operator: every invalid setting by its environment variable, and why."""
    if not isinstance(exc, ValidationError):
        return " ".join(str(exc).split()) or type(exc).__name__
    problems = []
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        where = ".".join(str(part) for part in error["loc"])
        problems.append(message if not where or message.startswith(where) else f"{where}: {message}")
    return "; ".join(problems)


def check_networks(value: str) -> str:
    """Comma-separated networks (CIDRs, or bare addresses), each of which must parse."""
    for part in (p.strip() for p in value.split(",") if p.strip()):
        try:
            parse_networks(part)
        except ValueError:
            raise ValueError(
                f"{part!r} is not a network: write CIDRs such as 10.0.0.2/32 or 192.0.2.0/24, comma-separated"
            ) from None
    return value


def check_postgresql_url(value: str) -> str:
    """Empty, or a PostgreSQL URL: another database's URL would only fail later, at the first connection."""
    if not value:
        return value
    scheme = urlsplit(value).scheme.lower() if "://" in value else ""
    if scheme.partition("+")[0] not in ("postgresql", "postgres"):
        shown = f"{scheme}://" if scheme else "a value without a scheme"
        raise ValueError(f"must be a postgresql:// URL (Comptoir runs on PostgreSQL >= 14), not {shown}")
    return value


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

    def __init__(self, **values: Any) -> None:
        # Errors name the environment variable to fix (AUTH_WEBHOOK_SECRET), not the field (webhook_secret).
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise _naming_variables(type(self), exc) from None
        except SettingsError as exc:
            raise SettingsError(_unparsable(str(exc), variable_names(type(self)))) from exc

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, not {value!r}")
        return level

    @field_validator("data_dir")
    @classmethod
    def _a_directory(cls, value: Path) -> Path:
        """DATA_DIR is a directory, or can become one: no part of it is a file (checked, nothing created)."""
        for path in (value, *value.parents):
            try:
                if not path.exists():
                    continue
                blocked = not path.is_dir()
            except OSError:  # not ours to look at: whoever creates it will say why
                break
            if blocked:
                where = "" if path == value else f" cannot be created: {path.absolute()}"
                raise ValueError(f"DATA_DIR {value.absolute()}{where} is a file, not a directory")
            break
        return value

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

    @field_validator("gateway_networks")
    @classmethod
    def _networks(cls, value: str) -> str:
        return check_networks(value)

    @field_validator("database_url")
    @classmethod
    def _postgresql(cls, value: str) -> str:
        return check_postgresql_url(value)
