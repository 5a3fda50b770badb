"""The ``comptoir`` command line."""

from __future__ import annotations

import argparse
import sys

from comptoir.config import RunSettings


def _database_url(settings: RunSettings) -> tuple[str, object | None]:
    """The admin URL: DATABASE_URL, or the embedded server (started if needed)."""
    if settings.database_url:
        return settings.database_url, None
    from comptoir.embedded import EmbeddedPostgres

    embedded = EmbeddedPostgres(settings.data_dir)
    return embedded.start(), embedded


def cmd_run(_args: argparse.Namespace) -> int:
    from comptoir.supervisor import Supervisor

    return Supervisor(RunSettings()).run()


def cmd_migrate(_args: argparse.Namespace) -> int:
    from comptoir.embedded import EmbeddedPostgres
    from comptoir.provision import migrate, redact_url

    settings = RunSettings()
    admin_url, embedded = _database_url(settings)
    try:
        roles = migrate(settings, admin_url)
    finally:
        if isinstance(embedded, EmbeddedPostgres):
            embedded.stop()
    for role in roles:
        print(f"{role.service:<10} schema {role.service!r}, role {role.user!r}: {redact_url(role.url)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="comptoir", description="Comptoir commerce backend")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="start the database (embedded by default), migrate, and run all five processes")
    sub.add_parser("migrate", help="create schemas and roles and apply every service's migrations")
    return parser


COMMANDS = {"run": cmd_run, "migrate": cmd_migrate}


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(COMMANDS[args.command](args))


if __name__ == "__main__":
    main()
