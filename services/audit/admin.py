"""Operator tasks behind ``comptoir audit ...``, run with the installation's admin database URL.

- ``verify``: the same verification as ``GET /api/v1/audit/verify`` (a failure also opens the
  integrity alert).
- ``export_checkpoints``: every signed checkpoint (database and log file) as self-contained JSON lines,
  each with the public key, the exact signed message and the signature; keep them somewhere the
  database's administrators cannot write (a WORM bucket, another team's storage, a printed page).
- ``archive``: retention. Events recorded before the cutoff are written to a signed JSON-lines file,
  then deleted together with an ``archive`` checkpoint at the last archived event, in one transaction,
  so the remaining chain still verifies (its first event's ``prev_hash`` is that checkpoint's
  ``head_hash``). The runtime role cannot do this (no DELETE): only the owner, through the path the
  events trigger allows. The newest event is never archived.

An archive file holds one line per event ``{"sequence", "prev_hash", "hash", "document"}`` (the document
is the exact hashed text) and a last line ``{"type": "signature", ...}`` that signs the SHA-256 of all
lines before it with the checkpoint key.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from common.db import Database
from services.audit.alerts import integrity_alert, raise_alerts
from services.audit.chain import GENESIS, canonical_json, chain_hash, format_timestamp
from services.audit.checkpoints import log_entry
from services.audit.config import Settings
from services.audit.models import Checkpoint
from services.audit.repository import CheckpointRepository, EventRepository
from services.audit.schemas import CheckpointRead, VerifyResult
from services.audit.signing import (
    SigningKey,
    TrustedKeys,
    append_log,
    checkpoint_message,
    key_id_of,
    load_key,
    read_log,
    trusted_keys,
    unb64,
)
from services.audit.verify import CHUNK, ChainVerifier, SignedHead

ARCHIVE_PURPOSE = "comptoir.audit.archive.v1"


def admin_database(admin_url: str) -> Database:
    return Database(admin_url, schema="audit", application_name="comptoir-audit-cli", pool_size=2, max_overflow=0)


def trusted_for(settings: Settings) -> TrustedKeys:
    """The public keys verification trusts: the local key file's, AUDIT_CHECKPOINT_TRUSTED_KEYS and the kept ones."""
    return trusted_keys(settings.checkpoint_key_path, settings.checkpoint_trusted_keys, settings.checkpoint_trusted_dir)


async def verify(
    admin_url: str, settings: Settings, progress: Callable[[int, int], None] | None = None
) -> VerifyResult:
    db = admin_database(admin_url)
    try:
        result = await ChainVerifier(db, trusted_for(settings), settings.checkpoint_log_path).run(progress=progress)
        if not result.ok:
            problems = [p.model_dump() for p in result.problems]
            await raise_alerts(db, [integrity_alert(result.first_bad_sequence, problems, "cli")])
        return result
    finally:
        await db.dispose()


async def export_checkpoints(admin_url: str, settings: Settings) -> list[dict[str, Any]]:
    """Every checkpoint once (database and log file), oldest first, with whether it verifies here."""
    db = admin_database(admin_url)
    try:
        async with db.sessionmaker() as session, session.begin():
            rows = await CheckpointRepository(session).all()
    finally:
        await db.dispose()
    entries = {row.signature: log_entry(CheckpointRead.model_validate(row)) for row in rows}
    for entry in read_log(settings.checkpoint_log_path):
        if isinstance(entry.get("signature"), str):
            entries.setdefault(entry["signature"], entry)
    trusted = trusted_for(settings)
    out = []
    for entry in sorted(entries.values(), key=lambda e: (int(e.get("sequence", 0)), str(e.get("signed_at")))):
        head = SignedHead.of_entry(entry)
        out.append(entry | {"trusted": bool(head and trusted.verify(head.key_id, head.signature, head.message))})
    return out


@dataclass(frozen=True)
class ArchiveResult:
    archived: int
    first_sequence: int | None = None
    last_sequence: int | None = None
    file: Path | None = None
    reason: str | None = None


class ArchiveRefused(Exception):
    pass


async def archive(
    admin_url: str,
    settings: Settings,
    *,
    older_than_days: int,
    output_dir: Path,
    now: datetime | None = None,
) -> ArchiveResult:
    """Archive and drop the events recorded more than ``older_than_days`` ago (see the module docstring)."""
    if older_than_days <= 0:
        return ArchiveResult(0, reason="retention is off: events are kept forever")
    key = load_key(settings.checkpoint_key_path)
    if key is None:
        raise ArchiveRefused(f"no checkpoint key at {settings.checkpoint_key_path}: archives must be signed")
    cutoff = (now or datetime.now(UTC)) - timedelta(days=older_than_days)
    db = admin_database(admin_url)
    try:
        verdict = await ChainVerifier(db, trusted_for(settings), settings.checkpoint_log_path).run()
        if not verdict.ok:
            raise ArchiveRefused(f"the chain does not verify (first bad sequence {verdict.first_bad_sequence})")
        if verdict.first_sequence is None:
            return ArchiveResult(0, reason="the chain is empty")
        first = verdict.first_sequence
        async with db.sessionmaker() as session, session.begin():
            events = EventRepository(session)
            await events.lock_chain()
            head = await events.head()
            if head is None:
                return ArchiveResult(0, reason="the chain is empty")
            boundary = await events.first_after(cutoff, after=first - 1)
            last = min((boundary - 1) if boundary is not None else head[0], head[0] - 1)
            if last < first:
                return ArchiveResult(0, reason="nothing is older than the retention period")
            path, digest, head_hash = await _write_archive(events, key, output_dir, first, last)
            checkpoint = await _archive_checkpoint(session, key, last, head_hash, path, digest, first)
            deleted = await events.delete_upto(last)
            if deleted != last - first + 1:
                raise ArchiveRefused(f"expected to drop {last - first + 1} events, the database dropped {deleted}")
        append_log(settings.checkpoint_log_path, log_entry(checkpoint))
        return ArchiveResult(deleted, first, last, path)
    finally:
        await db.dispose()


