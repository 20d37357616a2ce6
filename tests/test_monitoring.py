"""Operations artefacts that tools check (issue 17): the Prometheus alerting rules, their
promtool unit tests and the Grafana dashboard in server/monitoring/.

promtool checks and runs the rules (skipped without it, unless
QUOTA_LEDGER_REQUIRE_PROMTOOL=1); every alert must have a unit test; and every metric a rule
or a panel reads must be one a live server exposes on /metrics (no promtool needed).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from quota_ledger.v1 import quota_ledger_pb2_grpc

from ledger import calendar as cal

from .conftest import ROOT, T0, ServerProcess, make_account

MONITORING = ROOT / "server" / "monitoring"
ALERTS = MONITORING / "alerts.yml"
ALERTS_TEST = MONITORING / "alerts_test.yml"
DASHBOARD = MONITORING / "dashboard.json"
PROMTOOL_TIMEOUT_S = 120.0
SCRAPE_TIMEOUT_S = 10.0
CALL_TIMEOUT_S = 10.0
PROMETHEUS_OWN = frozenset({"up"})  # series Prometheus makes itself, not the ledger
SEVERITIES = frozenset({"critical", "warning"})
# What the rules read, exactly: a metric added to or dropped from alerts.yml is noticed here
# (and guards the name extraction below against silently finding nothing).
RULE_METRICS = frozenset({
    "up", "ledger_ready", "ledger_commit_latency_seconds_bucket", "ledger_writer_queue_depth",
    "ledger_writer_queue_limit", "ledger_rpc_requests_total",
    "ledger_last_settled_day_end_timestamp_seconds", "ledger_notice_oldest_pending_age_seconds"})


# ------------------------------------------------------------------ reading the artefacts

def _alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # a collapsed row holds its panels


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in _panels(_dashboard()["panels"])
            for target in panel.get("targets", []) if target.get("expr")]


# PromQL words that look like metric names but are not: keywords and modifiers (functions and
# aggregations are followed by "(" and left out by that alone; they are listed for safety).
PROMQL_WORDS = frozenset({
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "atmodifier", "inf", "nan",
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "rate", "irate", "increase", "delta", "idelta", "deriv",
    "histogram_quantile", "time", "vector", "scalar", "absent", "absent_over_time",
    "avg_over_time", "max_over_time", "min_over_time", "sum_over_time", "count_over_time",
    "quantile_over_time", "last_over_time", "changes", "resets", "clamp", "clamp_min",
    "clamp_max", "abs", "ceil", "floor", "round", "sort", "sort_desc", "label_replace",
    "label_join", "timestamp", "predict_linear", "holt_winters", "sgn", "exp", "ln", "log2",
    "log10", "sqrt"})
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(?![\w:]|\s*\()")


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: label matchers ({...}), ranges ([5m]),
    strings, grouping label lists (by (...), on (...)) and Grafana variables ($x) set aside,
    then every identifier that is not called (no "(" after it) and is not a PromQL word."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    return {m for m in _IDENTIFIER.findall(text) if m.lower() not in PROMQL_WORDS}


def label_values(exprs: list[str], label: str) -> set[str]:
    """The values a label is matched against (=, !=, =~, !~) in these expressions."""
    found = set()
    for expr in exprs:
        for block in re.findall(r"\{([^{}]*)\}", expr):
            found.update(re.findall(rf'\b{label}\s*!?[=~]~?\s*"([^"]*)"', block))
    return found


def test_promql_metric_names_finds_metrics_and_nothing_else():
    expr = ('histogram_quantile(0.99, sum by (job, instance, le) (rate(a_bucket{job="x",'
            ' le=~"0.1|+Inf", method!="Consume"}[5m] offset 1h))) > 0.1 and on (job)'
            ' b_total / ignoring(code) group_left c{code="RESOURCE_EXHAUSTED"} or time()'
            ' - max(d:recorded[$__rate_interval]) * 1e3 unless vector(1) > bool 2'
            ' or up{instance=~"$instance"} or sum(e) without (method)')
    assert promql_metric_names(expr) == {"a_bucket", "b_total", "c", "d:recorded", "up", "e"}
    assert label_values([expr], "code") == {"RESOURCE_EXHAUSTED"}
    assert label_values([expr], "method") == {"Consume"}


# ------------------------------------------------------------------ promtool

def _promtool(*args: str) -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        why = "promtool not found (Debian: apt-get install prometheus)"
        if os.environ.get("QUOTA_LEDGER_REQUIRE_PROMTOOL") == "1":
            pytest.fail(f"QUOTA_LEDGER_REQUIRE_PROMTOOL=1 but {why}", pytrace=False)
        pytest.skip(why)
    done = subprocess.run([promtool, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=PROMTOOL_TIMEOUT_S)
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}{done.stderr}"
    return done.stdout + done.stderr


def test_promtool_check_rules_accepts_the_alerts():
    out = _promtool("check", "rules", str(ALERTS.relative_to(ROOT)))
    assert f"SUCCESS: {len(_alert_rules())} rules found" in out


def test_promtool_unit_tests_of_the_alerts_pass():
    out = _promtool("test", "rules", str(ALERTS_TEST.relative_to(ROOT)))
    assert "SUCCESS" in out and "FAILED" not in out


# ------------------------------------------------------------------ the files themselves

def test_every_alert_is_well_formed_and_unit_tested_firing():
    """One group, quota-ledger; each alert has a severity, a summary, a description and a
    for:, and at least one promtool case that expects it to fire (a case that names an
    alert that does not exist would pass vacuously: refused too)."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    assert [g["name"] for g in groups] == ["quota-ledger"]
    rules = _alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "alert names are unique"
    for rule in rules:
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), rule["alert"]

    unit = yaml.safe_load(ALERTS_TEST.read_text())
    assert unit["rule_files"] == [ALERTS.name]
    cases = [case for test in unit["tests"] for case in test.get("alert_rule_test", [])]
    tested = {case["alertname"] for case in cases}
    firing = {case["alertname"] for case in cases if case.get("exp_alerts")}
    assert set(names) - tested == set(), "alerts without a unit test"
    assert set(names) - firing == set(), "alerts never tested firing"
    assert tested - set(names) == set(), "unit tests of alerts that do not exist"


