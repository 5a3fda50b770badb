"""The scorecard of `comptoir check --deploy`: every item of seed 004 maps to the check that proves it
(or to operator evidence, or to "does not apply"), and every such check can fail."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from common.deploychecks import Check
from comptoir import check
from comptoir.config import RunSettings
from comptoir.embedded import EmbeddedPostgres
from comptoir.provision import migrate, resolve_roles, to_asyncpg_dsn
from gateway.checks import gateway_checks
from services.auth.checks import auth_checks
from tests.comptoir.test_check import safe_auth, safe_gateway

# Seed 004's "Calculate your security score": items per category.
SEED_COUNTS = [6, 5, 5, 6, 5, 9, 10, 10, 10, 9, 10]

EXPECTED_TABLE = {
    "auth.user-model": "check:CMP-D005",
    "auth.email-login": "check:CMP-D005",
    "auth.password-length": "check:CMP-W014",
    "auth.pbkdf2": "check:CMP-W013",
    "auth.lockout": "check:CMP-W027",
    "auth.password-reset": "check:CMP-W026",
    "settings.debug": "check:CMP-W001",
    "settings.secrets": "check:CMP-W002",
    "settings.allowed-hosts": "check:CMP-W003",
    "settings.middleware": "check:CMP-H009",
    "settings.admin": "check:CMP-H011",
    "https.certificate": "evidence:tls-certificate",
    "https.redirect": "check:CMP-W010",
    "https.hsts": "check:CMP-H007",
    "https.tls-versions": "evidence:tls-configuration",
    "https.ssl-labs": "evidence:ssl-labs",
    "db.hardened": "evidence:database-hardening",
    "db.least-privilege": "check:CMP-D001",
    "db.tls": "check:CMP-W019",
    "db.credentials": "check:CMP-W020",
    "db.backups": "evidence:backup-schedule",
    "db.backup-encryption": "check:CMP-W024",
    "xss.csp": "check:CMP-H004",
    "xss.templates": "na:the API renders no HTML template, only JSON",
    "xss.input": "evidence:input-validation-tests",
    "xss.x-xss-protection": "check:CMP-H012",
    "xss.nosniff": "check:CMP-H001",
    "cors.no-wildcard": "check:CMP-W015",
    "cors.origins": "check:CMP-W033",
    "cors.headers": "check:CMP-H013",
    "cors.preflight": "check:CMP-H014",
    "headers.frame": "check:CMP-H002",
    "headers.nosniff": "check:CMP-H001",
    "headers.referrer": "check:CMP-H003",
    "headers.permissions": "check:CMP-H005",
    "headers.csp": "check:CMP-H004",
    "server.patched": "evidence:os-patching",
    "server.firewall": "evidence:firewall",
    "server.ssh": "evidence:ssh",
    "server.ids": "evidence:intrusion-detection",
    "server.updates": "evidence:automatic-updates",
    "container.base-images": "evidence:image-provenance",
    "container.updated": "evidence:image-updates",
    "container.non-root": "check:CMP-W034",
    "container.limits": "evidence:resource-limits",
    "container.no-secrets": "evidence:image-secrets-scan",
    "monitoring.security-events": "check:CMP-D003",
    "monitoring.failed-logins": "check:CMP-W036",
    "monitoring.alerts": "evidence:alert-routing",
    "monitoring.dashboard": "evidence:dashboard",
    "monitoring.incident-plan": "evidence:incident-response",
    "logging.structured": "check:CMP-W037",
    "logging.rotation": "evidence:log-rotation",
    "logging.no-sensitive": "check:CMP-W001",
    "logging.central": "evidence:log-shipping",
    "logging.integrity": "check:CMP-D004",
    "testing.vulnerability-scan": "evidence:vulnerability-scan",
    "testing.pentest": "evidence:pentest",
    "testing.owasp": "evidence:owasp-review",
    "testing.dependencies": "evidence:dependency-scan",
    "testing.code-review": "evidence:code-review",
    "testing.auth-flows": "evidence:test-report",
    "testing.authorization": "evidence:test-report",
    "testing.input": "evidence:test-report",
    "testing.errors": "check:CMP-H008",
    "testing.edge-cases": "evidence:test-report",
    "compliance.gdpr": "evidence:gdpr",
    "compliance.pci": "na:Comptoir stores no card data",
    "compliance.soc2": "evidence:soc2",
    "compliance.regulations": "evidence:regulations",
    "docs.architecture": "evidence:security-architecture",
    "docs.incident-procedures": "evidence:incident-response",
    "docs.policies": "evidence:security-policies",
    "docs.user-guidelines": "evidence:user-guidelines",
    "docs.developer-guidelines": "evidence:developer-guidelines",
    "deploy.environment": "check:CMP-W038",
    "deploy.migrations": "check:CMP-D007",
    "deploy.static": "na:the API serves no static files",
    "deploy.certificate": "evidence:tls-certificate",
    "deploy.dns": "evidence:dns",
    "deploy.https": "evidence:live-check",
    "deploy.api-secure": "check:CMP-H008",
    "deploy.auth-flows": "evidence:smoke-test",
    "deploy.headers": "check:CMP-H009",
    "deploy.ssl-config": "evidence:ssl-labs",
}


def table() -> dict[str, str]:
    return {item.key: item.proof for _, _, items in check.SCORECARD for item in items}


def test_the_scorecard_is_seed_004_item_for_item() -> None:
    assert [len(items) for _, _, items in check.SCORECARD] == SEED_COUNTS
    assert sum(SEED_COUNTS) == 85
    assert table() == EXPECTED_TABLE


def test_no_item_is_proven_by_a_file_existing() -> None:
    kinds = {proof.partition(":")[0] for proof in table().values()}
    assert kinds == {"check", "evidence", "na"}


def ids_failing(checks: list[Check]) -> set[str]:
    return {c.id for c in checks if not c.ok}


def bare_answers(**overrides: httpx.Response) -> dict[str, httpx.Response]:
    """Answers without any security header: what a gateway without its middleware would send."""
    request = httpx.Request("OPTIONS", "https://gateway/api/v1/auth/login", headers={"origin": "https://shop.cm"})
    answers = {
        name: httpx.Response(200, headers={"server": "uvicorn", "content-type": "text/html"})
        for name in ("health", "not found", "unauthenticated", "admin")
    }
    answers["foreign preflight"] = httpx.Response(
        200, headers={"access-control-allow-origin": check.EVIL_ORIGIN, "x-xss-protection": "1; mode=block"}
    )
    answers["allowed preflight"] = httpx.Response(403, request=request)
    answers["health"].headers["x-xss-protection"] = "1; mode=block"
    answers["plain http"] = httpx.Response(200)  # served in the clear
    return answers | overrides


def header_failures() -> set[str]:
    return ids_failing(check.header_checks(bare_answers(), production=True, tls_proxy=True))


def settings_failures(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **env: str) -> set[str]:
    for name in list(os.environ):
        if name.endswith(("_CLIENT_SECRET", "DATABASE_URL")) or name in ("ENVIRONMENT", "BACKUP_ENCRYPTION_KEY"):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return ids_failing(check.settings_checks({}))


# How to make each check of the table fail (database checks: see the test that breaks a real database).
SETTINGS_SCENARIOS: dict[str, Any] = {
    "CMP-W001": lambda: ids_failing(gateway_checks(safe_gateway(log_level="DEBUG"))),
    "CMP-W002": lambda: ids_failing(gateway_checks(safe_gateway(client_secret="change-me"))),
    "CMP-W003": lambda: ids_failing(gateway_checks(safe_gateway(allowed_hosts=""))),
    "CMP-W010": lambda: ids_failing(gateway_checks(safe_gateway(tls_terminating_proxy=False))),
    "CMP-W013": lambda: ids_failing(auth_checks(safe_auth(pbkdf2_rounds=1000))),
    "CMP-W014": lambda: ids_failing(auth_checks(safe_auth(password_min_length=8))),
    "CMP-W015": lambda: (
        {"CMP-W015"}
        & ids_failing(
            gateway_checks(
                safe_gateway().model_construct(**(safe_gateway().model_dump() | {"cors_allowed_origins": "*"}))
            )
        )
    ),
    "CMP-W019": lambda: ids_failing(auth_checks(safe_auth(database_url="postgresql://u:" + "p" * 40 + "@db.cm/c"))),
    "CMP-W020": lambda: ids_failing(auth_checks(safe_auth(database_url="postgresql://u:pw@db.cm/c?sslmode=require"))),
    "CMP-W026": lambda: ids_failing(auth_checks(safe_auth(otp_ttl_seconds=3600))),
    "CMP-W027": lambda: ids_failing(auth_checks(safe_auth(login_account_delay_after_failures=50))),
}
ENV_SCENARIOS = {
    "CMP-W024": {"ENVIRONMENT": "production"},
    "CMP-W036": {"AUDIT_FAILED_LOGIN_THRESHOLD": "500"},
    "CMP-W037": {"LOG_FORMAT": "console"},
    "CMP-W038": {"GATEWAY_UPSTREAM_TIMEOUT_SECONDS": "-1"},
}
DATABASE_CHECKS = {"CMP-D001", "CMP-D003", "CMP-D004", "CMP-D005", "CMP-D007"}


def test_every_check_of_the_table_has_a_way_to_fail() -> None:
    used = {proof.partition(":")[2] for proof in table().values() if proof.startswith("check:")}
    header_ids = {c.id for c in check.header_checks(bare_answers(), production=True)}
    covered = set(SETTINGS_SCENARIOS) | set(ENV_SCENARIOS) | header_ids | DATABASE_CHECKS | {"CMP-W033", "CMP-W034"}
    assert used <= covered, sorted(used - covered)


@pytest.mark.parametrize("check_id", sorted(SETTINGS_SCENARIOS))
def test_each_settings_check_can_fail(check_id: str) -> None:
    assert check_id in SETTINGS_SCENARIOS[check_id]()


def test_each_header_check_fails_on_a_gateway_without_its_middleware() -> None:
    failing = header_failures()
    for check_id in ("CMP-H001", "CMP-H002", "CMP-H003", "CMP-H004", "CMP-H005", "CMP-H006", "CMP-H007"):
        assert check_id in failing
    for check_id in ("CMP-H008", "CMP-H009", "CMP-H011", "CMP-H012", "CMP-H013", "CMP-H014", "CMP-H015"):
        assert check_id in failing


def test_plain_http_is_really_redirected_in_production_behind_a_tls_proxy(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ENVIRONMENT", "production")
    monkeypatch.setenv("TLS_TERMINATING_PROXY", "true")
    monkeypatch.setenv("TRUSTED_PROXIES", "172.31.0.1/32")
    results = {c.id: c for c in asyncio.run(check.live_header_checks())}
    assert results["CMP-H015"].status == "PASS"
    assert results["CMP-H011"].status == "PASS"  # the other answers were asked as the proxy asks


@pytest.mark.parametrize("check_id", sorted(ENV_SCENARIOS))
def test_each_run_level_check_can_fail(check_id: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert check_id in settings_failures(monkeypatch, tmp_path, **ENV_SCENARIOS[check_id])


def test_running_as_root_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert "CMP-W034" in settings_failures(monkeypatch, tmp_path)
    monkeypatch.setattr(os, "geteuid", lambda: 10001)
    assert "CMP-W034" not in settings_failures(monkeypatch, tmp_path)


def test_plain_http_cors_origins_fail_in_production(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ENVIRONMENT", "production")
    monkeypatch.setenv("CORS_ALLOWED_ORIGINS", "http://shop.cm")
    results = {c.id: c for c in asyncio.run(check.live_header_checks())}
    assert results["CMP-W033"].status == "FAIL"
    monkeypatch.setenv("CORS_ALLOWED_ORIGINS", "https://shop.cm")
    results = {c.id: c for c in asyncio.run(check.live_header_checks())}
    assert results["CMP-W033"].status == "PASS"
    assert results["CMP-H014"].status == "PASS"  # the listed origin's preflight really is answered


def test_generated_secrets_are_a_note_in_development_and_critical_in_production(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    generated = {p: secrets.token_urlsafe(32) for p in ("gateway", "auth", "inventory", "orders", "audit")}
    (secrets_dir / "service-clients.json").write_text(json.dumps(generated))
    development = settings_failures(monkeypatch, tmp_path, ENVIRONMENT="development")
    assert "CMP-W002" not in development
    assert "CMP-W032" not in development
    note = {c.id: c for c in check.settings_checks({})}["CMP-W032"]
    assert note.status == "NOTE"
    assert "generated by `comptoir run`" in note.note
    production = settings_failures(monkeypatch, tmp_path, ENVIRONMENT="production")
    assert "CMP-W032" in production
    assert {c.id: c for c in check.settings_checks({})}["CMP-W032"].critical


def test_evidence_counts_only_when_complete_and_not_applicable_leaves_the_percentage() -> None:
    checks: list[Check] = []
    empty = check.scorecard(checks, {})
    assert all(
        row["status"] == "EVIDENCE NEEDED"
        for category in empty["categories"]
        for row in category["items"]
        if row["proof"].startswith("evidence:")
    )
    complete = {"by": "A. Mbarga", "date": "2026-11-20", "reference": "ticket OPS-12"}
    with_dns = check.scorecard(checks, {"dns": complete})
    assert with_dns["passed"] == empty["passed"] + 1
    for broken in ({"by": "A. Mbarga", "date": "2026-11-20"}, complete | {"date": "last week"}):
        assert check.scorecard(checks, {"dns": broken})["passed"] == empty["passed"]
    not_applicable = check.scorecard(checks, {"soc2": {"not_applicable": "no SOC 2 commitment"}})
    assert not_applicable["total"] == empty["total"] - 1
    assert empty["total"] == 85 - sum(proof.startswith("na:") for proof in table().values())


def test_the_evidence_file_is_read_from_yaml_or_json(tmp_path: Path) -> None:
    path = tmp_path / "evidence.yaml"
    path.write_text("ssl-labs:\n  by: A. Mbarga\n  date: 2026-11-20\n  reference: https://ssllabs.example/r/1\n")
    assert check.load_evidence(path)["ssl-labs"]["by"] == "A. Mbarga"
    path.write_text("- not a mapping\n")
    with pytest.raises(check.EvidenceError):
        check.load_evidence(path)


def test_output_is_sorted_by_severity_and_names_every_failing_check(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in list(os.environ):
        if name.endswith(("_CLIENT_SECRET", "DATABASE_URL")) or name == "ENVIRONMENT":
            monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    report = check.run_deploy_check(with_database=False)
    order = [check.SEVERITY_ORDER[c["status"]] for c in report["checks"]]
    assert order == sorted(order)
    failing = [c["id"] for c in report["checks"] if c["status"] == "FAIL"]
    assert failing
    summary = check.render(report).splitlines()[-1]
    assert summary.startswith(f"FAILED ({len(failing)})")
    for check_id in failing:
        assert check_id in summary
    assert "score" in check.render(report, fail_under=99).splitlines()[-1]


async def _break(admin_url: str, *statements: str) -> None:
    conn = await asyncpg.connect(to_asyncpg_dsn(admin_url))
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def test_each_database_check_fails_on_a_database_that_breaks_it(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.comptoir.test_backup import seed_and_sign, tamper

    data_dir = tmp_path_factory.mktemp("scorecard")
    # The chain check reads this installation's keys from DATA_DIR: this one's, not whatever ./var holds
    # where the tests happen to run (a developer's own `make run`).
    monkeypatch.setenv("DATA_DIR", str(data_dir))
    embedded = EmbeddedPostgres(data_dir)
    admin_url = embedded.start()
    try:
        settings = RunSettings(data_dir=data_dir, database_url=admin_url)

        async def migrations_and_users() -> set[str]:
            conn = await asyncpg.connect(to_asyncpg_dsn(admin_url))
            try:
                return ids_failing([await check._users_table_check(conn), await check._migrations_check(conn)])
            finally:
                await conn.close()

        assert asyncio.run(migrations_and_users()) == {"CMP-D005", "CMP-D007"}  # nothing migrated yet
        roles = migrate(settings, admin_url)
        assert resolve_roles(settings, admin_url) == roles

        def database_failures() -> set[str]:
            checks = asyncio.run(check.database_checks(admin_url, roles))
            return ids_failing([*checks, asyncio.run(check.audit_chain_check(admin_url))])

        asyncio.run(seed_and_sign({r.service: r.url for r in roles}["audit"], data_dir))
        assert database_failures() == set()
        asyncio.run(_break(admin_url, "ALTER ROLE comptoir_orders CREATEDB"))
        assert database_failures() == {"CMP-D002"}
        asyncio.run(
            _break(admin_url, "ALTER ROLE comptoir_orders NOCREATEDB", "GRANT UPDATE ON audit.events TO comptoir_audit")
        )
        assert database_failures() == {"CMP-D003"}
        asyncio.run(
            _break(
                admin_url,
                "REVOKE UPDATE ON audit.events FROM comptoir_audit",
                "GRANT USAGE ON SCHEMA inventory TO comptoir_orders",
                "GRANT SELECT ON inventory.alembic_version TO comptoir_orders",
            )
        )
        assert database_failures() == {"CMP-D001"}
        asyncio.run(_break(admin_url, "REVOKE ALL ON SCHEMA inventory FROM comptoir_orders"))
        asyncio.run(tamper(admin_url))
        assert database_failures() == {"CMP-D004"}
    finally:
        embedded.stop()
