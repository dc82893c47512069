"""The shipped Grafana dashboard and Prometheus alert rules name only series the daemon
exports (a renamed metric would silently blank a panel or disarm an alert)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from daemon.app import QUEUES, STAGES
from daemon.metrics import Metrics

DOCS = Path(__file__).resolve().parent.parent / "docs" / "monitoring"
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
            "gauge": ("",), "info": ("_info",)}


def exported() -> set[str]:
    names = set()
    for fam in Metrics(STAGES, QUEUES).registry.collect():
        names |= {fam.name + s for s in SUFFIXES[fam.type]}
    return names


def referenced(expr: str) -> set[str]:
    return set(re.findall(r"\bpolecheck_[a-z0-9_]+", expr))


def test_alert_rules_are_valid_and_use_exported_series():
    rules = yaml.safe_load((DOCS / "prometheus-alerts.yml").read_text())
    have = exported()
    alerts = [r for g in rules["groups"] for r in g["rules"]]
    assert len(alerts) >= 8
    names = [r["alert"] for r in alerts]
    assert len(set(names)) == len(names)
    for r in alerts:
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}, r["alert"]
        assert r["labels"]["severity"] in ("critical", "warning", "info")
        assert r["annotations"]["summary"]
        assert r["expr"].count("(") == r["expr"].count(")"), r["alert"]
        missing = referenced(r["expr"]) - have
        assert not missing, (r["alert"], missing)
    used = set().union(*(referenced(r["expr"]) for r in alerts))
    for key in ("polecheck_reasons_total", "polecheck_up", "polecheck_model_provider_fallback"):
        assert key in used  # overload / missing frames, down, GPU fallback are alerted on


def test_dashboard_is_valid_and_uses_exported_series():
    dash = json.loads((DOCS / "grafana-polecheck.json").read_text())
    have = exported()
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(dash["panels"]) >= 10 and len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for e in exprs:
        assert e.count("(") == e.count(")"), e
        missing = referenced(e) - have
        assert not missing, (e, missing)
    shown = set().union(*(referenced(e) for e in exprs))
    # the per-stage durations, queue depths, batch sizes, verdicts and reasons are on it
    for key in ("polecheck_stage_duration_seconds_bucket", "polecheck_queue_depth", "polecheck_batch_size_sum",
                "polecheck_verdicts_total", "polecheck_reasons_total", "polecheck_model_provider_info"):
        assert key in shown, key
