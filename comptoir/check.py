"""``comptoir check --deploy``: the deployment checks and the seed's security scorecard, computed.

Four kinds of evidence, none self-declared:
- settings: every process's effective settings, read from the environment as the process would;
- live: an in-process gateway built from those settings answers real requests, and its headers are read;
- database: the service roles' real privileges (when a database is reachable);
- files: the container files and the documents an item needs (a path counts only if the file exists).
"""

from __future__ import annotations

import asyncio
import importlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.deploychecks import Check, service_checks
from comptoir.config import SERVICES, RunSettings

REPO = Path(__file__).resolve().parent.parent


def settings_checks(roles_urls: dict[str, str]) -> list[Check]:
    from gateway.checks import gateway_checks
    from gateway.config import GatewaySettings
    from services.auth.checks import auth_checks

    checks = gateway_checks(GatewaySettings())
    for service in SERVICES:
        config = importlib.import_module(f"services.{service}.config")
        settings = config.Settings()
        if not settings.database_url and service in roles_urls:
            settings = settings.model_copy(update={"database_url": roles_urls[service]})
        checks += auth_checks(settings) if service == "auth" else service_checks(settings, service)
    # One line per check id: the first failing process speaks for it.
    merged: dict[str, Check] = {}
    for check in checks:
        if check.id not in merged or (merged[check.id].ok and not check.ok):
            merged[check.id] = check
    return list(merged.values())


async def live_header_checks() -> list[Check]:
    """Build the gateway from the effective settings and read the headers it really sends."""
    import httpx

    from common.tokens import StaticKeys
    from gateway.config import GatewaySettings
    from gateway.main import create_app

    settings = GatewaySettings()
    # The effective settings, including the environment; only the refusal is skipped (it is reported here).
    app = create_app(
        settings.model_copy(update={"log_level": "WARNING"}), key_source=StaticKeys({}), enforce_checks=False
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="https://gateway") as client:
        answers = [
            await client.get("/healthz"),
            await client.get("/api/v1/does-not-exist"),
            await client.get("/api/v1/orders"),  # 401
        ]
    hsts_expected = settings.is_production

    def header_everywhere(name: str, predicate: Callable[[str], bool]) -> bool:
        return all(predicate(r.headers.get(name, "")) for r in answers)

    specs: list[tuple[str, str, bool, str]] = [
        (
            "CMP-H001",
            "X-Content-Type-Options: nosniff",
            header_everywhere("x-content-type-options", lambda v: v == "nosniff"),
            "",
        ),
        (
            "CMP-H002",
            "frames denied (X-Frame-Options, frame-ancestors)",
            header_everywhere("x-frame-options", lambda v: v == "DENY")
            and header_everywhere("content-security-policy", lambda v: "frame-ancestors 'none'" in v),
            "",
        ),
        (
            "CMP-H003",
            "Referrer-Policy strict-origin-when-cross-origin",
            header_everywhere("referrer-policy", lambda v: v in ("strict-origin-when-cross-origin", "no-referrer")),
            "",
        ),
        (
            "CMP-H004",
            "Content-Security-Policy default-src 'none'",
            header_everywhere("content-security-policy", lambda v: "default-src 'none'" in v),
            "",
        ),
        ("CMP-H005", "Permissions-Policy set", header_everywhere("permissions-policy", bool), ""),
        ("CMP-H006", "no Server version header", all("server" not in r.headers for r in answers), ""),
        (
            "CMP-H007",
            "HSTS sent in production",
            not hsts_expected or header_everywhere("strict-transport-security", lambda v: "includeSubDomains" in v),
            "set ENVIRONMENT=production",
        ),
        (
            "CMP-H008",
            "errors are problem+json without internals",
            all(r.headers.get("content-type", "").startswith("application/problem+json") for r in answers[1:]),
            "",
        ),
    ]
    return [
        Check(
            id_,
            title,
            ok,
            True,
            "" if ok else "the gateway's responses lack it",
            "" if ok else fix or "report a bug",
            "gateway",
        )
        for id_, title, ok, fix in specs
    ]


