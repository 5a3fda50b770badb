"""Password hashing (PBKDF2-SHA256 in low-priority worker threads) and the password policy (NIST 800-63B)."""

from __future__ import annotations

import asyncio
import functools
import gzip
import os
import secrets
import threading
import time
import unicodedata
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import TypeVar

from passlib.context import CryptContext

from services.auth.errors import HashingBusy

COMMON_PASSWORDS_RESOURCE = "common-passwords.txt.gz"

T = TypeVar("T")


def prepare(password: str) -> str:
    """NFKC, as NIST 800-63B asks, so that visually identical passwords are the same password."""
    return unicodedata.normalize("NFKC", password)


LATE_AFTER = 2  # a hash that has waited this many times max_wait for its thread is not computed...
LATE_FLOOR = 1.0  # ...nor less than this many seconds (a tiny max_wait must not drop every hash)


class PasswordHasher:
    """Hashes and verifies off the event loop, in a pool of its own (a login storm queues there).

    ``verify`` also says when a stored hash was made with other parameters and returns its
    replacement, so hashes are upgraded on the next successful login.

    The threads run at a raised nice value (Linux schedules threads, not processes): a hash is long
    CPU work that nobody watches tick, while every other request on the machine is short and waited
    for, so the scheduler serves those first and gives the hashes what is left.

    The queue is bounded by time: a hash that would wait more than ``max_wait`` seconds for a thread
    (the hashes queued ahead of it, at the recent time a hash takes) is refused at once with
    :class:`HashingBusy` (503, ``Retry-After``). Accepting it would only make it time out at the gateway
    after its hash had used the CPU for nothing, and a run of such timeouts would open the gateway's
    circuit to the whole auth service (refresh and sign-out included).

    That estimate looks back: when the machine slows down all at once (a storm begins), hashes admitted
    on it wait longer than it said. So a hash is also refused when its turn comes if it has waited more
    than twice ``max_wait`` (and at least a second) by then: it is never computed (the CPU goes to
    hashes whose callers still wait for them) and its caller gets the same :class:`HashingBusy`
    instead of a gateway timeout.
    """

    def __init__(
        self,
        rounds: int,
        *,
        workers: int = 0,
        nice: int = 0,
        max_wait: float = 0.0,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.rounds = rounds
        self.context = CryptContext(schemes=["pbkdf2_sha256"], pbkdf2_sha256__rounds=rounds)
        self.workers = workers or os.cpu_count() or 2
        self.executor = ThreadPoolExecutor(
            max_workers=self.workers,
            thread_name_prefix="pbkdf2",
            initializer=hashing_thread,
            initargs=(nice,),
        )
        self.max_wait = max_wait  # 0: unbounded
        self.timer = timer
        self.pending = 0  # submitted, not yet finished (running or queued)
        self.seconds_per_hash = 0.0  # moving average of the recent hashes' own time (0: none yet)
        self._dummy: str | None = None

    def expected_wait(self) -> float:
        """Seconds a hash submitted now would wait for a free thread."""
        queued_ahead = max(0, self.pending + 1 - self.workers)
        return queued_ahead * self.seconds_per_hash / self.workers

    def admit(self) -> None:
        """Raise :class:`HashingBusy` when a hash submitted now would wait longer than ``max_wait``.

        Callers that count an attempt before checking a password ask here first, so that a refusal
        for want of capacity changes nothing.
        """
        if self.max_wait and (wait := self.expected_wait()) > self.max_wait:
            raise HashingBusy(wait - self.max_wait)

    async def _run(self, func: Callable[[], T], *, admitted: bool = False) -> T:
        if not admitted:
            self.admit()
        self.pending += 1
        try:
            done = await asyncio.get_running_loop().run_in_executor(self.executor, self._timed, func, self.timer())
        finally:
            self.pending -= 1
        if done is None:  # dropped: come back when the queue is within max_wait again, on today's estimate
            raise HashingBusy(self.expected_wait() - self.max_wait)
        result, took = done
        average = self.seconds_per_hash
        self.seconds_per_hash = took if not average else 0.8 * average + 0.2 * took
        return result

    def _timed(self, func: Callable[[], T], queued_at: float) -> tuple[T, float] | None:
        """(result, seconds it took), or None when the turn came too late and ``func`` was not run."""
        started = self.timer()
        if self.max_wait and started - queued_at > max(LATE_AFTER * self.max_wait, LATE_FLOOR):
            return None
        result = func()
        return result, self.timer() - started

    async def hash(self, password: str) -> str:
        return str(await self._run(functools.partial(self.context.hash, prepare(password))))

    async def dummy_hash(self) -> str:
        if self._dummy is None:
            self._dummy = await self.hash(secrets.token_urlsafe(16))
        return self._dummy

    async def verify(self, password: str, stored: str | None, *, admitted: bool = False) -> tuple[bool, str | None]:
        """(matches, new hash if the stored one should be replaced). No hash: a dummy is checked.

        ``admitted``: the caller passed :meth:`admit` already (and may have counted the attempt since).
        """
        if not stored:
            dummy = functools.partial(self.context.verify, prepare(password), await self.dummy_hash())
            await self._run(dummy, admitted=admitted)
            return False, None
        return await self._run(functools.partial(self._verify_and_update, prepare(password), stored), admitted=admitted)

    def _verify_and_update(self, password: str, stored: str) -> tuple[bool, str | None]:
        try:
            ok, new_hash = self.context.verify_and_update(password, stored)
        except ValueError:  # an unusable stored hash matches nothing
            return False, None
        return bool(ok), new_hash

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def hashing_thread(nice: int) -> None:
    """Set up a hashing thread: named ``pbkdf2`` for the operating system (``top -H``, ``ps -L`` and
    /proc show where the CPU goes), at the lower priority."""
    try:
        Path("/proc/thread-self/comm").write_text("pbkdf2")
    except OSError:  # not Linux, or no /proc: the name is only a convenience
        pass
    lower_priority(nice)


def lower_priority(nice: int) -> None:
    """Raise the calling thread's nice value by ``nice`` (never lowers it: that needs privileges)."""
    if nice:
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + nice))


