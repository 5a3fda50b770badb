"""Structured JSON logs with a request id and secrets redacted by the logger itself.

Every log line (ours, uvicorn's, SQLAlchemy's) goes through one structlog ProcessorFormatter, so the
redaction step cannot be bypassed by logging through the standard library.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import structlog

REDACTED = "[REDACTED]"

# Keys whose value is always secret, wherever they appear in an event (compared lower-cased).
_SECRET_KEY_PARTS = (
    "password",
    "passwd",
    "secret",
    "token",
    "authorization",
    "cookie",
    "api_key",
    "apikey",
    "private_key",
    "credential",
    "signature",
)
_SECRET_KEYS_EXACT = frozenset({"code", "otp", "otp_code", "pin", "password_hash", "hash_value"})

# Names of secret fields, not a secret.
_SECRET_FIELD = r"(?:password|passwd|new_password|current_password|secret|token|refresh_token|access_token|code|otp)"  # noqa: S105
_STRING_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 " + REDACTED),
    # A token starts where a run of token characters starts, not at any "eyJ" inside one: with "\b" (a
    # boundary after every "-"), "eyJ-eyJ-eyJ-..." began a scan to the end of the run at each "eyJ", and
    # 60 KB of it in a request's path cost a process 2 s of CPU in its access log line.
    (re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"), REDACTED),
    (re.compile(r"(?i)\b(" + _SECRET_FIELD + r")=([^&\s\"']+)"), r"\1=" + REDACTED),
    (re.compile(r"(?i)(\"" + _SECRET_FIELD + r"\"\s*:\s*)\"(?:[^\"\\]|\\.)*\""), r'\1"' + REDACTED + '"'),
    (re.compile(r"(?i)('" + _SECRET_FIELD + r"'\s*:\s*)'(?:[^'\\]|\\.)*'"), r"\1'" + REDACTED + "'"),
)


# Every pattern above needs one of these; most log strings (paths, methods, ids) have none, so one
# search decides whether the substitutions run at all (logging is on the request path).
_TRIGGER = re.compile(r"(?i)bearer|basic|eyJ|=|\"|'")


@functools.lru_cache(maxsize=4096)
def is_secret_key(key: str) -> bool:
    lowered = key.lower()
    return lowered in _SECRET_KEYS_EXACT or any(part in lowered for part in _SECRET_KEY_PARTS)


def _may_hold_secret(text: str) -> bool:
    """``_TRIGGER.search(text)``, for ASCII text (nearly all) by substring tests at a fraction of the cost
    of that case-insensitive alternation (4 µs for an id, on every string of every audit event). Other
    text keeps the pattern: under IGNORECASE it also matches letters such as 'ſ' for 's'."""
    if not text.isascii():
        return _TRIGGER.search(text) is not None
    if "=" in text or '"' in text or "'" in text:
        return True
    lowered = text.lower()
    return "eyj" in lowered or "bearer" in lowered or "basic" in lowered


def redact_text(text: str) -> str:
    if not _may_hold_secret(text):
        return text
    for pattern, replacement in _STRING_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def redact(value: Any, _depth: int = 0) -> Any:
    """Return a copy of ``value`` with secret-named keys and secret-looking strings replaced."""
    if _depth > 20:
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if type(value) in _SCALARS:  # before the Mapping check, an abstract class's (slow) one
        return value
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if isinstance(k, str) and is_secret_key(k) else redact(v, _depth + 1))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v, _depth + 1) for v in value]
    return value


_SCALARS = frozenset({int, float, bool, type(None)})
_EVENT_KEYS_KEPT = frozenset({"event", "level", "timestamp", "logger"})


def _redact_processor(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> Any:
    for key in list(event_dict):
        value = event_dict[key]
        if key not in _EVENT_KEYS_KEPT and is_secret_key(key):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = redact(value)
    return event_dict


def configure_logging(*, level: str = "INFO", fmt: str = "json", service: str = "comptoir") -> None:
    """Route every logger through structlog's JSON renderer with redaction. Idempotent."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _add_service(service),
            _redact_processor,
            renderer,
        ],
    )
    handler = _StdoutHandler()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    global _access_lines
    _access_lines = _AccessLines(handler, service) if fmt == "json" else None
    root.setLevel(level.upper())
    # uvicorn installs its own handlers; send its records through ours instead.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    # Our access log is redacted and structured. uvicorn formats its own access line's arguments on every
    # response whenever its logger has a handler anywhere up the tree, even a disabled logger's: with no
    # handler reachable it skips that work.
    access = logging.getLogger("uvicorn.access")
    access.disabled = True
    access.propagate = False
    # Client libraries log every outgoing URL at INFO, ids of people included (GDPR calls): warnings only.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


