"""Outgoing messages (OTP SMS, password-reset e-mails) behind one small interface.

- ``JsonlSink``: development sink, one JSON object per line in ``DATA_DIR/messages.jsonl`` (0600).
- ``WebhookSender``: the real adapter, an HTTPS POST of the same JSON to a provider bridge, signed
  with HMAC-SHA256 over the exact body bytes, with a timeout and retries.
Message bodies carry codes and links, so they are never logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

import httpx
import structlog

from common.retries import retried

log = structlog.get_logger("comptoir.auth.messages")

SIGNATURE_HEADER = "X-Comptoir-Signature"
TIMESTAMP_HEADER = "X-Comptoir-Timestamp"


@dataclass(frozen=True)
class Message:
    channel: Literal["sms", "email"]
    to: str
    body: str
    subject: str | None = None

    def document(self, sent_at: float) -> dict[str, Any]:
        doc: dict[str, Any] = {"channel": self.channel, "to": self.to}
        if self.subject is not None:
            doc["subject"] = self.subject
        doc["body"] = self.body
        doc["sent_at"] = datetime.fromtimestamp(sent_at, UTC).isoformat()
        return doc


class MessageSender(Protocol):
    async def send(self, message: Message) -> None: ...

    async def aclose(self) -> None: ...


class JsonlSink:
    """Appends each message as one JSON line (what tests and the README read)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = asyncio.Lock()

    def _append(self, line: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    async def send(self, message: Message) -> None:
        line = json.dumps(message.document(time.time()), ensure_ascii=False).encode("utf-8") + b"\n"
        async with self._lock:
            await asyncio.to_thread(self._append, line)
        log.info("auth.message.written", channel=message.channel)

    async def aclose(self) -> None:
        return None


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>`` over ``<timestamp>.<body>``: the receiver can refuse replays of old bodies."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={mac}"


class DeliveryFailed(Exception):
    pass


class _NotYet(Exception):
    """One delivery attempt failed in a way worth retrying (a 5xx, a 429 or a network error)."""


class WebhookSender:
    """POSTs each message as signed JSON to an HTTPS endpoint; retries 5xx and network errors."""

    def __init__(
        self,
        url: str,
        secret: str,
        *,
        timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 0.5,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not url.startswith("https://"):
            raise ValueError("the message webhook must be an https:// URL")
        self.url = url
        self.secret = secret
        self.retries = retries
        self.backoff = backoff
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout), follow_redirects=False, transport=transport)

    async def send(self, message: Message) -> None:
        now = time.time()
        body = json.dumps(message.document(now), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        timestamp = str(int(now))
        headers = {
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self.secret, timestamp, body),
        }
        tries = itertools.count(1)
        try:
            await retried(
                lambda: self._post(message.channel, body, headers, next(tries)),
                _NotYet,
                attempts=self.retries + 1,
                first_wait=self.backoff,
            )
        except _NotYet:
            raise DeliveryFailed("the webhook did not accept the message") from None

    async def _post(self, channel: str, body: bytes, headers: dict[str, str], attempt: int) -> None:
        try:
            response = await self.client.post(self.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            outcome = type(exc).__name__
        else:
            if response.status_code < 300:
                log.info("auth.message.delivered", channel=channel, attempt=attempt)
                return
            if response.status_code < 500 and response.status_code != 429:
                log.error("auth.message.rejected", channel=channel, status=response.status_code)
                raise DeliveryFailed(f"the webhook refused the message ({response.status_code})")
            outcome = str(response.status_code)
        log.warning("auth.message.retry", channel=channel, attempt=attempt, outcome=outcome)
        raise _NotYet(outcome)

    async def aclose(self) -> None:
        await self.client.aclose()