async def database_checks(admin_url: str, roles: Sequence[Any]) -> list[Check]:
    import asyncpg

    from comptoir.provision import to_asyncpg_dsn

    checks: list[Check] = []
    isolated, problems = True, []
    for role in roles:
        conn = await asyncpg.connect(to_asyncpg_dsn(role.url))
        try:
            for other in roles:
                if other.service == role.service:
                    continue
                try:
                    await conn.fetchval(f'SELECT count(*) FROM "{other.service}".alembic_version')  # noqa: S608
                    isolated = False
                    problems.append(f"{role.user} can read schema {other.service}")
                except asyncpg.InsufficientPrivilegeError:
                    pass
        finally:
            await conn.close()
    checks.append(
        Check(
            "CMP-D001",
            "each service role is confined to its schema",
            isolated,
            True,
            "; ".join(problems),
            "" if isolated else "run comptoir migrate (it revokes cross-schema grants)",
        )
    )
    admin = await asyncpg.connect(to_asyncpg_dsn(admin_url))
    try:
        names = [role.user for role in roles]
        powerful = await admin.fetch(
            "SELECT rolname FROM pg_roles WHERE rolname = ANY($1::text[])"
            " AND (rolsuper OR rolcreaterole OR rolcreatedb OR rolbypassrls)",
            names,
        )
        checks.append(
            Check(
                "CMP-D002",
                "service roles hold no administrative attribute",
                not powerful,
                True,
                f"powerful roles: {[r['rolname'] for r in powerful]}" if powerful else "",
                "ALTER ROLE … NOSUPERUSER NOCREATEROLE NOCREATEDB NOBYPASSRLS" if powerful else "",
            )
        )
        audit_user = next((r.user for r in roles if r.service == "audit"), "comptoir_audit")
        tables = await admin.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'audit' AND tablename = 'events'"
        )
        if tables:
            writable = await admin.fetchval(
                "SELECT has_table_privilege($1, 'audit.events', 'UPDATE')"
                " OR has_table_privilege($1, 'audit.events', 'DELETE')",
                audit_user,
            )
            checks.append(
                Check(
                    "CMP-D003",
                    "audit role cannot UPDATE or DELETE events",
                    not writable,
                    True,
                    "the audit runtime role may rewrite history" if writable else "",
                    "REVOKE UPDATE, DELETE ON audit.events FROM the audit role" if writable else "",
                )
            )
        else:
            checks.append(
                Check(
                    "CMP-D003",
                    "audit role cannot UPDATE or DELETE events",
                    False,
                    True,
                    "no audit.events table",
                    "run comptoir migrate",
                )
            )
    finally:
        await admin.close()
    return checks


async def audit_chain_check(admin_url: str) -> Check:
    """The audit chain recomputed, with its signed checkpoints (what `comptoir audit verify` does)."""
    from services.audit import admin
    from services.audit.config import Settings as AuditSettings

    result = await admin.verify(admin_url, AuditSettings())
    problem = "" if result.ok else f"the audit chain breaks at sequence {result.first_bad_sequence}"
    return Check(
        "CMP-D004",
        "audit chain verifies",
        result.ok,
        True,
        problem,
        "" if result.ok else "investigate with comptoir audit verify; restore from backup",
        "audit",
    )


@dataclass(frozen=True)
class Item:
    text: str
    evaluate: str  # "check:CMP-…", "file:path", or "manual:path" (evidence an operator provides)


def _file_checks() -> dict[str, bool]:
    compose = REPO / "docker-compose.yml"
    dockerfile = REPO / "deploy" / "Dockerfile"
    result = {
        "only-gateway-published": False,
        "non-root-image": False,
        "limits": False,
        "no-secret-layers": False,
        "log-rotation": False,
    }
    if compose.exists():
        import yaml

        services = (yaml.safe_load(compose.read_text()) or {}).get("services", {})
        result["only-gateway-published"] = [n for n, s in services.items() if s.get("ports")] == ["gateway"]
        apps = [s for n, s in services.items() if n not in ("postgres", "redis")]
        result["limits"] = all(s.get("deploy", {}).get("resources", {}).get("limits") for s in apps)
        result["log-rotation"] = all(s.get("logging") for s in apps)
    if dockerfile.exists():
        text = dockerfile.read_text()
        final = text.rsplit("FROM ", 1)[-1]
        result["non-root-image"] = any(
            line.startswith("USER ") and line.split()[1] not in ("root", "0") for line in final.splitlines()
        )
        result["no-secret-layers"] = not any(
            line.strip().startswith(("ENV", "ARG")) and any(w in line.upper() for w in ("PASSWORD", "SECRET", "TOKEN"))
            for line in text.splitlines()
        )
    return result


