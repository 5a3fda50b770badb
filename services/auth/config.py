"""The auth service's settings (env prefix ``AUTH_``); defaults are DESIGN.md's "Security parameters"."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from common.settings import ServiceSettings, unprefixed

# Which audiences each client may ask a service token for (the callee must also list the caller).
DEFAULT_SERVICE_AUDIENCES: dict[str, list[str]] = {
    "gateway": ["auth", "audit"],
    "inventory": ["auth", "audit"],
    "orders": ["auth", "audit", "inventory"],
    "audit": ["auth"],
}

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="AUTH_")  # the rest comes from CommonSettings

    # ---- tokens and sessions ----
    access_token_ttl_seconds: int = Field(3600, ge=60, le=86_400)
    service_token_ttl_seconds: int = Field(300, ge=30, le=3600)
    refresh_token_ttl_seconds: int = Field(7 * 86_400, ge=300, description="Absolute lifetime of a session.")
    refresh_idle_timeout_seconds: int = Field(86_400, ge=60, description="A refresh token unused this long expires.")
    # A rotated refresh token presented again this soon after its rotation is most likely a client's
    # concurrent retry: it still gets 401 and still revokes the session (no fork), and the audit event
    # says so, to tell races from theft when reading the trail.
    refresh_race_window_seconds: int = Field(10, ge=0, le=300)
    max_sessions_per_user: int = Field(5, ge=1, le=100)

    # ---- signing keys ----
    # Empty: DATA_DIR/keys. Private keys are generated there on first start (dir 0700, files 0600).
    keys_dir: Path | None = None
    # Alternatively, PEM Ed25519 private keys (PKCS#8), one after the other; the last one signs.
    signing_keys: str = Field("", repr=False)
    # A key added by `comptoir keys rotate` is published this long before it signs, so that every
    # verifier's JWKS cache knows it by then.
    key_activation_delay_seconds: int = Field(10, ge=0, le=3600)
    # How often the key directory is re-read (new keys are picked up without a restart).
    key_scan_interval_seconds: float = Field(2.0, gt=0, le=300)

    # ---- passwords ----
    pbkdf2_rounds: int = Field(600_000, ge=1000)
    # Threads that compute password hashes (0: one per CPU); the event loop never hashes.
    hash_workers: int = Field(0, ge=0, le=64)
    # The hashing threads' nice value: above the event loops', so that on a busy machine every request
    # is served before the next hash step (hashes take the CPU the loops leave). 0: same priority.
    hash_nice: int = Field(10, ge=0, le=19)
    # A password check that would wait longer than this for a hashing thread is refused at once (503 with
    # Retry-After) instead of timing out at the gateway (its deadline is 15 s). 0: never refused.
    hash_max_wait_seconds: float = Field(5.0, ge=0, le=60)
    password_min_length: int = Field(12, ge=8, le=128)
    password_max_length: int = Field(128, ge=64, le=1024)

    # ---- login throttling ----
    login_delay_after_failures: int = Field(5, ge=1, le=100)
    login_delay_base_seconds: int = Field(30, ge=1)
    login_delay_max_seconds: int = Field(900, ge=1)
    # Failures of one account from devices it does not know, across every address, before it waits.
    login_account_delay_after_failures: int = Field(10, ge=1, le=100)
    # Failures from one address across every account (credential stuffing) before it waits.
    login_ip_delay_after_failures: int = Field(30, ge=1, le=10_000)
    # The account, address and device counters forget failures older than this.
    login_failure_window_seconds: int = Field(3600, ge=60, le=7 * 86_400)
    # A device that has not signed in for this long is unknown again.
    device_ttl_days: int = Field(90, ge=1, le=3650)

    # ---- browser session mode (browser.py) ----
    # Exact origins of the browser apps that may refresh with the session cookie (JSON list).
    browser_origins: list[str] = Field(default_factory=list)

    # ---- consent and retention ----
    # The terms and privacy policy version in force: registration must accept exactly this one.
    terms_version: str = Field("2026-12-01", min_length=1, max_length=32)
    # Revoked or expired sessions and revoked devices are deleted this long after (see retention.py).
    retention_days: int = Field(30, ge=1, le=3650)
    # Customer accounts without a login for this long are anonymised (0: never).
    inactive_account_days: int = Field(730, ge=0, le=36_500)
    # How often the auth service purges by itself (`comptoir purge` does it on demand).
    retention_interval_seconds: float = Field(86_400.0, gt=0)

    # ---- second factor (TOTP, RFC 6238) ----
    # Roles that must sign in with a second factor; unset: ["admin"] in production, none otherwise.
    mfa_required_roles: list[Literal["customer", "staff", "admin"]] | None = None
    mfa_issuer: str = Field("Comptoir", min_length=1, max_length=64)
    mfa_challenge_ttl_seconds: int = Field(300, ge=60, le=1800)
    mfa_max_attempts: int = Field(5, ge=1, le=20, description="Codes tried per login challenge.")
    mfa_recovery_codes: int = Field(10, ge=4, le=20)

    # ---- phone verification (OTP) ----
    otp_digits: int = Field(6, ge=6, le=10)
    otp_ttl_seconds: int = Field(600, ge=60, le=3600)
    otp_max_attempts: int = Field(5, ge=1, le=20)
    otp_window_seconds: int = Field(600, ge=60)
    otp_max_per_window: int = Field(3, ge=1, description="Sends per user in the window.")
    otp_max_per_day: int = Field(10, ge=1, description="Sends per user in 24 h.")
    # Sends to one number from every account together: twice a user's, so that one other account claiming
    # the number cannot lock its owner out, while the number still cannot be flooded from many accounts.
    otp_phone_max_per_window: int = Field(6, ge=1, description="Sends per phone number in the window.")
    otp_phone_max_per_day: int = Field(20, ge=1, description="Sends per phone number in 24 h.")
    otp_ip_max_per_window: int = Field(10, ge=1, description="Sends per client IP in the window.")
    otp_ip_max_per_day: int = Field(30, ge=1, description="Sends per client IP in 24 h.")
    # Sends are counted in a Prometheus metric by this many leading characters of the E.164 number.
    otp_metric_prefix_length: int = Field(6, ge=2, le=8)
    # The HMAC key of stored codes; empty: generated under the keys directory.
    otp_hmac_key: str = Field("", repr=False)

    # ---- password reset ----
    password_reset_ttl_seconds: int = Field(1800, ge=300, le=86_400)
    password_reset_max_per_hour: int = Field(3, ge=1, description="Reset e-mails per account per hour.")
    # The client app's reset page; {token} is replaced. A fragment keeps the token out of server logs.
    password_reset_link: str = "http://localhost:3000/reset-password#token={token}"  # noqa: S105 - a URL template

    # ---- service clients (client credentials) ----
    # JSON object: client name -> SHA-256 hex digest of its secret (comptoir run generates them).
    service_clients: dict[str, str] = Field(default_factory=dict, repr=False)
    service_audiences: dict[str, list[str]] = Field(default_factory=lambda: dict(DEFAULT_SERVICE_AUDIENCES))

    # ---- first administrator ----
    bootstrap_admin_email: str = Field("", validation_alias=unprefixed("BOOTSTRAP_ADMIN_EMAIL"))
    bootstrap_admin_password: str = Field("", validation_alias=unprefixed("BOOTSTRAP_ADMIN_PASSWORD"), repr=False)

    # ---- messages (SMS, e-mail) ----
    message_sender: Literal["jsonl", "webhook"] = "jsonl"
    # Empty: DATA_DIR/messages.jsonl (the development sink).
    messages_path: Path | None = None
    webhook_url: str = ""
    webhook_secret: str = Field("", repr=False)
    webhook_timeout_seconds: float = Field(5.0, gt=0, le=60)
    webhook_retries: int = Field(3, ge=0, le=10)

    # ---- other services (GDPR export and erasure) ----
    orders_url: str = "http://127.0.0.1:8003"
    audit_url: str = "http://127.0.0.1:8004"
    inventory_url: str = "http://127.0.0.1:8002"
    # The services asked for a user's data on export and erasure, in that order.
    gdpr_services: list[str] = Field(default_factory=lambda: ["orders", "audit"])
    peer_timeout_seconds: float = Field(10.0, gt=0, le=120)

    # How often expired rows (revocations, codes, counters) are pruned.
    maintenance_interval_seconds: float = Field(60.0, gt=0)

    @field_validator("service_clients")
    @classmethod
    def _digests(cls, value: dict[str, str]) -> dict[str, str]:
        for name, digest in value.items():
            if not _SHA256_HEX.match(digest.lower()):
                raise ValueError(f"the secret digest of client {name!r} is not a SHA-256 hex digest")
        return {name: digest.lower() for name, digest in value.items()}

    @field_validator("gdpr_services")
    @classmethod
    def _known_peers(cls, value: list[str]) -> list[str]:
        unknown = set(value) - {"orders", "audit", "inventory"}
        if unknown:
            raise ValueError(f"unknown services: {sorted(unknown)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.password_min_length > self.password_max_length:
            raise ValueError("password_min_length is above password_max_length")
        if self.login_delay_base_seconds > self.login_delay_max_seconds:
            raise ValueError("login_delay_base_seconds is above login_delay_max_seconds")
        per_phone = (self.otp_phone_max_per_window, self.otp_phone_max_per_day)
        if per_phone[0] <= self.otp_max_per_window or per_phone[1] <= self.otp_max_per_day:
            # Equal, one other account claiming the number could use them up and lock its owner out.
            raise ValueError("otp_phone_max_per_window/_per_day must be above otp_max_per_window/_per_day")
        if self.otp_hmac_key and len(self.otp_hmac_key) < 32:
            raise ValueError("otp_hmac_key must be at least 32 characters")
        if self.message_sender == "webhook":
            if not self.webhook_url.startswith("https://"):
                raise ValueError("webhook_url must be an https:// URL")
            if len(self.webhook_secret) < 32:
                raise ValueError("webhook_secret must be at least 32 characters")
        if "{token}" not in self.password_reset_link:
            raise ValueError("password_reset_link must contain {token}")
        return self

    @property
    def mfa_roles(self) -> frozenset[str]:
        if self.mfa_required_roles is not None:
            return frozenset(self.mfa_required_roles)
        return frozenset({"admin"}) if self.is_production else frozenset()

    @property
    def resolved_keys_dir(self) -> Path:
        return self.keys_dir or self.data_dir / "keys"

    @property
    def resolved_messages_path(self) -> Path:
        return self.messages_path or self.data_dir / "messages.jsonl"

    def peer_url(self, service: str) -> str:
        return str(getattr(self, f"{service}_url"))
