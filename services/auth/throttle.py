"""Login throttling without handing attackers a denial-of-service tool.

Failures are counted per account (``ip`` = '') and per (account, client IP); the account is the SHA-256
of the normalised e-mail, so unknown e-mails behave exactly like real ones.
- From the 5th failure of an (account, IP) pair, that pair waits: 30 s, doubling, at most 15 min,
  answered with 429 + Retry-After, even for the right password. Other addresses are not delayed,
  so an attacker cannot lock the owner out with a few guesses.
- At 100 consecutive failures of the account, from any address, it is locked until a password reset or
  a staff unlock: distributed guessing stops there, and the owner always recovers by reset.

Every attempt is counted *before* the password is checked, in a short transaction of its own that
locks the two counter rows: concurrent guesses cannot slip past the threshold together, and no row
lock is held while PBKDF2 runs. A successful login clears the counters again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from services.auth.context import Runtime
from services.auth.repository import LoginFailureRepository


@dataclass(frozen=True)
class Gate:
    blocked: bool
    # Blocked: how long to wait. Not blocked: the wait this attempt starts if the password is wrong.
    retry_after: float = 0.0
    hard_locked: bool = False
    failures: int = 0


class LoginThrottle:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.settings = rt.settings

    def delay_for(self, failures: int) -> int:
        """Seconds of delay after ``failures`` consecutive failures of one (account, IP) pair."""
        s = self.settings
        if failures < s.login_delay_after_failures:
            return 0
        exponent = min(failures - s.login_delay_after_failures, 32)
        return int(min(s.login_delay_base_seconds * 2**exponent, s.login_delay_max_seconds))

    async def enter(self, account_key: str, ip: str) -> Gate:
        """Refuse the attempt (blocked) or count it as a failure until it proves otherwise."""
        s = self.settings
        now = self.rt.now()
        async with self.rt.sessionmaker() as session, session.begin():
            account, pair = await LoginFailureRepository(session).lock_pair(account_key, ip)
            if account.failures >= s.login_hard_lock_failures:
                return Gate(blocked=True, retry_after=s.login_delay_max_seconds, hard_locked=True)
            if pair.locked_until is not None and pair.locked_until > now:
                return Gate(blocked=True, retry_after=(pair.locked_until - now).total_seconds())
            account.failures += 1
            pair.failures += 1
            account.last_failure_at = pair.last_failure_at = now
            delay = self.delay_for(pair.failures)
            pair.locked_until = now + timedelta(seconds=delay) if delay else None
            hard = account.failures >= s.login_hard_lock_failures
            return Gate(
                blocked=False,
                retry_after=s.login_delay_max_seconds if hard else delay,
                hard_locked=hard,
                failures=account.failures,
            )
