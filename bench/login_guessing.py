"""make bench-guessing: what a botnet gets out of guessing one account's password for an hour.

The auth service runs on a real PostgreSQL (embedded) with an injected clock, so that one simulated
hour takes seconds. The attacker owns 1,000 addresses and sends one guess every ATTACK_INTERVAL
seconds, each from the next address (the client IP arrives in X-Forwarded-For from the trusted
gateway address, as in production). Meanwhile the owner signs in from a device the account knows
every few minutes. The same schedule is then run against an e-mail that has no account.

Printed: guesses sent, guesses that reached password verification (the only ones that can succeed),
429 answers, the owner's first-try successes, and whether the two e-mails got identical answers.
The test tests/auth/test_distributed_guessing.py runs the same simulation and asserts the figures.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.results import record

IPS = int(os.environ.get("BENCH_GUESSING_IPS", "1000"))
ATTACK_SECONDS = 3600
ATTACK_INTERVAL = float(os.environ.get("BENCH_GUESSING_INTERVAL", "3"))
OWNER_EVERY_SECONDS = 600
GATEWAY_ADDRESS = "203.0.113.7"
WRONG = "not the password, a guess"


def attacker_ip(i: int) -> str:
    """The i-th of the attacker's addresses (198.18.0.0/15, the benchmarking range)."""
    n = i % IPS
    return f"198.18.{n // 256}.{n % 256}"


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Figures:
    sent: int = 0
    throttled: int = 0
    verified: int = 0  # guesses that reached password verification (the only ones that can succeed)
    accepted: int = 0
    owner_tries: int = 0
    owner_first_try: int = 0
    answers: list[tuple[int, str | None, str]] = field(default_factory=list)
    addresses: set[str] = field(default_factory=set)


def shape(response: httpx.Response) -> tuple[int, str | None, str]:
    """What an attacker sees of an answer, minus the request id."""
    body = response.json()
    body.pop("request_id", None)
    return response.status_code, response.headers.get("retry-after"), json.dumps(body, sort_keys=True)


class Verifications:
    """Counts the password verifications of the running auth service (wraps its hasher's ``verify``)."""

    def __init__(self, app: Any) -> None:
        self.count = 0
        hasher = app.state.auth.hasher
        verify: Callable[..., Awaitable[tuple[bool, str | None]]] = hasher.verify

        async def counted(*args: Any, **kwargs: Any) -> tuple[bool, str | None]:
            self.count += 1
            return await verify(*args, **kwargs)

        hasher.verify = counted


async def attack(
    client: httpx.AsyncClient,
    clock: Clock,
    verifications: Verifications,
    email: str,
    *,
    owner: tuple[str, str, str] | None = None,
    seconds: float = ATTACK_SECONDS,
    interval: float = ATTACK_INTERVAL,
) -> Figures:
    """Guess ``email``'s password for ``seconds`` from rotating addresses; ``owner`` = (email, password,
    device token) signs in every ten minutes from its own address."""
    figures = Figures()
    elapsed = 0.0
    next_owner = OWNER_EVERY_SECONDS / 2
    i = 0
    while elapsed < seconds:
        ip = attacker_ip(i)
        figures.addresses.add(ip)
        before = verifications.count
        response = await client.post(
            "/api/v1/auth/login", json={"email": email, "password": WRONG}, headers={"X-Forwarded-For": ip}
        )
        figures.sent += 1
        figures.answers.append(shape(response))
        figures.verified += verifications.count - before
        if response.status_code == 429:
            figures.throttled += 1
        if response.status_code == 200:
            figures.accepted += 1
        if owner is not None and elapsed >= next_owner:
            next_owner += OWNER_EVERY_SECONDS
            owner_email, password, device = owner
            answer = await client.post(
                "/api/v1/auth/login",
                json={"email": owner_email, "password": password, "device_token": device},
                headers={"X-Forwarded-For": "192.0.2.44"},
            )
            figures.owner_tries += 1
            figures.owner_first_try += answer.status_code == 200
        i += 1
        clock.advance(interval)
        elapsed += interval
    return figures


