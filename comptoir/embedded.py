"""The embedded PostgreSQL (pgserver) used when no DATABASE_URL is configured.

pgserver initialises the cluster with ``trust`` authentication on a unix socket. On first start we
give the superuser a generated password, create the ``comptoir`` database and switch the socket to
``scram-sha-256``, so a service's role can never log in as another role without its password.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import asyncpg

from comptoir.secrets import load_json, new_password, secrets_dir, write_private_json

log = logging.getLogger("comptoir.embedded")

DATABASE = "comptoir"
SUPERUSER = "postgres"
_HARDENED_MARK = "# comptoir: hardened"
_HBA = f"""{_HARDENED_MARK}
# Only the unix socket under DATA_DIR is open (no TCP listener); every role needs its password.
local   all             all                                     scram-sha-256
"""


# pgserver stops the server when the last process that holds it lets go, and keeps the holders' pids here.
_HOLDERS = ".handle_pids.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _forget_dead_holders(path: Path) -> None:
    """Drop the pids of holders that died without letting go (``kill -9`` of ``comptoir run``): with them
    still listed, the next run would join the server they left running and, on stopping, leave it running
    too, since it never counts as the last holder."""
    if not path.exists():
        return
    try:
        holders = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(holders, list):
        return
    alive = [pid for pid in holders if isinstance(pid, int) and _alive(pid)]
    if alive != holders:
        path.write_text(json.dumps(alive), encoding="utf-8")


def libpq_url(user: str, password: str, socket_dir: Path | str, database: str = DATABASE) -> str:
    from urllib.parse import quote

    return f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}@/{database}?host={socket_dir}"


class EmbeddedPostgres:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.resolve()
        self.pgdata = self.data_dir / "pg"
        self._server: Any = None
        self.socket_dir: Path | None = None

    @property
    def credentials_file(self) -> Path:
        return secrets_dir(self.data_dir) / "postgres.json"

    def start(self) -> str:
        """Start (or join) the server and return the superuser URL of the ``comptoir`` database."""
        # pgserver picks its lock directory at import; without XDG_RUNTIME_DIR it warns and uses /tmp.
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        logging.getLogger("pgserver").setLevel(logging.WARNING)
        from pgserver.postgres_server import PostgresServer, get_server

        self.data_dir.mkdir(parents=True, exist_ok=True)
        with PostgresServer._lock:  # pgserver's own lock over its list of holders
            _forget_dead_holders(self.pgdata / _HOLDERS)
        self._server = get_server(self.pgdata, cleanup_mode="stop")
        self.socket_dir = Path(self._server.get_postmaster_info().socket_dir)
        creds = load_json(self.credentials_file)
        hba = self.pgdata / "pg_hba.conf"
        if _HARDENED_MARK not in hba.read_text(encoding="utf-8"):
            password = creds.get("superuser_password") or new_password()
            creds["superuser_password"] = password
            write_private_json(self.credentials_file, creds)
            asyncio.run(self._harden(password))
            hba.write_text(_HBA, encoding="utf-8")
            asyncio.run(self._reload(password))
        return libpq_url(SUPERUSER, creds["superuser_password"], self.socket_dir)

    async def _harden(self, password: str) -> None:
        conn = await asyncpg.connect(user=SUPERUSER, host=str(self.socket_dir), database="postgres")
        try:
            await conn.execute(f"ALTER ROLE {SUPERUSER} PASSWORD $pw$" + password + "$pw$")
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE)
            if not exists:
                await conn.execute(f"CREATE DATABASE {DATABASE} ENCODING 'UTF8'")
        finally:
            await conn.close()

    async def _reload(self, password: str) -> None:
        conn = await asyncpg.connect(user=SUPERUSER, password=password, host=str(self.socket_dir), database="postgres")
        try:
            await conn.execute("SELECT pg_reload_conf()")
        finally:
            await conn.close()

    def stop(self) -> None:
        if self._server is not None:
            from pgserver.postgres_server import PostgresServer

            with PostgresServer._lock:  # a holder that died since this one joined must not keep the server up
                _forget_dead_holders(self.pgdata / _HOLDERS)
            self._server.cleanup()
            self._server = None
