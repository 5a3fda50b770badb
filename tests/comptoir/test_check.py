"""`comptoir check --deploy` and production refusal: each check fails when it should, and only then."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from common.deploychecks import service_checks
from comptoir import check
from gateway.checks import gateway_checks
from gateway.config import GatewaySettings
from services.auth.checks import auth_checks
from services.auth.config import Settings as AuthSettings
from services.orders.config import Settings as OrdersSettings
from tests.conftest import DatabaseFixture, free_port

STRONG = secrets.token_urlsafe(32)


def production_env(database: DatabaseFixture) -> dict[str, str]:
    env = {
        "ENVIRONMENT": "production",
        "LOG_LEVEL": "INFO",
        "DATA_DIR": str(database.data_dir),
        "DATABASE_URL": database.admin_url,
        "TLS_TERMINATING_PROXY": "true",
        "TRUSTED_PROXIES": "10.0.0.2/32",
        "ALLOWED_HOSTS": "api.boutique.cm",
        "BACKUP_ENCRYPTION_KEY": secrets.token_urlsafe(32),
        "AUTH_MESSAGE_SENDER": "webhook",
        "AUTH_WEBHOOK_URL": "https://sms-gateway.boutique.cm/hook",
        "AUTH_WEBHOOK_SECRET": secrets.token_urlsafe(32),
    }
    for process in ("gateway", "auth", "inventory", "orders", "audit"):
        env[f"{process.upper()}_CLIENT_SECRET"] = secrets.token_urlsafe(32)
    return env


def ids(checks: list[Any]) -> dict[str, bool]:
    return {c.id: c.ok for c in checks}


def safe_gateway(**overrides: Any) -> GatewaySettings:
    values: dict[str, Any] = {
        "environment": "production",
        "client_secret": STRONG,
        "tls_terminating_proxy": True,
        "trusted_proxies": "10.0.0.2/32",
        "allowed_hosts": "api.boutique.cm",
        "backup_encryption_key": STRONG,
    }
    return GatewaySettings(**(values | overrides))


def safe_auth(**overrides: Any) -> AuthSettings:
    values: dict[str, Any] = {
        "environment": "production",
        "client_secret": STRONG,
        "tls_terminating_proxy": True,
        "database_url": f"postgresql://comptoir_auth:{STRONG}@db.boutique.cm/comptoir?sslmode=verify-full",
        "message_sender": "webhook",
        "webhook_url": "https://sms.boutique.cm/hook",
        "webhook_secret": STRONG,
        "backup_encryption_key": STRONG,
    }
    return AuthSettings(**(values | overrides))


def test_a_safe_configuration_passes_every_critical_settings_check() -> None:
    for checks in (gateway_checks(safe_gateway()), auth_checks(safe_auth())):
        assert [c for c in checks if c.critical and not c.ok] == []


@pytest.mark.parametrize(
    ("check_id", "overrides"),
    [
        ("CMP-W001", {"log_level": "DEBUG"}),
        ("CMP-W002", {"client_secret": ""}),
        ("CMP-W002", {"client_secret": "change-me-" + "x" * 40}),
        ("CMP-W004", {"hsts_seconds": 3600}),
        ("CMP-W010", {"tls_terminating_proxy": False}),
        ("CMP-W023", {"max_body_bytes": 10 * 1024 * 1024}),
        ("CMP-W003", {"allowed_hosts": ""}),
        ("CMP-W016", {"trusted_proxies": "0.0.0.0/0"}),
        ("CMP-W016", {"trusted_proxies": "::/0"}),
        ("CMP-W030", {"trusted_proxies": ""}),
        ("CMP-W017", {"rate_limits_enabled": False}),
        ("CMP-W018", {"replicas": 3}),
        ("CMP-W031", {"image_upload_max_bytes": 50 * 1024 * 1024}),
    ],
)
def test_each_gateway_check_fails_on_its_unsafe_setting(check_id: str, overrides: dict[str, Any]) -> None:
    result = ids(gateway_checks(safe_gateway(**overrides)))
    assert result[check_id] is False
    assert sum(not ok for ok in result.values()) == 1  # and nothing else fails


@pytest.mark.parametrize(
    ("check_id", "overrides"),
    [
        ("CMP-W011", {"access_token_ttl_seconds": 7200}),
        ("CMP-W012", {"refresh_token_ttl_seconds": 30 * 86_400}),
        ("CMP-W012", {"refresh_idle_timeout_seconds": 3 * 86_400}),
        ("CMP-W013", {"pbkdf2_rounds": 100_000}),
        ("CMP-W014", {"password_min_length": 8}),
        ("CMP-W025", {"message_sender": "jsonl"}),  # a webhook set up but not used: the codes go to a file
        ("CMP-W025", {"message_sender": "jsonl", "webhook_url": ""}),
        ("CMP-W025", {"webhook_secret": "x" * 36}),
        ("CMP-W026", {"otp_ttl_seconds": 1800}),
        ("CMP-W027", {"login_account_delay_after_failures": 50}),
        ("CMP-W019", {"database_url": f"postgresql://comptoir_auth:{STRONG}@db.boutique.cm/comptoir"}),
        ("CMP-W020", {"database_url": "postgresql://comptoir_auth:change-me@db.boutique.cm/comptoir?sslmode=require"}),
        ("CMP-W022", {"bootstrap_admin_password": "Sup3r-long-bootstrap-password"}),
    ],
)
def test_each_auth_check_fails_on_its_unsafe_setting(check_id: str, overrides: dict[str, Any]) -> None:
    result = ids(auth_checks(safe_auth(**overrides)))
    assert result[check_id] is False
    assert sum(not ok for ok in result.values()) == 1


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"message_sender": "jsonl"}, "go to DATA_DIR/messages.jsonl"),
        ({"webhook_secret": "x" * 36}, "AUTH_WEBHOOK_SECRET is weak: 36 characters"),
        ({"webhook_secret": "an-example-webhook-secret-of-many-characters-long"}, "AUTH_WEBHOOK_SECRET is weak"),
    ],
)
def test_the_message_delivery_check_names_what_is_wrong(overrides: dict[str, Any], problem: str) -> None:
    (w025,) = [c for c in auth_checks(safe_auth(**overrides)) if c.id == "CMP-W025"]
    assert not w025.ok
    assert problem in w025.problem


def test_a_unix_socket_database_needs_no_tls() -> None:
    url = f"postgresql://comptoir_orders:{STRONG}@/comptoir?host=/srv/comptoir/pg"
    settings = OrdersSettings(
        environment="production", client_secret=STRONG, tls_terminating_proxy=True, database_url=url
    )
    assert ids(service_checks(settings, "orders"))["CMP-W019"] is True


def test_the_development_defaults_report_their_expected_failures(
    database: DatabaseFixture, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    for name in list(os.environ):
        if name.endswith(("_CLIENT_SECRET", "DATABASE_URL")) or name in ("ENVIRONMENT", "ALLOWED_HOSTS"):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATA_DIR", str(database.data_dir))
    monkeypatch.setenv("DATABASE_URL", database.admin_url)
    report = check.run_deploy_check()
    failing = {c["id"] for c in report["checks"] if c["critical"] and not c["ok"]}
    assert {"CMP-W000", "CMP-W002", "CMP-W003", "CMP-W010", "CMP-W025"} <= failing
    assert not failing & {"CMP-W013", "CMP-W014", "CMP-W011", "CMP-H001", "CMP-H002", "CMP-D001", "CMP-D002"}
    assert check.exit_status(report, None) == 1
    assert report["scorecard"]["band"].startswith("poor")
    printed = capfd.readouterr()
    assert "unhandled_exception" not in printed.out + printed.err  # every probe is answered by the gateway itself


def test_a_production_grade_configuration_passes(
    database: DatabaseFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name, value in production_env(database).items():
        monkeypatch.setenv(name, value)
    report = check.run_deploy_check()
    failing = [c for c in report["checks"] if c["critical"] and not c["ok"]]
    assert failing == [], failing
    assert check.exit_status(report, None) == 0
    # Operator evidence counts only when the evidence file holds a complete entry for it.
    before = report["scorecard"]["percent"]
    checks = [check.Check(**{k: v for k, v in c.items() if k != "status"}) for c in report["checks"]]
    evidence = {"ssl-labs": {"by": "A. Mbarga", "date": "2026-11-20", "reference": "https://ssllabs.example/r/1"}}
    after = check.scorecard(checks, evidence)["percent"]
    assert after > before
    assert check.scorecard(checks, {"ssl-labs": {"by": "A. Mbarga"}})["percent"] == before
    assert check.exit_status(report, fail_under=101) == 1


def test_a_check_failing_in_several_processes_names_them_all(
    database: DatabaseFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One run shows every fix: not the first failing process, then the next one on the next run."""
    for name, value in production_env(database).items():
        monkeypatch.setenv(name, value)
    for service in ("auth", "orders"):  # without sslmode: no TLS to the database
        monkeypatch.setenv(f"{service.upper()}_DATABASE_URL", f"postgresql://comptoir_{service}:{STRONG}@db.invalid/c")
    checks = {c["id"]: c for c in check.run_deploy_check()["checks"]}
    assert not checks["CMP-W019"]["ok"]
    assert checks["CMP-W019"]["process"] == "auth, orders"
    # Those roles cannot sign in (no such server): said as such, and the other checks still ran.
    assert "cannot sign in as comptoir_auth" in checks["CMP-D001"]["problem"]
    assert "has `comptoir migrate` run" in checks["CMP-D001"]["problem"]
    assert "CMP-D004" in checks


def start(process: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "comptoir.serve", process, "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_production_refuses_to_start_an_unsafe_gateway(database: DatabaseFixture) -> None:
    env = {k: v for k, v in os.environ.items() if not k.endswith("DATABASE_URL")}
    env |= production_env(database) | {"ALLOWED_HOSTS": "", "TRUSTED_PROXIES": "0.0.0.0/0"}
    result = start("gateway", env)
    assert result.returncode != 0
    assert "CMP-W003" in result.stderr
    assert "CMP-W016" in result.stderr


def test_production_refuses_to_start_an_unsafe_service(database: DatabaseFixture) -> None:
    env = {k: v for k, v in os.environ.items() if not k.endswith("DATABASE_URL")}
    env |= production_env(database) | {"AUTH_PBKDF2_ROUNDS": "1000", "AUTH_DATABASE_URL": database.url("auth")}
    result = start("auth", env)
    assert result.returncode != 0
    assert "CMP-W013" in result.stderr
