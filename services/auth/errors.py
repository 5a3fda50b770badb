"""The auth service's errors: each a ``common.errors.ServiceError`` with a stable problem type."""

from __future__ import annotations

import math
from typing import Any

from common.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    ServiceUnavailable,
    TooManyRequests,
    Unauthorized,
    Unprocessable,
)


class InvalidCredentials(Unauthorized):
    """The one answer for an unknown e-mail, a wrong password and a disabled account."""

    slug = "invalid-credentials"
    title = "Invalid credentials"

    def __init__(self) -> None:
        super().__init__("The e-mail or password is incorrect.")


def retry_later(seconds: float) -> dict[str, Any]:
    """The ``Retry-After`` header and its ``retry_after`` twin in the body, in whole seconds (at least 1)."""
    whole = max(1, math.ceil(seconds))
    return {"headers": {"Retry-After": str(whole)}, "extra": {"retry_after": whole}}


class LoginThrottled(TooManyRequests):
    slug = "login-throttled"
    title = "Too many failed logins"

    def __init__(self, retry_after: float) -> None:
        super().__init__(
            "Too many failed attempts: try again later, or reset the password.", **retry_later(retry_after)
        )


class HashingBusy(ServiceUnavailable):
    """More password checks are queued than can finish in time: refused at once, not left to time out."""

    slug = "hashing-busy"
    title = "Too many logins at once"

    def __init__(self, retry_after: float) -> None:
        super().__init__(
            "The service is checking too many passwords at once: try again shortly.", **retry_later(retry_after)
        )


class InvalidRefreshToken(Unauthorized):
    slug = "invalid-refresh-token"
    title = "Invalid refresh token"

    def __init__(self, detail: str = "The refresh token is invalid, expired or already used.") -> None:
        super().__init__(detail)


class EmailTaken(Conflict):
    slug = "email-taken"
    title = "E-mail already registered"


class WeakPassword(Unprocessable):
    slug = "weak-password"
    title = "Password refused"

    def __init__(self, field: str, reasons: list[str]) -> None:
        errors: list[dict[str, Any]] = [{"loc": ["body", field], "msg": f"The password {r}."} for r in reasons]
        super().__init__("The password does not meet the password policy.", extra={"errors": errors})


class InvalidField(Unprocessable):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(
            "One or more fields are invalid.", extra={"errors": [{"loc": ["body", field], "msg": message}]}
        )


class WrongPassword(BadRequest):
    slug = "wrong-password"
    title = "Wrong password"

    def __init__(self) -> None:
        super().__init__("The password is incorrect.")


class UserNotFound(NotFound):
    slug = "user-not-found"
    title = "User not found"


class SessionNotFound(NotFound):
    slug = "session-not-found"
    title = "Session not found"


class InvalidResetToken(BadRequest):
    slug = "invalid-reset-token"
    title = "Invalid password reset token"

    def __init__(self) -> None:
        super().__init__("The reset link is invalid, expired or already used.")


class InvalidCode(BadRequest):
    slug = "invalid-code"
    title = "Invalid code"

    def __init__(self) -> None:
        super().__init__("The code is incorrect, expired or already used; request a new one if needed.")


class NoPhone(Unprocessable):
    slug = "no-phone"
    title = "No phone number"

    def __init__(self) -> None:
        super().__init__(
            "Add a phone number first.", extra={"errors": [{"loc": ["body", "phone"], "msg": "No phone number."}]}
        )


class PhoneAlreadyVerified(Conflict):
    slug = "phone-already-verified"
    title = "Phone already verified"


class OtpThrottled(TooManyRequests):
    slug = "otp-throttled"
    title = "Too many codes requested"

    def __init__(self, retry_after: float) -> None:
        super().__init__("Too many codes were requested: try again later.", **retry_later(retry_after))


class OwnAccountChange(Forbidden):
    slug = "own-account-change"
    title = "Own account"

    def __init__(self) -> None:
        super().__init__("Nobody changes their own role or deactivates their own account.")


class UnlockNotAllowed(Forbidden):
    slug = "unlock-not-allowed"
    title = "Unlock not allowed"

    def __init__(self) -> None:
        super().__init__("Only an admin clears the failed sign-ins of a staff or admin account.")


class InvalidClient(Unauthorized):
    slug = "invalid-client"
    title = "Invalid client credentials"

    def __init__(self) -> None:
        super().__init__("The client credentials are invalid.")


class AudienceNotAllowed(Forbidden):
    slug = "audience-not-allowed"
    title = "Audience not allowed"

    def __init__(self) -> None:
        super().__init__("This client may not obtain tokens for that audience.")


class PeerUnavailable(ServiceUnavailable):
    slug = "peer-unavailable"
    title = "A service is unavailable"


class MfaRequired(Unauthorized):
    """Not an error of the caller: the password was right, the second factor is asked for."""

    slug = "mfa-required"
    title = "Second factor required"

    def __init__(self, extra: dict[str, Any]) -> None:
        super().__init__(
            "Send a code from the authenticator app (or a recovery code) to POST /api/v1/auth/login/mfa.",
            extra=extra,
        )


class InvalidMfaChallenge(Unauthorized):
    slug = "invalid-mfa-challenge"
    title = "Invalid MFA challenge"

    def __init__(self) -> None:
        super().__init__("The MFA token is invalid, expired, used or out of attempts: sign in again.")


class InvalidMfaCode(Unauthorized):
    slug = "invalid-mfa-code"
    title = "Invalid code"

    def __init__(self) -> None:
        super().__init__("The code is incorrect or was already used.")


class WrongMfaCode(BadRequest):
    slug = "wrong-mfa-code"
    title = "Wrong code"

    def __init__(self) -> None:
        super().__init__("The code is incorrect or was already used.")


class MfaStateConflict(Conflict):
    slug = "mfa-state"
    title = "Second factor state"
