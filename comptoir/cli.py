"""The ``comptoir`` command line."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from comptoir.config import SERVICES, RunSettings


def _database_url(settings: RunSettings) -> tuple[str, object | None]:
    """The admin URL: DATABASE_URL, or the embedded server (started if needed)."""
    if settings.database_url:
        return settings.database_url, None
    from comptoir.embedded import EmbeddedPostgres

    embedded = EmbeddedPostgres(settings.data_dir)
    return embedded.start(), embedded


def has_system(settings: RunSettings) -> bool:
    """An installation exists: a database server is configured, or DATA_DIR holds the embedded one."""
    return bool(settings.database_url) or (settings.data_dir / "pg" / "PG_VERSION").exists()


def refuse_without_system(command: str, settings: RunSettings) -> int | None:
    """Exit status 2 (and a message naming the path) when there is no system to work on; nothing is created."""
    if has_system(settings):
        return None
    print(
        f"comptoir {command}: no Comptoir system in {settings.data_dir.resolve()} (DATA_DIR): it holds no "
        "database. Point DATA_DIR at the installation's data directory (the one `comptoir run` uses), or set "
        "DATABASE_URL; `comptoir run` or `comptoir migrate` creates a new system.",
        file=sys.stderr,
    )
    return 2


def cmd_run(_args: argparse.Namespace) -> int:
    from comptoir.supervisor import Supervisor

    return Supervisor(RunSettings()).run()


def cmd_migrate(_args: argparse.Namespace) -> int:
    from comptoir.embedded import EmbeddedPostgres
    from comptoir.progress import progress
    from comptoir.provision import migrate, redact_url, revisions, upgrades

    settings = RunSettings()
    admin_url, embedded = _database_url(settings)
    try:
        before = revisions(admin_url, SERVICES)
        with progress("schemas, roles and migrations"):
            roles = migrate(settings, admin_url)
        done = upgrades(before, revisions(admin_url, SERVICES))
    finally:
        if isinstance(embedded, EmbeddedPostgres):
            embedded.stop()
    for role in roles:
        print(f"{role.service:<10} schema {role.service!r}, role {role.user!r}: {redact_url(role.url)}")
    print(done)
    return 0


def _admin_password() -> str:
    """BOOTSTRAP_ADMIN_PASSWORD, else asked twice on a terminal, else the first line of standard input
    (never an argument: argv is public)."""
    import getpass
    import os

    password = os.environ.get("BOOTSTRAP_ADMIN_PASSWORD", "")
    if password:
        return password
    if not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise ValueError("no password: write it on standard input or set BOOTSTRAP_ADMIN_PASSWORD")
        return password
    password = getpass.getpass("Password for the new admin: ")
    if getpass.getpass("Once more: ") != password:
        raise ValueError("the two passwords differ")
    return password


def cmd_create_admin(args: argparse.Namespace) -> int:
    import asyncio

    from comptoir.embedded import EmbeddedPostgres
    from comptoir.provision import migrate
    from services.auth.bootstrap import AdminRefused, check_admin_input, create_admin_in_database
    from services.auth.config import Settings as AuthSettings
    from services.auth.passwords import PasswordPolicy

    auth_settings = AuthSettings()
    try:
        password = _admin_password()
        policy = PasswordPolicy(
            min_length=auth_settings.password_min_length, max_length=auth_settings.password_max_length
        )
        check_admin_input(args.email, password, policy)
    except (AdminRefused, ValueError) as exc:
        print(f"comptoir create-admin: {exc}", file=sys.stderr)
        return 2
    settings = RunSettings()
    # After the input checks (a refused password touches nothing), before anything is started or created.
    if (refused := refuse_without_system("create-admin", settings)) is not None:
        return refused
    admin_url, embedded = _database_url(settings)
    try:
        roles = migrate(settings, admin_url)
        auth_url = next(role.url for role in roles if role.service == "auth")
        user = asyncio.run(create_admin_in_database(auth_url, args.email, password, auth_settings))
    except AdminRefused as exc:
        print(f"comptoir create-admin: {exc}", file=sys.stderr)
        return 1
    finally:
        if isinstance(embedded, EmbeddedPostgres):
            embedded.stop()
    print(f"admin {user.email} created (id {user.id})")
    return 0


def cmd_purge(_args: argparse.Namespace) -> int:
    """Retention now (docs/privacy.md): what the auth service's daily purge does, as JSON counts."""
    import asyncio
    import contextlib
    import json

    from comptoir.embedded import EmbeddedPostgres
    from comptoir.provision import migrate
    from comptoir.supervisor import AUTH_PEERS
    from services.auth.config import Settings as AuthSettings
    from services.auth.retention import purge_now

    settings = RunSettings()
    # The services it asks to erase an account's data, where `comptoir run` puts them (unless set).
    peers: dict[str, Any] = {
        f"{peer}_url": settings.url_of(peer) for peer in AUTH_PEERS if f"AUTH_{peer.upper()}_URL" not in os.environ
    }
    admin_url, embedded = _database_url(settings)
    try:
        # Migrations and the auth app log to standard output (a service's log stream); here that is the JSON's.
        with contextlib.redirect_stdout(sys.stderr):
            roles = migrate(settings, admin_url)
            auth_url = next(role.url for role in roles if role.service == "auth")
            report = asyncio.run(purge_now(AuthSettings(database_url=auth_url, **peers)))
    finally:
        if isinstance(embedded, EmbeddedPostgres):
            embedded.stop()
    print(json.dumps(report.as_dict(), sort_keys=True))
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from services.auth.bootstrap import AdminRefused, rotate_keys
    from services.auth.config import Settings as AuthSettings

    settings = AuthSettings()
    try:
        key = rotate_keys(settings)
    except AdminRefused as exc:
        print(f"comptoir keys {args.keys_command}: {exc}", file=sys.stderr)
        return 1
    print(
        f"new signing key {key.kid} in {settings.resolved_keys_dir}: published now, signs from "
        f"{settings.key_activation_delay_seconds} s on; the running auth service picks it up by itself"
    )
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from comptoir import check

    if args.host and not args.live:
        print("comptoir check: --host goes with --live URL", file=sys.stderr)
        return 2
    if args.live:
        import json

        from comptoir import live

        try:
            report = live.live_check(args.live, args.host)
        except live.Unreachable as exc:
            print(f"comptoir check: {exc}", file=sys.stderr)
            return 2
        failing = live.failing_reasons(report, args.fail_under)
        text = (
            json.dumps(report | {"ok": not failing, "failing": failing}, indent=2)
            if args.json
            else live.render(report, args.fail_under)
        )
        print(text)
        return 1 if failing else 0
    if not args.deploy:
        print("comptoir check: say what to check: --deploy or --live URL", file=sys.stderr)
        return 2
    return check.main(
        json_output=args.json, fail_under=args.fail_under, with_database=not args.no_database, evidence=args.evidence
    )


