"""The gateway's deployment checks (``comptoir check --deploy`` and the start-up refusal in production)."""

from __future__ import annotations

import ipaddress

from common.deploychecks import Check, check, common_checks
from gateway.config import GatewaySettings


def _too_broad(network: str) -> bool:
    try:
        return ipaddress.ip_network(network.strip(), strict=False).prefixlen == 0
    except ValueError:
        return True


def gateway_checks(s: GatewaySettings) -> list[Check]:
    """Every check the gateway runs at start-up (common ones included)."""
    proxies = [p for p in s.trusted_proxies.split(",") if p.strip()]
    return [
        *common_checks(s, "gateway"),
        check(
            "CMP-W003",
            "allowed hosts set",
            bool(s.hosts) and "*" not in s.allowed_hosts,
            "ALLOWED_HOSTS is empty: the gateway answers any Host header",
            "set ALLOWED_HOSTS=api.yourshop.example",
            process="gateway",
        ),
        check(
            "CMP-W015",
            "CORS lists explicit origins",
            "*" not in s.cors_allowed_origins,
            "CORS_ALLOWED_ORIGINS contains a wildcard",
            "list each origin (scheme://host[:port])",
            process="gateway",
        ),
        check(
            "CMP-W016",
            "TRUSTED_PROXIES is not everyone",
            not any(_too_broad(p) for p in proxies),
            "TRUSTED_PROXIES contains 0.0.0.0/0, ::/0 or an invalid network: any client can pick its IP",
            "list only your proxies' addresses",
            process="gateway",
        ),
        check(
            "CMP-W030",
            "the TLS proxy's address is trusted",
            bool(proxies),
            "TLS_TERMINATING_PROXY=true but TRUSTED_PROXIES is empty: client IPs would be the proxy's, and in "
            "production every request would be refused as plain HTTP (308/403)",
            "set TRUSTED_PROXIES to the proxy's address",
            process="gateway",
            applies=s.tls_terminating_proxy,
        ),
        check(
            "CMP-W017",
            "rate limits enabled",
            bool(s.rate_limits_enabled),
            "GATEWAY_RATE_LIMITS_ENABLED=false",
            "enable rate limits",
            process="gateway",
        ),
        check(
            "CMP-W018",
            "shared limit storage for several replicas",
            bool(s.redis_url),
            f"GATEWAY_REPLICAS={s.replicas} without REDIS_URL: each replica counts alone and misses revocations",
            "set REDIS_URL",
            process="gateway",
            applies=s.replicas > 1,
        ),
        check(
            "CMP-W031",
            "image upload limit at most 5 MiB",
            s.image_upload_max_bytes <= 5 * 1024 * 1024,
            f"GATEWAY_IMAGE_UPLOAD_MAX_BYTES={s.image_upload_max_bytes}",
            "use the default 5242880",
            process="gateway",
        ),
    ]