class _StdoutHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stdout`` is now (test capture, a redirected stream)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def _add_service(service: str) -> Any:
    def processor(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> Any:
        event_dict.setdefault("service", service)
        return event_dict

    return processor


ACCESS_LOGGER = "comptoir.access"
_access_logger = logging.getLogger(ACCESS_LOGGER)
_access_structlog = structlog.get_logger(ACCESS_LOGGER)


class _AccessLines:
    """The access log's line, one per request, written straight to the handler's stream.

    The same JSON line the general pipeline makes (the same keys in the same order, the request's context
    variables, the same redaction), without its dozen processors and ``LogRecord``: measured on the gateway,
    that pipeline cost more CPU per request than all the rest of its work. The stream is flushed once per
    turn of the event loop rather than after every line (outside a loop, at once)."""

    def __init__(self, handler: logging.Handler, service: str, clock: Callable[[], float] = time.time) -> None:
        self.handler = handler
        self.service = service
        self.clock = clock
        self.flush_pending = False
        self._second = -1
        self._second_text = ""

    def write(self, event: dict[str, Any]) -> None:
        event["event"] = "http.request"
        for key, value in structlog.contextvars.get_contextvars().items():
            event.setdefault(key, value)
        event["level"] = "info"
        event["logger"] = ACCESS_LOGGER
        event["timestamp"] = self.timestamp()
        event.setdefault("service", self.service)
        _redact_processor(None, "info", event)
        try:
            line = json.dumps(event) + "\n"  # no keyword argument: json's ready-made encoder
        except TypeError:  # a context variable JSON cannot hold: rendered as the general pipeline does
            line = str(_RENDER(None, "info", event)) + "\n"
        handler = self.handler
        handler.acquire()
        try:
            handler.stream.write(line)  # type: ignore[attr-defined]
        finally:
            handler.release()
        if not self.flush_pending:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                handler.flush()
                return
            self.flush_pending = True
            loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_pending = False
        self.handler.flush()

    def timestamp(self) -> str:
        """What ``TimeStamper(fmt="iso", utc=True)`` writes (``datetime.isoformat``, ``Z`` for ``+00:00``), the
        date and time formatted once per second."""
        now = self.clock()
        second = int(now)
        micro = round((now - second) * 1e6)
        if micro >= 1_000_000:
            second, micro = second + 1, micro - 1_000_000
        if second != self._second:
            self._second = second
            self._second_text = datetime.datetime.fromtimestamp(second, tz=datetime.UTC).isoformat()[:19]
        return f"{self._second_text}.{micro:06d}Z" if micro else f"{self._second_text}Z"


_access_lines: _AccessLines | None = None
_RENDER = structlog.processors.JSONRenderer()


def access_logged() -> bool:
    """Whether the access log is on (``INFO``): checked before building a line, so that below it costs nothing."""
    return _access_logger.isEnabledFor(logging.INFO)


def log_access(**fields: Any) -> None:
    """One ``http.request`` line of the access log (``comptoir.access``, level INFO).

    The direct writer is used while the logging set up by ``configure_logging`` is the only destination
    (JSON, one handler); anything else (console format, a handler a test or a library added) gets the line
    through the general pipeline, as any other."""
    lines = _access_lines
    if (
        lines is not None
        and logging.root.handlers == [lines.handler]
        and not _access_logger.handlers
        and _access_logger.propagate
    ):
        lines.write(fields)
    else:
        _access_structlog.info("http.request", **fields)
