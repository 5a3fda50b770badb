"""`comptoir check --live URL` scoring (the A+ run against the real system is in tests/e2e/test_run.py)."""

from __future__ import annotations

from comptoir.live import grade, live_check


def test_a_server_without_the_headers_fails(echo) -> None:  # noqa: ANN001
    report = live_check(echo[1].url)  # the bare upstream: no security headers, answers every path
    assert report["score"] == 50  # no CSP -25, no nosniff -5, framing allowed -20
    assert report["grade"] == "C"
    assert report["ok"] is False
    assert any(e["exposed"] and e["path"] == "/docs" for e in report["exposures"])


def test_grades_follow_the_observatory_table() -> None:
    assert [grade(s) for s in (120, 100, 95, 87, 50, 10)] == ["A+", "A+", "A", "A-", "C", "F"]
