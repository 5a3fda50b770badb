"""Request and response bodies. Requests forbid unknown fields (no mass assignment)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

import phonenumbers
from email_validator import EmailNotValidError, validate_email
from pydantic import BaseModel, ConfigDict, Field, field_validator

from common.db import NO_NUL

DEFAULT_REGION = "CM"
# Password fields are bounded generously here; the policy gives the real limits with its reasons.
PasswordField = Field(min_length=1, max_length=1024)
# A new password: the policy (12-128 characters by default) answers 422 with every reason; the schema says
# the lengths so that a client can check them first.
NewPasswordField = Field(
    min_length=1, max_length=1024, json_schema_extra={"minLength": 12, "maxLength": 128, "format": "password"}
)


def normalise_email(value: str) -> str:
    """The stored form: validated syntax, normalised, lower-cased (so uniqueness ignores case)."""
    result = validate_email(value.strip(), check_deliverability=False)
    return result.normalized.lower()


def lookup_email(value: str) -> str:
    """Best-effort normal form for a lookup: invalid input is still counted by the login throttle."""
    try:
        return normalise_email(value)
    except EmailNotValidError:
        return value.strip().lower()


# Numbers a text message reaches (a Cameroonian landline, a toll-free or premium number cannot get a code).
SMS_CAPABLE = frozenset({phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE_OR_MOBILE})


def normalise_phone(value: str) -> str:
    """E.164, parsed with Cameroon as the default region, a number that takes text messages (any country's
    mobile); anything else is a ValueError."""
    try:
        number = phonenumbers.parse(value, DEFAULT_REGION)
    except phonenumbers.NumberParseException as exc:
        raise ValueError("not a phone number") from exc
    if not phonenumbers.is_valid_number(number):
        raise ValueError("not a valid phone number")
    if phonenumbers.number_type(number) not in SMS_CAPABLE:
        raise ValueError("not a mobile number: verification codes are sent by SMS")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


Role = Literal["customer", "staff", "admin"]


def _no_nul_in_schema(schema: dict[str, Any]) -> None:
    """Say in the schema what ``Input._no_nul`` enforces, so a client generated from it agrees."""
    for prop in schema.get("properties", {}).values():
        for variant in [prop, *prop.get("anyOf", ())]:
            if variant.get("type") == "string" and "pattern" not in variant and "enum" not in variant:
                variant["pattern"] = NO_NUL


class Input(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False, json_schema_extra=_no_nul_in_schema)

    @field_validator("*")
    @classmethod
    def _no_nul(cls, value: object) -> object:
        # PostgreSQL text cannot hold NUL: refuse it here (422) instead of failing in the database.
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return value


class Schema(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class RegisterRequest(Input):
    email: str = Field(min_length=3, max_length=320, json_schema_extra={"format": "email"})
    password: str = NewPasswordField
    full_name: str | None = Field(None, max_length=200)
    phone: str | None = Field(
        None,
        max_length=40,
        description="A mobile number (it gets the verification codes by SMS): Cameroonian in any usual form "
        "(6 71 23 45 67) or international (+33 6 12 34 56 78); stored in E.164.",
    )
    accept_terms: bool = Field(
        strict=True, description="Must be true: the user accepts the terms and the privacy policy."
    )
    terms_version: str = Field(min_length=1, max_length=32, description="The version accepted (the one in force).")
    marketing_consent: bool = Field(False, strict=True, description="Optional consent to marketing messages.")

    @field_validator("accept_terms")
    @classmethod
    def _accepted(cls, value: bool) -> bool:
        if value is not True:
            raise ValueError("the terms and the privacy policy must be accepted")
        return value

    @field_validator("email")
    @classmethod
    def _email(cls, value: str) -> str:
        try:
            return normalise_email(value)
        except EmailNotValidError as exc:
            raise ValueError("not a valid e-mail address") from exc

    @field_validator("phone")
    @classmethod
    def _phone(cls, value: str | None) -> str | None:
        return normalise_phone(value) if value else None

    @field_validator("full_name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None


class LoginRequest(Input):
    email: str = Field(min_length=1, max_length=320)
    password: str = PasswordField
    device_token: str | None = Field(
        None,
        max_length=512,
        description="The `device_token` of an earlier login on this device: it is then throttled on its own "
        "(browsers send the `__Host-comptoir-device` cookie instead). Anything else counts as an unknown device.",
    )
    session_mode: Literal["bearer", "cookie"] = Field(
        "bearer", description="`cookie` for browser apps: refresh and device tokens in `__Host-` cookies."
    )


class RefreshRequest(Input):
    refresh_token: str | None = Field(
        None, min_length=1, max_length=4096, description="Omitted in cookie mode (see X-CSRF-Token)."
    )


class LogoutRequest(Input):
    refresh_token: str | None = Field(None, max_length=4096)


class TokenPair(Schema):
    access_token: str
    refresh_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - a token type name, not a secret
    expires_in: int
    refresh_expires_in: int = Field(description="Seconds until the session's absolute end.")
    refresh_idle_expires_in: int = Field(description="Seconds until this refresh token expires if unused.")


class LoginResponse(TokenPair):
    refresh_token: str | None = Field(description="null in cookie mode: it is in the `__Host-comptoir-refresh` cookie.")  # type: ignore[assignment]
    device_token: str | None = Field(
        description="Proof that this device signed in to this account; send it with the next logins "
        "(null in cookie mode: it is in the `__Host-comptoir-device` cookie)."
    )
    csrf_token: str | None = Field(None, description="Cookie mode: send it as X-CSRF-Token when refreshing.")


class RefreshResponse(TokenPair):
    refresh_token: str | None = Field(description="null in cookie mode: the cookie was replaced.")  # type: ignore[assignment]
    csrf_token: str | None = Field(None, description="Cookie mode: the new CSRF token (the cookie was replaced).")


class UserRead(Schema):
    id: uuid.UUID
    email: str | None
    full_name: str | None
    phone: str | None
    phone_verified: bool
    role: Role
    is_active: bool
    created_at: datetime


class UserUpdate(Input):
    """What a user may change about themselves: nothing else is accepted (422)."""

    full_name: str | None = Field(None, max_length=200)
    phone: str | None = Field(
        None,
        max_length=40,
        description="A mobile number (it gets the verification codes by SMS): Cameroonian in any usual form "
        "(6 71 23 45 67) or international (+33 6 12 34 56 78); stored in E.164.",
    )

    @field_validator("phone")
    @classmethod
    def _phone(cls, value: str | None) -> str | None:
        return normalise_phone(value) if value else None

    @field_validator("full_name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None


class PasswordChange(Input):
    current_password: str = PasswordField
    new_password: str = NewPasswordField


class OtpRequest(Input):
    phone: str | None = Field(
        None,
        max_length=40,
        description="A mobile number (it gets the verification codes by SMS): Cameroonian in any usual form "
        "(6 71 23 45 67) or international (+33 6 12 34 56 78); stored in E.164.",
    )

    @field_validator("phone")
    @classmethod
    def _phone(cls, value: str | None) -> str | None:
        return normalise_phone(value) if value else None


class OtpVerify(Input):
    code: str = Field(min_length=1, max_length=16)


class ResetRequest(Input):
    email: str = Field(min_length=1, max_length=320)


class ResetConfirm(Input):
    token: str = Field(min_length=1, max_length=512)
    new_password: str = NewPasswordField


class AccountDeletion(Input):
    password: str = PasswordField


class SessionRead(Schema):
    id: uuid.UUID
    created_at: datetime
    last_used_at: datetime
    ip: str | None
    user_agent: str | None
    current: bool


class AdminUserUpdate(Input):
    role: Role | None = None
    is_active: bool | None = None


class Accepted(Schema):
    status: Literal["accepted"] = "accepted"
    detail: str


class ServiceTokenRequest(Input):
    client_id: str = Field(min_length=1, max_length=64)
    client_secret: str = Field(min_length=1, max_length=512)
    audience: str = Field(min_length=1, max_length=64)


class ServiceTokenResponse(Schema):
    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - a token type name, not a secret
    expires_in: int


class RevocationItem(Schema):
    seq: int
    sid: str
    expires_at: float


class RevocationPage(Schema):
    items: list[RevocationItem]
    has_more: bool


class Export(Schema):
    generated_at: datetime
    user: UserRead
    sessions: list[dict[str, Any]]
    phone_verifications: list[dict[str, Any]]
    password_resets: list[dict[str, Any]]
    consent: dict[str, Any] = Field(default_factory=dict, description="Terms version accepted, marketing consent.")
    devices: list[dict[str, Any]] = Field(default_factory=list, description="Devices that signed in.")
    account: dict[str, Any] = Field(
        default_factory=dict, description="When the account was created, last signed in, changed its password."
    )
    second_factor: dict[str, Any] = Field(
        default_factory=dict, description="Whether an authenticator is set up, and recovery codes left."
    )
    services: dict[str, Any] = Field(
        description="What each other service holds, as it answered; null when it holds nothing."
    )


class JWK(Schema):
    """An Ed25519 public key (RFC 8037)."""

    kty: Literal["OKP"]
    crv: Literal["Ed25519"]
    x: str = Field(description="The public key, base64url.")
    kid: str
    alg: Literal["EdDSA"]
    use: Literal["sig"]


class JWKS(Schema):
    keys: list[JWK]
