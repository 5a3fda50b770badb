"""Schemas and least-privilege roles, then every service's Alembic migrations.

For each service ``svc``:
- ``comptoir_svc_owner`` (NOLOGIN) owns schema ``svc`` and every object in it; migrations run as it;
- ``comptoir_svc`` (LOGIN) is the runtime role: USAGE on its own schema, DML on its tables (the audit
  role gets SELECT and INSERT only), nothing on any other schema, no CREATE anywhere.

Roles belong to the whole server: a role that another database of the server already uses (it owns
objects or holds privileges there, per ``pg_shdepend``) is never created over or changed; provisioning
refuses before changing anything (``RoleConflictError``), naming the settings that give this
installation its own role names.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import asyncpg
from alembic import command
from alembic.config import Config
from pydantic_settings import SettingsError
from sqlalchemy.engine import make_url

import services
from comptoir.config import SERVICES, RunSettings
from comptoir.secrets import load_json, new_password, secrets_dir, write_private_json

# The audit trail is insert-only for the running service (DESIGN.md, "Data and consistency").
RUNTIME_TABLE_PRIVILEGES = {
    "auth": "SELECT, INSERT, UPDATE, DELETE",
    "inventory": "SELECT, INSERT, UPDATE, DELETE",
    "orders": "SELECT, INSERT, UPDATE, DELETE",
    "audit": "SELECT, INSERT",
}


@dataclass(frozen=True)
class ServiceRole:
    service: str
    user: str
    password: str
    url: str

    @property
    def owner(self) -> str:
        return f"{self.user}_owner"


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def to_asyncpg_dsn(url: str) -> str:
    """A libpq-style URL asyncpg accepts (no ``+driver`` suffix; TLS spelled ``sslmode``, as libpq does)."""
    parsed = make_url(url)
    query = dict(parsed.query)
    if "ssl" in query:
        query["sslmode"] = query.pop("ssl")
    return parsed.set(drivername="postgresql", query=query).render_as_string(hide_password=False)


def with_credentials(admin_url: str, user: str, password: str) -> str:
    parsed = make_url(admin_url).set(drivername="postgresql", username=user, password=password)
    return parsed.render_as_string(hide_password=False)


class RoleConflictError(SettingsError):
    """A role this installation would create or change already serves another database of the server.

    Roles are cluster-wide: setting its password here would lock the other installation out. It is a
    settings error (the command line reports it in one line, exit status 2): this installation needs its
    own role names.
    """


ROLE_NAME_SETTINGS = ", ".join(f"{svc.upper()}_DATABASE_URL" for svc in SERVICES)


def resolve_roles(settings: RunSettings, admin_url: str, *, save: bool = True) -> list[ServiceRole]:
    """Each service's role: from ``<SVC>_DATABASE_URL`` when given, else generated and kept under DATA_DIR.

    With ``save=False`` a newly generated password is not written yet (``save_roles`` does it once the
    database accepted the roles).
    """
    roles = _resolve(settings, admin_url)
    if save:
        save_roles(settings, roles)
    return roles


def save_roles(settings: RunSettings, roles: list[ServiceRole]) -> None:
    """Keep the generated role names and passwords under DATA_DIR (services with an override are not kept)."""
    store = secrets_dir(settings.data_dir) / "database-roles.json"
    saved = load_json(store)
    wanted = {
        role.service: {"user": role.user, "password": role.password}
        for role in roles
        if not settings.service_url_override(role.service)
    }
    if any(saved.get(svc) != entry for svc, entry in wanted.items()):
        write_private_json(store, saved | wanted)


def _resolve(settings: RunSettings, admin_url: str) -> list[ServiceRole]:
    saved = load_json(secrets_dir(settings.data_dir) / "database-roles.json")
    roles = []
    for svc in SERVICES:
        override = settings.service_url_override(svc)
        if override:
            parsed = make_url(override)
            user, password = parsed.username or f"comptoir_{svc}", unquote(parsed.password or "")
            url = override
        else:
            entry = saved.get(svc) or {}
            user = entry.get("user") or f"comptoir_{svc}"
            password = entry.get("password") or new_password()
            url = with_credentials(admin_url, user, password)
        roles.append(ServiceRole(svc, user, password, url))
    return roles


async def _provision(admin_url: str, roles: list[ServiceRole]) -> None:
    conn = await asyncpg.connect(to_asyncpg_dsn(admin_url))
    try:
        database = await conn.fetchval("SELECT current_database()")
        async with conn.transaction():
            # One transaction-wide lock so two concurrent `comptoir migrate` runs serialise.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('comptoir.provision'))")
            await _refuse_shared_roles(conn, database, roles)
            await conn.execute(f"REVOKE ALL ON DATABASE {ident(database)} FROM PUBLIC")
            await conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
            for role in roles:
                await _provision_one(conn, database, role)
    finally:
        await conn.close()


async def refuse_shared_roles(admin_url: str, roles: list[ServiceRole]) -> None:
    """The check ``_provision`` starts with, alone and changing nothing (a restore asks it before it begins)."""
    conn = await asyncpg.connect(to_asyncpg_dsn(admin_url))
    try:
        await _refuse_shared_roles(conn, await conn.fetchval("SELECT current_database()"), roles)
    finally:
        await conn.close()


async def _role_exists(conn: asyncpg.Connection, name: str) -> bool:
    return bool(await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", name))


async def _roles_used_elsewhere(conn: asyncpg.Connection, names: list[str]) -> dict[str, list[str]]:
    """role name -> the other databases of the server where it owns objects or holds privileges.

    ``pg_shdepend`` records, for each role, the objects it owns or is granted something on: ``dbid`` is
    the database of the object, or 0 for a shared object (then a database's own ACL or owner counts for
    that database). A role known only to the current database is ours to change.
    """
    rows = await conn.fetch(
        """
        SELECT DISTINCT r.rolname, d.datname
        FROM pg_shdepend s
        JOIN pg_roles r ON r.oid = s.refobjid
        JOIN pg_database d ON d.oid = CASE
            WHEN s.dbid = 0 AND s.classid = 'pg_database'::regclass THEN s.objid ELSE s.dbid END
        WHERE s.refclassid = 'pg_authid'::regclass
          AND r.rolname = ANY($1::text[])
          AND d.datname <> current_database()
        ORDER BY r.rolname, d.datname
        """,
        names,
    )
    used: dict[str, list[str]] = {}
    for row in rows:
        used.setdefault(row["rolname"], []).append(row["datname"])
    return used


async def _refuse_shared_roles(conn: asyncpg.Connection, database: str, roles: list[ServiceRole]) -> None:
    """Refuse, before changing anything, to take over a role that another database of the server uses."""
    used = await _roles_used_elsewhere(conn, [name for role in roles for name in (role.owner, role.user)])
    if not used:
        return
    by_database: dict[str, list[str]] = {}
    for name, databases in used.items():
        for other in databases:
            by_database.setdefault(other, []).append(name)
    where = "; ".join(f"{', '.join(names)} by database {other!r}" for other, names in by_database.items())
    raise RoleConflictError(
        f"roles already used on this server: {where}. Roles are shared by all databases of a server and "
        f"changing them would lock that installation out: give this one (database {database!r}) its own role "
        f"names with {ROLE_NAME_SETTINGS} (each URL's user is a runtime role, <user>_owner its owner role), "
        f"e.g. AUTH_DATABASE_URL=postgresql://{database}_auth:PASSWORD@…/{database}; nothing was changed"
    )


async def _provision_one(conn: asyncpg.Connection, database: str, role: ServiceRole) -> None:
    owner, user, schema = ident(role.owner), ident(role.user), ident(role.service)
    if not await _role_exists(conn, role.owner):
        await conn.execute(f"CREATE ROLE {owner} NOLOGIN")
    if await _role_exists(conn, role.user):
        await conn.execute(
            f"ALTER ROLE {user} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT PASSWORD {literal(role.password)}"
        )
    else:
        await conn.execute(f"CREATE ROLE {user} LOGIN NOINHERIT PASSWORD {literal(role.password)}")
    # The admin must be able to SET ROLE to the owner to run migrations (no-op for a superuser).
    is_super = await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
    if not is_super:
        await conn.execute(f"GRANT {owner} TO CURRENT_USER")
    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema} AUTHORIZATION {owner}")
    await conn.execute(f"ALTER SCHEMA {schema} OWNER TO {owner}")
    await conn.execute(f"REVOKE ALL ON SCHEMA {schema} FROM PUBLIC")
    await conn.execute(f"GRANT USAGE ON SCHEMA {schema} TO {user}")
    await conn.execute(f"GRANT CONNECT ON DATABASE {ident(database)} TO {user}")
    await conn.execute(f"ALTER ROLE {user} SET search_path = {schema}")
    privileges = RUNTIME_TABLE_PRIVILEGES[role.service]
    await conn.execute(
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA {schema} GRANT {privileges} ON TABLES TO {user}"
    )
    await conn.execute(
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA {schema} GRANT USAGE, SELECT ON SEQUENCES TO {user}"
    )


async def _lock_version_tables(admin_url: str, roles: list[ServiceRole]) -> None:
    """The runtime role may read its schema's migration version, never change it."""
    conn = await asyncpg.connect(to_asyncpg_dsn(admin_url))
    try:
        for role in roles:
            table = f"{ident(role.service)}.alembic_version"
            await conn.execute(f"REVOKE ALL ON {table} FROM {ident(role.user)}")
            await conn.execute(f"GRANT SELECT ON {table} TO {ident(role.user)}")
    finally:
        await conn.close()