def test_dashboard_takes_its_datasource_as_an_input():
    dash = _dashboard()
    assert 36 <= dash["schemaVersion"] <= 41
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    assert dash["__inputs"][0]["pluginId"] == "prometheus"
    panels = [p for p in _panels(dash["panels"]) if p["type"] != "row"]
    assert len({p["id"] for p in _panels(dash["panels"])}) == len(list(_panels(dash["panels"])))
    for panel in panels:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]


# ------------------------------------------------------------------ against a live server

def _scrape(port: int) -> list[Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                timeout=SCRAPE_TIMEOUT_S) as reply:
        return list(text_string_to_metric_families(reply.read().decode()))


def _exercise(server: ServerProcess, client: Any) -> None:
    """A little of everything, so that labelled series appear: unary calls (one refused),
    a batch, a stream, a settled day."""
    make_account(client, "acme", cash_micros=100_000_000)
    client.purchase_plan("acme", "month-100k")
    client.consume("acme")
    client.consume("acme", region="outside")
    client.consume_batch([client.consume_request("acme") for _ in range(5)])
    with grpc.insecure_channel(server.target) as channel:
        stub = quota_ledger_pb2_grpc.QuotaLedgerStub(channel)
        results = list(stub.ConsumeStream(iter([client.consume_request("acme")]),
                                          timeout=CALL_TIMEOUT_S))
    assert len(results) == 1
    with pytest.raises(Exception, match="no account"):
        client.get_account("nobody")  # NOT_FOUND: a code other than OK
    client.advance_time(86_400)  # the first day ends: settled


