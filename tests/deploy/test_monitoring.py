"""deploy/prometheus and deploy/grafana: alerts and dashboard read only metrics the code exports.

The instruments are found statically: every ``prometheus_client`` Counter, Gauge, Histogram and Summary
constructed in the source, with its label names. A Counter is exposed as ``<name>_total`` (and
``_created``), a Histogram as ``_bucket`` (with ``le``), ``_sum`` and ``_count``. Every metric named in
an alert or a panel query must be one of those series (or Prometheus's own ``up``), and every label a
query matches or groups by must exist on it or be a target label given by prometheus.yml.
promtool (Debian package ``prometheus``) checks the rules, runs their unit tests and parses every query.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
ALERTS_TEST = PROMETHEUS / "alerts_test.yml"
SCRAPE_CONFIG = PROMETHEUS / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "comptoir.json"
SOURCE_PACKAGES = ("common", "gateway", "services", "comptoir")
PROCESSES = ("gateway", "auth", "inventory", "orders", "audit")

INSTRUMENTS = {"Counter", "Gauge", "Histogram", "Summary"}
# Series Prometheus makes itself for every target, with their labels.
PROMETHEUS_SERIES = {"up": frozenset()}
# Labels every scraped series carries: Prometheus's job/instance, and prometheus.yml's relabelling.
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "process"})
# Labels whose literal values in a query must be values the code uses (string constants of the source).
VALUE_CHECKED_LABELS = {"outcome", "rule", "result", "action", "kind", "upstream"}
SEVERITIES = {"critical", "warning", "info"}

# Grafana's variables, replaced by a value of the right kind before a query is parsed.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$service": ".*"}

AGGREGATORS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile", "limitk", "limit_ratio",
}  # fmt: skip
KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}
LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
TOKEN = re.compile(
    r"""(?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)"""
    r"""|(?P<braces>\{(?:"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|[^}"'])*\})|(?P<range>\[[^\]]*\])"""
    r"""|(?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?[a-zA-Z]*)"""
    r"""|(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)|(?P<other>\S)"""
)
MATCHER = re.compile(r"""([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*')""")


# ---------------------------------------------------------------- what the code exports


def _source_files() -> list[Path]:
    return [path for package in SOURCE_PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]


def _constant_strings(nodes: list[ast.expr]) -> list[str]:
    return [n.value for n in nodes if isinstance(n, ast.Constant) and isinstance(n.value, str)]


@cache
def exported_series() -> dict[str, frozenset[str]]:
    """Every series name the processes expose on /metrics -> its label names."""
    series: dict[str, frozenset[str]] = {}
    for path in _source_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {
            alias.asname or alias.name: alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == "prometheus_client"
            for alias in node.names
            if alias.name in INSTRUMENTS
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Name) and func.id in imported:
                kind = imported[func.id]
            elif (
                isinstance(func, ast.Attribute)
                and func.attr in INSTRUMENTS
                and isinstance(func.value, ast.Name)
                and func.value.id == "prometheus_client"
            ):
                kind = func.attr
            else:
                continue
            keywords = {k.arg: k.value for k in node.keywords}
            assert not {"namespace", "subsystem", "unit"} & set(keywords), f"{path}: extend this test for {keywords}"
            name_node = node.args[0] if node.args else keywords["name"]
            assert isinstance(name_node, ast.Constant), f"{path}:{node.lineno}: a metric name must be a literal"
            name = str(name_node.value)
            label_node = node.args[2] if len(node.args) > 2 else keywords.get("labelnames")
            labels: frozenset[str] = frozenset()
            if label_node is not None:
                assert isinstance(label_node, ast.List | ast.Tuple), f"{path}:{node.lineno}: literal label names"
                labels = frozenset(_constant_strings(label_node.elts))
            if kind == "Counter":
                base = name.removesuffix("_total")
                series[base + "_total"] = labels
                series[base + "_created"] = labels
            elif kind == "Gauge":
                series[name] = labels
            elif kind == "Histogram":
                series[name + "_bucket"] = labels | {"le"}
                for suffix in ("_sum", "_count", "_created"):
                    series[name + suffix] = labels
            else:  # Summary
                series[name] = labels | {"quantile"}
                for suffix in ("_sum", "_count", "_created"):
                    series[name + suffix] = labels
    return series


@cache
def source_strings() -> frozenset[str]:
    strings: set[str] = set()
    for path in _source_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                strings.add(node.value)
    return frozenset(strings)


def family(series: str) -> str:
    """A histogram's _bucket, _sum and _count series belong to one metric."""
    for suffix in ("_bucket", "_sum", "_count"):
        base = series.removesuffix(suffix)
        if base != series and base + "_bucket" in exported_series():
            return base
    return series


def route_exists(route: str) -> bool:
    """A route label: a template served by some router (prefix + path), or a gateway route-limit path."""
    for path in _source_files():
        text = path.read_text(encoding="utf-8")
        for prefix in re.findall(r'prefix="([^"]*)"', text):
            if route.startswith(prefix) and f'"{route[len(prefix) :]}"' in text:
                return True
        if f" {route}=" in text:  # gateway/config.py: "POST /api/v1/auth/login=10/minute;"
            return True
    return False


# ---------------------------------------------------------------- reading PromQL


def substitute_grafana_variables(expr: str) -> str:
    for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda item: -len(item[0])):
        expr = expr.replace(variable, value)
    assert "$" not in expr.replace("$labels", "").replace("$value", ""), f"unknown variable in {expr}"
    return expr


def analyse(expr: str) -> tuple[list[tuple[str, list[tuple[str, str, str]]]], set[str]]:
    """([(metric, [(label, operator, value)])], labels named in by/without/on/ignoring/group_*)."""
    tokens = [(m.lastgroup, m.group()) for m in TOKEN.finditer(expr)]
    selectors: list[tuple[str, list[tuple[str, str, str]]]] = []
    grouping: set[str] = set()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else (None, "")
        if kind == "ident" and text in LABEL_LIST_KEYWORDS:
            if following[1] == "(":
                i += 2
                while tokens[i][1] != ")":
                    if tokens[i][0] == "ident":
                        grouping.add(tokens[i][1])
                    i += 1
        elif kind == "ident" and (text in AGGREGATORS or text in KEYWORDS or following[1] == "("):
            pass
        elif kind == "ident":
            matchers = []
            if following[0] == "braces":
                matchers = [(label, op, value[1:-1]) for label, op, value in MATCHER.findall(following[1])]
                i += 1
            selectors.append((text, matchers))
        elif kind == "braces":
            matchers = [(label, op, value[1:-1]) for label, op, value in MATCHER.findall(text)]
            names = [value for label, op, value in matchers if label == "__name__" and op == "="]
            assert names, f"a selector without a metric name in {expr}"
            selectors.append((names[0], matchers))
        i += 1
    return selectors, grouping


def check_query(expr: str, where: str) -> set[str]:
    """Assert that ``expr`` reads exported series with existing labels; return the metric names."""
    known = {**exported_series(), **PROMETHEUS_SERIES}
    selectors, grouping = analyse(substitute_grafana_variables(expr))
    assert selectors, f"{where}: no metric in {expr!r}"
    available: set[str] = set(TARGET_LABELS)
    for metric, matchers in selectors:
        assert metric in known, f"{where}: {metric} is not exported by any Comptoir process"
        labels = known[metric] | TARGET_LABELS
        available |= labels
        for label, op, value in matchers:
            assert label in labels, f"{where}: {metric} has no label {label!r} (it has {sorted(known[metric])})"
            if op != "=" or label in TARGET_LABELS:
                continue
            if label in VALUE_CHECKED_LABELS:
                assert value in source_strings(), f"{where}: the code never sets {label}={value!r}"
            elif label == "route":
                assert route_exists(value), f"{where}: no router serves the route {value!r}"
            elif label == "service":
                assert value in PROCESSES, f"{where}: {value!r} is not a process"
            elif label == "status":
                assert re.fullmatch(r"[1-5]\d\d", value), f"{where}: {value!r} is not an HTTP status"
    unknown = grouping - available
    assert not unknown, f"{where}: grouping by labels that no metric of the query has: {sorted(unknown)}"
    return {metric for metric, _ in selectors}


# ---------------------------------------------------------------- the files


@cache
def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


@cache
def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def dashboard_panels() -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # panels of a collapsed row
    return panels


def dashboard_queries() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in dashboard_panels()
        if panel["type"] != "row"
        for target in panel["targets"]
    ]


