"""``python -m comptoir.serve``: the entry point every process is started with."""

from __future__ import annotations

import gc
from typing import Any

import pytest

from comptoir import serve


def test_each_process_runs_its_factory_with_a_larger_young_gc_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    started: dict[str, Any] = {}
    monkeypatch.setattr(serve.uvicorn, "run", lambda app, **options: started.update(app=app, **options))
    before = gc.get_threshold()
    try:
        serve.main(["orders", "--port", "18003"])
        assert gc.get_threshold()[0] == serve.GC_GEN0_THRESHOLD > before[0]
        assert gc.get_threshold()[1:] == before[1:]
        # The imported code is frozen out of the collector's walks.
        assert gc.get_freeze_count() > 10_000
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()
    # The orders factory, wrapped so that a refused configuration is one line naming the failing check.
    app = started["app"]()
    assert app.title.lower().startswith("comptoir orders") or "orders" in app.title.lower()
    assert started["factory"] is True
    assert started["workers"] == 1
    assert (started["port"], started["proxy_headers"], started["server_header"]) == (18003, False, False)


def test_a_gateway_with_several_workers_is_imported_by_name_in_each(monkeypatch: pytest.MonkeyPatch) -> None:
    started: dict[str, Any] = {}
    monkeypatch.setattr(serve.uvicorn, "run", lambda app, **options: started.update(app=app, **options))
    monkeypatch.setenv("GATEWAY_WORKERS", "2")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6390/0")
    serve.main(["gateway", "--port", "18000"])
    assert (started["app"], started["factory"], started["workers"]) == ("comptoir.serve:gateway_worker", True, 2)


def test_several_gateway_workers_without_shared_limits_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from gateway.config import GatewaySettings

    monkeypatch.setenv("GATEWAY_WORKERS", "2")
    monkeypatch.delenv("REDIS_URL", raising=False)
    with pytest.raises(ValidationError, match="GATEWAY_WORKERS=2 needs REDIS_URL"):
        GatewaySettings(environment="test")


def test_a_start_up_failure_is_one_short_line_without_secrets() -> None:
    reason = serve.one_line(ValueError("cannot reach postgresql://comptoir_auth:hunter2@db:5432/shop\n  (token=abc)"))
    assert reason.startswith("ValueError: cannot reach postgresql://comptoir_auth:***@db:5432/shop (token=")
    assert "hunter2" not in reason
    assert "abc" not in reason
    long = serve.one_line(ValueError("x" * 1000))
    assert len(long) == serve.REASON_CHARS
    assert long.endswith("…")
