"""Queries only: flush, never commit."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from sqlalchemy import delete, func, literal_column, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from services.audit.chain import COLUMN_FIELDS
from services.audit.models import Alert, Checkpoint, ErasedSubject, Event, Pseudonym

# Every ingest (and erasure) holds this transaction-scoped lock: one writer at a time extends the
# chain, so it cannot fork and its sequence has no gaps.
CHAIN_LOCK_SQL = "SELECT pg_advisory_xact_lock(hashtext('comptoir.audit.chain'))"
CHAIN_LOCK = text(CHAIN_LOCK_SQL)

VERIFY_COLUMNS = (
    Event.sequence,
    Event.id,
    Event.occurred_at,
    Event.recorded_at,
    Event.service,
    Event.action,
    Event.actor_id,
    Event.resource_type,
    Event.resource_id,
    Event.outcome,
    Event.document,
    Event.prev_hash,
    Event.hash,
)


@dataclass(frozen=True)
class EventFilter:
    actor_ids: Sequence[str] = ()
    action: str | None = None
    resource_type: str | None = None
    resource_ids: Sequence[str] = ()
    # Events in which these pseudonyms act, or whose subject (resource) they are: a person's own events.
    subject_ids: Sequence[str] = ()
    since: datetime | None = None
    until: datetime | None = None


class EventRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def lock_chain(self) -> None:
        await self.session.execute(CHAIN_LOCK)

    async def head(self) -> tuple[int, str] | None:
        row = (
            await self.session.execute(select(Event.sequence, Event.hash).order_by(Event.sequence.desc()).limit(1))
        ).first()
        return (row.sequence, row.hash) if row else None

    async def page(self, where: EventFilter, *, limit: int, before: int | None) -> list[Any]:
        """Newest first (by sequence), with the real user ids the pseudonyms stand for while they exist."""
        actor, resource = aliased(Pseudonym), aliased(Pseudonym)
        stmt = (
            select(
                Event.sequence,
                Event.document,
                Event.hash,
                Event.prev_hash,
                actor.user_id.label("actor_user_id"),
                resource.user_id.label("resource_user_id"),
            )
            .outerjoin(actor, actor.pseudonym == Event.actor_id)
            .outerjoin(resource, (resource.pseudonym == Event.resource_id) & (Event.resource_type == "user"))
        )
        if where.actor_ids:
            stmt = stmt.where(Event.actor_id.in_(where.actor_ids))
        if where.action is not None:
            stmt = stmt.where(Event.action == where.action)
        if where.resource_type is not None:
            stmt = stmt.where(Event.resource_type == where.resource_type)
        if where.resource_ids:
            stmt = stmt.where(Event.resource_id.in_(where.resource_ids))
        if where.subject_ids:
            stmt = stmt.where(
                or_(
                    Event.actor_id.in_(where.subject_ids),
                    (Event.resource_type == "user") & Event.resource_id.in_(where.subject_ids),
                )
            )
        if where.since is not None:
            stmt = stmt.where(Event.occurred_at >= where.since)
        if where.until is not None:
            stmt = stmt.where(Event.occurred_at < where.until)
        if before is not None:
            stmt = stmt.where(Event.sequence < before)
        stmt = stmt.order_by(Event.sequence.desc()).limit(limit)
        return list((await self.session.execute(stmt)).all())

    async def count_by_actor(self, actor_id: str) -> int:
        return int(await self.session.scalar(select(func.count()).where(Event.actor_id == actor_id)) or 0)

    async def count_recent(
        self, *, action: str, resource_type: str, resource_id: str, since: datetime, until: datetime
    ) -> int:
        stmt = select(func.count()).where(
            Event.resource_type == resource_type,
            Event.resource_id == resource_id,
            Event.action == action,
            Event.occurred_at > since,
            Event.occurred_at <= until,
        )
        return int(await self.session.scalar(stmt) or 0)

    async def chunk(self, *, start: int, upto: int, limit: int) -> list[Any]:
        """Rows for verification, in sequence order."""
        stmt = (
            select(*VERIFY_COLUMNS)
            .where(Event.sequence >= start, Event.sequence <= upto)
            .order_by(Event.sequence)
            .limit(limit)
        )
        return list((await self.session.execute(stmt)).all())

    async def first_after(self, cutoff: datetime, *, after: int) -> int | None:
        """The first sequence after ``after`` recorded at or after ``cutoff``."""
        stmt = select(func.min(Event.sequence)).where(Event.sequence > after, Event.recorded_at >= cutoff)
        value = await self.session.scalar(stmt)
        return int(value) if value is not None else None

    async def first_sequence(self) -> int | None:
        value = await self.session.scalar(select(func.min(Event.sequence)))
        return int(value) if value is not None else None

    async def delete_upto(self, sequence: int) -> int:
        """Retention only: the trigger lets this through for archived, checkpointed rows alone."""
        await self.session.execute(text("SET LOCAL comptoir.audit_retention = 'archive'"))
        result = await self.session.execute(delete(Event).where(Event.sequence <= sequence))
        await self.session.execute(text("SET LOCAL comptoir.audit_retention = ''"))
        return int(getattr(result, "rowcount", 0) or 0)


# Ingest, the hot path, is written by hand on the asyncpg driver inside the session's transaction: a
# batch costs three statements and a COPY whatever its size (SQLAlchemy's multi-row INSERT was compiled anew for every
# batch, and its bulk insert ran one INSERT per event in PostgreSQL).
_EXISTING_AND_HEAD = """
SELECT ARRAY(SELECT e.id FROM audit.events e WHERE e.id = ANY($1::uuid[])) AS existing, h.sequence, h.hash
FROM (SELECT 1) AS one
LEFT JOIN LATERAL (SELECT sequence, hash FROM audit.events ORDER BY sequence DESC LIMIT 1) AS h ON true
"""

# For every wanted user: the pseudonym it has, else ERASED-to-be if its digest was erased, else the fresh
# pseudonym given for it, stored here. The chain lock serialises this with every other ingest and erasure.
_PSEUDONYMS = """
WITH wanted AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[]) AS w(user_id, digest, fresh)
), known AS (
    SELECT p.user_id, p.pseudonym FROM audit.pseudonyms p JOIN wanted w ON w.user_id = p.user_id
), erased AS (
    SELECT w.user_id FROM wanted w JOIN audit.erased_subjects s ON s.subject_digest = w.digest
    WHERE NOT EXISTS (SELECT 1 FROM known k WHERE k.user_id = w.user_id)
), added AS (
    INSERT INTO audit.pseudonyms (user_id, pseudonym)
    SELECT w.user_id, w.fresh FROM wanted w
    WHERE NOT EXISTS (SELECT 1 FROM known k WHERE k.user_id = w.user_id)
      AND NOT EXISTS (SELECT 1 FROM erased x WHERE x.user_id = w.user_id)
    ON CONFLICT DO NOTHING
    RETURNING user_id
)
SELECT user_id, pseudonym, false AS erased FROM known
UNION ALL SELECT user_id, NULL, true FROM erased
"""

# The columns of a stored event, in the order ChainWriter.insert takes each row's values.
EVENT_COLUMNS = ("sequence", *COLUMN_FIELDS, "document", "prev_hash", "hash")


@dataclass(frozen=True)
class Subjects:
    """What the pseudonym map holds for the users a batch refers to."""

    known: dict[uuid.UUID, str]
    erased: set[uuid.UUID]


class ChainWriter:
    """The ingest statements, on the asyncpg driver of a transaction the caller holds."""

    def __init__(self, driver: asyncpg.Connection) -> None:
        self.driver = driver

    async def lock_chain(self) -> None:
        await self.driver.execute(CHAIN_LOCK_SQL)

    async def existing_and_head(self, ids: Sequence[uuid.UUID]) -> tuple[set[uuid.UUID], tuple[int, str] | None]:
        """Which of ``ids`` are stored already, and the chain's head (sequence, hash), in one round trip."""
        row = await self.driver.fetchrow(_EXISTING_AND_HEAD, list(ids))
        if row is None:  # pragma: no cover - the statement always answers one row
            raise RuntimeError("no answer from the head query")
        head = (int(row["sequence"]), str(row["hash"])) if row["sequence"] is not None else None
        return set(row["existing"]), head

    async def pseudonyms(self, wanted: Sequence[tuple[uuid.UUID, str, str]]) -> Subjects:
        """For each (user id, erasure digest, fresh pseudonym): the stored pseudonym, or erased, or the fresh
        pseudonym stored now (then it is not in ``known``: the caller has it)."""
        if not wanted:
            return Subjects({}, set())
        ids, digests, fresh = (list(column) for column in zip(*wanted, strict=True))
        rows = await self.driver.fetch(_PSEUDONYMS, ids, digests, fresh)
        return Subjects(
            known={row["user_id"]: row["pseudonym"] for row in rows if not row["erased"]},
            erased={row["user_id"] for row in rows if row["erased"]},
        )

    async def insert(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """The events (values in ``EVENT_COLUMNS`` order) in one binary COPY: the cheapest way, for this
        process and for PostgreSQL, to add many rows (the triggers and constraints apply as to an INSERT)."""
        await self.driver.copy_records_to_table("events", schema_name="audit", columns=EVENT_COLUMNS, records=rows)


class PseudonymRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def of(self, user_id: uuid.UUID) -> str | None:
        return await self.session.scalar(select(Pseudonym.pseudonym).where(Pseudonym.user_id == user_id))

    async def forget(self, user_id: uuid.UUID, digest: str) -> bool:
        """Delete the mapping and remember the erasure (by digest); True if a mapping existed."""
        result = await self.session.execute(delete(Pseudonym).where(Pseudonym.user_id == user_id))
        await self.session.execute(
            insert(ErasedSubject).values({ErasedSubject.subject_digest: digest}).on_conflict_do_nothing()
        )
        return bool(getattr(result, "rowcount", 0))


class CheckpointRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, values: dict[str, Any]) -> Checkpoint:
        checkpoint = Checkpoint(**values)
        self.session.add(checkpoint)
        await self.session.flush()
        return checkpoint

    async def all(self) -> Sequence[Checkpoint]:
        return (await self.session.scalars(select(Checkpoint).order_by(Checkpoint.sequence, Checkpoint.id))).all()

    async def page(self, *, limit: int, before: int | None) -> Sequence[Checkpoint]:
        stmt = select(Checkpoint)
        if before is not None:
            stmt = stmt.where(Checkpoint.id < before)
        return (await self.session.scalars(stmt.order_by(Checkpoint.id.desc()).limit(limit))).all()


class AlertRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def raise_alert(self, values: dict[str, Any]) -> tuple[int, bool]:
        """Open an alert, or count one more occurrence of the open alert for the same rule and subject.

        Returns (alert id, whether a new alert was opened).
        """
        insert_stmt = insert(Alert).values(**values)
        stmt: Any = insert_stmt.on_conflict_do_update(
            index_elements=[Alert.rule, Alert.subject],
            # A literal, as in the index: with a bind parameter, the prepared statement's generic plan (used
            # from its sixth run on a connection) cannot prove the partial index applies (42P10).
            index_where=text("status = 'open'"),
            set_={
                "occurrences": Alert.occurrences + 1,
                "last_seen_at": insert_stmt.excluded.last_seen_at,
                "detail": insert_stmt.excluded.detail,
                "event_sequence": func.coalesce(insert_stmt.excluded.event_sequence, Alert.event_sequence),
            },
        ).returning(Alert.id, literal_column("xmax = 0").label("inserted"))
        row = (await self.session.execute(stmt)).one()
        return int(row.id), bool(row.inserted)

    async def page(self, *, status: str | None, limit: int, before: int | None) -> Sequence[Alert]:
        stmt = select(Alert)
        if status is not None:
            stmt = stmt.where(Alert.status == status)
        if before is not None:
            stmt = stmt.where(Alert.id < before)
        return (await self.session.scalars(stmt.order_by(Alert.id.desc()).limit(limit))).all()

    async def resolve(self, alert_id: int, *, by: str, at: datetime) -> Alert | None:
        """Close an alert (resolving a resolved alert again changes nothing)."""
        stmt = (
            update(Alert)
            .where(Alert.id == alert_id)
            .values(
                status="resolved",
                resolved_at=func.coalesce(Alert.resolved_at, at),
                resolved_by=func.coalesce(Alert.resolved_by, by),
            )
            .returning(Alert)
        )
        return (await self.session.scalars(stmt)).one_or_none()

    async def forget_resolver(self, user_id: str, replacement: str) -> None:
        """GDPR erasure: an erased admin no longer appears as the one who resolved alerts."""
        await self.session.execute(update(Alert).where(Alert.resolved_by == user_id).values(resolved_by=replacement))
