"""The deployment and monitoring files (config/ecs, config/prometheus, config/grafana,
loadtests/locustfile.py) as the tests read them: tests/unit/test_deploy_files.py checks
them as files, tests/system/test_deploy_files_tools.py runs them through their tools."""

from __future__ import annotations

import json
from typing import Any

import yaml

from tests.support.paths import REPO

TASK_DEFINITION = REPO / "config" / "ecs" / "task-definition.json"
PROMETHEUS = REPO / "config" / "prometheus" / "prometheus.yml"
ALERTS = REPO / "config" / "prometheus" / "alerts.yml"
ALERTS_TEST = REPO / "config" / "prometheus" / "alerts_test.yml"
DASHBOARD = REPO / "config" / "grafana" / "router-dashboard.json"
PROVISIONING = REPO / "config" / "grafana" / "provisioning"
LOCUSTFILE = REPO / "loadtests" / "locustfile.py"


def read_alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    rules = [rule for group in data["groups"] for rule in group["rules"]]
    assert rules
    return rules


def read_dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # a collapsed row keeps its panels inside
    return out


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [
        target["expr"]
        for panel in dashboard_panels(dashboard)
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def read_task_definition() -> dict[str, Any]:
    data = json.loads(TASK_DEFINITION.read_text())
    assert isinstance(data, dict)
    return data


def router_container(task: dict[str, Any]) -> dict[str, Any]:
    routers = [c for c in task["containerDefinitions"] if c["name"] == "router"]
    assert len(routers) == 1, "expected one container named router"
    return routers[0]  # type: ignore[no-any-return]