def test_the_code_exports_the_metrics_this_test_knows() -> None:
    series = exported_series()
    # A sanity check of the static scan itself: the shared HTTP instruments, with their labels.
    assert series["comptoir_http_requests_total"] == {"service", "method", "route", "status"}
    assert series["comptoir_http_request_duration_seconds_bucket"] == {"service", "method", "route", "le"}
    assert "comptoir_http_requests" not in series


def test_every_alert_reads_only_exported_metrics() -> None:
    for rule in alert_rules():
        check_query(rule["expr"], f"alert {rule['alert']}")


def test_every_alert_is_named_once_has_a_severity_and_explains_itself() -> None:
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names))
    for rule in alert_rules():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert rule["annotations"].get("summary"), rule["alert"]
        assert rule["annotations"].get("description"), rule["alert"]


def test_the_issue_s_signals_are_alerted_on() -> None:
    """Failed-login spikes, throttled logins, refresh-token reuse, OTP sends per prefix, 5xx per process,
    upstream down / circuit open, p99 latency, audit lag and pending events, chain verification failure,
    rate-limit storage unreachable."""
    used = " ".join(rule["expr"] for rule in alert_rules())
    for needle in (
        'comptoir_auth_logins_total{outcome="failed"}',
        'comptoir_auth_logins_total{outcome="throttled"}',
        'rule="auth.token.reuse_detected"',
        "sum by (prefix) (increase(comptoir_auth_otp_sends_total",
        'comptoir_http_requests_total{status=~"5.."}',
        "comptoir_gateway_circuit_open",
        "comptoir_gateway_upstream_failures_total",
        "histogram_quantile(0.99",
        "comptoir_outbox_oldest_pending_seconds",
        "comptoir_outbox_pending_events",
        'comptoir_audit_verify_total{result="failed"}',
        "comptoir_gateway_rate_limit_storage_errors_total",
    ):
        assert needle in used, needle


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    tests = yaml.safe_load(ALERTS_TEST.read_text(encoding="utf-8"))
    assert tests["rule_files"] == [ALERTS.name]
    fired = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert sorted({rule["alert"] for rule in alert_rules()} - fired) == []