def test_every_metric_in_the_rules_and_the_dashboard_is_served(server, client):
    """Each metric name a rule expression or a dashboard query reads (histograms as
    NAME_bucket/_sum/_count, counters as NAME_total) is a series on a live server's
    /metrics, after a little traffic; label values the rules match (code, method) are ones
    the server uses."""
    _exercise(server, client)
    families = _scrape(server.metrics_port)
    served = {sample.name for family in families for sample in family.samples}

    rule_exprs = [str(rule["expr"]) for rule in _alert_rules()]
    rule_names = set().union(*map(promql_metric_names, rule_exprs))
    assert rule_names == RULE_METRICS
    panel_exprs = _dashboard_exprs()
    panel_names = set().union(*map(promql_metric_names, panel_exprs))
    variables = [v["query"]["query"] for v in _dashboard()["templating"]["list"]
                 if v["type"] == "query"]
    variable_names = {m.group(1) for q in variables
                      for m in [re.match(r"label_values\(\s*([A-Za-z_:][\w:]*)", q)] if m}
    assert len(variable_names) == 1 and len(panel_names) >= 10
    for where, names in (("alerts.yml", rule_names), ("dashboard.json", panel_names),
                         ("dashboard.json variables", variable_names)):
        missing = sorted(names - served - PROMETHEUS_OWN)
        assert not missing, f"{where} reads metrics the server does not expose: {missing}"

    rpc_samples = [s for f in families for s in f.samples
                   if s.name == "ledger_rpc_requests_total"]
    methods = {s.labels["method"] for s in rpc_samples}
    assert {"Consume", "ConsumeBatch", "ConsumeStream.item", "GetAccount"} <= methods
    used_methods = label_values(rule_exprs + panel_exprs, "method")
    assert used_methods and used_methods <= methods
    codes = {c.name for c in grpc.StatusCode} | {"ERROR"}  # ERROR: a stream item's failure
    assert {"OK", "NOT_FOUND"} <= {s.labels["code"] for s in rpc_samples}
    assert label_values(rule_exprs, "code") == {"RESOURCE_EXHAUSTED", "UNAVAILABLE"} <= codes


def _gauge(families: list[Any], name: str) -> float:
    [sample] = [s for f in families for s in f.samples if s.name == name]
    return sample.value


def test_the_metrics_added_for_the_alerts_read_right(tmp_path, db):
    """ledger_ready is 1 once serving; ledger_writer_queue_limit is queue_depth_max; the last
    settled day's end is NaN on an empty ledger, then the start of its first billing day
    (UTC+08:00), then that day's end once it is settled."""
    srv = ServerProcess(tmp_path, extra=["--queue-depth-max", "1234"], db=db).start()
    try:
        families = _scrape(srv.metrics_port)
        assert _gauge(families, "ledger_ready") == 1
        assert _gauge(families, "ledger_writer_queue_limit") == 1234
        assert math.isnan(_gauge(families, "ledger_last_settled_day_end_timestamp_seconds"))
        with srv.client() as c:
            c.set_time(T0)
            make_account(c)
            day = cal.billing_day(cal.from_datetime(T0))
            last_settled = "ledger_last_settled_day_end_timestamp_seconds"
            assert _gauge(_scrape(srv.metrics_port), last_settled) == \
                cal.day_start(day) / cal.US_PER_SECOND
            c.advance_time(86_400)
            assert _gauge(_scrape(srv.metrics_port), last_settled) == \
                cal.day_end(day) / cal.US_PER_SECOND
    finally:
        srv.stop()


def _item_counts(port: int) -> dict[str, float]:
    """ledger_rpc_requests_total of ConsumeStream.item, by code; and whether the latency
    histogram has any series of it (it must not: items are not timed one by one)."""
    counts: dict[str, float] = {}
    timed = False
    for family in _scrape(port):
        for s in family.samples:
            if s.labels.get("method") != "ConsumeStream.item":
                continue
            if s.name == "ledger_rpc_requests_total":
                counts[s.labels["code"]] = s.value
            timed = timed or s.name.startswith("ledger_rpc_latency_seconds")
    counts["timed"] = float(timed)
    return counts


def test_stream_items_are_counted_each_once_by_outcome(server, client):
    """A stream of five items, two of them refused (an unknown account), adds 3 to its
    OK count and 2 to its ERROR count, and times none of them."""
    make_account(client, "streamer", cash_micros=100_000_000)
    before = _item_counts(server.metrics_port)
    accounts = ("streamer", "nobody", "streamer", "nobody", "streamer")
    items = [client.consume_request(a) for a in accounts]
    with grpc.insecure_channel(server.target) as channel:
        stub = quota_ledger_pb2_grpc.QuotaLedgerStub(channel)
        results = list(stub.ConsumeStream(iter(items), timeout=CALL_TIMEOUT_S))
    assert [r.HasField("error") for r in results] == [False, True, False, True, False]
    after = _item_counts(server.metrics_port)
    assert after.get("OK", 0) - before.get("OK", 0) == 3
    assert after.get("ERROR", 0) - before.get("ERROR", 0) == 2
    assert after["timed"] == 0.0
