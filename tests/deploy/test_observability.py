"""Dashboards, alert rules and the metrics reference agree with each other and with the
metrics contract; every dashboard query is valid PromQL."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import DASHBOARDS, ROOT, promtool

# The metrics contract: what the Rust side exports (docs/metrics.md is its reference).
CONTRACT = {
    "tenantsync_sync_lag_seconds": ("gauge", {"tenant", "table"}),
    "tenantsync_sync_backlog_rows": ("gauge", {"tenant", "table"}),
    "tenantsync_sync_rows_total": ("counter", {"tenant", "table"}),
    "tenantsync_sync_slices_total": ("counter", {"outcome"}),
    "tenantsync_bigquery_insert_requests_total": ("counter", {"outcome", "method"}),
    "tenantsync_bigquery_insert_duration_seconds": ("histogram", {"method"}),
    "tenantsync_control_batch_tasks": ("histogram", set()),
    "tenantsync_ratelimit_wait_seconds_total": ("counter", {"tenant"}),
    "tenantsync_lease_acquired_total": ("counter", set()),
    "tenantsync_lease_lost_total": ("counter", set()),
    "tenantsync_lease_expired_total": ("counter", set()),
    "tenantsync_queue_depth": ("gauge", {"shard"}),
    "tenantsync_workers_live": ("gauge", set()),
    "tenantsync_coordinator_is_leader": ("gauge", set()),
    "tenantsync_dlq_rows": ("gauge", {"tenant", "table"}),
    "tenantsync_tenants": ("gauge", {"status"}),
    "tenantsync_tenant_credentials_invalid": ("gauge", {"tenant"}),
    "tenantsync_coordinator_tick_failures_total": ("counter", set()),
    "tenantsync_coordinator_scan_failures_total": ("counter", {"table"}),
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Grafana variables a query may use. The e2e run substitutes them; nothing else may appear.
ALLOWED_VARIABLES = {"tenant", "__rate_interval"}
DASHBOARD_FILES = ("fleet-overview.json", "tenant-drilldown.json")
ALERTS = {"TenantLagHigh", "TenantCredentialsInvalid", "NoLiveWorkers", "DeadLettersGrowing",
          "NoCoordinatorLeading", "CoordinatorTicksFailing", "ChangeDetectionFailing"}

METRIC_RE = re.compile(r"\btenantsync_[a-z_]+\b")


def base_metric(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        stem = name[: -len(suffix)]
        if name.endswith(suffix) and CONTRACT.get(stem, ("",))[0] == "histogram":
            return stem
    return name


def load_dashboard(name: str) -> dict[str, Any]:
    return json.loads((DASHBOARDS / name).read_text())


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out += panel.get("panels", [])  # collapsed rows keep their panels inside
    return [p for p in out if p["type"] != "row"]


def all_exprs() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) for every target of every panel."""
    found = []
    for name in DASHBOARD_FILES:
        for panel in panels(load_dashboard(name)):
            for target in panel["targets"]:
                found.append((name, panel["title"], target["expr"]))
    return found


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((DASHBOARDS / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


# ------------------------------------------------------------------ the reference


def test_metrics_reference_lists_exactly_the_contract():
    text = (ROOT / "docs" / "metrics.md").read_text()
    reference = text.split("\n## Reference\n", 1)[1].split("\n## ", 1)[0]
    reference = reference.replace("\\|", "/")  # escaped pipes inside cells
    documented = {}
    for name, kind, labels in re.findall(
        r"^\| `(tenantsync_[a-z_]+)` \| (\w+) \| ([^|]*) \|", reference, re.M
    ):
        # each comma-separated item starts with the label's name: `outcome` = `ok` / …
        names = {m.group(1) for part in labels.split(",") if (m := re.match(r"\s*`(\w+)`", part))}
        documented[name] = (kind, names)
    assert documented == CONTRACT


# ------------------------------------------------------------------ dashboards


@pytest.mark.parametrize("name", DASHBOARD_FILES)
def test_dashboard_is_valid_grafana_json(name):
    d = load_dashboard(name)
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    ps = panels(d)
    assert len(ps) >= 6
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in ps:
        assert p["targets"], f"panel {p['title']!r} has no targets"
        assert p["datasource"]["type"] == "prometheus"
        for t in p["targets"]:
            assert t["expr"].strip(), f"panel {p['title']!r} has an empty expr"
            assert t["datasource"]["type"] == "prometheus"
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24


def test_dashboard_uids_are_distinct_and_linked():
    fleet, tenant = (load_dashboard(n) for n in DASHBOARD_FILES)
    assert fleet["uid"] != tenant["uid"]
    assert any(tenant["uid"] in link["url"] for link in fleet["links"])
    assert any(fleet["uid"] in link["url"] for link in tenant["links"])


def test_queries_use_only_contract_metrics():
    used = set()
    for name, title, expr in all_exprs():
        for metric in METRIC_RE.findall(expr):
            assert base_metric(metric) in CONTRACT, f"{name} / {title}: unknown metric {metric}"
            used.add(base_metric(metric))
    # and every exported metric is on a dashboard somewhere
    assert used == set(CONTRACT)


def test_queries_use_no_grafana_macros_but_tenant():
    for name, title, expr in all_exprs():
        variables = set(re.findall(r"\$\{?(\w+)", expr))
        assert variables <= ALLOWED_VARIABLES, f"{name} / {title}: {variables}"
        if name != "tenant-drilldown.json":
            assert "tenant" not in variables, f"{title}: $tenant outside the drill-down"


def test_fleet_overview_panels():
    exprs = {e for n, _, e in all_exprs() if n == "fleet-overview.json"}
    joined = "\n".join(exprs)
    assert any(e.startswith("topk(") and "tenantsync_sync_lag_seconds" in e for e in exprs)
    assert "rate(tenantsync_sync_rows_total[5m])" in joined
    assert any("by (method, outcome)" in e and "tenantsync_bigquery_insert_requests_total" in e
               for e in exprs)
    for metric in ("tenantsync_workers_live", "tenantsync_queue_depth",
                   "tenantsync_coordinator_is_leader", "tenantsync_tenants", "tenantsync_dlq_rows"):
        assert metric in joined


def test_tenant_drilldown_is_scoped_by_the_tenant_variable():
    d = load_dashboard("tenant-drilldown.json")
    [var] = [v for v in d["templating"]["list"] if v["name"] == "tenant"]
    assert var["type"] == "query"
    assert var["query"]["query"] == "label_values(tenantsync_sync_lag_seconds, tenant)"
    assert var["definition"] == "label_values(tenantsync_sync_lag_seconds, tenant)"
    exprs = [e for n, _, e in all_exprs() if n == "tenant-drilldown.json"]
    for expr in exprs:
        for selector in re.findall(r"tenantsync_\w+(\{[^}]*\})?", expr):
            assert selector == '{tenant="$tenant"}', expr
    joined = "\n".join(exprs)
    for metric in ("tenantsync_sync_lag_seconds", "tenantsync_sync_backlog_rows",
                   "tenantsync_sync_rows_total", "tenantsync_ratelimit_wait_seconds_total",
                   "tenantsync_dlq_rows"):
        assert metric in joined


def test_dashboard_queries_parse_as_promql(tmp_path: Path):
    """promtool parses every expr: they become recording rules of a throwaway rules file."""
    tool = promtool()
    if tool is None:
        pytest.skip("promtool not installed (scripts/check-deploy installs it)")
    rules = []
    for i, (_, _, expr) in enumerate(all_exprs()):
        concrete = expr.replace("$tenant", "acme").replace("$__rate_interval", "5m")
        rules.append({"record": f"tenantsync:dashboard_query:{i}", "expr": concrete})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run([tool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_grafana_provisioning():
    prov = DASHBOARDS / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "tenantsync-prometheus.yaml").read_text())
    [source] = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"]
    dash = yaml.safe_load((prov / "dashboards" / "tenantsync.yaml").read_text())
    [provider] = dash["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
    # dashboards reach the datasource through a variable, so any Prometheus datasource works
    for name in DASHBOARD_FILES:
        variables = {v["name"]: v for v in load_dashboard(name)["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"


# ------------------------------------------------------------------ alerts


def test_alert_rules_cover_the_agreed_alerts():
    rules = alert_rules()
    assert {r["alert"] for r in rules} == ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        for metric in METRIC_RE.findall(rule["expr"]):
            assert metric in CONTRACT, f"{rule['alert']}: unknown metric {metric}"
    by_name = {r["alert"]: r for r in rules}
    assert "> 900" in by_name["TenantLagHigh"]["expr"]
    assert by_name["TenantLagHigh"]["for"] == "10m"
    assert by_name["NoLiveWorkers"]["for"] == "5m"
    assert by_name["NoCoordinatorLeading"]["for"] == "2m"
    for name in ("NoLiveWorkers", "NoCoordinatorLeading"):
        assert "absent(" in by_name[name]["expr"]


def test_alert_tests_make_each_alert_fire_and_stay_silent():
    doc = yaml.safe_load((DASHBOARDS / "alerts_test.yml").read_text())
    fired, silent = set(), set()
    for case in doc["tests"]:
        for check in case["alert_rule_test"]:
            (fired if check["exp_alerts"] else silent).add(check["alertname"])
    assert fired == ALERTS
    assert silent == ALERTS


def test_promtool_checks_and_tests_the_rules():
    tool = promtool()
    if tool is None:
        pytest.skip("promtool not installed (scripts/check-deploy installs it)")
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        result = subprocess.run([tool, *args], cwd=DASHBOARDS, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