async def _write_archive(
    events: EventRepository, key: SigningKey, output_dir: Path, first: int, last: int
) -> tuple[Path, str, str]:
    output_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = output_dir / f"audit-events-{first:012d}-{last:012d}.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    digest = hashlib.sha256()
    head_hash = ""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        start = first
        while start <= last:
            rows = await events.chunk(start=start, upto=last, limit=CHUNK)
            if not rows:
                raise ArchiveRefused(f"events from {start} disappeared while archiving")
            for row in rows:
                line = canonical_json(
                    {"sequence": row.sequence, "prev_hash": row.prev_hash, "hash": row.hash, "document": row.document}
                )
                fh.write(line + "\n")
                digest.update((line + "\n").encode("utf-8"))
                head_hash = row.hash
                start = row.sequence + 1
        signed = {
            "purpose": ARCHIVE_PURPOSE,
            "first_sequence": first,
            "last_sequence": last,
            "events": last - first + 1,
            "sha256": digest.hexdigest(),
            "head_hash": head_hash,
            "signed_at": format_timestamp(datetime.now(UTC)),
        }
        signature = key.sign(canonical_json(signed).encode("utf-8"))
        trailer = signed | {"type": "signature", "key_id": key.key_id, "public_key": key.public_key}
        fh.write(canonical_json(trailer | {"signature": signature}) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path, digest.hexdigest(), head_hash


async def _archive_checkpoint(
    session: Any, key: SigningKey, last: int, head_hash: str, path: Path, digest: str, first: int
) -> CheckpointRead:
    signed_at = datetime.now(UTC)
    message = checkpoint_message(
        kind="archive", sequence=last, head_hash=head_hash, signed_at=format_timestamp(signed_at)
    )
    row: Checkpoint = await CheckpointRepository(session).add(
        {
            "sequence": last,
            "head_hash": head_hash,
            "signed_at": signed_at,
            "kind": "archive",
            "key_id": key.key_id,
            "public_key": key.public_key,
            "signature": key.sign(message),
            "archive": {"file": path.name, "sha256": digest, "first_sequence": first, "events": last - first + 1},
        }
    )
    return CheckpointRead.model_validate(row)


class NotAnArchive(ValueError):
    """The file is not an archive at all: not UTF-8 text, or a line that is not a JSON object."""


EVENT_FIELDS = ("prev_hash", "hash", "document")


def _archive_lines(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """The file's lines and each one's JSON object (NotAnArchive names the first that is not one)."""
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise NotAnArchive(f"{path} is not an audit archive: it is not UTF-8 text") from None
    entries: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if not isinstance(entry, dict):
            raise NotAnArchive(f"{path} is not an audit archive: line {number} is not a JSON object")
        entries.append(entry)
    return lines, entries


def verify_archive(path: Path, trusted: TrustedKeys) -> dict[str, Any]:
    """Check an archive file on its own: its chain, its digest and its signature."""
    problems: list[str] = []
    digest = hashlib.sha256()
    lines, entries = _archive_lines(path)
    if not lines:
        return {"ok": False, "events": 0, "problems": ["the file is empty"]}
    trailer = entries[-1]
    prev: str | None = None
    count = 0
    for number, (line, entry) in enumerate(zip(lines[:-1], entries[:-1], strict=True), 1):
        digest.update((line + "\n").encode("utf-8"))
        count += 1
        if not all(isinstance(entry.get(name), str) for name in EVENT_FIELDS) or not entry["prev_hash"].isascii():
            problems.append(f"line {number}: not an archived event (it needs {', '.join(EVENT_FIELDS)})")
            prev = None
            continue
        sequence = entry.get("sequence", f"line {number}")
        if prev is not None and entry["prev_hash"] != prev:
            problems.append(f"{sequence}: prev_hash is not the previous event's hash")
        try:
            matches = chain_hash(entry["prev_hash"], entry["document"]) == entry["hash"]
        except UnicodeEncodeError:  # a lone surrogate: no event the chain wrote
            matches = False
        if not matches:
            problems.append(f"{sequence}: hash does not match the event's content")
        prev = entry["hash"]
    signed = {
        k: trailer.get(k)
        for k in ("purpose", "first_sequence", "last_sequence", "events", "sha256", "head_hash", "signed_at")
    }
    if trailer.get("type") != "signature" or signed["purpose"] != ARCHIVE_PURPOSE:
        problems.append("the last line is not an archive signature")
    if signed["sha256"] != digest.hexdigest() or signed["events"] != count or signed["head_hash"] != prev:
        problems.append("the signed digest, count or head does not match the file")
    key_id = str(trailer.get("key_id"))
    try:
        public_key_id = key_id_of(unb64(str(trailer.get("public_key", ""))))
    except ValueError:  # not base64
        public_key_id = None
    if public_key_id != key_id or not trusted.verify(
        key_id, str(trailer.get("signature")), canonical_json(signed).encode("utf-8")
    ):
        problems.append("the signature is not valid under a trusted key")
    first_prev = entries[0].get("prev_hash") if len(lines) > 1 else None
    return {
        "ok": not problems,
        "events": count,
        "first_sequence": signed["first_sequence"],
        "last_sequence": signed["last_sequence"],
        "starts_at_genesis": first_prev == GENESIS,
        "problems": problems,
    }
