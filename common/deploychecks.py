"""Deployment checks on a process's effective settings (the ``CMP-W…`` ids of ``comptoir check --deploy``).

Every process runs the checks that concern it at start-up; with ``ENVIRONMENT=production`` a failing
critical check stops the process, naming the check. The checks common to every process live here; the
gateway's are in ``gateway/checks.py`` and the auth service's in ``services/auth/checks.py``.
``comptoir check --deploy`` runs them all, plus the checks that need the database or a running app.

A check that does not apply to this configuration (HSTS outside production, TLS to a unix socket ...)
is ``applies=False``: it is reported as N/A and never counted as passed or failed.
"""

from __future__ import annotations

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
    applies: bool = True
    # Something the operator should know even though the check passes (shown as NOTE).
    note: str = ""

    @property
    def status(self) -> str:
        """FAIL (critical), WARN (not critical), NOTE, PASS or N/A."""
        if not self.applies:
            return "N/A"
        if not self.ok:
            return "FAIL" if self.critical else "WARN"
        return "NOTE" if self.note else "PASS"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"status": self.status}


def strong_secret(value: str) -> bool:
    lowered = value.lower()
    return len(value) >= MIN_SECRET_CHARS and not any(marker in lowered for marker in DEFAULT_MARKERS)


def check(
    id_: str,
    title: str,
    ok: bool,
    problem: str,
    fix: str,
    *,
    process: str,
    critical: bool = True,
    applies: bool = True,
    note: str = "",
) -> Check:
    """A check result; problem and fix are kept only when it fails, and it passes when it does not apply."""
    ok = ok or not applies
    failing = not ok
    return Check(id_, title, ok, critical, problem if failing else "", fix if failing else "", process, applies, note)


_c = check


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
            applies=s.is_production,
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
    ]


def over_unix_socket(url: str) -> bool:
    """A unix-socket URL (the embedded server): the connection never leaves the machine."""
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    return parts.hostname in (None, "") or query.get("host", "").startswith("/")


def database_tls(url: str) -> bool:
    query = {k: v[-1] for k, v in parse_qs(urlsplit(url).query).items()}
    return query.get("sslmode") in ("require", "verify-ca", "verify-full") or query.get("ssl") in (
        "require",
        "verify-ca",
        "verify-full",
        "true",
    )


def service_checks(s: ServiceSettings, process: str) -> list[Check]:
    password = urlsplit(s.database_url).password or ""
    socket = over_unix_socket(s.database_url)
    return [
        *common_checks(s, process),
        _c(
            "CMP-W019",
            "database connection uses TLS",
            database_tls(s.database_url),
            f"{process.upper()}_DATABASE_URL connects over TCP without sslmode=require/verify-full",
            "append ?sslmode=verify-full (or require) to the URL",
            process=process,
            applies=not socket,
        ),
        _c(
            "CMP-W020",
            "database password is strong",
            len(password) >= 16 and not any(m in password.lower() for m in DEFAULT_MARKERS),
            f"{process.upper()}_DATABASE_URL has a short or placeholder password",
            "use a generated password of at least 16 characters",
            process=process,
            applies=not socket,
        ),
    ]


class UnsafeConfiguration(SystemExit):
    """Raised at start-up in production; the message names every failing critical check."""


def enforce(checks: list[Check], *, production: bool) -> None:
    failing = [c for c in checks if c.critical and not c.ok]
    if production and failing:
        lines = "; ".join(f"{c.id} {c.title}: {c.problem} (fix: {c.fix})" for c in failing)
        raise UnsafeConfiguration(f"refusing to start in production: {lines}")