def test_every_dashboard_query_reads_only_exported_metrics() -> None:
    queries = dashboard_queries()
    assert len(queries) > 20
    for title, expr in queries:
        check_query(expr, f"panel {title!r}")
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(r"label_values\((.+),\s*([A-Za-z_][A-Za-z0-9_]*)\)", query)
        assert match, query
        metric = check_query(match.group(1), f"variable {variable['name']}").pop()
        assert match.group(2) in exported_series()[metric] | TARGET_LABELS


def test_the_dashboard_shows_every_alerted_signal_and_the_traffic_per_route() -> None:
    shown: set[str] = set()
    for title, expr in dashboard_queries():
        shown |= check_query(expr, title)
    alerted: set[str] = set()
    for rule in alert_rules():
        alerted |= check_query(rule["expr"], rule["alert"])
    assert sorted({family(m) for m in alerted} - {family(m) for m in shown}) == []
    exprs = " ".join(expr for _, expr in dashboard_queries())
    assert "sum by (service, method, route) (rate(comptoir_http_requests_total" in exprs
    assert "sum by (service, method, route, le) (rate(comptoir_http_request_duration_seconds_bucket" in exprs


def test_the_dashboard_is_well_formed() -> None:
    data = dashboard()
    assert data["uid"]
    assert data["title"]
    variables = {v["name"] for v in data["templating"]["list"]}
    ids = [panel["id"] for panel in dashboard_panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard_panels():
        position = panel["gridPos"]
        assert 0 <= position["x"], panel["title"]
        assert position["x"] + position["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            for used in re.findall(r"\$(\w+)", target["expr"]):
                assert used.startswith("__") or used in variables, f"{panel['title']}: ${used} is not defined"


def test_the_scrape_configuration_gives_the_labels_the_rules_use() -> None:
    config = yaml.safe_load(SCRAPE_CONFIG.read_text(encoding="utf-8"))
    assert config["rule_files"] == [ALERTS.name]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "comptoir"
    assert job["metrics_path"] == "/metrics"
    relabelled = {item["target_label"] for item in job["relabel_configs"] if "target_label" in item}
    assert relabelled >= TARGET_LABELS - {"job", "instance"}
    rules = ALERTS.read_text(encoding="utf-8")
    assert 'job="comptoir"' in rules


# ---------------------------------------------------------------- promtool


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found (Debian package `prometheus`: apt-get install prometheus)")
    return promtool


def _run(*argv: str, cwd: Path) -> None:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_rules() -> None:
    _run(_promtool(), "check", "rules", ALERTS.name, cwd=PROMETHEUS)


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    _run(_promtool(), "test", "rules", ALERTS_TEST.name, cwd=PROMETHEUS)


def test_promtool_accepts_the_scrape_configuration(tmp_path: Path) -> None:
    promtool = _promtool()
    config = yaml.safe_load(SCRAPE_CONFIG.read_text(encoding="utf-8"))
    # Debian builds Prometheus without Kubernetes discovery: check everything else with static targets.
    for job in config["scrape_configs"]:
        if job.pop("kubernetes_sd_configs", None) is not None:
            job["static_configs"] = [{"targets": ["127.0.0.1:8000"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    shutil.copy(ALERTS, tmp_path / ALERTS.name)
    _run(promtool, "check", "config", "prometheus.yml", cwd=tmp_path)


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    promtool = _promtool()
    rules = [
        {"record": f"comptoir:dashboard_query:{i}", "expr": substitute_grafana_variables(expr)}
        for i, (_, expr) in enumerate(dashboard_queries())
    ]
    (tmp_path / "queries.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _run(promtool, "check", "rules", "queries.yml", cwd=tmp_path)
