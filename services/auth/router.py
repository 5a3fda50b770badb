"""Public endpoints under /api/v1/auth (and the JWKS at the well-known path)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

import structlog
from fastapi import APIRouter, BackgroundTasks, Query, Request, Response, status

from common.audit import record_denial
from common.db import NO_NUL, SessionDep
from common.errors import Forbidden
from common.pagination import DEFAULT_LIMIT, CursorParam, LimitParam, Page
from common.security import CurrentUser, RequireAdmin, RequireStaff
from services.auth import browser
from services.auth.context import RequestContext, Runtime, RuntimeDep, request_context
from services.auth.errors import InvalidRefreshToken
from services.auth.gdpr import GdprService
from services.auth.messages import Message, MessageSender
from services.auth.mfa import MfaChallengeProblem
from services.auth.otp import OtpService
from services.auth.schemas import (
    JWKS,
    Accepted,
    AccountDeletion,
    AdminUserUpdate,
    Export,
    LoginRequest,
    LoginResponse,
    LogoutRequest,
    OtpRequest,
    OtpVerify,
    PasswordChange,
    RefreshRequest,
    RefreshResponse,
    RegisterRequest,
    ResetConfirm,
    ResetRequest,
    SessionRead,
    UserRead,
    UserUpdate,
)
from services.auth.service import AccountService

log = structlog.get_logger("comptoir.auth")

router = APIRouter(prefix="/api/v1/auth", tags=["auth"])

# A wrong secret in a well-formed request is a 400 (the API reference), not a 401: the caller's token is good.
WRONG_PASSWORD = "The current password is wrong (`wrong-password`), or the body is not JSON"  # noqa: S105 - a text
well_known = APIRouter(tags=["auth"])

NO_CONTENT = status.HTTP_204_NO_CONTENT
RESET_ACCEPTED = "If an account exists for this e-mail, a reset link has been sent to it."


def accounts(session: SessionDep, rt: Runtime, request: Request) -> AccountService:
    return AccountService(session, rt, request_context(request))


async def deliver(sender: MessageSender, message: Message) -> None:
    """Runs after the response: a failed delivery is logged (without the message body), never raised."""
    try:
        await sender.send(message)
    except Exception as exc:  # the answer has been sent; the client retries by asking again
        log.error("auth.message.failed", channel=message.channel, error=type(exc).__name__)


async def process_reset_request(rt: Runtime, email: str, ctx: RequestContext) -> None:
    """After the 202: the same answer and timing whether or not the e-mail exists."""
    try:
        async with rt.sessionmaker() as session, session.begin():
            message = await AccountService(session, rt, ctx).request_reset(email)
    except Exception as exc:
        log.error("auth.password.reset_request_failed", error=type(exc).__name__)
        return
    if message is not None:
        await deliver(rt.sender, message)


# ---- anyone ----


@router.post("/register", status_code=status.HTTP_201_CREATED, response_model=UserRead)
async def register(body: RegisterRequest, session: SessionDep, rt: RuntimeDep, request: Request) -> UserRead:
    """Create a customer account."""
    return await accounts(session, rt, request).register(body)


@router.post(
    "/login",
    response_model=LoginResponse,
    responses={
        401: {
            "model": MfaChallengeProblem,
            "description": "Any bad credential (`invalid-credentials`), or the password was right and a second "
            "factor is asked for (`mfa-required`, with `mfa_token`: see POST /login/mfa)",
        },
        429: {"description": "Delayed: see Retry-After"},
    },
)
async def login(
    body: LoginRequest, session: SessionDep, rt: RuntimeDep, request: Request, response: Response
) -> LoginResponse:
    """Exchange e-mail and password for a token pair and a device token (cookies in `cookie` mode)."""
    device = browser.device_token_of(request, body.device_token)
    answer = await accounts(session, rt, request).login(body.email, body.password, device)
    return browser.finish_login(response, answer, rt.settings, body.session_mode)


@router.post(
    "/token/refresh",
    response_model=RefreshResponse,
    responses={
        403: {"description": "Cookie mode: bad Origin or CSRF token"},
    },
)
async def refresh(
    session: SessionDep, rt: RuntimeDep, request: Request, response: Response, body: RefreshRequest | None = None
) -> RefreshResponse:
    """Spend a refresh token for a new pair (a spent one presented again ends the session).

    Without `refresh_token`: cookie mode (allowed Origin, X-CSRF-Token = CSRF cookie), the refresh cookie
    rotated (the CSRF token is the session's: every tab of the app keeps a valid one)."""
    if body is not None and body.refresh_token is not None:
        pair = await accounts(session, rt, request).refresh(body.refresh_token)
        return RefreshResponse(**pair.model_dump())
    if browser.REFRESH_COOKIE not in request.cookies:
        # Neither mode (an app that sent no token, or a browser whose cookie has expired): nothing to check
        # the origin of, and nothing to refresh.
        raise InvalidRefreshToken("No refresh token was sent (nor a session cookie): sign in again.")
    token = browser.check_cookie_request(request, rt.settings)
    pair = await accounts(session, rt, request).refresh(token)
    csrf = browser.set_session(response, pair, rt.settings, csrf=request.cookies.get(browser.CSRF_COOKIE))
    return RefreshResponse(**(pair.model_dump() | {"refresh_token": None, "csrf_token": csrf}))


@router.post("/password-reset/request", status_code=status.HTTP_202_ACCEPTED, response_model=Accepted)
async def password_reset_request(
    body: ResetRequest, rt: RuntimeDep, request: Request, background: BackgroundTasks
) -> Accepted:
    """E-mail a reset link; the answer is the same whether or not the account exists."""
    background.add_task(process_reset_request, rt, body.email, request_context(request))
    return Accepted(detail=RESET_ACCEPTED)


@router.post(
    "/password-reset/confirm",
    status_code=NO_CONTENT,
    responses={
        400: {
            "description": "The reset token is unknown, used or expired (`invalid-reset-token`), "
            "or the body is not JSON"
        }
    },
)
async def password_reset_confirm(body: ResetConfirm, session: SessionDep, rt: RuntimeDep, request: Request) -> None:
    """Set a new password with a reset token; every session ends."""
    await accounts(session, rt, request).confirm_reset(body.token, body.new_password)


@router.get("/.well-known/jwks.json", response_model=JWKS)
async def jwks_public(rt: RuntimeDep) -> dict[str, Any]:
    """The public keys that verify access tokens (as the gateway exposes them)."""
    return rt.keys.jwks()


@well_known.get("/.well-known/jwks.json", response_model=JWKS)
async def jwks(rt: RuntimeDep) -> dict[str, Any]:
    """The public keys that verify access and service tokens."""
    return rt.keys.jwks()


# ---- signed-in users ----


@router.post("/logout", status_code=NO_CONTENT)
async def logout(
    claims: CurrentUser,
    session: SessionDep,
    rt: RuntimeDep,
    request: Request,
    response: Response,
    body: LogoutRequest | None = None,
) -> None:
    """End this session (and the one of the refresh token given, if it is the caller's); clears cookies."""
    await accounts(session, rt, request).logout(claims, body.refresh_token if body else None)
    browser.clear_session(response)


@router.post("/logout-all", status_code=NO_CONTENT)
async def logout_all(
    claims: CurrentUser, session: SessionDep, rt: RuntimeDep, request: Request, response: Response
) -> None:
    """End every session of the caller; clears this browser's cookies (their session is over too)."""
    await accounts(session, rt, request).logout_all(claims)
    browser.clear_session(response)


@router.get("/sessions", response_model=Page[SessionRead])
async def list_sessions(
    claims: CurrentUser, session: SessionDep, rt: RuntimeDep, request: Request
) -> Page[SessionRead]:
    """The caller's active sessions, newest first, all in one page (at most `AUTH_MAX_SESSIONS_PER_USER`, 5 by
    default; `next_cursor` is always null)."""
    return await accounts(session, rt, request).list_sessions(claims)


@router.delete("/sessions/{session_id}", status_code=NO_CONTENT)
async def delete_session(
    session_id: uuid.UUID, claims: CurrentUser, session: SessionDep, rt: RuntimeDep, request: Request
) -> None:
    """End one of the caller's sessions."""
    await accounts(session, rt, request).delete_session(claims, session_id)


@router.get("/me", response_model=UserRead)
async def me(claims: CurrentUser, session: SessionDep, rt: RuntimeDep, request: Request) -> UserRead:
    """The caller's account."""
    return await accounts(session, rt, request).me(claims)


@router.patch("/me", response_model=UserRead)
async def update_me(
    body: UserUpdate, claims: CurrentUser, session: SessionDep, rt: RuntimeDep, request: Request
) -> UserRead:
    """Change the caller's name or phone (a new phone must be verified again); nothing else."""
    return await accounts(session, rt, request).update_me(claims, body)


@router.post("/me/password", status_code=NO_CONTENT, responses={400: {"description": WRONG_PASSWORD}})
async def change_password(
    body: PasswordChange, claims: CurrentUser, session: SessionDep, rt: RuntimeDep, request: Request
) -> None:
    """Change the password; the caller's other sessions end."""
    await accounts(session, rt, request).change_password(claims, body.current_password, body.new_password)


@router.post("/otp/request", status_code=status.HTTP_202_ACCEPTED, response_model=Accepted)
async def otp_request(
    claims: CurrentUser,
    session: SessionDep,
    rt: RuntimeDep,
    request: Request,
    background: BackgroundTasks,
    body: OtpRequest | None = None,
) -> Accepted:
    """Text a 6-digit code to the caller's phone (``phone`` replaces the number on the account)."""
    message = await OtpService(session, rt, request_context(request)).request(claims, body.phone if body else None)
    background.add_task(deliver, rt.sender, message)
    return Accepted(detail="A code has been sent to the phone number.")


@router.post(
    "/otp/verify",
    response_model=UserRead,
    responses={400: {"description": "A wrong or expired code (`invalid-code`), or a body that is not JSON"}},
)
async def otp_verify(
    body: OtpVerify, claims: CurrentUser, session: SessionDep, rt: RuntimeDep, request: Request
) -> UserRead:
    """Prove the phone with the code it received."""
    return await OtpService(session, rt, request_context(request)).verify(claims, body.code)


@router.get("/me/export", response_model=Export)
async def export(claims: CurrentUser, session: SessionDep, rt: RuntimeDep, request: Request) -> Export:
    """Everything Comptoir holds about the caller, from every service (GDPR access)."""
    return await GdprService(session, rt, request_context(request)).export(claims)


@router.delete("/me", status_code=NO_CONTENT, responses={400: {"description": WRONG_PASSWORD}})
async def erase(
    body: AccountDeletion, claims: CurrentUser, session: SessionDep, rt: RuntimeDep, request: Request
) -> None:
    """Erase the caller's personal data everywhere (GDPR erasure); orders stay, anonymised."""
    await GdprService(session, rt, request_context(request)).erase(claims, body.password)


# ---- staff and admin ----


@router.get("/admin/users", response_model=Page[UserRead])
async def list_users(
    claims: RequireStaff,
    session: SessionDep,
    rt: RuntimeDep,
    request: Request,
    q: Annotated[str | None, Query(max_length=100, pattern=NO_NUL, description="Part of the e-mail.")] = None,
    role: Annotated[Literal["customer", "staff", "admin"] | None, Query()] = None,
    limit: LimitParam = DEFAULT_LIMIT,
    cursor: CursorParam = None,
) -> Page[UserRead]:
    """Accounts, newest first: customers for staff (the accounts they may unlock), every account for an admin."""
    if not claims.has_role("admin"):
        if role not in (None, "customer"):
            await record_denial(request, claims, "access.denied", {"required_role": "admin", "role": claims.role})
            raise Forbidden("Staff list customers; only an admin lists staff and admin accounts.")
        role = "customer"  # data minimisation: staff need no colleague's or admin's e-mail and phone
    return await accounts(session, rt, request).list_users(limit=limit, cursor=cursor, query=q, role=role)


@router.patch("/admin/users/{user_id}", response_model=UserRead)
async def admin_update(
    user_id: uuid.UUID,
    body: AdminUserUpdate,
    claims: RequireAdmin,
    session: SessionDep,
    rt: RuntimeDep,
    request: Request,
) -> UserRead:
    """Change a role or (de)activate an account (admin; never one's own)."""
    return await accounts(session, rt, request).admin_update(claims, user_id, body)


@router.post("/admin/users/{user_id}/unlock", status_code=NO_CONTENT)
async def unlock(
    user_id: uuid.UUID, claims: RequireStaff, session: SessionDep, rt: RuntimeDep, request: Request
) -> None:
    """Clear an account's failed-login counters (staff for a customer's, an admin for anyone's)."""
    await accounts(session, rt, request).unlock(claims, user_id)
