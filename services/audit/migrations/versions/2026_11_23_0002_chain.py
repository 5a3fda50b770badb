"""chain: append-only hash-chained events, signed checkpoints, alerts, pseudonyms

Revision ID: audit_0002
Revises: audit_0001
Create Date: 2026-11-23

The runtime role keeps the default SELECT and INSERT; it additionally gets UPDATE on ``alerts``
(repeat counts, resolving) and DELETE on ``pseudonyms`` (GDPR erasure), nothing else.
``events`` and ``checkpoints`` refuse UPDATE, DELETE and TRUNCATE through triggers, even for the
owner role. The one exception is documented retention (``comptoir audit archive``): rows may be
deleted only with ``comptoir.audit_retention = 'archive'`` set in the transaction and only up to
the newest signed archive checkpoint, so what remains still verifies.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from common.migrations import runtime_role_grant

revision: str = "audit_0002"
down_revision: str | None = "audit_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

HASH_CHECK = "~ '^[0-9a-f]{64}$'"

EVENTS_GUARD = """
CREATE FUNCTION audit.events_append_only() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_OP = 'DELETE'
       AND current_setting('comptoir.audit_retention', true) = 'archive'
       AND OLD.sequence <= (SELECT max(c.sequence) FROM audit.checkpoints c WHERE c.kind = 'archive') THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit.events is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$
"""

REFUSE_CHANGE = """
CREATE FUNCTION audit.refuse_change() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RAISE EXCEPTION '%.% is append-only: % refused', TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$
"""


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("sequence", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("service", sa.Text(), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("actor_id", sa.Text(), nullable=True),
        sa.Column("resource_type", sa.Text(), nullable=True),
        sa.Column("resource_id", sa.Text(), nullable=True),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("document", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.Text(), nullable=False),
        sa.Column("hash", sa.Text(), nullable=False),
        sa.CheckConstraint("sequence > 0", name="ck_events_sequence_positive"),
        sa.CheckConstraint("prev_hash " + HASH_CHECK, name="ck_events_prev_hash_hex"),
        sa.CheckConstraint("hash " + HASH_CHECK, name="ck_events_hash_hex"),
        sa.PrimaryKeyConstraint("sequence", name="pk_events"),
        sa.UniqueConstraint("id", name="uq_events_id"),
    )
    op.create_index("ix_events_actor_id_sequence", "events", ["actor_id", "sequence"])
    op.create_index("ix_events_action_sequence", "events", ["action", "sequence"])
    op.create_index(
        "ix_events_resource_type_resource_id_sequence", "events", ["resource_type", "resource_id", "sequence"]
    )
    op.create_index("ix_events_occurred_at", "events", ["occurred_at"])
    op.create_index("ix_events_recorded_at", "events", ["recorded_at"])

    op.create_table(
        "checkpoints",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("head_hash", sa.Text(), nullable=False),
        sa.Column("signed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("key_id", sa.Text(), nullable=False),
        sa.Column("public_key", sa.Text(), nullable=False),
        sa.Column("signature", sa.Text(), nullable=False),
        sa.Column("archive", JSONB(), nullable=True),
        sa.CheckConstraint("kind IN ('periodic', 'manual', 'archive')", name="ck_checkpoints_kind_known"),
        sa.CheckConstraint("head_hash " + HASH_CHECK, name="ck_checkpoints_head_hash_hex"),
        sa.PrimaryKeyConstraint("id", name="pk_checkpoints"),
    )
    op.create_index("ix_checkpoints_sequence", "checkpoints", ["sequence"])

    op.create_table(
        "alerts",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("rule", sa.Text(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False, server_default=""),
        sa.Column("severity", sa.Text(), nullable=False),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.Column("detail", JSONB(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False, server_default="open"),
        sa.Column("occurrences", sa.Integer(), nullable=False, server_default="1"),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event_sequence", sa.BigInteger(), nullable=True),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resolved_by", sa.Text(), nullable=True),
        sa.CheckConstraint("status IN ('open', 'resolved')", name="ck_alerts_status_known"),
        sa.CheckConstraint("occurrences >= 1", name="ck_alerts_occurrences_positive"),
        sa.PrimaryKeyConstraint("id", name="pk_alerts"),
    )
    op.create_index(
        "uq_alerts_rule_subject_open",
        "alerts",
        ["rule", "subject"],
        unique=True,
        postgresql_where=sa.text("status = 'open'"),
    )
    op.create_index("ix_alerts_status_id", "alerts", ["status", "id"])

    op.create_table(
        "pseudonyms",
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("pseudonym", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("user_id", name="pk_pseudonyms"),
        sa.UniqueConstraint("pseudonym", name="uq_pseudonyms_pseudonym"),
    )

    op.create_table(
        "erased_subjects",
        sa.Column("subject_digest", sa.Text(), nullable=False),
        sa.Column("erased_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint("subject_digest " + HASH_CHECK, name="ck_erased_subjects_subject_digest_hex"),
        sa.PrimaryKeyConstraint("subject_digest", name="pk_erased_subjects"),
    )

    op.execute(EVENTS_GUARD)
    op.execute(REFUSE_CHANGE)
    op.execute(
        "CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON audit.events"
        " FOR EACH ROW EXECUTE FUNCTION audit.events_append_only()"
    )
    for table in ("events", "checkpoints"):
        op.execute(
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON audit.{table}"
            " FOR EACH STATEMENT EXECUTE FUNCTION audit.refuse_change()"
        )
    op.execute(
        "CREATE TRIGGER checkpoints_append_only BEFORE UPDATE OR DELETE ON audit.checkpoints"
        " FOR EACH ROW EXECUTE FUNCTION audit.refuse_change()"
    )
    op.execute("REVOKE ALL ON FUNCTION audit.events_append_only() FROM PUBLIC")
    op.execute("REVOKE ALL ON FUNCTION audit.refuse_change() FROM PUBLIC")

    op.execute(runtime_role_grant("UPDATE", "audit.alerts"))
    op.execute(runtime_role_grant("DELETE", "audit.pseudonyms"))


def downgrade() -> None:
    # Dropping the trail is deliberate and explicit: the triggers go with their tables.
    op.drop_table("erased_subjects")
    op.drop_table("pseudonyms")
    op.drop_table("alerts")
    op.drop_table("checkpoints")
    op.drop_table("events")
    op.execute("DROP FUNCTION audit.refuse_change()")
    op.execute("DROP FUNCTION audit.events_append_only()")