# ---- audit: verify, checkpoints, retention ----


def _with_admin_url(run: Callable[[str], int]) -> int:
    """Run ``run(admin_url)`` against DATABASE_URL or the embedded server, exactly as ``migrate`` connects."""
    from comptoir.embedded import EmbeddedPostgres

    admin_url, embedded = _database_url(RunSettings())
    try:
        return run(admin_url)
    finally:
        if isinstance(embedded, EmbeddedPostgres):
            embedded.stop()


def cmd_audit(args: argparse.Namespace) -> int:
    import asyncio
    import contextlib
    import json

    from services.audit import admin
    from services.audit.config import Settings as AuditSettings

    settings = AuditSettings()
    if args.audit_command == "verify-archive":
        try:
            result = admin.verify_archive(args.file, admin.trusted_for(settings))
        except admin.NotAnArchive as exc:
            print(f"comptoir audit verify-archive: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(result, indent=2))
        return 0 if result["ok"] else 1

    def verify(admin_url: str) -> int:
        from comptoir.progress import progress

        # Log lines (an alert on failure) go to stderr: stdout is the verdict, as JSON.
        with contextlib.redirect_stdout(sys.stderr), progress("verifying the audit chain") as report:
            verdict = asyncio.run(admin.verify(admin_url, settings, progress=report.update))
        print(verdict.model_dump_json(indent=2))
        for warning in verdict.warnings:
            print(f"comptoir audit verify: warning: {warning.reason}", file=sys.stderr)
        for problem in verdict.problems:
            print(f"comptoir audit verify: CRITICAL: at {problem.sequence}: {problem.reason}", file=sys.stderr)
        return 0 if verdict.ok else 1

    def export(admin_url: str) -> int:
        with contextlib.redirect_stdout(sys.stderr):
            entries = asyncio.run(admin.export_checkpoints(admin_url, settings))
        lines = [json.dumps(entry, sort_keys=True) for entry in entries]
        text = "".join(line + "\n" for line in lines)
        if args.output:
            Path(args.output).write_text(text, encoding="utf-8")
            print(f"{len(lines)} checkpoints written to {args.output}", file=sys.stderr)
        else:
            sys.stdout.write(text)
        return 0

    def archive(admin_url: str) -> int:
        days = settings.retention_days if args.older_than_days is None else args.older_than_days
        output_dir = args.output_dir or settings.data_dir / "audit" / "archive"
        try:
            result = asyncio.run(admin.archive(admin_url, settings, older_than_days=days, output_dir=output_dir))
        except admin.ArchiveRefused as exc:
            print(f"comptoir audit archive: refused: {exc}", file=sys.stderr)
            return 1
        if result.archived:
            print(f"archived events {result.first_sequence}..{result.last_sequence} to {result.file} and dropped them")
        else:
            print(f"nothing archived: {result.reason}")
        return 0

    if args.audit_command == "checkpoints":
        return _with_admin_url(export)
    return _with_admin_url({"verify": verify, "archive": archive}[args.audit_command])


# ---- outbox: dead letters of the audit delivery ----

OUTBOX_SERVICES = ("auth", "inventory", "orders")


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def outbox_status(
    admin_url: str, services: Sequence[str], *, stuck_after: int, rows: int = 0, table: str = "outbox"
) -> list[dict[str, Any]]:
    """Pending and stuck (dead-letter) counts per service, and the oldest pending rows if asked."""
    import asyncpg

    from comptoir.provision import to_asyncpg_dsn

    conn = await asyncpg.connect(to_asyncpg_dsn(admin_url))
    try:
        out: list[dict[str, Any]] = []
        for service in services:
            if await conn.fetchval("SELECT to_regclass($1)", f"{_ident(service)}.{_ident(table)}") is None:
                out.append({"service": service, "outbox": False})
                continue
            qualified = f"{_ident(service)}.{_ident(table)}"
            counts_sql = (
                "SELECT count(*) AS pending, count(*) FILTER (WHERE attempts >= $1) AS stuck,"  # noqa: S608 - quoted names
                f" min(occurred_at) AS oldest FROM {qualified} WHERE delivered_at IS NULL"
            )
            counts = await conn.fetchrow(counts_sql, stuck_after)
            entry: dict[str, Any] = {"service": service, "outbox": True, **dict(counts)}
            if rows:
                rows_sql = (
                    "SELECT id, occurred_at, payload->>'action' AS action, attempts, next_attempt_at, last_error"  # noqa: S608
                    f" FROM {qualified} WHERE delivered_at IS NULL ORDER BY occurred_at, id LIMIT $1"
                )
                entry["rows"] = [dict(r) for r in await conn.fetch(rows_sql, rows)]
            out.append(entry)
        return out
    finally:
        await conn.close()


async def outbox_replay(
    admin_url: str, service: str, *, stuck_after: int, everything: bool = False, table: str = "outbox"
) -> int:
    """Make stuck events due now with a fresh attempt count; returns how many. Nothing is deleted."""
    import asyncpg

    from comptoir.provision import to_asyncpg_dsn

    conn = await asyncpg.connect(to_asyncpg_dsn(admin_url))
    try:
        status = await conn.execute(
            f"UPDATE {_ident(service)}.{_ident(table)} SET attempts = 0, next_attempt_at = now()"  # noqa: S608
            " WHERE delivered_at IS NULL AND (attempts >= $1 OR $2)",
            stuck_after,
            everything,
        )
        return int(status.split()[-1])
    finally:
        await conn.close()


def cmd_outbox(args: argparse.Namespace) -> int:
    import asyncio

    if args.outbox_command == "replay":

        def replay(admin_url: str) -> int:
            count = asyncio.run(
                outbox_replay(admin_url, args.service, stuck_after=args.stuck_after, everything=args.all)
            )
            print(f"{args.service}: {count} undelivered events are due again now")
            return 0

        return _with_admin_url(replay)

    def show(admin_url: str) -> int:
        services = [args.service] if args.service else list(OUTBOX_SERVICES)
        limit = args.rows if args.service else 0
        for entry in asyncio.run(outbox_status(admin_url, services, stuck_after=args.stuck_after, rows=limit)):
            if not entry["outbox"]:
                print(f"{entry['service']:<10} no outbox table")
                continue
            print(
                f"{entry['service']:<10} pending {entry['pending']:>6}  stuck {entry['stuck']:>6}"
                f"  oldest {entry['oldest'].isoformat() if entry['oldest'] else '-'}"
            )
            for row in entry.get("rows", []):
                print(
                    f"  {row['id']}  {row['occurred_at'].isoformat()}  {row['action'] or '-':<32}"
                    f" attempts {row['attempts']:>3}  next {row['next_attempt_at'].isoformat()}"
                    f"  {row['last_error'] or ''}"
                )
        return 0

    return _with_admin_url(show)


def _backup_key(command: str, settings: RunSettings) -> bytes:
    """BACKUP_ENCRYPTION_KEY; in development, the key generated and kept under DATA_DIR/secrets."""
    from comptoir.backup import BackupError, load_key
    from comptoir.secrets import backup_key_path, development_backup_key

    if settings.backup_encryption_key:
        return load_key(settings.backup_encryption_key)
    if settings.is_production:
        raise BackupError("BACKUP_ENCRYPTION_KEY is required in production (comptoir secrets generates one)")
    path = backup_key_path(settings.data_dir)
    if command == "restore" and not path.exists():
        raise BackupError(
            f"no backup key: set BACKUP_ENCRYPTION_KEY to the key the backup was made with (development keeps "
            f"it in <the original DATA_DIR>/secrets/{path.name}; there is none in {path.parent})"
        )
    encoded, created = development_backup_key(settings.data_dir)
    if created:
        print(f"comptoir {command}: generated the development backup key {path}; keep a copy", file=sys.stderr)
    return load_key(encoded)


def cmd_backup(args: argparse.Namespace) -> int:
    from comptoir.backup import BackupError, backup, check_file, check_target, restore
    from comptoir.progress import progress
    from services.audit.config import Settings as AuditSettings

    settings = RunSettings()
    if args.command == "backup" and (refused := refuse_without_system("backup", settings)) is not None:
        return refused
    try:
        key = _backup_key(args.command, settings)
    except BackupError as exc:
        print(f"comptoir {args.command}: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "backup":
            check_target(args.out, overwrite=args.force)
        else:
            check_file(args.file, key)  # a wrong key or an altered file: refused before any database is set up
    except BackupError as exc:
        print(f"comptoir {args.command}: {exc}", file=sys.stderr)
        return 2 if args.command == "backup" else 1
    audit = AuditSettings()
    admin_url, embedded = _database_url(settings)
    try:
        if args.command == "backup":
            with progress("backup") as report:
                size, contents = backup(
                    admin_url,
                    args.out,
                    key,
                    audit,
                    include_private_key=args.include_private_key,
                    overwrite=args.force,
                    report=report,
                )
            print(f"encrypted backup of schemas auth, inventory, orders, audit: {args.out} ({size} bytes)")
            print(
                f"  with {len(contents.public_keys)} public checkpoint key(s) {', '.join(contents.public_keys) or '-'}"
                + (", the private checkpoint key" if contents.private_key else " (not the private key)")
                + (", the checkpoint log" if contents.checkpoint_log else "")
            )
        else:
            with progress("restore") as report:
                contents = restore(admin_url, args.file, key, settings, audit, report=report)
            print(f"restored {args.file}")
            if contents.public_keys:
                kept = ", ".join(contents.public_keys)
                print(f"  trusted checkpoint keys put back in {audit.checkpoint_trusted_dir}: {kept}")
            else:
                print("  the backup holds no checkpoint key: `comptoir audit verify` cannot check old checkpoints")
            if contents.private_key:
                print(f"  the private checkpoint key is at {audit.checkpoint_key_path}")
            keys, uploads = settings.data_dir / "keys", settings.data_dir / "uploads"
            missing = []
            if not any(keys.glob("*.pem")):  # auth's signing keys (the OTP and second-factor key beside them)
                missing.append(
                    f"{keys} (auth's token signing and second-factor keys: without them every admin's"
                    " second factor and every session is lost)"
                )
            if not uploads.is_dir() or not any(p.is_file() for p in uploads.rglob("*")):
                missing.append(f"{uploads} (the products' images)")
            if missing:
                print(
                    "  not in a database backup, copy from your file backup before the first start: "
                    + "; ".join(missing)
                )
            print("run `comptoir audit verify` to check the audit chain")
    except BackupError as exc:
        print(f"comptoir {args.command}: {exc}", file=sys.stderr)
        return 1
    finally:
        if embedded is not None:
            embedded.stop()  # type: ignore[attr-defined]
    return 0


def cmd_secrets(_args: argparse.Namespace) -> int:
    """A fresh .env fragment for docker compose / Kubernetes: every password and secret, never reused."""
    import base64
    import json
    import os
    import secrets

    from comptoir.clients import digest
    from comptoir.config import PROCESSES, SERVICES

    lines = [f"POSTGRES_PASSWORD={secrets.token_urlsafe(32)}"]
    lines += [f"{svc.upper()}_DB_PASSWORD={secrets.token_urlsafe(32)}" for svc in SERVICES]
    clients = {process: secrets.token_urlsafe(32) for process in PROCESSES}
    lines += [f"{process.upper()}_CLIENT_SECRET={secret}" for process, secret in clients.items()]
    digests = json.dumps({process: digest(secret) for process, secret in clients.items()}, separators=(",", ":"))
    lines.append(f"AUTH_SERVICE_CLIENTS='{digests}'")
    lines.append(f"BACKUP_ENCRYPTION_KEY={base64.urlsafe_b64encode(os.urandom(32)).decode()}")
    print("# generated by `comptoir secrets`: keep out of version control")
    print("\n".join(lines))
    return 0


def cmd_openapi(args: argparse.Namespace) -> int:
    from comptoir.openapi import build_document, render_markdown

    document = build_document()
    text = render_markdown(document) if args.markdown else json.dumps(document, indent=2) + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text, encoding="utf-8")
    return 0


def _days(text: str) -> int:
    """A number of days, 0 or more (argparse answers anything else with a usage line and status 2)."""
    try:
        days = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of days") from None
    if days < 0:
        raise argparse.ArgumentTypeError(f"{days} days: give 0 (keep everything) or more")
    return days


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="comptoir", description="Comptoir commerce backend")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="start the database (embedded by default), migrate, and run all five processes")
    sub.add_parser("migrate", help="create schemas and roles and apply every service's migrations")
    sub.add_parser("secrets", help="print freshly generated passwords and client secrets as .env lines")
    backup = sub.add_parser("backup", help="encrypted dump of the four schemas (key: BACKUP_ENCRYPTION_KEY)")
    backup.add_argument("--out", type=Path, required=True)
    backup.add_argument(
        "--include-private-key",
        action="store_true",
        help="also the audit checkpoint signing key (the public keys are always included)",
    )
    backup.add_argument("--force", action="store_true", help="replace an existing --out file")
    restore = sub.add_parser("restore", help="restore an encrypted backup into an empty database")
    restore.add_argument("file", type=Path)
    check = sub.add_parser("check", help="deployment checks and the security scorecard")
    check.add_argument("--deploy", action="store_true", help="check the effective settings, headers and database")
    check.add_argument("--live", metavar="URL", help="score a running gateway's headers and exposure")
    check.add_argument("--host", metavar="NAME", help="with --live: the Host header to send (one of ALLOWED_HOSTS)")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.add_argument("--fail-under", type=float, default=None, help="exit 1 when the score is below this")
    check.add_argument(
        "--no-database",
        action="store_true",
        help="do not connect to the database: its checks are reported as not run, which fails them",
    )
    check.add_argument(
        "--evidence", type=Path, default=None, help="operator evidence (YAML/JSON: key -> by, date, reference)"
    )
    create_admin = sub.add_parser(
        "create-admin",
        help="create an admin (password from BOOTSTRAP_ADMIN_PASSWORD, a prompt, or standard input without a terminal)",
    )
    create_admin.add_argument("--email", required=True)
    sub.add_parser(
        "purge", help="retention: delete expired codes, tokens, sessions, devices; anonymise inactive accounts"
    )
    keys = sub.add_parser("keys", help="the auth service's signing keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    keys_sub.add_parser("rotate", help="add a new signing key; older ones keep verifying until their tokens expire")
    audit = sub.add_parser("audit", help="the audit chain: verify, export signed checkpoints, retention")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    audit_sub.add_parser("verify", help="recompute the chain and check every signed checkpoint; exit 1 if not ok")
    checkpoints = audit_sub.add_parser("checkpoints", help="signed checkpoints of the chain head")
    checkpoints_sub = checkpoints.add_subparsers(dest="checkpoints_command", required=True)
    export = checkpoints_sub.add_parser("export", help="print every checkpoint as a JSON line with its public key")
    export.add_argument("--output", type=Path, default=None, help="write to this file instead of standard output")
    archive = audit_sub.add_parser("archive", help="retention: archive old events to a signed file, then drop them")
    archive.add_argument("--older-than-days", type=_days, default=None, help="default: AUDIT_RETENTION_DAYS (0 = keep)")
    archive.add_argument("--output-dir", type=Path, default=None, help="default: DATA_DIR/audit/archive")
    verify_archive = audit_sub.add_parser("verify-archive", help="check an archive file's chain and signature")
    verify_archive.add_argument("file", type=Path)
    outbox = sub.add_parser("outbox", help="undelivered audit events in the services' outboxes")
    outbox_sub = outbox.add_subparsers(dest="outbox_command", required=True)
    outbox_list = outbox_sub.add_parser("list", help="pending and stuck events per service")
    outbox_list.add_argument("--service", choices=OUTBOX_SERVICES, default=None, help="also list its pending rows")
    outbox_list.add_argument("--rows", type=int, default=50, help="how many pending rows to list")
    outbox_list.add_argument("--stuck-after", type=int, default=10, help="attempts after which an event is stuck")
    replay = outbox_sub.add_parser("replay", help="make a service's stuck events due now (nothing is deleted)")
    replay.add_argument("--service", choices=OUTBOX_SERVICES, required=True)
    replay.add_argument("--stuck-after", type=int, default=10, help="attempts after which an event is stuck")
    replay.add_argument("--all", action="store_true", help="every undelivered event, not only the stuck ones")
    openapi = sub.add_parser("openapi", help="print the public OpenAPI document (or the API reference)")
    openapi.add_argument("--markdown", action="store_true", help="the API reference (docs/api.md) instead of JSON")
    openapi.add_argument("--output", type=Path, default=None, help="write to this file instead of standard output")
    return parser


COMMANDS = {
    "run": cmd_run,
    "migrate": cmd_migrate,
    "check": cmd_check,
    "secrets": cmd_secrets,
    "backup": cmd_backup,
    "restore": cmd_backup,
    "create-admin": cmd_create_admin,
    "keys": cmd_keys,
    "purge": cmd_purge,
    "audit": cmd_audit,
    "outbox": cmd_outbox,
    "openapi": cmd_openapi,
}


def needs_system(args: argparse.Namespace) -> bool:
    """Commands that work on an existing installation (and must not create one by accident)."""
    if args.command in ("backup", "keys", "outbox", "purge"):  # create-admin checks its input first, then refuses
        return True
    return bool(args.command == "audit" and args.audit_command != "verify-archive")


def data_dir_problem(exc: OSError) -> str | None:
    """An OSError on DATA_DIR itself or on the way to it (a directory that cannot be created), said as such."""
    if not exc.filename:
        return None
    try:
        data_dir = RunSettings().data_dir.absolute()
    except ValueError:
        return None
    where = Path(os.fsdecode(exc.filename)).absolute()
    creating = exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.EROFS) and not data_dir.is_dir()
    if where != data_dir and not (creating and where in data_dir.parents):
        return None  # a file the command was given (a directory passed as a backup, say), not DATA_DIR
    return f"DATA_DIR {data_dir} cannot be created or used: {exc.strerror or exc}: {where}"


def run_command(args: argparse.Namespace) -> int:
    """Run one command; an operator's mistake (settings, an unreachable or missing database, a file)
    ends with one line and a status, not a traceback."""
    import asyncpg
    import sqlalchemy.exc
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from common.settings import describe_settings_error

    try:
        if needs_system(args):
            refused = refuse_without_system(args.command, RunSettings())
            if refused is not None:
                return refused
        return COMMANDS[args.command](args)
    except (ValidationError, SettingsError) as exc:
        print(f"comptoir {args.command}: invalid settings: {describe_settings_error(exc)}", file=sys.stderr)
        return 2
    except (asyncpg.PostgresError, sqlalchemy.exc.SQLAlchemyError) as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        print(f"comptoir {args.command}: database error: {detail}", file=sys.stderr)
        return 1
    except OSError as exc:
        data_dir = data_dir_problem(exc)
        if data_dir is not None:
            print(f"comptoir {args.command}: {data_dir}", file=sys.stderr)
            return 2
        print(f"comptoir {args.command}: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"comptoir {args.command}: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(run_command(args))


if __name__ == "__main__":
    main()
