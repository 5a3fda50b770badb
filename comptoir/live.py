"""``comptoir check --live URL``: score a running gateway's response headers like the Mozilla HTTP Observatory,
and check that nothing internal is reachable through it.

Scoring (Observatory rules that apply to a JSON API; the base is 100, A+ needs at least 100):
- Content-Security-Policy: missing -25; present with ``default-src 'none'`` and nothing unsafe +10;
  unsafe-inline/unsafe-eval -20.
- Strict-Transport-Security (HTTPS only): missing or under 6 months -20; with ``preload`` +5.
- X-Content-Type-Options: missing -5.
- Framing: neither X-Frame-Options nor CSP frame-ancestors -20; frame-ancestors in the CSP +5.
- Referrer-Policy: a private policy +5; an unsafe one (unsafe-url, no-referrer-when-downgrade) -5.
- CORS: a wildcard or an echoed arbitrary origin -50.
- Cross-Origin-Resource-Policy / -Opener-Policy: reported (the Observatory does not score them).
The lowest score over all the probed responses counts: error answers need the headers as much as successes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import httpx

GRADES = [
    (100, "A+"),
    (90, "A"),
    (85, "A-"),
    (80, "B+"),
    (70, "B"),
    (65, "B-"),
    (60, "C+"),
    (50, "C"),
    (45, "C-"),
    (40, "D+"),
    (30, "D"),
    (25, "D-"),
    (0, "F"),
]
PRIVATE_REFERRERS = {"no-referrer", "same-origin", "strict-origin", "strict-origin-when-cross-origin"}
EVIL_ORIGIN = "https://comptoir-live-check.evil.example"


@dataclass
class Scored:
    label: str
    status: int
    score: int
    notes: list[str] = field(default_factory=list)


def grade(score: int) -> str:
    return next(letter for floor, letter in GRADES if score >= floor)


def score_response(label: str, response: httpx.Response, https: bool) -> Scored:
    h = response.headers
    result = Scored(label, response.status_code, 100)

    def adjust(points: int, note: str) -> None:
        result.score += points
        result.notes.append(f"{points:+d} {note}")

    csp = h.get("content-security-policy", "")
    if not csp:
        adjust(-25, "no Content-Security-Policy")
    elif "unsafe-inline" in csp or "unsafe-eval" in csp:
        adjust(-20, "CSP allows unsafe-inline/unsafe-eval")
    elif "default-src 'none'" in csp:
        adjust(10, "CSP default-src 'none'")
    if https:
        hsts = h.get("strict-transport-security", "")
        max_age = next(
            (
                int(p.split("=", 1)[1])
                for p in hsts.replace(" ", "").split(";")
                if p.startswith("max-age=") and p.split("=", 1)[1].isdigit()
            ),
            0,
        )
        if max_age < 15_552_000:
            adjust(-20, "HSTS missing or shorter than 6 months")
        elif "preload" in hsts:
            adjust(5, "HSTS preload")
    if h.get("x-content-type-options", "").lower() != "nosniff":
        adjust(-5, "no X-Content-Type-Options: nosniff")
    frame_ancestors = "frame-ancestors" in csp
    if not frame_ancestors and h.get("x-frame-options", "").upper() not in ("DENY", "SAMEORIGIN"):
        adjust(-20, "framing not restricted")
    elif frame_ancestors:
        adjust(5, "frame-ancestors in the CSP")
    referrer = h.get("referrer-policy", "").split(",")[-1].strip().lower()
    if referrer in PRIVATE_REFERRERS:
        adjust(5, f"Referrer-Policy {referrer}")
    elif referrer in ("unsafe-url", "no-referrer-when-downgrade"):
        adjust(-5, f"Referrer-Policy {referrer}")
    acao = h.get("access-control-allow-origin", "")
    if acao == "*" or acao == EVIL_ORIGIN:
        adjust(-50, "CORS allows any origin")
    for name in ("cross-origin-resource-policy", "cross-origin-opener-policy"):
        if name not in h:
            result.notes.append(f"+0 no {name} (reported only)")
    return result


class Unreachable(Exception):
    """No answer to score: the URL is not an http(s) URL, or nothing answers there."""


def live_check(base_url: str, host: str | None = None) -> dict[str, object]:
    """``host``: the Host header to send (one of the gateway's ALLOWED_HOSTS, when it is asked by address)."""
    base = base_url.rstrip("/")
    try:
        parts = urlsplit(base)
        address = (parts.scheme, parts.hostname, parts.port)
    except ValueError:  # a bracket left open, a port that is not a number
        address = ("", None, None)
    if address[0] not in ("http", "https") or not address[1]:
        raise Unreachable(f"{base_url!r} is not a URL: give the gateway's http:// or https:// address")
    try:
        return _probe(base, host)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise Unreachable(f"no answer from {base}: {detail}") from exc


def _probe(base: str, host: str | None) -> dict[str, object]:
    https = base.startswith("https://")
    probes: list[Scored] = []
    exposures: list[dict[str, object]] = []
    with httpx.Client(timeout=10, follow_redirects=False, headers={"Host": host} if host else None) as client:
        headers = {"Origin": EVIL_ORIGIN}
        probes.append(score_response("public route", client.get(base + "/api/v1/products", headers=headers), https))
        probes.append(score_response("not found", client.get(base + "/api/v1/no-such-thing", headers=headers), https))
        probes.append(score_response("unauthenticated", client.get(base + "/api/v1/orders", headers=headers), https))
        big = b"{" + b" " * (2 * 1024 * 1024) + b"}"
        probes.append(
            score_response(
                "too large",
                client.post(
                    base + "/api/v1/auth/login", content=big, headers=headers | {"content-type": "application/json"}
                ),
                https,
            )
        )
        for path in (
            "/docs",
            "/openapi.json",
            "/api/v1/auth/docs",
            "/api/v1/auth/openapi.json",
            "/api/v1/products/metrics",
            "/api/v1/auth/metrics",
            "/internal/token",
            "/api/v1/auth/internal/token",
            "/api/v1/products/%2e%2e/internal/reservations",
        ):
            status = client.get(base + path).status_code
            exposures.append({"path": path, "status": status, "exposed": status < 400})
    worst = min(probes, key=lambda p: p.score)
    # Refusals alone prove nothing: a gateway that answers every request 400 (another Host than its
    # ALLOWED_HOSTS) or 308 (plain HTTP behind a TLS proxy) exposes nothing because it serves nothing.
    served = probes[0].status == 200
    return {
        "url": base,
        "score": worst.score,
        "grade": grade(worst.score),
        "public_route_served": served,
        "probes": [p.__dict__ for p in probes],
        "exposures": exposures,
        "ok": served and worst.score >= 100 and not any(e["exposed"] for e in exposures),
    }


def failing_reasons(report: dict[str, object], fail_under: float | None = None) -> list[str]:
    """Why the run fails: an exposed path, a score under A+ (100), and a score under ``--fail-under``."""
    score = cast(int, report["score"])
    exposures = cast(list[dict[str, object]], report["exposures"])
    reasons = [f"{item['path']} is exposed ({item['status']})" for item in exposures if item["exposed"]]
    if not report.get("public_route_served", True):
        status = cast(list[dict[str, object]], report["probes"])[0]["status"]
        reasons.append(
            f"the public catalogue answered {status}, not 200, so only refusals were seen: give --host one of "
            "ALLOWED_HOSTS, or the https:// address clients use"
        )
    if score < GRADES[0][0]:
        reasons.append(f"score {score} is under {GRADES[0][0]} ({GRADES[0][1]})")
    if fail_under is not None and score < fail_under:
        reasons.append(f"score {score} is under --fail-under {fail_under:g}")
    return reasons


def render(report: dict[str, object], fail_under: float | None = None) -> str:
    lines = [f"{report['url']}: {report['score']} points, grade {report['grade']}"]
    for probe in report["probes"]:  # type: ignore[attr-defined]
        lines.append(f"  {probe['label']:<16} {probe['status']}  {probe['score']:>4}  " + "; ".join(probe["notes"]))
    for item in report["exposures"]:  # type: ignore[attr-defined]
        lines.append(f"  {'EXPOSED' if item['exposed'] else 'closed '} {item['status']} {item['path']}")
    reasons = failing_reasons(report, fail_under)
    verdict = f"FAILED ({len(reasons)}): " + "; ".join(reasons) if reasons else "OK: nothing internal is exposed"
    lines.append(verdict)
    return "\n".join(lines)
