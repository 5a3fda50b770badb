"""Retries with stamina, paid for only when a first try fails.

Building a stamina retry context costs a few hundred microseconds of CPU (measured on the development
machine): more than a whole order claim. So the first try runs bare; when it fails in a way worth
retrying, stamina takes over, with that failure as its first attempt (the waits, the attempt count, the
retry log ``stamina.retry_scheduled`` and the counter ``stamina_retries_total`` are all stamina's).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import stamina

T = TypeVar("T")

# An exception class (or several), or a hook: False = do not retry, True = the usual wait, a number = that wait.
Retryable = type[Exception] | tuple[type[Exception], ...] | Callable[[Exception], bool | float]


def _worth_retrying(on: Retryable, exc: Exception) -> bool:
    if isinstance(on, type | tuple):
        return isinstance(exc, on)
    return on(exc) is not False


async def retried(
    call: Callable[[], Awaitable[T]],
    on: Retryable,
    *,
    attempts: int | None,
    first_wait: float,
    max_wait: float | None = None,
    timeout: float | None = None,
) -> T:
    """``call()``, tried again while it raises what ``on`` names: up to ``attempts`` tries in all and for
    ``timeout`` seconds at most (None: no bound), waiting ``first_wait`` seconds, then twice as long each
    time up to ``max_wait`` (default: no cap within the attempts). When the tries run out, the last
    failure is raised."""
    try:
        return await call()
    except Exception as exc:
        if not _worth_retrying(on, exc):
            raise
        failed: Exception | None = exc
    if max_wait is None:
        max_wait = first_wait * 2 ** (attempts or 1)
    async for attempt in stamina.retry_context(
        on=on, attempts=attempts, timeout=timeout, wait_initial=first_wait, wait_max=max_wait, wait_jitter=0
    ):
        with attempt:
            if failed is not None:  # the bare first try counts as stamina's first attempt
                first, failed = failed, None
                raise first
            result = await call()
    return result
