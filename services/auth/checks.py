"""The auth service's deployment checks (``comptoir check --deploy`` and the start-up refusal in production)."""

from __future__ import annotations

from common.deploychecks import MIN_SECRET_CHARS, Check, check, service_checks, strong_secret
from services.auth.config import Settings


def _delivery_problem(s: Settings) -> str:
    """Why CMP-W025 fails: the one thing that is wrong, not a list of what is already set."""
    if s.message_sender != "webhook" or not s.webhook_url:
        return "OTP and reset messages go to DATA_DIR/messages.jsonl"
    if not s.webhook_url.startswith("https://"):
        return "AUTH_WEBHOOK_URL is not an https:// URL"
    return (
        f"AUTH_WEBHOOK_SECRET is weak: {len(s.webhook_secret)} characters (at least {MIN_SECRET_CHARS} random "
        "ones, without a placeholder word such as 'secret' or 'example')"
    )


def auth_checks(s: Settings) -> list[Check]:
    """Every check the auth service runs at start-up (the service checks included)."""
    webhook = s.webhook_url
    return [
        *service_checks(s, "auth"),
        check(
            "CMP-W011",
            "access tokens live at most 1 hour",
            s.access_token_ttl_seconds <= 3600,
            f"AUTH_ACCESS_TOKEN_TTL_SECONDS={s.access_token_ttl_seconds}",
            "at most 3600",
            process="auth",
        ),
        check(
            "CMP-W012",
            "refresh tokens: 7 days absolute, 24 h idle at most",
            s.refresh_token_ttl_seconds <= 7 * 86_400 and s.refresh_idle_timeout_seconds <= 86_400,
            "refresh token lifetime above the seed's bounds",
            "AUTH_REFRESH_TOKEN_TTL_SECONDS<=604800, idle<=86400",
            process="auth",
        ),
        check(
            "CMP-W013",
            "PBKDF2 at least 600,000 rounds",
            s.pbkdf2_rounds >= 600_000,
            f"AUTH_PBKDF2_ROUNDS={s.pbkdf2_rounds}",
            "use the default 600000",
            process="auth",
        ),
        check(
            "CMP-W014",
            "passwords of at least 12 characters",
            s.password_min_length >= 12,
            f"AUTH_PASSWORD_MIN_LENGTH={s.password_min_length}",
            "at least 12",
            process="auth",
        ),
        check(
            "CMP-W025",
            "real message delivery (not the development sink)",
            s.message_sender == "webhook" and webhook.startswith("https://") and strong_secret(s.webhook_secret),
            _delivery_problem(s),
            "set AUTH_MESSAGE_SENDER=webhook, AUTH_WEBHOOK_URL (https) and AUTH_WEBHOOK_SECRET (`comptoir secrets`)",
            process="auth",
        ),
        check(
            "CMP-W026",
            "OTP and reset tokens short-lived",
            s.otp_ttl_seconds <= 600 and s.password_reset_ttl_seconds <= 1800 and s.otp_max_attempts <= 5,
            "OTP lifetime > 10 min, reset token > 30 min or more than 5 OTP tries",
            "use the defaults",
            process="auth",
        ),
        check(
            "CMP-W027",
            "account lockout enabled",
            s.login_delay_after_failures <= 5 and s.login_account_delay_after_failures <= 10,
            "login throttling thresholds above the defaults",
            "use the defaults (5 failures per IP or device, 10 per account from unknown devices)",
            process="auth",
        ),
        check(
            "CMP-W022",
            "no bootstrap admin password left in the environment",
            not s.bootstrap_admin_password,
            "BOOTSTRAP_ADMIN_PASSWORD is still set",
            "remove it after the first start and change that password",
            process="auth",
            critical=False,
        ),
    ]