@functools.cache
def common_passwords() -> frozenset[str]:
    """Django's list of 20,000 common passwords (lower-cased), shipped as package data."""
    data = resources.files("services.auth.data").joinpath(COMMON_PASSWORDS_RESOURCE).read_bytes()
    text = gzip.decompress(data).decode("utf-8")
    return frozenset(line.strip() for line in text.splitlines() if line.strip())


# Runs a password may not be part of (NIST 800-63B: "repetitive or sequential characters"): digits and
# letters in order, and the letter rows of QWERTY and of AZERTY (French keyboards, the usual ones here).
SEQUENCES = ("0123456789", "abcdefghijklmnopqrstuvwxyz", "qwertyuiopasdfghjklzxcvbnm", "azertyuiopqsdfghjklmwxcvbn")
MIN_DISTINCT = 5  # characters: "aaaaaaaaaaaa", "abababababab" or "123123123123" have length and nothing else


@functools.cache
def _runs(length: int) -> tuple[str, ...]:
    """Each sequence, forwards and backwards, repeated to cover ``length`` from any starting point."""
    times = length // 10 + 2
    return tuple(run * times for sequence in SEQUENCES for run in (sequence, sequence[::-1]))


def repetitive(password: str) -> bool:
    """Too few different characters, or a stretch of one sequence ("123456789012", "azertyuiopqs")."""
    lowered = password.lower()
    if len(set(lowered)) < MIN_DISTINCT:
        return True
    return any(lowered in run for run in _runs(len(lowered)))


class PasswordPolicy:
    """Length 12-128, no composition rules, not a common password, not a repetition or a sequence, not
    containing the e-mail."""

    def __init__(self, *, min_length: int, max_length: int) -> None:
        self.min_length = min_length
        self.max_length = max_length

    def problems(self, password: str, *, email: str | None) -> list[str]:
        """Every reason the password is refused (empty: accepted)."""
        password = prepare(password)
        reasons = []
        if len(password) < self.min_length:
            reasons.append(f"must be at least {self.min_length} characters long")
        if len(password) > self.max_length:
            reasons.append(f"must be at most {self.max_length} characters long")
        lowered = password.lower()
        if lowered in common_passwords() or lowered.strip() in common_passwords():
            reasons.append("is too common: it appears in a list of frequently used passwords")
        elif len(password) <= self.max_length and repetitive(password):
            reasons.append("is a repetition or a sequence (like aaaa, abab or 1234): choose words or mixed characters")
        if email:
            email = email.lower()
            local = email.split("@", 1)[0]
            if email in lowered or (len(local) >= 3 and local in lowered):
                reasons.append("must not contain the e-mail address or its part before the @")
        return reasons