SCORECARD: list[tuple[str, str, list[Item]]] = [
    (
        "Authentication & Authorization",
        "critical",
        [
            Item("Custom user model", "file:services/auth/models.py"),
            Item("Email-based authentication", "file:services/auth/models.py"),
            Item("Strong password validation (12+)", "check:CMP-W014"),
            Item("PBKDF2 password hashing", "check:CMP-W013"),
            Item("Account lockout after failed logins", "check:CMP-W027"),
            Item("Password reset secured", "check:CMP-W026"),
        ],
    ),
    (
        "Django-equivalent security settings",
        "critical",
        [
            Item("DEBUG off", "check:CMP-W001"),
            Item("Secrets unique, random, strong", "check:CMP-W002"),
            Item("ALLOWED_HOSTS restricted", "check:CMP-W003"),
            Item("Security middleware enabled", "check:CMP-H001"),
            Item("Admin interface secured or disabled", "check:CMP-H008"),
        ],
    ),
    (
        "HTTPS",
        "critical",
        [
            Item("TLS certificate installed and valid", "manual:docs/evidence/tls-certificate.md"),
            Item("HTTPS redirect / TLS-terminating proxy", "check:CMP-W010"),
            Item("HSTS enabled", "check:CMP-W004"),
            Item("TLS 1.2 minimum, 1.3 preferred", "manual:docs/evidence/tls-configuration.md"),
            Item("SSL Labs A+", "manual:docs/evidence/ssl-labs.md"),
        ],
    ),
    (
        "Database security",
        "critical",
        [
            Item("Database server hardened and updated", "manual:docs/evidence/database-hardening.md"),
            Item("Database user has minimal permissions", "check:CMP-D001"),
            Item("Database connection encrypted", "check:CMP-W019"),
            Item("Credentials from the environment, not defaults", "check:CMP-W020"),
            Item("Automated backups", "check:CMP-W024"),
            Item("Backup encryption", "check:CMP-W024"),
        ],
    ),
    (
        "XSS protection",
        "important",
        [
            Item("Content Security Policy", "check:CMP-H004"),
            Item("No HTML rendering (JSON only)", "check:CMP-H008"),
            Item("Input validation on all inputs", "file:tests/common/test_http_conventions.py"),
            Item("X-XSS-Protection header set", "check:CMP-H001"),
            Item("X-Content-Type-Options: nosniff", "check:CMP-H001"),
        ],
    ),
    (
        "Network security",
        "important",
        [
            Item("No CORS wildcard", "check:CMP-W015"),
            Item("Explicit CORS origins", "check:CMP-W015"),
            Item("CORS headers properly configured", "file:tests/gateway/test_security.py"),
            Item("Preflight handled", "file:gateway/cors.py"),
            Item("X-Frame-Options DENY", "check:CMP-H002"),
            Item("nosniff", "check:CMP-H001"),
            Item("Referrer-Policy", "check:CMP-H003"),
            Item("Permissions-Policy", "check:CMP-H005"),
            Item("Content Security Policy", "check:CMP-H004"),
        ],
    ),
    (
        "Infrastructure",
        "important",
        [
            Item("Server OS updated", "manual:docs/evidence/os-patching.md"),
            Item("Only necessary ports open", "file-check:only-gateway-published"),
            Item("SSH key-based, no root login", "manual:docs/evidence/ssh.md"),
            Item("Intrusion detection", "manual:docs/evidence/intrusion-detection.md"),
            Item("Automated security updates", "manual:docs/evidence/os-patching.md"),
            Item("Trusted base images", "file:deploy/Dockerfile"),
            Item("Images regularly updated", "manual:docs/evidence/image-updates.md"),
            Item("Non-root containers", "file-check:non-root-image"),
            Item("Resource limits", "file-check:limits"),
            Item("No secrets in image layers", "file-check:no-secret-layers"),
        ],
    ),
    (
        "Monitoring & logging",
        "important",
        [
            Item("Security event logging", "file:services/audit/main.py"),
            Item("Failed logins tracked", "file:services/auth/main.py"),
            Item("Suspicious activity alerts", "file:deploy/prometheus/alerts.yml"),
            Item("Real-time dashboard", "file:deploy/grafana/comptoir.json"),
            Item("Incident response plan", "file:docs/operations.md"),
            Item("Structured logging", "file:common/logging.py"),
            Item("Log rotation", "file-check:log-rotation"),
            Item("Sensitive data not logged", "file:tests/common/test_logging.py"),
            Item("Centralised log management", "manual:docs/evidence/log-shipping.md"),
            Item("Log integrity protection", "check:CMP-D004"),
        ],
    ),
    (
        "Testing & validation",
        "recommended",
        [
            Item("Vulnerability scanning", "manual:docs/evidence/vulnerability-scan.md"),
            Item("Penetration testing", "manual:docs/evidence/pentest.md"),
            Item("OWASP Top 10 addressed", "file:SECURITY.md"),
            Item("Dependency scan clean", "manual:docs/evidence/pip-audit.md"),
            Item("Security code review", "manual:docs/evidence/code-review.md"),
            Item("Authentication flows tested", "file:tests/auth"),
            Item("Authorization verified", "file:tests/gateway/test_security.py"),
            Item("Input validation tested", "file:tests/common/test_http_conventions.py"),
            Item("Error handling reviewed", "file:tests/common/test_http_conventions.py"),
            Item("Edge cases covered", "file:tests/e2e"),
        ],
    ),
    (
        "Compliance & documentation",
        "recommended",
        [
            Item("GDPR (export, erasure)", "file:services/auth/router.py"),
            Item("PCI DSS (if processing payments)", "manual:docs/evidence/pci.md"),
            Item("SOC 2 controls (if required)", "manual:docs/evidence/soc2.md"),
            Item("Industry regulations", "manual:docs/evidence/regulations.md"),
            Item("Security architecture documented", "file:SECURITY.md"),
            Item("Incident response procedures", "file:docs/operations.md"),
            Item("Security policies published", "file:SECURITY.md"),
            Item("User security guidelines", "manual:docs/evidence/user-guidelines.md"),
            Item("Developer security guidelines", "file:SECURITY.md"),
        ],
    ),
    (
        "Deployment verification",
        "recommended",
        [
            Item("Environment variables configured", "check:CMP-W002"),
            Item("Database migrations applied", "check:CMP-D001"),
            Item("Static files (none: JSON API)", "check:CMP-H008"),
            Item("SSL certificate verified", "manual:docs/evidence/tls-certificate.md"),
            Item("DNS configured", "manual:docs/evidence/dns.md"),
            Item("Loads over HTTPS", "check:CMP-W010"),
            Item("API endpoints respond securely", "check:CMP-H008"),
            Item("Authentication flows working", "manual:docs/evidence/smoke-test.md"),
            Item("Security headers present", "check:CMP-H002"),
            Item("SSL configuration validated", "manual:docs/evidence/ssl-labs.md"),
        ],
    ),
]

