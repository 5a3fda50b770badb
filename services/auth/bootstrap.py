"""The first administrator (``comptoir create-admin`` and BOOTSTRAP_ADMIN_* at start-up) and key rotation."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from common.db import async_url
from services.auth.config import Settings
from services.auth.context import RequestContext
from services.auth.keys import CLOCK_SKEW_SECONDS, SigningKey, rotate
from services.auth.models import User
from services.auth.passwords import PasswordHasher, PasswordPolicy
from services.auth.repository import LoginFailureRepository, UserRepository
from services.auth.schemas import normalise_email
from services.auth.service import account_key

log = structlog.get_logger("comptoir.auth.bootstrap")

BOOTSTRAP_LOCK = 0x636F6D70_61646D6E  # "compadmn": one bootstrap at a time across workers


class AdminRefused(Exception):
    """The admin cannot be created as asked; the message says why (never containing the password)."""


def check_admin_input(email: str, password: str, policy: PasswordPolicy) -> str:
    """The normalised e-mail, or AdminRefused with every reason."""
    try:
        normalised = normalise_email(email)
    except ValueError as exc:
        raise AdminRefused(f"invalid e-mail address: {exc}") from exc
    reasons = policy.problems(password, email=normalised)
    if reasons:
        raise AdminRefused("password refused: the password " + "; the password ".join(reasons))
    return normalised


async def create_admin(
    session: AsyncSession,
    *,
    email: str,
    password: str,
    hasher: PasswordHasher,
    policy: PasswordPolicy,
    now: datetime,
    ctx: RequestContext,
    only_if_none: bool = False,
) -> User | None:
    """Create an active admin in ``session``'s transaction.

    ``only_if_none``: do nothing when an admin exists already (start-up bootstrap). An e-mail that is
    already registered is refused: promoting an account is an admin's decision, made through the API.
    """
    await session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": BOOTSTRAP_LOCK})
    users = UserRepository(session)
    if only_if_none and await users.any_admin():
        # Before the policy: a bootstrap password left set, refused by a policy newer than the admin it
        # made, must not stop an upgraded auth from starting.
        return None
    normalised = check_admin_input(email, password, policy)
    if await users.by_email(normalised) is not None:
        raise AdminRefused(f"an account with the e-mail {normalised} exists already")
    user = User(
        id=uuid.uuid4(),
        email=normalised,
        password_hash=await hasher.hash(password),
        full_name=None,
        phone=None,
        phone_verified=False,
        role="admin",
        is_active=True,
        created_at=now,
        updated_at=now,
        password_changed_at=now,
    )
    await users.add(user)
    await LoginFailureRepository(session).clear(account_key(normalised))
    await ctx.audit(
        session,
        "auth.user.admin_created",
        resource_type="user",
        resource_id=str(user.id),
        new_values={"role": "admin", "bootstrap": only_if_none},
    )
    return user


async def create_admin_in_database(database_url: str, email: str, password: str, settings: Settings) -> User:
    """``comptoir create-admin``: connect as the auth role and create the admin."""
    policy = PasswordPolicy(min_length=settings.password_min_length, max_length=settings.password_max_length)
    check_admin_input(email, password, policy)  # before any connection: a weak password fails fast
    engine = create_async_engine(async_url(database_url), connect_args={"server_settings": {"search_path": "auth"}})
    hasher = PasswordHasher(settings.pbkdf2_rounds, workers=1)
    try:
        async with async_sessionmaker(engine, expire_on_commit=False)() as session, session.begin():
            user = await create_admin(
                session,
                email=email,
                password=password,
                hasher=hasher,
                policy=policy,
                now=datetime.now(UTC),
                ctx=RequestContext(actor_role="system", user_agent="comptoir create-admin"),
            )
            if user is None:  # only_if_none is off: create_admin creates or raises
                raise RuntimeError("create_admin created no admin")
            return user
    finally:
        hasher.close()
        await engine.dispose()


def rotate_keys(settings: Settings) -> SigningKey:
    """``comptoir keys rotate``: a new signing key in the keys directory (not with AUTH_SIGNING_KEYS)."""
    if settings.signing_keys.strip():
        raise AdminRefused("the signing keys come from AUTH_SIGNING_KEYS: rotate them there")
    return rotate(
        settings.resolved_keys_dir,
        activation_delay=settings.key_activation_delay_seconds,
        retire_after=settings.access_token_ttl_seconds + CLOCK_SKEW_SECONDS,
        now=time.time(),
    )
