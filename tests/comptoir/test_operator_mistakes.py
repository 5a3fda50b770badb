"""An operator's mistakes found in review, each ending with one line that names what to fix and a non-zero
status, never a traceback: a log level, a proxy network or a database URL that cannot work, a DATA_DIR that
cannot be a directory, a broken evidence file, a URL nothing answers at, a file that is not an archive, and
settings errors that name the environment variable rather than the field behind it."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from comptoir import check, serve
from comptoir.cli import build_parser, run_command
from comptoir.config import RunSettings
from gateway.config import GatewaySettings
from tests.conftest import SECURITY_HEADERS, free_port
from tests.support.servers import request_body
from tests.support.servers import serve as serve_app

UNREACHABLE_DATABASE = "postgresql://comptoir:secret@127.0.0.1:1/comptoir"
WEAK_WEBHOOK = {
    "AUTH_MESSAGE_SENDER": "webhook",
    "AUTH_WEBHOOK_URL": "https://hooks.boutique.cm/messages",
    "AUTH_WEBHOOK_SECRET": "too-short",
}


@pytest.fixture
def operator(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """A shell in an empty directory with no database and no settings but DATA_DIR."""
    for name in list(os.environ):
        if name.endswith(("DATABASE_URL", "_CLIENT_SECRET")) or name.startswith(("AUTH_", "GATEWAY_")):
            monkeypatch.delenv(name, raising=False)
    for name in ("ENVIRONMENT", "LOG_LEVEL", "TRUSTED_PROXIES", "BOOTSTRAP_ADMIN_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "var"))
    return monkeypatch


def comptoir(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run one command as the console script does: its status, standard output and standard error."""
    status = run_command(build_parser().parse_args(list(argv)))
    out, err = capsys.readouterr()
    return status, out, err


def one_line(err: str) -> str:
    assert err.endswith("\n"), err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


# ---- LOG_LEVEL ----


