"""Login throttling that a botnet can neither get past nor turn against the owner.

Failures are counted in ``auth.login_failures`` rows keyed (account_key, ip); the account key is the
SHA-256 of the normalised e-mail, so unknown e-mails behave exactly like real ones:

- ``(account, ip)``: the pair. From its 5th failure it waits 30 s, doubling, at most 15 min.
- ``(account, '')``: the account across every address, for devices it does not know. From the 10th
  failure within the window it waits the same way: an attacker with any number of addresses gets
  about 17 guesses in the first hour and 4 an hour after that (``bench/login_guessing.py``).
- ``('*', ip)``: the address across every account (credential stuffing). From the 30th failure within
  the window, that address waits, for unknown devices only: users behind a shared address (carrier
  NAT) who signed in before are not held back.
- ``(sha256("mfa:" user id), '#mfa')``: wrong second-factor codes of one user, same delays.
- ``(device, '#device')``: a device the account knows (see devices.py) is throttled on its own
  counter only, so the owner signs in at the first try while strangers are held back.

Every delay is bounded: nothing a stranger does locks an account for good (an admin still can, by
deactivating it). Counters of the window kinds forget failures older than the window.

Every attempt is counted *before* the password is checked, in a short transaction of its own that
locks the counter rows (always in the same order): concurrent guesses cannot slip past a threshold
together, and no row lock is held while the password hash is computed. A successful login clears the
pair and the account counters (or the device's).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from services.auth.context import Runtime, sha256_hex
from services.auth.repository import Counter, LoginFailureRepository

ACCOUNT = ""
ANY_ACCOUNT = "*"
DEVICE = "#device"
MFA = "#mfa"


@dataclass(frozen=True)
class Gate:
    blocked: bool
    # Blocked: how long to wait. Not blocked: the wait this attempt starts if the password is wrong.
    retry_after: float = 0.0
    failures: int = 0
    # Which counter blocks or starts the wait: "pair", "account", "ip" or "device".
    scope: str = ""


def keys_for(account_key: str, ip: str, device: str | None) -> list[tuple[str, str]]:
    """The counters one attempt is checked against and counted in."""
    if device is not None:
        return [(device, DEVICE)]
    return [(account_key, ACCOUNT), (account_key, ip), (ANY_ACCOUNT, ip)]


def cleared_on_success(account_key: str, ip: str, device: str | None) -> list[tuple[str, str]]:
    if device is not None:
        return [(device, DEVICE)]
    return [(account_key, ACCOUNT), (account_key, ip)]


async def succeeded(session: AsyncSession, rt: Runtime, account_key: str, ip: str, device: str | None) -> None:
    """After a right password: the account's counters are cleared; the address's is not (a stuffer
    would sign in to an account of its own to clear it), but this attempt is taken back from it."""
    repository = LoginFailureRepository(session)
    await repository.clear_keys(cleared_on_success(account_key, ip, device))
    if device is None:
        await repository.uncount((ANY_ACCOUNT, ip), rt.settings.login_ip_delay_after_failures)


async def not_checked(rt: Runtime, account_key: str, ip: str, device: str | None) -> None:
    """An attempt counted but never checked (its hash was dropped when its turn came too late): taken
    back from every counter it was counted in, in a short transaction of its own, so a refusal for want
    of capacity changes nothing."""
    throttle = LoginThrottle(rt)
    async with rt.sessionmaker() as session, session.begin():
        repository = LoginFailureRepository(session)
        for key in keys_for(account_key, ip, device):
            await repository.uncount(key, throttle.threshold(scope_of(key)))


def mfa_key(user_id: str) -> tuple[str, str]:
    """The counter of wrong second-factor codes of one user (any challenge, enrolment or disabling)."""
    return sha256_hex(f"mfa:{user_id}"), MFA


def scope_of(key: tuple[str, str]) -> str:
    if key[1] == MFA:
        return "mfa"
    if key[1] == DEVICE:
        return "device"
    if key[1] == ACCOUNT:
        return "account"
    return "ip" if key[0] == ANY_ACCOUNT else "pair"


class LoginThrottle:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.settings = rt.settings

    def threshold(self, scope: str) -> int:
        s = self.settings
        return {
            "account": s.login_account_delay_after_failures,
            "ip": s.login_ip_delay_after_failures,
        }.get(scope, s.login_delay_after_failures)

    def delay_for(self, failures: int, scope: str = "pair") -> int:
        """Seconds of delay after ``failures`` failures counted by one counter of ``scope``."""
        s = self.settings
        after = self.threshold(scope)
        if failures < after:
            return 0
        exponent = min(failures - after, 32)
        return int(min(s.login_delay_base_seconds * 2**exponent, s.login_delay_max_seconds))

    def _forget_old(self, row: Counter, scope: str, now: datetime) -> None:
        window = timedelta(seconds=self.settings.login_failure_window_seconds)
        if scope != "pair" and row.last_failure_at is not None and row.last_failure_at + window <= now:
            if row.locked_until is None or row.locked_until <= now:
                row.failures = 0

    async def enter(self, account_key: str, ip: str, device: str | None = None) -> Gate:
        """Refuse the attempt (blocked) or count it as a failure until it proves otherwise.

        ``device`` is the id hash of a device the account knows, or None.
        """
        async with self.rt.sessionmaker() as session, session.begin():
            return await self.enter_in(session, account_key, ip, device)

    async def enter_in(self, session: AsyncSession, account_key: str, ip: str, device: str | None) -> Gate:
        """``enter`` within the caller's short transaction (which commits the counts)."""
        return await self.enter_keys(session, keys_for(account_key, ip, device))

    async def enter_mfa(self, user_id: str) -> Gate:
        async with self.rt.sessionmaker() as session, session.begin():
            return await self.enter_keys(session, [mfa_key(user_id)])

    async def enter_keys(self, session: AsyncSession, keys: list[tuple[str, str]]) -> Gate:
        now = self.rt.now()
        repository = LoginFailureRepository(session)
        rows = await repository.lock(keys)
        waits = {
            key: (row.locked_until - now).total_seconds()
            for key, row in rows.items()
            if row.locked_until is not None and row.locked_until > now
        }
        if waits:
            key = max(waits, key=lambda k: waits[k])
            return Gate(blocked=True, retry_after=waits[key], scope=scope_of(key))
        delays: dict[tuple[str, str], int] = {}
        for key, row in rows.items():
            scope = scope_of(key)
            self._forget_old(row, scope, now)
            row.failures += 1
            row.last_failure_at = now
            delay = self.delay_for(row.failures, scope)
            row.locked_until = now + timedelta(seconds=delay) if delay else None
            delays[key] = delay
        await repository.save(rows)
        worst = max(delays, key=lambda k: delays[k])
        counted = rows[keys[0]].failures
        return Gate(blocked=False, retry_after=delays[worst], failures=counted, scope=scope_of(worst))
