"""Second-factor endpoints under /api/v1/auth (see mfa.py for the rules)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status

from common.db import SessionDep
from common.security import CurrentUser
from services.auth import browser
from services.auth.context import RuntimeDep, request_context
from services.auth.devices import DeviceTokens
from services.auth.mfa import (
    CodeBody,
    Mfa,
    MfaConfirm,
    MfaDisable,
    MfaLogin,
    MfaLoginResponse,
    MfaStatus,
    RecoveryCodes,
    TotpEnrolment,
)
from services.auth.service import AccountService

router = APIRouter(prefix="/api/v1/auth", tags=["auth"])

# A wrong code in a well-formed request is a 400 (the API reference), like a wrong phone code.
WRONG_FACTOR = "A wrong password or authenticator code (`wrong-password`, `wrong-mfa-code`), or a body that is not JSON"
WRONG_MFA_CODE = (
    "The code from the authenticator app, or the recovery code, is wrong (`wrong-mfa-code`), or the body is not JSON"
)


@router.post(
    "/login/mfa",
    response_model=MfaLoginResponse,
    responses={
        401: {"description": "Unknown, expired or spent `mfa_token` (`invalid-mfa-challenge`) or wrong code"},
        429: {"description": "Too many wrong codes: see Retry-After"},
    },
)
async def login_mfa(
    body: MfaLogin, session: SessionDep, rt: RuntimeDep, request: Request, response: Response
) -> MfaLoginResponse:
    """Complete a login answered with `mfa-required`: its `mfa_token` and a code (or a recovery code)."""
    ctx = request_context(request)
    user, _method, codes = await Mfa(session, rt, ctx).answer(body.mfa_token, body.code)
    devices = DeviceTokens(session, rt)
    known = await devices.recognise(browser.device_token_of(request, body.device_token), user.id)
    device_token = await devices.remember(user.id, known, ctx)
    pair = await AccountService(session, rt, ctx).start_session(
        user.id, user.role, known_device=known is not None, mfa=True
    )
    answer = MfaLoginResponse(**pair.model_dump(), device_token=device_token, recovery_codes=codes)
    finished = browser.finish_login(response, answer, rt.settings, body.session_mode)
    if not isinstance(finished, MfaLoginResponse):  # finish_login returns the answer it was given
        raise TypeError("finish_login changed the answer's type")
    return finished


@router.get("/mfa", response_model=MfaStatus)
async def mfa_status(claims: CurrentUser, session: SessionDep, rt: RuntimeDep, request: Request) -> MfaStatus:
    """Whether the caller has an authenticator, recovery codes left, and whether the role requires one."""
    ctx = request_context(request)
    user = await AccountService(session, rt, ctx).current_user(claims)
    return await Mfa(session, rt, ctx).status(user)


@router.post("/mfa/totp/enrol", response_model=TotpEnrolment)
async def mfa_enrol(claims: CurrentUser, session: SessionDep, rt: RuntimeDep, request: Request) -> TotpEnrolment:
    """Start setting up an authenticator app: a secret and its otpauth:// URI (409 if one is live)."""
    ctx = request_context(request)
    user = await AccountService(session, rt, ctx).current_user(claims, lock=True)
    return await Mfa(session, rt, ctx).enrol(user)


@router.post(
    "/mfa/totp/confirm",
    response_model=RecoveryCodes,
    responses={400: {"description": WRONG_FACTOR}},
)
async def mfa_confirm(
    body: MfaConfirm, claims: CurrentUser, session: SessionDep, rt: RuntimeDep, request: Request
) -> RecoveryCodes:
    """Turn the authenticator on with the password and a code from it; returns the recovery codes (shown
    once)."""
    ctx = request_context(request)
    accounts = AccountService(session, rt, ctx)
    user = await accounts.current_user(claims, lock=True)
    await accounts.verify_with_throttle(user, body.password, "mfa_confirm")
    return await Mfa(session, rt, ctx).confirm(user, body.code)


@router.post("/mfa/recovery-codes", response_model=RecoveryCodes, responses={400: {"description": WRONG_MFA_CODE}})
async def mfa_recovery_codes(
    body: CodeBody, claims: CurrentUser, session: SessionDep, rt: RuntimeDep, request: Request
) -> RecoveryCodes:
    """New recovery codes (the old ones stop working), with a code from the app."""
    ctx = request_context(request)
    user = await AccountService(session, rt, ctx).current_user(claims, lock=True)
    return await Mfa(session, rt, ctx).new_recovery_codes(user, body.code)


@router.post(
    "/mfa/totp/disable",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={400: {"description": WRONG_FACTOR}},
)
async def mfa_disable(
    body: MfaDisable, claims: CurrentUser, session: SessionDep, rt: RuntimeDep, request: Request
) -> None:
    """Turn the second factor off: the password and a code (409 while the role requires one)."""
    ctx = request_context(request)
    accounts = AccountService(session, rt, ctx)
    user = await accounts.current_user(claims, lock=True)
    await accounts.verify_with_throttle(user, body.password, "mfa_disable")
    await Mfa(session, rt, ctx).disable(user, body.code)
