"""The command line with an operator's mistakes: no system where DATA_DIR points, no terminal, bad
settings, an unreachable database. Each ends with one line and a status, never a traceback, and
creates nothing."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from comptoir.config import RunSettings
from comptoir.embedded import EmbeddedPostgres
from comptoir.progress import progress
from comptoir.provision import migrate
from tests.conftest import free_port

# Every command that works on an existing installation.
NEEDS_A_SYSTEM = [
    ["create-admin", "--email", "admin@boutique.cm"],
    ["backup", "--out", "shop.backup"],
    ["keys", "rotate"],
    ["audit", "verify"],
    ["audit", "checkpoints", "export"],
    ["audit", "archive", "--older-than-days", "30"],
    ["outbox", "list"],
    ["outbox", "replay", "--service", "orders"],
    ["purge"],
]


def comptoir(*args: str, env: dict[str, str], cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "comptoir.cli", *args],
        env=env,
        cwd=cwd,
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=120,
    )


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("DATABASE_URL")}
    env.pop("BOOTSTRAP_ADMIN_PASSWORD", None)
    return env


@pytest.mark.parametrize("args", NEEDS_A_SYSTEM, ids=lambda a: " ".join(a[:2]))
def test_a_command_refuses_a_data_dir_without_a_system_and_creates_nothing(args: list[str], tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    wrong = tmp_path / "not-the-system"
    env = base_env() | {"DATA_DIR": str(wrong), "BOOTSTRAP_ADMIN_PASSWORD": "Correct-Horse-Battery-9"}
    result = comptoir(*args, env=env, cwd=work)
    assert result.returncode == 2, result.stdout + result.stderr
    assert str(wrong) in result.stderr
    assert "no Comptoir system" in result.stderr
    assert "Traceback" not in result.stderr
    assert not wrong.exists()
    assert list(work.iterdir()) == []  # not even ./var


def test_an_unreachable_database_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    env = base_env() | {"DATABASE_URL": f"postgresql://postgres:x@127.0.0.1:{free_port()}/comptoir"}
    result = comptoir("audit", "verify", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("comptoir audit:")


def test_invalid_settings_are_named_not_a_traceback(tmp_path: Path) -> None:
    env = base_env() | {"DATA_DIR": str(tmp_path / "x"), "AUTH_PBKDF2_ROUNDS": "many"}
    result = comptoir("keys", "rotate", env=env | {"DATABASE_URL": "postgresql://u:p@127.0.0.1:1/db"}, cwd=tmp_path)
    assert result.returncode == 2
    assert "AUTH_PBKDF2_ROUNDS" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def system(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    data_dir = tmp_path_factory.mktemp("system")
    embedded = EmbeddedPostgres(data_dir)
    admin_url = embedded.start()
    migrate(RunSettings(data_dir=data_dir, database_url=admin_url), admin_url)
    embedded.stop()
    return data_dir


def test_create_admin_reads_the_password_from_stdin_without_a_terminal(system: Path, tmp_path: Path) -> None:
    env = base_env() | {"DATA_DIR": str(system)}
    made = comptoir("create-admin", "--email", "admin@boutique.cm", env=env, cwd=tmp_path, stdin="Correct-Horse-9\n")
    assert made.returncode == 0, made.stderr
    assert "admin admin@boutique.cm created" in made.stdout
    empty = comptoir("create-admin", "--email", "other@boutique.cm", env=env, cwd=tmp_path, stdin="")
    assert empty.returncode == 2
    assert "standard input" in empty.stderr
    assert "Traceback" not in empty.stderr
    weak = comptoir("create-admin", "--email", "weak@boutique.cm", env=env, cwd=tmp_path, stdin="short\n")
    assert weak.returncode == 2
    assert "Traceback" not in weak.stderr


def test_long_commands_are_quiet_without_a_terminal(system: Path, tmp_path: Path) -> None:
    env = base_env() | {"DATA_DIR": str(system)}
    result = comptoir("audit", "verify", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "verifying" not in result.stderr
    assert "\x1b[" not in result.stderr


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_drawn_on_a_terminal_only() -> None:
    terminal, pipe = Terminal(), io.StringIO()
    for stream in (terminal, pipe):
        with progress("verifying the audit chain", total=10, stream=stream) as report:
            report.update(5, 10)
            report.advance(5)
    assert "verifying the audit chain" in terminal.getvalue()
    assert pipe.getvalue() == ""