def alembic_config(service: str, admin_url: str, owner_role: str | None, runtime_role: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(services.__file__).parent / service / "migrations"))
    cfg.set_main_option("file_template", "%%(year)d_%%(month).2d_%%(day).2d_%%(slug)s")
    cfg.attributes["url"] = admin_url
    cfg.attributes["owner_role"] = owner_role
    cfg.attributes["runtime_role"] = runtime_role
    return cfg


async def _revisions(admin_url: str, services: Sequence[str]) -> dict[str, str | None]:
    conn = await asyncpg.connect(to_asyncpg_dsn(admin_url))
    try:
        out: dict[str, str | None] = {}
        for service in services:
            table = f"{service}.alembic_version"
            exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table)
            sql = f"SELECT version_num FROM {ident(service)}.alembic_version"  # noqa: S608 - a service's name
            out[service] = await conn.fetchval(sql) if exists else None
        return out
    finally:
        await conn.close()


def revisions(admin_url: str, services: Sequence[str]) -> dict[str, str | None]:
    """Each service's schema revision (None: not created yet)."""
    return asyncio.run(_revisions(admin_url, services))


def upgrades(before: dict[str, str | None], after: dict[str, str | None]) -> str:
    """What a migrate did, for the operator: the schemas it created or upgraded, or that all were current."""
    moved = [
        f"{service} {before.get(service) or 'new'} -> {revision}"
        for service, revision in after.items()
        if before.get(service) != revision
    ]
    if moved:
        return "applied: " + "; ".join(moved)
    return "already current: " + ", ".join(f"{service} {revision}" for service, revision in after.items())


def migrate(settings: RunSettings, admin_url: str) -> list[ServiceRole]:
    """Create schemas and roles, apply every migration; idempotent. Returns the runtime roles."""
    roles = resolve_roles(settings, admin_url, save=False)
    asyncio.run(_provision(admin_url, roles))
    save_roles(settings, roles)
    for role in roles:
        command.upgrade(alembic_config(role.service, admin_url, role.owner, role.user), "head")
    asyncio.run(_lock_version_tables(admin_url, roles))
    return roles


def redact_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)
