from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

Outcome = Literal["success", "failure", "denied"]


class Schema(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class EventIn(BaseModel):
    """One event as common.audit.AuditEvent sends it. Unknown fields are refused (422), not dropped:
    a sender newer than this service keeps its events in its outbox until audit understands them,
    rather than having part of them silently lost."""

    model_config = ConfigDict(extra="forbid")

    id: uuid.UUID
    occurred_at: AwareDatetime
    service: str = Field(min_length=1, max_length=32, pattern=r"^[a-z][a-z0-9_-]*$")
    action: str = Field(pattern=r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$", max_length=100)
    actor_id: str | None = Field(None, max_length=128)
    actor_role: str | None = Field(None, max_length=32)
    ip: str | None = Field(None, max_length=64)
    user_agent: str | None = Field(None, max_length=512)
    method: str | None = Field(None, max_length=16)
    path: str | None = Field(None, max_length=512)
    request_id: str | None = Field(None, max_length=128)
    resource_type: str | None = Field(None, max_length=64)
    resource_id: str | None = Field(None, max_length=256)
    old_values: dict[str, Any] | None = None
    new_values: dict[str, Any] | None = None
    outcome: Outcome = "success"


class EventBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    events: list[EventIn] = Field(max_length=1000)


class IngestResult(BaseModel):
    stored: int
    duplicates: int


TIMESTAMP = "RFC 3339 UTC with six fraction digits, exactly as hashed."


class EventRead(BaseModel):
    """An event exactly as hashed, plus ``sequence``, ``hash`` and ``prev_hash``.

    The chain holds a user's pseudonym wherever the event names the user. For admins, ``actor_id``
    (and ``resource_id`` of a user) hold the user's id while the pseudonym mapping exists, and
    ``pseudonyms`` the values as hashed; once the user is erased they stay pseudonyms.
    ``actor_user_id`` and ``resource_user_id`` give the resolved ids too (null once the user is erased).
    None of these three extra fields is part of the hashed document: to rehash an event, drop them and
    ``hash``/``prev_hash``, and put the ``pseudonyms`` values back in place.
    """

    id: uuid.UUID
    sequence: int
    occurred_at: str = Field(json_schema_extra={"format": "date-time"}, description=TIMESTAMP)
    recorded_at: str = Field(json_schema_extra={"format": "date-time"}, description=TIMESTAMP)
    service: str
    action: str
    actor_id: str | None
    actor_role: str | None
    resource_type: str | None
    resource_id: str | None
    ip: str | None
    user_agent: str | None
    method: str | None
    path: str | None
    request_id: str | None
    old_values: dict[str, Any] | None
    new_values: dict[str, Any] | None
    outcome: str
    hash: str
    prev_hash: str
    actor_user_id: str | None = None
    resource_user_id: str | None = None
    pseudonyms: dict[str, str] | None = Field(
        None, description="`actor_id`/`resource_id` as hashed (pseudonyms), where this answer resolved them."
    )


class Problem(BaseModel):
    sequence: int | None
    reason: str


class VerifyWarning(BaseModel):
    """Something verification could not check (not evidence of tampering): a checkpoint signed by a key
    this installation does not trust."""

    sequence: int
    key_id: str
    reason: str


class VerifyResult(BaseModel):
    ok: bool
    checked: int = Field(description="Events whose hash was recomputed.")
    head_hash: str | None = Field(description="Hash of the newest event checked (null for an empty chain).")
    first_bad_sequence: int | None = Field(
        description="The lowest sequence that is not proven intact; null when ok. For a checkpoint mismatch "
        "(rows rewritten with recomputed hashes) this is the first event after the last checkpoint that matched."
    )
    head_sequence: int | None = None
    first_sequence: int | None = None
    checkpoints_checked: int = 0
    problems: list[Problem] = Field(default_factory=list, description="At most 20, lowest sequence first.")
    warnings: list[VerifyWarning] = Field(
        default_factory=list,
        description="Checkpoints that could not be checked (signed by a key not trusted here); not tampering.",
    )


class CheckpointRead(Schema):
    id: int
    sequence: int
    head_hash: str
    signed_at: datetime
    kind: str
    key_id: str
    public_key: str
    signature: str
    archive: dict[str, Any] | None = None


class AlertRead(Schema):
    id: int
    rule: str
    subject: str
    severity: str
    summary: str
    detail: dict[str, Any]
    status: str
    occurrences: int
    first_seen_at: datetime
    last_seen_at: datetime
    event_sequence: int | None
    resolved_at: datetime | None
    resolved_by: str | None


class UserExport(BaseModel):
    user_id: uuid.UUID
    pseudonym: str
    events: list[EventRead]
    truncated: bool


class ErasureResult(BaseModel):
    erased: bool
    pseudonym_removed: bool
    events_pseudonymised: int
