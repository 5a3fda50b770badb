"""The audit schema: one hash chain of events, signed checkpoints, alerts, and the pseudonym map.

Only ``events.document`` (with ``prev_hash``) is hashed; the other event columns are copies of some of
its fields for querying, and verification checks that they still agree with it (services/audit/chain.py).
The real user ids live only in ``pseudonyms``, outside the hashed content, so erasing a user deletes one
row there and leaves the chain intact.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, CheckConstraint, DateTime, Identity, Index, Integer, Text, func, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from common.models import schema_metadata


class Base(DeclarativeBase):
    metadata = schema_metadata("audit")


HASH_CHECK = "~ '^[0-9a-f]{64}$'"


class Event(Base):
    """Append-only: the runtime role may only INSERT and SELECT, and a trigger refuses UPDATE and DELETE."""

    __tablename__ = "events"
    __table_args__ = (
        CheckConstraint("sequence > 0", name="sequence_positive"),
        CheckConstraint("prev_hash " + HASH_CHECK, name="prev_hash_hex"),
        CheckConstraint("hash " + HASH_CHECK, name="hash_hex"),
        Index("ix_events_actor_id_sequence", "actor_id", "sequence"),
        Index("ix_events_action_sequence", "action", "sequence"),
        Index("ix_events_resource_type_resource_id_sequence", "resource_type", "resource_id", "sequence"),
        Index("ix_events_occurred_at", "occurred_at"),
        Index("ix_events_recorded_at", "recorded_at"),
    )

    sequence: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    id: Mapped[uuid.UUID] = mapped_column(unique=True)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    service: Mapped[str] = mapped_column(Text)
    action: Mapped[str] = mapped_column(Text)
    actor_id: Mapped[str | None] = mapped_column(Text)
    resource_type: Mapped[str | None] = mapped_column(Text)
    resource_id: Mapped[str | None] = mapped_column(Text)
    outcome: Mapped[str] = mapped_column(Text)
    # The canonical JSON text that was hashed, byte for byte (never re-serialised from parsed values).
    document: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(Text)
    hash: Mapped[str] = mapped_column(Text)


class Checkpoint(Base):
    """A chain head signed with the Ed25519 key under DATA_DIR (the database never holds the private key)."""

    __tablename__ = "checkpoints"
    __table_args__ = (
        CheckConstraint("kind IN ('periodic', 'manual', 'archive')", name="kind_known"),
        CheckConstraint("head_hash " + HASH_CHECK, name="head_hash_hex"),
        Index("ix_checkpoints_sequence", "sequence"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    sequence: Mapped[int] = mapped_column(BigInteger)
    head_hash: Mapped[str] = mapped_column(Text)
    signed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    kind: Mapped[str] = mapped_column(Text)
    key_id: Mapped[str] = mapped_column(Text)
    public_key: Mapped[str] = mapped_column(Text)
    signature: Mapped[str] = mapped_column(Text)
    # For an archive checkpoint: the file name, its SHA-256 and the range of events it holds.
    archive: Mapped[dict[str, Any] | None] = mapped_column(JSONB, default=None)


class Alert(Base):
    __tablename__ = "alerts"
    __table_args__ = (
        CheckConstraint("status IN ('open', 'resolved')", name="status_known"),
        CheckConstraint("occurrences >= 1", name="occurrences_positive"),
        # One open alert per rule and subject: repeats count up instead of flooding the list.
        Index("uq_alerts_rule_subject_open", "rule", "subject", unique=True, postgresql_where=text("status = 'open'")),
        Index("ix_alerts_status_id", "status", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    rule: Mapped[str] = mapped_column(Text)
    subject: Mapped[str] = mapped_column(Text, server_default="")
    severity: Mapped[str] = mapped_column(Text)
    summary: Mapped[str] = mapped_column(Text)
    detail: Mapped[dict[str, Any]] = mapped_column(JSONB)
    status: Mapped[str] = mapped_column(Text, server_default="open")
    occurrences: Mapped[int] = mapped_column(Integer, server_default="1")
    first_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    event_sequence: Mapped[int | None] = mapped_column(BigInteger, default=None)
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    resolved_by: Mapped[str | None] = mapped_column(Text, default=None)


class Pseudonym(Base):
    """The only link between a pseudonym in the chain and a real user id (deleted on erasure)."""

    __tablename__ = "pseudonyms"

    user_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    pseudonym: Mapped[str] = mapped_column(Text, unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ErasedSubject(Base):
    """Users erased so far, by a digest of their id: their late events get no new pseudonym."""

    __tablename__ = "erased_subjects"
    __table_args__ = (CheckConstraint("subject_digest " + HASH_CHECK, name="subject_digest_hex"),)

    subject_digest: Mapped[str] = mapped_column(Text, primary_key=True)
    erased_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
