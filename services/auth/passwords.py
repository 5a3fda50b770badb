"""Password hashing (PBKDF2-SHA256 in worker threads) and the password policy (NIST 800-63B style)."""

from __future__ import annotations

import asyncio
import functools
import gzip
import os
import secrets
import unicodedata
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import TypeVar

from passlib.context import CryptContext

COMMON_PASSWORDS_RESOURCE = "common-passwords.txt.gz"

T = TypeVar("T")


def prepare(password: str) -> str:
    """NFKC, as NIST 800-63B asks, so that visually identical passwords are the same password."""
    return unicodedata.normalize("NFKC", password)


class PasswordHasher:
    """Hashes and verifies off the event loop, in a pool of its own (a login storm queues there).

    ``verify`` also says when a stored hash was made with other parameters and returns its
    replacement, so hashes are upgraded on the next successful login.
    """

    def __init__(self, rounds: int, *, workers: int = 0) -> None:
        self.rounds = rounds
        self.context = CryptContext(schemes=["pbkdf2_sha256"], pbkdf2_sha256__rounds=rounds)
        self.executor = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2, thread_name_prefix="pbkdf2")
        self._dummy: str | None = None

    async def _run(self, func: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, func)

    async def hash(self, password: str) -> str:
        return str(await self._run(functools.partial(self.context.hash, prepare(password))))

    async def dummy_hash(self) -> str:
        if self._dummy is None:
            self._dummy = await self.hash(secrets.token_urlsafe(16))
        return self._dummy

    async def verify(self, password: str, stored: str | None) -> tuple[bool, str | None]:
        """(matches, new hash if the stored one should be replaced). No hash: a dummy is checked."""
        if not stored:
            await self._run(functools.partial(self.context.verify, prepare(password), await self.dummy_hash()))
            return False, None
        return await self._run(functools.partial(self._verify_and_update, prepare(password), stored))

    def _verify_and_update(self, password: str, stored: str) -> tuple[bool, str | None]:
        try:
            ok, new_hash = self.context.verify_and_update(password, stored)
        except ValueError:  # an unusable stored hash matches nothing
            return False, None
        return bool(ok), new_hash

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


@functools.cache
def common_passwords() -> frozenset[str]:
    """Django's list of 20,000 common passwords (lower-cased), shipped as package data."""
    data = resources.files("services.auth.data").joinpath(COMMON_PASSWORDS_RESOURCE).read_bytes()
    text = gzip.decompress(data).decode("utf-8")
    return frozenset(line.strip() for line in text.splitlines() if line.strip())


class PasswordPolicy:
    """Length 12-128, no composition rules, not a common password, not containing the e-mail."""

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
        if email:
            email = email.lower()
            local = email.split("@", 1)[0]
            if email in lowered or (len(local) >= 3 and local in lowered):
                reasons.append("must not contain the e-mail address or its part before the @")
        return reasons