BANDS = [
    (90, "excellent - production ready"),
    (80, "good - minor improvements needed"),
    (70, "fair - security enhancements required"),
    (0, "poor - major security work needed"),
]


def scorecard(checks: list[Check], root: Path = REPO, evidence_dir: Path | None = None) -> dict[str, Any]:
    """Items are automatic (a check), files of this repository, or evidence an operator provides: a
    ``manual:`` path is looked up under ``evidence_dir`` (default: the repository), and counts only if it exists."""
    by_id = {c.id: c for c in checks}
    files = _file_checks()
    categories = []
    passed_total = total = 0
    for name, tier, items in SCORECARD:
        rows: list[dict[str, Any]] = []
        for item in items:
            kind, _, target = item.evaluate.partition(":")
            if kind == "check":
                ok, evidence = (by_id[target].ok if target in by_id else False), target
            elif kind == "file-check":
                ok, evidence = files.get(target, False), f"docker-compose.yml/Dockerfile: {target}"
            elif kind == "manual":
                ok, evidence = ((evidence_dir or root) / target).exists(), target
            else:
                ok, evidence = (root / target).exists(), target
            rows.append(
                {
                    "item": item.text,
                    "ok": ok,
                    "kind": "automatic"
                    if kind in ("check", "file-check")
                    else ("evidence" if kind == "manual" else "file"),
                    "evidence": evidence,
                }
            )
        passed = sum(r["ok"] for r in rows)
        passed_total += passed
        total += len(rows)
        categories.append({"category": name, "tier": tier, "passed": passed, "total": len(rows), "items": rows})
    percent = round(100 * passed_total / total, 1) if total else 0.0
    band = next(label for floor, label in BANDS if percent >= floor)
    return {"categories": categories, "passed": passed_total, "total": total, "percent": percent, "band": band}


