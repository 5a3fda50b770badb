"""Recomputing the chain, and checking it against the signed checkpoints.

A full verification:
1. reads every checkpoint, from the database and from the checkpoint log file outside it, and keeps
   those whose Ed25519 signature checks out under a trusted key. A bad signature under a trusted key is
   a problem (someone wrote it without the key: tampering). A checkpoint signed by a key this
   installation does not know cannot be checked at all: it is a warning that names the key id and how
   to trust it (typically a restore whose keys were not put back), and it is not used as evidence;
2. starts at the newest archive checkpoint (after retention) or at sequence 1 with ``GENESIS``;
3. walks the events in sequence order: no gaps, ``prev_hash`` equal to the previous ``hash``,
   ``hash`` equal to SHA-256(prev_hash ‖ document), query columns equal to the document's fields;
4. compares every signed checkpoint with the event at its sequence. A superuser who rewrites rows and
   recomputes every hash passes step 3 but not this one: the rewritten range starts after the last
   checkpoint that still matches, and that is what ``first_bad_sequence`` reports;
5. a checkpoint beyond the last event means events were removed from the end.

``incremental`` verification (before signing a new checkpoint) starts from the newest valid
checkpoint instead of the start of the chain.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.db import Database
from services.audit.chain import COLUMN_FIELDS, GENESIS, chain_hash, column_values, format_timestamp
from services.audit.models import Checkpoint
from services.audit.repository import CheckpointRepository, EventRepository
from services.audit.schemas import Problem, VerifyResult, VerifyWarning
from services.audit.signing import TrustedKeys, checkpoint_message, read_log

CHUNK = 2000
MAX_PROBLEMS = 20


@dataclass(frozen=True)
class SignedHead:
    sequence: int
    head_hash: str
    kind: str
    signed_at: str
    key_id: str
    signature: str

    @property
    def message(self) -> bytes:
        return checkpoint_message(
            kind=self.kind, sequence=self.sequence, head_hash=self.head_hash, signed_at=self.signed_at
        )

    @classmethod
    def of_row(cls, row: Checkpoint) -> SignedHead:
        return cls(row.sequence, row.head_hash, row.kind, format_timestamp(row.signed_at), row.key_id, row.signature)

    @classmethod
    def of_entry(cls, entry: dict[str, Any]) -> SignedHead | None:
        try:
            return cls(
                int(entry["sequence"]),
                str(entry["head_hash"]),
                str(entry["kind"]),
                str(entry["signed_at"]),
                str(entry["key_id"]),
                str(entry["signature"]),
            )
        except (KeyError, TypeError, ValueError):
            return None


class ChainVerifier:
    def __init__(self, db: Database, trusted: TrustedKeys, log_path: Path | None) -> None:
        self.db = db
        self.trusted = trusted
        self.log_path = log_path

    async def signed_heads(self) -> tuple[list[SignedHead], list[SignedHead], list[SignedHead]]:
        """(valid, invalid, unknown key) checkpoints from the database and the log file, each once."""
        async with self.db.sessionmaker() as session, session.begin():
            rows = await CheckpointRepository(session).all()
        heads = {SignedHead.of_row(row) for row in rows}
        if self.log_path is not None:
            heads |= {h for h in map(SignedHead.of_entry, read_log(self.log_path)) if h is not None}
        valid: list[SignedHead] = []
        invalid: list[SignedHead] = []
        unknown: list[SignedHead] = []
        for head in sorted(heads, key=lambda h: (h.sequence, h.signed_at)):
            if not self.trusted.knows(head.key_id):
                unknown.append(head)
            elif self.trusted.verify(head.key_id, head.signature, head.message):
                valid.append(head)
            else:
                invalid.append(head)
        return valid, invalid, unknown

    async def run(
        self, *, incremental: bool = False, progress: Callable[[int, int], None] | None = None
    ) -> VerifyResult:
        """``progress(done, total)`` is called after each chunk of events (the command line's progress bar)."""
        valid, invalid, unknown = await self.signed_heads()
        async with self.db.sessionmaker() as session, session.begin():
            head = await EventRepository(session).head()
        head_sequence = head[0] if head else 0

        archives = [h for h in valid if h.kind == "archive" and h.sequence <= head_sequence]
        anchor = max(archives, key=lambda h: h.sequence) if archives else None
        start, expected_prev = (anchor.sequence + 1, anchor.head_hash) if anchor else (1, GENESIS)
        if incremental:
            usable = [h for h in valid if h.sequence <= head_sequence and h.sequence >= start - 1]
            if usable:
                newest = max(usable, key=lambda h: h.sequence)
                start, expected_prev = newest.sequence + 1, newest.head_hash
        expected_at: dict[int, set[str]] = {}
        for signed in valid:
            expected_at.setdefault(signed.sequence, set()).add(signed.head_hash)

        problems: list[Problem] = []
        mismatched: list[int] = []  # checkpoints that do not match the chain
        matched: list[int] = [start - 1]
        checked = 0
        last_hash: str | None = expected_prev if start > 1 else None
        expected_seq = start
        while expected_seq <= head_sequence:
            async with self.db.sessionmaker() as session, session.begin():
                rows = await EventRepository(session).chunk(start=expected_seq, upto=head_sequence, limit=CHUNK)
            if not rows:
                problems.append(
                    Problem(sequence=expected_seq, reason=f"events {expected_seq}..{head_sequence} are missing")
                )
                break
            for row in rows:
                sequence = row.sequence
                if sequence != expected_seq:
                    problems.append(
                        Problem(sequence=expected_seq, reason=f"events {expected_seq}..{sequence - 1} are missing")
                    )
                if row.prev_hash != expected_prev:
                    problems.append(Problem(sequence=sequence, reason="prev_hash is not the previous event's hash"))
                if chain_hash(row.prev_hash, row.document) != row.hash:
                    problems.append(Problem(sequence=sequence, reason="hash does not match the event's content"))
                elif not _columns_agree(row):
                    problems.append(Problem(sequence=sequence, reason="columns differ from the hashed document"))
                for signed_hash in expected_at.get(sequence, ()):
                    if signed_hash == row.hash:
                        matched.append(sequence)
                    else:
                        mismatched.append(sequence)
                checked += 1
                expected_prev = row.hash
                last_hash = row.hash
                expected_seq = sequence + 1
            if progress is not None:
                progress(checked, head_sequence - start + 1)

        matched.sort()
        for sequence in sorted(set(mismatched)):
            since = _last_below(matched, sequence)
            problems.append(
                Problem(
                    sequence=since + 1,
                    reason=f"the signed checkpoint at {sequence} does not match the chain: "
                    f"events after {since} were rewritten",
                )
            )
        for signed in valid:
            if signed.sequence > head_sequence:
                problems.append(
                    Problem(
                        sequence=head_sequence + 1,
                        reason=f"a checkpoint was signed at {signed.sequence} but the chain ends at {head_sequence}: "
                        "events were removed",
                    )
                )
        for signed in invalid:
            since = _last_below(matched, signed.sequence)
            problems.append(
                Problem(
                    sequence=since + 1,
                    reason=f"the checkpoint at {signed.sequence} has no valid signature from a trusted key",
                )
            )
        warnings = [
            VerifyWarning(
                sequence=signed.sequence,
                key_id=signed.key_id,
                reason=f"the checkpoint at {signed.sequence} is signed by key {signed.key_id}, which this "
                "installation does not trust, so it cannot be checked. If that key is yours (an earlier "
                "installation, a restored backup), trust its public key: restore the backup's keys, or add it "
                "to AUDIT_CHECKPOINT_TRUSTED_KEYS (`comptoir audit checkpoints export` prints it)",
            )
            for signed in unknown
        ]
        problems.sort(key=lambda p: p.sequence if p.sequence is not None else 0)
        bad = [p.sequence for p in problems if p.sequence is not None]
        return VerifyResult(
            ok=not problems,
            checked=checked,
            head_hash=last_hash,
            first_bad_sequence=min(bad) if bad else None,
            head_sequence=head_sequence or None,
            first_sequence=start if head_sequence else None,
            checkpoints_checked=len(valid) + len(invalid),
            problems=problems[:MAX_PROBLEMS],
            warnings=warnings[:MAX_PROBLEMS],
        )


def _last_below(sorted_values: list[int], limit: int) -> int:
    below = [v for v in sorted_values if v < limit]
    return below[-1] if below else 0


def _columns_agree(row: Any) -> bool:
    try:
        doc = json.loads(row.document)
        if doc.get("sequence") != row.sequence:
            return False
        values = column_values(doc)
    except (ValueError, KeyError, TypeError):
        return False
    return all(getattr(row, name) == values[name] for name in COLUMN_FIELDS)
