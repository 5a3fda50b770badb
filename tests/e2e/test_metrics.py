"""Every metric the alert rules and the dashboard use is exported by the running system (scraped for real)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from tests.deploy.test_monitoring import alert_rules, analyse, dashboard_panels, substitute_grafana_variables
from tests.e2e.harness import PROCESSES, new_system

pytestmark = pytest.mark.e2e

TYPE_LINE = re.compile(r"^# TYPE (\S+) (counter|gauge|histogram|summary|untyped)$", re.M)
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
    "gauge": ("",),
    "untyped": ("",),
}


def scraped_series(text: str) -> set[str]:
    series = set()
    for name, kind in TYPE_LINE.findall(text):
        series.update(name + suffix for suffix in SUFFIXES[kind])
        series.add(name)
    return series


def queries() -> list[tuple[str, str]]:
    found = [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            if target.get("expr"):
                found.append((f"panel {panel.get('title')}", substitute_grafana_variables(target["expr"])))
    return found


def test_alerts_and_panels_use_metrics_the_processes_export(tmp_path: Path) -> None:
    system = new_system(tmp_path)
    system.start()
    try:
        httpx.get(system.url() + "/api/v1/products")
        httpx.get(system.url() + "/api/v1/orders")  # a 401: the gateway's counters get children
        exported: set[str] = set()
        for process in PROCESSES:
            response = httpx.get(system.url(process) + "/metrics")
            assert response.status_code == 200
            exported |= scraped_series(response.text)
    finally:
        assert system.stop() == 0
    missing = []
    for where, expr in queries():
        for metric, _ in analyse(expr)[0]:
            if metric != "up" and metric not in exported:
                missing.append(f"{where}: {metric}")
    assert missing == [], missing
    assert len(queries()) > 20
