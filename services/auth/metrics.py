"""The auth service's own Prometheus instruments (exported by the shared /metrics endpoint)."""

from __future__ import annotations

from prometheus_client import Counter

LOGINS = Counter("comptoir_auth_logins_total", "Login attempts by outcome.", ["outcome"])
# A sudden rise for one prefix is the signal of SMS pumping (toll fraud through our OTP sends).
OTP_SENDS = Counter(
    "comptoir_auth_otp_sends_total", "OTP codes sent, by destination prefix (leading E.164 characters).", ["prefix"]
)
REFRESH_REUSE = Counter(
    "comptoir_auth_refresh_reuse_total", "Rotated refresh tokens presented again (each revoked its session)."
)

# Known label values exist from start-up, so a first occurrence is an increase the alert rules can see.
for _outcome in ("succeeded", "failed", "throttled"):
    LOGINS.labels(_outcome)
