"""Signed checkpoints of the chain head: periodically, on demand, and for retention archives.

Before signing, the events since the newest valid checkpoint are verified: a chain that does not
verify is never signed (an alert is raised instead). Each checkpoint goes to the ``checkpoints``
table and, as a JSON line, to the checkpoint log under DATA_DIR, so that deleting the table does
not delete the evidence.

Exporting them for safekeeping elsewhere: ``comptoir audit checkpoints export`` prints one JSON line
per checkpoint with the public key that verifies it.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from common.db import Database
from common.tasks import BackgroundLoop
from services.audit.alerts import integrity_alert
from services.audit.chain import format_timestamp
from services.audit.errors import ChainBroken, EmptyChain
from services.audit.metrics import CHECKPOINT_SEQUENCE, CHECKPOINTS, VERIFY_RUNS
from services.audit.models import Checkpoint
from services.audit.repository import CheckpointRepository
from services.audit.schemas import CheckpointRead, VerifyResult
from services.audit.service import AuditChain
from services.audit.signing import SigningKey, append_log, checkpoint_message
from services.audit.verify import ChainVerifier

log = structlog.get_logger("comptoir.audit.checkpoints")


def log_entry(row: Checkpoint | CheckpointRead) -> dict[str, Any]:
    """A checkpoint as one self-contained JSON line (what the export prints)."""
    return {
        "sequence": row.sequence,
        "head_hash": row.head_hash,
        "signed_at": format_timestamp(row.signed_at),
        "kind": row.kind,
        "key_id": row.key_id,
        "public_key": row.public_key,
        "algorithm": "Ed25519",
        "signature": row.signature,
        "message": checkpoint_message(
            kind=row.kind, sequence=row.sequence, head_hash=row.head_hash, signed_at=format_timestamp(row.signed_at)
        ).decode(),
        "archive": row.archive,
    }


class CheckpointService:
    def __init__(
        self, db: Database, key: SigningKey, verifier: ChainVerifier, chain: AuditChain, log_path: Path | None
    ) -> None:
        self.db = db
        self.key = key
        self.verifier = verifier
        self.chain = chain
        self.log_path = log_path

    async def verify(self, *, source: str, incremental: bool = False) -> VerifyResult:
        """Verify; a failure raises the integrity alert."""
        result = await self.verifier.run(incremental=incremental)
        VERIFY_RUNS.labels("ok" if result.ok else "failed").inc()
        if not result.ok:
            log.error(
                "audit.chain.verify_failed",
                source=source,
                first_bad_sequence=result.first_bad_sequence,
                problems=[p.reason for p in result.problems[:5]],
            )
            problems = [p.model_dump() for p in result.problems]
            await self.chain.raise_alerts([integrity_alert(result.first_bad_sequence, problems, source)])
        return result

    async def sign(self, kind: str) -> CheckpointRead:
        """Verify the events since the last checkpoint, then sign the head."""
        checked, sequence, head_hash = await self._verified_head(kind)
        return await self.sign_head(kind, sequence, head_hash)

    async def sign_if_new(self, kind: str) -> CheckpointRead | None:
        """``sign``, or None when the newest checkpoint already covers the head (the periodic signer)."""
        checked, sequence, head_hash = await self._verified_head(kind)
        if checked == 0:
            return None
        return await self.sign_head(kind, sequence, head_hash)

    async def _verified_head(self, kind: str) -> tuple[int, int, str]:
        """How many events were verified, and the head they lead to (refused if broken or empty)."""
        result = await self.verify(source=f"checkpoint.{kind}", incremental=True)
        if not result.ok:
            raise ChainBroken(
                "The chain does not verify; no checkpoint was signed.",
                extra={"first_bad_sequence": result.first_bad_sequence},
            )
        if result.head_sequence is None or result.head_hash is None:
            raise EmptyChain()
        return result.checked, result.head_sequence, result.head_hash

    async def sign_head(
        self, kind: str, sequence: int, head_hash: str, *, archive: dict[str, Any] | None = None
    ) -> CheckpointRead:
        signed_at = datetime.now(UTC)
        message = checkpoint_message(
            kind=kind, sequence=sequence, head_hash=head_hash, signed_at=format_timestamp(signed_at)
        )
        async with self.db.sessionmaker() as session, session.begin():
            row = await CheckpointRepository(session).add(
                {
                    "sequence": sequence,
                    "head_hash": head_hash,
                    "signed_at": signed_at,
                    "kind": kind,
                    "key_id": self.key.key_id,
                    "public_key": self.key.public_key,
                    "signature": self.key.sign(message),
                    "archive": archive,
                }
            )
            read = CheckpointRead.model_validate(row)
        if self.log_path is not None:
            append_log(self.log_path, log_entry(read))
        CHECKPOINTS.labels(kind).inc()
        CHECKPOINT_SEQUENCE.set(sequence)
        log.info("audit.checkpoint.signed", kind=kind, sequence=sequence, key_id=self.key.key_id)
        return read


class Checkpointer(BackgroundLoop):
    """Signs the head every ``interval`` seconds when it moved (never, with an interval of 0)."""

    task_name = "audit-checkpointer"

    def __init__(self, service: CheckpointService, interval: float) -> None:
        self.service = service
        self.interval = interval

    async def run_once(self) -> CheckpointRead | None:
        try:
            return await self.service.sign_if_new("periodic")
        except EmptyChain:
            return None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except ChainBroken:
                pass  # already logged and alerted by verify
            except Exception as exc:  # the checkpointer must outlive a database outage
                log.warning("audit.checkpoint.failed", error=type(exc).__name__)

    def start(self) -> None:
        if self.interval > 0:
            super().start()