def test_an_unknown_log_level_is_a_settings_error_naming_the_levels(
    operator: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    operator.setenv("LOG_LEVEL", "LOUD")
    operator.setenv("DATABASE_URL", UNREACHABLE_DATABASE)
    status, _, err = comptoir(capsys, "purge")
    assert status == 2
    line = one_line(err)
    assert line.startswith("comptoir purge: invalid settings: LOG_LEVEL")
    assert "DEBUG, INFO, WARNING, ERROR, CRITICAL" in line
    assert "'LOUD'" in line


def test_a_log_level_is_read_in_any_case(operator: pytest.MonkeyPatch) -> None:
    operator.setenv("LOG_LEVEL", "warning")
    assert RunSettings().log_level == "WARNING"


# ---- TRUSTED_PROXIES ----


def test_a_trusted_proxy_that_is_not_a_network_is_a_settings_error(operator: pytest.MonkeyPatch) -> None:
    operator.setenv("TRUSTED_PROXIES", "10.0.0.2/32, notacidr")
    with pytest.raises(ValidationError) as refused:
        GatewaySettings()
    [error] = refused.value.errors()
    assert error["loc"] == ("TRUSTED_PROXIES",)
    assert "'notacidr' is not a network" in error["msg"]
    operator.setenv("TRUSTED_PROXIES", "10.0.0.2/32, 192.0.2.7, 2001:db8::/32")
    assert GatewaySettings().trusted_proxies


def test_the_gateway_refuses_to_start_on_a_trusted_proxy_that_is_not_a_network(
    operator: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    operator.setenv("TRUSTED_PROXIES", "notacidr")
    with pytest.raises(SystemExit) as stopped:
        serve.factory("gateway")()
    assert stopped.value.code == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("comptoir gateway: refusing to start: invalid settings: TRUSTED_PROXIES")


def test_check_deploy_names_a_trusted_proxy_that_is_not_a_network(
    operator: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    operator.setenv("TRUSTED_PROXIES", "notacidr")
    status, out, _ = comptoir(capsys, "check", "--deploy", "--no-database")
    assert status == 1
    [w038] = [line for line in out.splitlines() if line.startswith("CMP-W038")]
    assert "FAIL" in w038
    assert "gateway: TRUSTED_PROXIES: 'notacidr' is not a network" in w038
    assert "CMP-W038" in out.splitlines()[-1]


# ---- the evidence file ----


def _in_days(days: int) -> str:
    return (dt.datetime.now(dt.UTC).date() + dt.timedelta(days=days)).isoformat()


@pytest.mark.parametrize(
    ("entry", "said"),
    [
        ("ssl-labs: {by: A. Mbarga, date: 2026-13-45, reference: r1}", "ssl-labs: date '2026-13-45' is not a calendar"),
        ("ssl-labs: {by: A. Mbarga, date: 20261120, reference: r1}", "ssl-labs: date '20261120' is not YYYY-MM-DD"),
        (f"ssl-labs: {{by: A. Mbarga, date: {_in_days(3)}, reference: r1}}", "is in the future"),
        ("ssl_labs: {by: A. Mbarga, date: 2026-11-20, reference: r1}", "did you mean 'ssl-labs'?"),
        ("ssl-labs: {by: A. Mbarga, date: 2026-11-20, refrence: r1}", "ssl-labs: unknown field refrence"),
    ],
    ids=["impossible date", "date without dashes", "future date", "unknown key", "unknown field"],
)
def test_a_mistake_in_the_evidence_file_is_one_line_and_status_2(
    entry: str, said: str, operator: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    evidence = tmp_path / "evidence.yaml"
    evidence.write_text("pentest: {by: Securitas CM, date: 2026-10-02, reference: PT-2026-14}\n" + entry + "\n")
    status, out, err = comptoir(capsys, "check", "--deploy", "--no-database", "--evidence", str(evidence))
    assert status == 2
    assert out == ""
    line = one_line(err)
    assert line.startswith(f"comptoir check: {evidence}: ")
    assert said in line


def test_evidence_dates_stay_as_written(tmp_path: Path) -> None:
    evidence = tmp_path / "evidence.yaml"
    evidence.write_text("pentest: {by: Securitas CM, date: 2026-10-02, reference: PT-2026-14}\n")
    entries = check.load_evidence(evidence)
    assert entries["pentest"]["date"] == "2026-10-02"
    assert check.scorecard([], entries)["passed"] == check.scorecard([], {})["passed"] + 1


# ---- check --live ----


@pytest.mark.parametrize("url", ["unreachable", "notaurl", "http://[::1"])
def test_check_live_without_an_answer_is_one_line_and_status_2(
    url: str, operator: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    target = f"http://127.0.0.1:{free_port()}" if url == "unreachable" else url
    status, out, err = comptoir(capsys, "check", "--live", target)
    assert status == 2
    assert out == ""
    line = one_line(err)
    assert line.startswith("comptoir check: ")
    assert ("no answer from" if url == "unreachable" else "is not a URL") in line


async def _a_well_kept_gateway(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Every security header; the catalogue answers, nothing else does (120 points, nothing exposed)."""
    if await request_body(scope, receive, send) is None:
        return
    status = 200 if scope["path"] == "/api/v1/products" else 404
    headers = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
    headers += [(b"permissions-policy", b"camera=()"), (b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"{}"})


def test_check_live_fails_under_fail_under(operator: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    with serve_app(_a_well_kept_gateway) as gateway:
        capsys.readouterr()  # the server's own start-up line, when an earlier test configured logging
        status, out, _ = comptoir(capsys, "check", "--live", gateway.url, "--fail-under", "120")
        assert status == 0, out
        assert out.splitlines()[0].endswith("120 points, grade A+")
        status, out, _ = comptoir(capsys, "check", "--live", gateway.url, "--fail-under", "200")
        assert status == 1
        assert out.splitlines()[-1] == "FAILED (1): score 120 is under --fail-under 200"
        status, out, _ = comptoir(capsys, "check", "--live", gateway.url, "--fail-under", "200", "--json")
        assert status == 1
        assert json.loads(out)["failing"] == ["score 120 is under --fail-under 200"]
        assert json.loads(out)["ok"] is False  # the verdict agrees with the status


async def _a_gateway_for_another_host(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Every security header; 400 Unknown Host to anything but api.shop.example (ALLOWED_HOSTS)."""
    if await request_body(scope, receive, send) is None:
        return
    host = dict(scope["headers"]).get(b"host", b"")
    status = 404 if scope["path"] != "/api/v1/products" else 200
    status = status if host == b"api.shop.example" else 400
    headers = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
    headers += [(b"permissions-policy", b"camera=()"), (b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"{}"})


def test_check_live_does_not_pass_a_gateway_that_served_nothing(
    operator: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only refusals (the address asked, not one of ALLOWED_HOSTS) expose nothing and prove nothing."""
    with serve_app(_a_gateway_for_another_host) as gateway:
        capsys.readouterr()
        status, out, _ = comptoir(capsys, "check", "--live", gateway.url)
        assert status == 1
        assert "the public catalogue answered 400, not 200" in out.splitlines()[-1]
        status, out, _ = comptoir(capsys, "check", "--live", gateway.url, "--host", "api.shop.example")
        assert status == 0, out
        assert out.splitlines()[-1] == "OK: nothing internal is exposed"


# ---- audit verify-archive ----


@pytest.mark.parametrize(
    ("content", "said"),
    [(b"hello\nworld\n", "line 1 is not a JSON object"), (bytes(range(256)), "it is not UTF-8 text")],
    ids=["text", "binary"],
)
def test_verify_archive_of_a_file_that_is_not_one_is_one_line(
    content: bytes, said: str, operator: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "not-an-archive.jsonl"
    path.write_bytes(content)
    status, out, err = comptoir(capsys, "audit", "verify-archive", str(path))
    assert status == 1
    assert out == ""
    assert one_line(err) == f"comptoir audit verify-archive: {path} is not an audit archive: {said}\n"


def test_verify_archive_reports_lines_that_are_not_events(
    operator: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "odd.jsonl"
    path.write_text('{"sequence": 1}\n{"type": "signature", "public_key": "abcde"}\n')
    status, out, _ = comptoir(capsys, "audit", "verify-archive", str(path))
    assert status == 1
    assert "line 1: not an archived event" in json.loads(out)["problems"][0]
    # Event-shaped, but with a lone surrogate that no chain could have hashed.
    path.write_text('{"prev_hash": "a", "hash": "b", "document": "\\ud800"}\n{"type": "signature"}\n')
    status, out, err = comptoir(capsys, "audit", "verify-archive", str(path))
    assert status == 1, err
    assert "hash does not match" in json.loads(out)["problems"][0]


def test_a_directory_given_as_a_file_is_not_called_a_data_dir_problem(
    operator: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`comptoir audit verify-archive .` from the folder that holds DATA_DIR: the mistake is the argument."""
    (tmp_path / "var").mkdir()
    status, _, err = comptoir(capsys, "audit", "verify-archive", str(tmp_path))
    assert status == 1
    assert "DATA_DIR" not in one_line(err)
    assert "Is a directory" in err


# ---- settings errors name the environment variable ----


@pytest.mark.parametrize(
    ("settings", "said"),
    [
        (WEAK_WEBHOOK, "invalid settings: AUTH_WEBHOOK_SECRET must be at least 32 characters"),
        (
            {"AUTH_MFA_REQUIRED_ROLES": "admin"},
            "invalid settings: AUTH_MFA_REQUIRED_ROLES: Input should be a valid list",
        ),
        ({"AUTH_GDPR_SERVICES": "orders"}, "invalid settings: AUTH_GDPR_SERVICES: not valid JSON"),
        ({"AUTH_PBKDF2_ROUNDS": "many"}, "invalid settings: AUTH_PBKDF2_ROUNDS: Input should be a valid integer"),
    ],
    ids=["model check", "list", "JSON", "integer"],
)
def test_settings_errors_name_the_environment_variable(
    settings: dict[str, str], said: str, operator: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    operator.setenv("DATABASE_URL", UNREACHABLE_DATABASE)
    for name, value in settings.items():
        operator.setenv(name, value)
    status, _, err = comptoir(capsys, "keys", "rotate")
    assert status == 2
    assert said in one_line(err)
    field = said.split(": ")[1].split()[0].removeprefix("AUTH_").lower()
    assert field not in err


def test_a_process_refusing_to_start_names_the_environment_variable(
    operator: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in WEAK_WEBHOOK.items():
        operator.setenv(name, value)
    with pytest.raises(SystemExit):
        serve.factory("auth")()
    line = one_line(capsys.readouterr().err)
    assert "AUTH_WEBHOOK_SECRET must be at least 32 characters" in line
    assert "webhook_secret" not in line


def test_check_deploy_names_the_settings_that_do_not_load(operator: pytest.MonkeyPatch) -> None:
    for name, value in WEAK_WEBHOOK.items():
        operator.setenv(name, value)
    operator.setenv("ORDERS_OUTBOX_BATCH_SIZE", "lots")
    w038 = {c.id: c for c in check.settings_checks({})}["CMP-W038"]
    assert not w038.ok
    assert w038.problem == (
        "auth: AUTH_WEBHOOK_SECRET must be at least 32 characters; "
        "orders: ORDERS_OUTBOX_BATCH_SIZE: Input should be a valid integer, unable to parse string as an integer"
    )


# ---- DATABASE_URL and DATA_DIR ----


def test_a_database_url_that_is_not_postgresql_is_refused_before_connecting(
    operator: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    operator.setenv("DATABASE_URL", "mysql://shop:hunter2@127.0.0.1:1/shop")
    status, _, err = comptoir(capsys, "migrate")
    assert status == 2
    line = one_line(err)
    assert line.startswith("comptoir migrate: invalid settings: DATABASE_URL: must be a postgresql:// URL")
    assert "hunter2" not in line


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_a_data_dir_that_is_a_file_is_named(
    where: str, operator: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    file = tmp_path / "shop.txt"
    file.write_text("not a directory\n")
    data_dir = file if where == "a file" else file / "var"
    operator.setenv("DATA_DIR", str(data_dir))
    status, _, err = comptoir(capsys, "migrate")
    assert status == 2
    line = one_line(err)
    assert line.startswith(f"comptoir migrate: invalid settings: DATA_DIR {data_dir}")
    assert line.endswith(f"{file} is a file, not a directory\n")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc, where nothing can be created")
def test_a_data_dir_that_cannot_be_created_is_named(
    operator: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = Path("/proc/comptoir-no-such-process/var")
    operator.setenv("DATA_DIR", str(data_dir))
    status, _, err = comptoir(capsys, "migrate")
    assert status == 2
    line = one_line(err)
    assert line.startswith(f"comptoir migrate: DATA_DIR {data_dir} cannot be created")
    assert "No such file or directory" in line


# ---- audit archive ----


@pytest.mark.parametrize("days", ["-3", "ten"])
def test_archiving_a_negative_or_wordy_age_is_a_usage_error(days: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`--older-than-days -3` used to read as "retention is off" and exit 0, as if nothing were wrong."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["audit", "archive", "--older-than-days", days])
    assert exited.value.code == 2
    assert "--older-than-days" in capsys.readouterr().err
