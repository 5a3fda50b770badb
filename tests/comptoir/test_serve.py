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
    assert (started["port"], started["proxy_headers"], started["server_header"]) == (18003, False, False)
