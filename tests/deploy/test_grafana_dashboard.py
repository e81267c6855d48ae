"""The Grafana provisioning and dashboard agree with each other and with what /metrics exposes: every metric a
panel queries exists, every panel reads the provisioned data source, every engine query follows `$model`."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "attnserve.json"
# where docker-compose mounts deploy/grafana/dashboards inside the Grafana container
DASHBOARDS_MOUNT = "/var/lib/grafana/dashboards"
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
            "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers left once strings, label matchers, ranges and
    grouping clauses are removed, that are neither keywords nor function calls."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*", s):
        if m.group().lower() in KEYWORDS or s[m.end():].lstrip().startswith("("):
            continue
        names.add(m.group())
    return names


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in dashboard["panels"]:
        yield p
        yield from p.get("panels", [])  # a collapsed row holds its panels


def exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]


def variable_queries(dashboard: dict[str, Any]) -> list[str]:
    """label_values(metric, label) of each query variable, as the metric selector it reads."""
    out = []
    for v in dashboard["templating"]["list"]:
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"label_values\((.+),\s*\w+\)", q.strip())
        assert m, f"variable {v['name']}: unexpected query {q}"
        out.append(m.group(1))
    return out


def test_provisioning_matches_the_compose_mounts_and_the_dashboard() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert (source["type"], source["url"], source["isDefault"]) == ("prometheus", "http://prometheus:9090", True)
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "dashboards.yml").read_text())["providers"]
    assert [p["options"]["path"] for p in providers] == [DASHBOARDS_MOUNT]
    assert providers[0]["type"] == "file"

    dash = load_dashboard()
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels(dash):
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["targets"], f"panel {p['title']} has no query"
        for t in [p, *p["targets"]]:
            assert t["datasource"] == {"type": "prometheus", "uid": source["uid"]}, p["title"]
    (var,) = dash["templating"]["list"]
    assert var["name"] == "model" and var["multi"] and var["includeAll"]
    assert var["datasource"]["uid"] == source["uid"]


def test_every_engine_query_follows_the_model_variable() -> None:
    for expr in exprs(load_dashboard()):
        if "attnserve_build_info" in expr:
            continue  # one per process, no model
        assert re.search(r'model=~"\$model\|?"', expr), expr


def test_dashboard_covers_the_serving_signals() -> None:
    used = set().union(*map(metric_names, exprs(load_dashboard())))
    for name in ("attnserve_generation_tokens_total", "attnserve_time_to_first_token_seconds_bucket",
                 "attnserve_inter_token_latency_seconds_bucket", "attnserve_e2e_request_latency_seconds_bucket",
                 "attnserve_requests_waiting", "attnserve_requests_running", "attnserve_kv_cache_usage_ratio",
                 "attnserve_batch_size_sum", "attnserve_requests_finished_total", "attnserve_requests_rejected_total",
                 "attnserve_http_requests_total", "attnserve_prefix_cache_hits_total",
                 "attnserve_prefix_cache_queries_total", "attnserve_kv_blocks_shared"):
        assert name in used, f"no panel shows {name}"
    quantile_panels = [e for e in exprs(load_dashboard()) if e.startswith("histogram_quantile(")]
    assert any("time_to_first_token" in e for e in quantile_panels)
    assert any("inter_token_latency" in e for e in quantile_panels)


@pytest.fixture
def exposed(make_server: Callable[..., Any]) -> set[str]:
    """Every sample name a fresh server exposes after one HTTP request (engine series exist from the start; HTTP
    series appear with the first request of their route and status)."""
    server = make_server()
    assert httpx.get(f"{server.url}/v1/models").status_code == 200
    text = httpx.get(f"{server.url}/metrics").text
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_every_metric_the_dashboard_uses_is_exposed(exposed: set[str]) -> None:
    dash = load_dashboard()
    used = set().union(*map(metric_names, exprs(dash) + variable_queries(dash)))
    assert used, "no metric names found in the dashboard"
    missing = sorted(used - exposed)
    assert not missing, f"the dashboard queries metrics /metrics does not expose: {missing}"
