"""The audit service's rules: ingest into the one chain, queries, GDPR access and erasure, alerts."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from common.audit import AuditEvent, outbox_payload
from common.db import Database, driver_of
from common.errors import RETRYABLE_SQLSTATES, sqlstate_of
from common.logging import is_secret_key, redact_text
from common.pagination import Page, number_before, page_of
from services.audit.alerts import AlertRules, Opened, Raised, announce, raise_alerts, store_alerts
from services.audit.chain import GENESIS, canonical_document, chain_hash, format_timestamp
from services.audit.errors import AlertNotFound, ChainBusy, InvalidEvent, NothingHeld
from services.audit.metrics import CHAIN_HEAD, EVENTS_DUPLICATE, EVENTS_STORED
from services.audit.pseudonyms import (
    ERASED,
    as_user_id,
    by_text,
    clean_string,
    clean_text,
    erased_digest,
    new_pseudonym,
    subjects,
    substitute,
)
from services.audit.repository import (
    AlertRepository,
    ChainWriter,
    CheckpointRepository,
    EventFilter,
    EventRepository,
    PseudonymRepository,
)
from services.audit.schemas import AlertRead, CheckpointRead, ErasureResult, EventRead, IngestResult, UserExport

log = structlog.get_logger("comptoir.audit")

SERVICE = "audit"


_PLAIN = frozenset({int, float, bool, type(None)})
_MAX_DEPTH = 20


def prepare(payload: dict[str, Any]) -> dict[str, Any]:
    """Redact again (a sender may have forgotten) and make every string storable: ``clean_text(scrub(p))``
    in one walk of the event instead of two (tests/audit/test_ingest_paths.py holds them equal)."""
    cleaned: dict[str, Any] = _storable(payload, 0)  # a mapping comes back a mapping
    return cleaned


def _storable(value: Any, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        return None
    kind = type(value)
    if kind is str:
        return clean_string(redact_text(value))
    if kind in _PLAIN:
        return value
    if kind is dict or isinstance(value, Mapping):  # an event's objects are dicts: no ABC check for them
        key_depth = depth + 1
        return {
            (clean_string(k) if isinstance(k, str) and key_depth <= _MAX_DEPTH else clean_text(k, key_depth)): (
                _storable(v, depth + 1)
            )
            for k, v in value.items()
            if not (isinstance(k, str) and is_secret_key(k))
        }
    if isinstance(value, list | tuple):
        return [_storable(v, depth + 1) for v in value]
    if isinstance(value, str):
        return clean_string(redact_text(value))
    return clean_text(value, depth)


def read_event(row: Any, *, resolve: bool = False) -> EventRead:
    """An event as stored; ``resolve`` (admin reads): ``actor_id`` and a user ``resource_id`` hold the
    user id while the pseudonym mapping exists, and ``pseudonyms`` keeps the values as hashed."""
    doc = json.loads(row.document)
    doc.pop("sequence", None)
    actor_user_id = getattr(row, "actor_user_id", None)
    resource_user_id = getattr(row, "resource_user_id", None)
    hashed: dict[str, str] = {}
    if resolve and actor_user_id is not None:
        hashed["actor_id"], doc["actor_id"] = doc["actor_id"], str(actor_user_id)
    if resolve and resource_user_id is not None:
        hashed["resource_id"], doc["resource_id"] = doc["resource_id"], str(resource_user_id)
    return EventRead(
        **doc,
        sequence=row.sequence,
        hash=row.hash,
        prev_hash=row.prev_hash,
        actor_user_id=str(actor_user_id) if actor_user_id else None,
        resource_user_id=str(resource_user_id) if resource_user_id else None,
        pseudonyms=hashed or None,
    )


def _as_subject_sees_it(event: EventRead, pseudonym: str) -> EventRead:
    """An event of a person's export: someone else's doing to them (a role change, an unlock, a failed
    sign-in on their account) keeps what was done and when, not who did it nor from where (another
    person's data)."""
    if event.actor_id == pseudonym:
        return event
    return event.model_copy(update={"actor_id": None, "actor_user_id": None, "ip": None, "user_agent": None})


class AuditChain:
    """Appends events to the one chain, one writer at a time (a transaction-scoped advisory lock)."""

    def __init__(self, db: Database, rules: AlertRules) -> None:
        self.db = db
        self.rules = rules

    async def append(self, payloads: Sequence[dict[str, Any]]) -> IngestResult:
        """Store each event once (idempotent by id), in order, each chained to the one before."""
        events: dict[uuid.UUID, dict[str, Any]] = {}
        for payload in payloads:
            event = prepare(payload)
            events.setdefault(uuid.UUID(str(event["id"])), event)
        in_batch_repeats = len(payloads) - len(events)
        try:
            async with self.db.sessionmaker() as session, session.begin():
                stored_docs, opened = await self._append_locked(session, events)
        except DBAPIError as exc:
            if sqlstate_of(exc) in RETRYABLE_SQLSTATES:
                raise ChainBusy("The audit chain is busy; retry shortly.", headers={"Retry-After": "1"}) from exc
            raise
        announce(opened)
        duplicates = len(events) - len(stored_docs) + in_batch_repeats
        for doc in stored_docs:
            EVENTS_STORED.labels(doc["service"]).inc()
        if duplicates:
            EVENTS_DUPLICATE.labels(str(payloads[0].get("service"))).inc(duplicates)
        if stored_docs:
            CHAIN_HEAD.set(stored_docs[-1]["sequence"])
        return IngestResult(stored=len(stored_docs), duplicates=duplicates)

    async def _append_locked(
        self, session: AsyncSession, events: dict[uuid.UUID, dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], list[Opened]]:
        # The lock goes through the session: its first statement is what opens the transaction on the
        # connection, and the hand-written statements below run inside it, holding the lock.
        await EventRepository(session).lock_chain()
        async with driver_of(await session.connection()) as driver:
            if not driver.is_in_transaction():  # pragma: no cover - would append outside the chain lock
                raise RuntimeError("the chain is appended to only inside a transaction")
            writer = ChainWriter(driver)
            existing, head = await writer.existing_and_head(list(events))
            fresh = [(event_id, event) for event_id, event in events.items() if event_id not in existing]
            if not fresh:
                return [], []
            mapping_text = by_text(await pseudonyms_for(writer, (event for _id, event in fresh)))
            sequence, prev_hash = head if head is not None else (0, GENESIS)
            now = datetime.now(UTC)
            recorded_at = format_timestamp(now)
            docs, rows = [], []
            for event_id, event in fresh:
                sequence += 1
                occurred = occurred_at_of(event)
                doc = build_document(
                    substitute(event, mapping_text),
                    event_id=event_id,
                    sequence=sequence,
                    occurred_at=format_timestamp(occurred),
                    recorded_at=recorded_at,
                )
                try:
                    document = canonical_document(doc)
                except ValueError as exc:  # NaN or infinity in a value
                    raise InvalidEvent(f"Event {doc['id']} holds a value JSON cannot represent.") from exc
                digest = chain_hash(prev_hash, document)
                rows.append(  # in EVENT_COLUMNS order
                    (
                        sequence,
                        event_id,
                        occurred,
                        now,
                        doc["service"],
                        doc["action"],
                        doc["actor_id"],
                        doc["resource_type"],
                        doc["resource_id"],
                        doc["outcome"],
                        document,
                        prev_hash,
                        digest,
                    )
                )
                docs.append(doc)
                prev_hash = digest
            await writer.insert(rows)
        opened = await store_alerts(session, await self.rules.evaluate(session, docs))
        return docs, opened

    async def record_own(self, event: AuditEvent) -> None:
        """The audit service's own events go straight into its chain (no outbox)."""
        await self.append([outbox_payload(event)])

    async def raise_alerts(self, raised: Sequence[Raised]) -> None:
        await raise_alerts(self.db, raised)


def occurred_at_of(event: Mapping[str, Any]) -> datetime:
    """When the event happened, in UTC (as the chain's text and the ``occurred_at`` column hold it).

    An instant the chain's text cannot hold (a year before 1000 in UTC, which ``parse_timestamp`` and so
    verification could not read back; or none at all once in UTC) refuses the batch with a 422."""
    occurred = datetime.fromisoformat(str(event["occurred_at"]).replace("Z", "+00:00"))
    if occurred.tzinfo is None:
        raise ValueError("timestamps in the chain are timezone-aware")
    try:
        utc = occurred.astimezone(UTC)
    except OverflowError:
        utc = None
    if utc is None or utc.year < 1000:
        raise InvalidEvent(f"Event {event['id']} has an occurred_at the chain cannot hold (years 1000-9999 in UTC).")
    return utc


def build_document(
    event: dict[str, Any], *, event_id: uuid.UUID, sequence: int, occurred_at: str, recorded_at: str
) -> dict[str, Any]:
    return {
        "sequence": sequence,
        "id": str(event_id),
        "occurred_at": occurred_at,
        "recorded_at": recorded_at,
        "service": event["service"],
        "action": event["action"],
        "actor_id": event.get("actor_id"),
        "actor_role": event.get("actor_role"),
        "resource_type": event.get("resource_type"),
        "resource_id": event.get("resource_id"),
        "ip": event.get("ip"),
        "user_agent": event.get("user_agent"),
        "method": event.get("method"),
        "path": event.get("path"),
        "request_id": event.get("request_id"),
        "old_values": event.get("old_values"),
        "new_values": event.get("new_values"),
        "outcome": event.get("outcome") or "success",
    }


async def pseudonyms_for(writer: ChainWriter, events: Iterable[dict[str, Any]]) -> dict[uuid.UUID, str]:
    """The pseudonym of every user the events refer to; new users get one, erased users get ERASED."""
    wanted: set[uuid.UUID] = set()
    for event in events:
        wanted |= subjects(event)
    if not wanted:
        return {}
    fresh = {user_id: new_pseudonym() for user_id in wanted}
    held = await writer.pseudonyms([(user_id, erased_digest(user_id), fresh[user_id]) for user_id in wanted])
    return {
        user_id: ERASED if user_id in held.erased else held.known.get(user_id, fresh[user_id]) for user_id in wanted
    }


class EventQueries:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self.events = EventRepository(session)
        self.pseudonyms = PseudonymRepository(session)

    async def _ids(self, value: str | None) -> list[str]:
        """A user id is searched for by its pseudonym (and as given: a pseudonym, a service name ...)."""
        if value is None:
            return []
        user_id = as_user_id(value)
        pseudonym = await self.pseudonyms.of(user_id) if user_id is not None else None
        return [value, pseudonym] if pseudonym else [value]

    async def page(
        self,
        *,
        actor_id: str | None,
        action: str | None,
        resource_type: str | None,
        resource_id: str | None,
        since: datetime | None,
        until: datetime | None,
        limit: int,
        cursor: str | None,
    ) -> Page[EventRead]:
        before = number_before(cursor)
        where = EventFilter(
            actor_ids=await self._ids(actor_id),
            action=action,
            resource_type=resource_type,
            resource_ids=await self._ids(resource_id),
            since=since,
            until=until,
        )
        rows = await self.events.page(where, limit=limit + 1, before=before)
        return page_of(rows, limit, lambda row: read_event(row, resolve=True), lambda row: [str(row.sequence)])


async def checkpoint_page(session: AsyncSession, *, limit: int, cursor: str | None) -> Page[CheckpointRead]:
    rows = await CheckpointRepository(session).page(limit=limit + 1, before=number_before(cursor))
    return page_of(rows, limit, CheckpointRead.model_validate, lambda row: [str(row.id)])


class Alerts:
    def __init__(self, session: AsyncSession) -> None:
        self.repo = AlertRepository(session)

    async def page(self, *, status: str | None, limit: int, cursor: str | None) -> Page[AlertRead]:
        rows = await self.repo.page(status=status, limit=limit + 1, before=number_before(cursor))
        return page_of(rows, limit, AlertRead.model_validate, lambda row: [str(row.id)])

    async def resolve(self, alert_id: int, *, by: str) -> AlertRead:
        alert = await self.repo.resolve(alert_id, by=by, at=datetime.now(UTC))
        if alert is None:
            raise AlertNotFound()
        return AlertRead.model_validate(alert)


class Gdpr:
    """GDPR access and erasure for the auth service."""

    def __init__(self, db: Database, chain: AuditChain, *, export_limit: int) -> None:
        self.db = db
        self.chain = chain
        self.export_limit = export_limit

    async def export(self, user_id: uuid.UUID) -> UserExport:
        async with self.db.sessionmaker() as session, session.begin():
            pseudonym = await PseudonymRepository(session).of(user_id)
            if pseudonym is None:
                raise NothingHeld()
            rows = await EventRepository(session).page(
                EventFilter(subject_ids=[pseudonym]), limit=self.export_limit + 1, before=None
            )
        events = [_as_subject_sees_it(read_event(row), pseudonym) for row in rows[: self.export_limit]]
        return UserExport(user_id=user_id, pseudonym=pseudonym, events=events, truncated=len(rows) > self.export_limit)

    async def erase(self, user_id: uuid.UUID) -> ErasureResult:
        """Delete the pseudonym mapping (under the chain lock, so no ingest re-creates it meanwhile)."""
        async with self.db.sessionmaker() as session, session.begin():
            await EventRepository(session).lock_chain()
            pseudonyms = PseudonymRepository(session)
            pseudonym = await pseudonyms.of(user_id)
            count = await EventRepository(session).count_by_actor(pseudonym) if pseudonym else 0
            removed = await pseudonyms.forget(user_id, erased_digest(user_id))
            await AlertRepository(session).forget_resolver(str(user_id), ERASED)
        return ErasureResult(erased=True, pseudonym_removed=removed, events_pseudonymised=count)
