"""Deployment checks on a process's effective settings (the ``CMP-W…`` ids of ``comptoir check --deploy``).

Every process runs the checks that concern it at start-up; with ``ENVIRONMENT=production`` a failing
critical check stops the process, naming the check. ``comptoir check --deploy`` runs them all, plus
the checks that need the database or a running app.
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from common.settings import CommonSettings, ServiceSettings

ONE_YEAR = 31_536_000
MIN_SECRET_CHARS = 43  # 256 bits of urlsafe base64
DEFAULT_MARKERS = ("change-me", "changeme", "example", "secret", "password", "default")


@dataclass(frozen=True)
class Check:
    id: str
    title: str
    ok: bool
    critical: bool = True
    problem: str = ""
    fix: str = ""
    process: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def strong_secret(value: str) -> bool:
    lowered = value.lower()
    return len(value) >= MIN_SECRET_CHARS and not any(marker in lowered for marker in DEFAULT_MARKERS)


def _c(id_: str, title: str, ok: bool, problem: str, fix: str, *, process: str, critical: bool = True) -> Check:
    return Check(id_, title, ok, critical, "" if ok else problem, "" if ok else fix, process)


def common_checks(s: CommonSettings, process: str) -> list[Check]:
    return [
        _c(
            "CMP-W001",
            "debug output off",
            s.log_level.upper() != "DEBUG",
            "LOG_LEVEL=DEBUG logs request details",
            "set LOG_LEVEL=INFO",
            process=process,
        ),
        _c(
            "CMP-W002",
            "service client secret is strong",
            strong_secret(s.client_secret),
            f"{process.upper()}_CLIENT_SECRET is missing, shorter than 256 bits or a placeholder",
            "generate one: python -c 'import secrets; print(secrets.token_urlsafe(32))'",
            process=process,
        ),
        _c(
            "CMP-W004",
            "HSTS at least one year with includeSubDomains",
            s.hsts_seconds >= ONE_YEAR,
            f"HSTS max-age is {s.hsts_seconds}s",
            f"set {process.upper()}_HSTS_SECONDS>={ONE_YEAR}",
            process=process,
        ),
        _c(
            "CMP-W010",
            "HTTPS: a TLS-terminating proxy is declared",
            s.tls_terminating_proxy,
            "plain HTTP without a declared TLS-terminating proxy",
            "terminate TLS in front of the gateway and set TLS_TERMINATING_PROXY=true (+ TRUSTED_PROXIES)",
            process=process,
        ),
        _c(
            "CMP-W023",
            "JSON body limit at most 1 MiB",
            s.max_body_bytes <= 1024 * 1024,
            f"{process.upper()}_MAX_BODY_BYTES={s.max_body_bytes}",
            "use the default 1048576",
            process=process,
        ),
        _c(
            "CMP-W024",
            "encrypted backups configured",
            strong_secret(s.backup_encryption_key),
            "BACKUP_ENCRYPTION_KEY is missing or weak",
            "set BACKUP_ENCRYPTION_KEY (32 random bytes, base64)",
            process=process,
            critical=False,
        ),
    ]


def _database_tls(url: str) -> bool:
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if parts.hostname in (None, "") or query.get("host", "").startswith("/"):
        return True  # a unix socket never leaves the machine
    return query.get("sslmode") in ("require", "verify-ca", "verify-full") or query.get("ssl") in (
        "require",
        "verify-ca",
        "verify-full",
        "true",
    )


def service_checks(s: ServiceSettings, process: str) -> list[Check]:
    password = urlsplit(s.database_url).password or ""
    return [
        *common_checks(s, process),
        _c(
            "CMP-W019",
            "database connection uses TLS",
            _database_tls(s.database_url),
            f"{process.upper()}_DATABASE_URL connects over TCP without sslmode=require/verify-full",
            "append ?sslmode=verify-full (or require) to the URL",
            process=process,
        ),
        _c(
            "CMP-W020",
            "database password is strong",
            len(password) >= 16
            and not any(m in password.lower() for m in DEFAULT_MARKERS)
            or not urlsplit(s.database_url).hostname,
            f"{process.upper()}_DATABASE_URL has a short or placeholder password",
            "use a generated password of at least 16 characters",
            process=process,
        ),
    ]


def _too_broad(network: str) -> bool:
    try:
        return ipaddress.ip_network(network.strip(), strict=False).prefixlen == 0
    except ValueError:
        return True


def gateway_checks(s: Any) -> list[Check]:
    proxies = [p for p in s.trusted_proxies.split(",") if p.strip()]
    return [
        *common_checks(s, "gateway"),
        _c(
            "CMP-W003",
            "allowed hosts set",
            bool(s.hosts) and "*" not in s.allowed_hosts,
            "ALLOWED_HOSTS is empty: the gateway answers any Host header",
            "set ALLOWED_HOSTS=api.yourshop.example",
            process="gateway",
        ),
        _c(
            "CMP-W015",
            "CORS lists explicit origins",
            "*" not in s.cors_allowed_origins,
            "CORS_ALLOWED_ORIGINS contains a wildcard",
            "list each origin (scheme://host[:port])",
            process="gateway",
        ),
        _c(
            "CMP-W016",
            "TRUSTED_PROXIES is not everyone",
            not any(_too_broad(p) for p in proxies),
            "TRUSTED_PROXIES contains 0.0.0.0/0, ::/0 or an invalid network: any client can pick its IP",
            "list only your proxies' addresses",
            process="gateway",
        ),
        _c(
            "CMP-W030",
            "the TLS proxy's address is trusted",
            bool(proxies) or not s.tls_terminating_proxy,
            "TLS_TERMINATING_PROXY=true but TRUSTED_PROXIES is empty: client IPs will be the proxy's",
            "set TRUSTED_PROXIES to the proxy's address",
            process="gateway",
        ),
        _c(
            "CMP-W017",
            "rate limits enabled",
            bool(s.rate_limits_enabled),
            "GATEWAY_RATE_LIMITS_ENABLED=false",
            "enable rate limits",
            process="gateway",
        ),
        _c(
            "CMP-W018",
            "shared limit storage for several replicas",
            s.replicas <= 1 or bool(s.redis_url),
            f"GATEWAY_REPLICAS={s.replicas} without REDIS_URL: each replica counts alone and misses revocations",
            "set REDIS_URL",
            process="gateway",
        ),
        _c(
            "CMP-W031",
            "image upload limit at most 5 MiB",
            s.image_upload_max_bytes <= 5 * 1024 * 1024,
            f"GATEWAY_IMAGE_UPLOAD_MAX_BYTES={s.image_upload_max_bytes}",
            "use the default 5242880",
            process="gateway",
        ),
    ]


def auth_checks(s: Any) -> list[Check]:
    webhook = str(getattr(s, "webhook_url", ""))
    return [
        *service_checks(s, "auth"),
        _c(
            "CMP-W011",
            "access tokens live at most 1 hour",
            s.access_token_ttl_seconds <= 3600,
            f"AUTH_ACCESS_TOKEN_TTL_SECONDS={s.access_token_ttl_seconds}",
            "at most 3600",
            process="auth",
        ),
        _c(
            "CMP-W012",
            "refresh tokens: 7 days absolute, 24 h idle at most",
            s.refresh_token_ttl_seconds <= 7 * 86_400 and s.refresh_idle_timeout_seconds <= 86_400,
            "refresh token lifetime above the seed's bounds",
            "AUTH_REFRESH_TOKEN_TTL_SECONDS<=604800, idle<=86400",
            process="auth",
        ),
        _c(
            "CMP-W013",
            "PBKDF2 at least 600,000 rounds",
            s.pbkdf2_rounds >= 600_000,
            f"AUTH_PBKDF2_ROUNDS={s.pbkdf2_rounds}",
            "use the default 600000",
            process="auth",
        ),
        _c(
            "CMP-W014",
            "passwords of at least 12 characters",
            s.password_min_length >= 12,
            f"AUTH_PASSWORD_MIN_LENGTH={s.password_min_length}",
            "at least 12",
            process="auth",
        ),
        _c(
            "CMP-W025",
            "real message delivery (not the development sink)",
            webhook.startswith("https://") and strong_secret(str(getattr(s, "webhook_secret", ""))),
            "OTP and reset messages go to DATA_DIR/messages.jsonl",
            "set AUTH_WEBHOOK_URL (https) and AUTH_WEBHOOK_SECRET",
            process="auth",
        ),
        _c(
            "CMP-W026",
            "OTP and reset tokens short-lived",
            s.otp_ttl_seconds <= 600 and s.password_reset_ttl_seconds <= 1800 and s.otp_max_attempts <= 5,
            "OTP lifetime > 10 min, reset token > 30 min or more than 5 OTP tries",
            "use the defaults",
            process="auth",
        ),
        _c(
            "CMP-W027",
            "account lockout enabled",
            s.login_delay_after_failures <= 5 and s.login_account_delay_after_failures <= 10,
            "login throttling thresholds above the defaults",
            "use the defaults (5 failures per IP or device, 10 per account from unknown devices)",
            process="auth",
        ),
        _c(
            "CMP-W022",
            "no bootstrap admin password left in the environment",
            not s.bootstrap_admin_password,
            "BOOTSTRAP_ADMIN_PASSWORD is still set",
            "remove it after the first start and change that password",
            process="auth",
            critical=False,
        ),
    ]


class UnsafeConfiguration(SystemExit):
    """Raised at start-up in production; the message names every failing critical check."""


def enforce(checks: list[Check], *, production: bool) -> None:
    failing = [c for c in checks if c.critical and not c.ok]
    if production and failing:
        lines = "; ".join(f"{c.id} {c.title}: {c.problem} (fix: {c.fix})" for c in failing)
        raise UnsafeConfiguration(f"refusing to start in production: {lines}")
