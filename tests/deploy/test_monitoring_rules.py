"""Alert rules and the Grafana dashboard: they parse, their PromQL is sane, and every maas_* metric
they name is defined in services/."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "deploy" / "monitoring"
REQUIRED_ALERTS = {
    "MaasHighErrorRate", "MaasPredictLatencyP99High", "MaasTritonDown", "MaasRedisDegraded",
    "MaasInferenceQueueBacklog", "MaasTrainingQueueBacklog", "MaasQuotaNearExhaustion",
    "MaasBudgetNearlySpent", "MaasBudgetSpent",
}

METRIC_DEFINITION = re.compile(r'(?:Counter|Gauge|Histogram|Summary)\(\s*"(maas_[a-z0-9_]+)"')
METRIC_NAME = re.compile(r"\b(maas_[a-z0-9_]+)")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Names PromQL itself or other exporters provide.
FUNCTIONS = {"sum", "rate", "increase", "histogram_quantile", "min", "max", "by", "avg", "up"}


def defined_metrics() -> set[str]:
    names: set[str] = set()
    for path in (REPO / "services").rglob("*.py"):
        names.update(METRIC_DEFINITION.findall(path.read_text()))
    return names


def check_expression(expr: str, defined: set[str]) -> None:
    assert expr.count("(") == expr.count(")"), f"unbalanced parentheses: {expr}"
    assert expr.count("{") == expr.count("}"), f"unbalanced braces: {expr}"
    assert expr.count('"') % 2 == 0, f"unbalanced quotes: {expr}"
    for selector in re.findall(r"\{([^}]*)\}", expr):
        for matcher in filter(None, (m.strip() for m in selector.split(","))):
            assert re.fullmatch(r'[a-z_]+\s*(=~|!~|!=|=)\s*"[^"]*"', matcher), f"bad label matcher {matcher!r} in {expr}"
    for window in re.findall(r"\[([^\]]+)\]", expr):
        assert re.fullmatch(r"\d+[smhd]", window), f"bad range {window!r} in {expr}"
    for name in METRIC_NAME.findall(expr):
        base = next((name[: -len(s)] for s in HISTOGRAM_SUFFIXES if name.endswith(s)), name)
        assert name in defined or base in defined, f"{name} is not defined anywhere in services/"


def test_alert_rules_parse_and_name_only_real_metrics(yaml: Any) -> None:
    rules = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    defined = defined_metrics()
    alerts = set()
    for group in rules["groups"]:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}
            assert rule["labels"]["severity"] in {"page", "warn", "info"}
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            if "for" in rule:
                assert re.fullmatch(r"\d+[smh]", rule["for"])
            check_expression(rule["expr"], defined)
            alerts.add(rule["alert"])
    assert REQUIRED_ALERTS <= alerts


def test_the_dashboard_queries_real_metrics() -> None:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    defined = defined_metrics()
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            check_expression(target["expr"], defined)