async def run(auth_url: str, data_dir: Path) -> tuple[Figures, Figures, float]:
    from services.auth.config import Settings
    from services.auth.main import create_app

    password = "the owner's long passphrase"  # noqa: S105 - the bench's own test account
    settings = Settings(
        database_url=auth_url,
        environment="test",
        pbkdf2_rounds=1000,  # the attacker's cost is not what is measured here
        keys_dir=data_dir / "keys",
        messages_path=data_dir / "messages.jsonl",
        gateway_networks=f"{GATEWAY_ADDRESS}/32",
        # No service clients: nothing here calls /internal/token, and with none auth's outbox relay stays off
        # (there is no audit service to deliver to, and its retries filled the output with warnings).
        bootstrap_admin_email="",
        bootstrap_admin_password="",
    )
    clock = Clock()
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=(GATEWAY_ADDRESS, 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://auth") as client:
            email = "amina.fotso@example.cm"
            registered = await client.post(
                "/api/v1/auth/register",
                json={"email": email, "password": password, "accept_terms": True, "terms_version": "2026-12-01"},
            )
            assert registered.status_code == 201, registered.text
            first = await client.post("/api/v1/auth/login", json={"email": email, "password": password})
            device = first.json()["device_token"]
            started = time.perf_counter()
            verifications = Verifications(app)
            real = await attack(client, clock, verifications, email, owner=(email, password, device))
            ghost = await attack(client, clock, verifications, "nobody-here@example.cm")
            return real, ghost, time.perf_counter() - started


def main() -> None:
    from comptoir.config import RunSettings
    from comptoir.embedded import EmbeddedPostgres
    from comptoir.provision import migrate

    logging.disable(logging.INFO)
    with tempfile.TemporaryDirectory(prefix="comptoir-bench-guessing-") as tmp:
        data_dir = Path(tmp)
        embedded = EmbeddedPostgres(data_dir)
        admin_url = embedded.start()
        try:
            roles = {r.service: r for r in migrate(RunSettings(data_dir=data_dir, database_url=admin_url), admin_url)}
            real, ghost, wall = asyncio.run(run(roles["auth"].url, data_dir))
        finally:
            embedded.stop()
    sys.exit(report(real, ghost, wall))


def report(real: Figures, ghost: Figures, wall: float) -> int:
    print(f"Distributed guessing: {IPS} addresses, one guess every {ATTACK_INTERVAL:g} s for one hour")
    print(f"{'':36}{'real account':>14}{'unknown e-mail':>16}")
    rows = [
        ("guesses sent", real.sent, ghost.sent),
        ("distinct addresses used", len(real.addresses), len(ghost.addresses)),
        ("reached password verification", real.verified, ghost.verified),
        ("answered 429 (throttled)", real.throttled, ghost.throttled),
        ("guesses accepted", real.accepted, ghost.accepted),
    ]
    for name, a, b in rows:
        print(f"{name:36}{a:>14}{b:>16}")
    print(f"owner on a known device, first try:  {real.owner_first_try}/{real.owner_tries}")
    identical = real.answers == ghost.answers
    print(f"identical answers (status, Retry-After, body) for both e-mails: {identical}")
    print(f"wall time for both simulated hours: {wall:.1f} s")
    ok = real.verified <= 20 and real.owner_first_try == real.owner_tries and identical
    record(f"guesses per account per hour from {IPS} addresses", real.verified, 20, "", higher_is_better=False)
    record("owner's first-try logins during the attack", 100 * real.owner_first_try / real.owner_tries, 100, "%")
    record("answers differing for unknown e-mails", 0 if identical else 1, 0, "", higher_is_better=False)
    return 0 if ok else 1


if __name__ == "__main__":
    main()