def run_deploy_check(*, with_database: bool = True, evidence: Path | None = None) -> dict[str, Any]:
    settings = RunSettings()
    checks: list[Check] = [
        Check(
            "CMP-W000",
            "running as production",
            settings.is_production,
            True,
            "" if settings.is_production else f"ENVIRONMENT={settings.environment.value}",
            "" if settings.is_production else "set ENVIRONMENT=production",
            "all",
        )
    ]
    roles: list[Any] = []
    admin_url = ""
    embedded = None
    if with_database:
        from comptoir.provision import resolve_roles

        if settings.database_url:
            admin_url = settings.database_url
        elif (settings.data_dir / "pg" / "PG_VERSION").exists():
            from comptoir.embedded import EmbeddedPostgres

            embedded = EmbeddedPostgres(settings.data_dir)
            admin_url = embedded.start()
        if admin_url:
            roles = resolve_roles(settings, admin_url)
    try:
        checks += settings_checks({r.service: r.url for r in roles})
        checks += asyncio.run(live_header_checks())
        if admin_url:
            checks += asyncio.run(database_checks(admin_url, roles))
            checks.append(asyncio.run(audit_chain_check(admin_url)))
        else:
            checks.append(
                Check(
                    "CMP-D001",
                    "each service role is confined to its schema",
                    False,
                    True,
                    "no database reachable (DATABASE_URL unset and no embedded data)",
                    "run with DATABASE_URL or after comptoir migrate",
                )
            )
    finally:
        if embedded is not None:
            embedded.stop()
    return {"checks": [c.as_dict() for c in checks], "scorecard": scorecard(checks, evidence_dir=evidence)}


def render(report: dict[str, Any]) -> str:
    lines = []
    for c in report["checks"]:
        status = "PASS" if c["ok"] else ("FAIL" if c["critical"] else "WARN")
        line = f"{c['id']:<9} {status}  {c['title']}"
        if not c["ok"]:
            line += f" [{c['process']}]: {c['problem']} -> fix: {c['fix']}"
        lines.append(line)
    card = report["scorecard"]
    lines.append("")
    lines.append("Security scorecard (seed 004)")
    for category in card["categories"]:
        lines.append(
            f"  {category['category']:<38} {category['passed']:>2}/{category['total']:<2} ({category['tier']})"
        )
        for row in category["items"]:
            if not row["ok"]:
                lines.append(f"      missing: {row['item']} ({row['kind']}: {row['evidence']})")
    lines.append(f"Overall security score: {card['percent']}% ({card['passed']}/{card['total']}): {card['band']}")
    return "\n".join(lines)


def exit_status(report: dict[str, Any], fail_under: float | None) -> int:
    critical_failure = any(bool(c["critical"]) and not c["ok"] for c in report["checks"])
    below = fail_under is not None and report["scorecard"]["percent"] < fail_under
    return 1 if critical_failure or below else 0


def main(json_output: bool, fail_under: float | None, with_database: bool = True, evidence: Path | None = None) -> int:
    report = run_deploy_check(with_database=with_database, evidence=evidence)
    print(json.dumps(report, indent=2) if json_output else render(report))  # noqa: T201
    return exit_status(report, fail_under)
