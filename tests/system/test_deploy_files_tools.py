"""Deployment and monitoring files run through the tools that read them: promtool (`check
config`, `check rules`, `test rules` on alerts_test.yml, the dashboard's PromQL), the task
definition's health-check command against a local server, and the locustfile against demo
backends through the router (when locust is installed). The files' static checks are in
tests/unit/test_deploy_files.py.

promtool comes from the Debian package `prometheus` (.ci/run installs it). Without it these
tests skip locally and fail when CI=true: CI must not go green by skipping them.
"""

from __future__ import annotations

import csv
import http.server
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.control.flagfile import set_tenants
from tests.support.deploy_files import (
    ALERTS,
    ALERTS_TEST,
    LOCUSTFILE,
    PROMETHEUS,
    dashboard_exprs,
    read_alert_rules,
    read_dashboard,
    read_task_definition,
    router_container,
)
from tests.support.paths import REPO
from tests.support.procs import Procs, child_env, write_config


def promtool() -> str:
    path = shutil.which("promtool")
    if path is not None:
        return path
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
        pytest.fail(
            "promtool is not installed: .ci/run installs it (need_debs promtool:prometheus)"
        )
    pytest.skip("promtool is not installed (apt-get install prometheus); with CI=true this fails")


def run_promtool(*args: str, cwd: Path = REPO) -> str:
    result = subprocess.run(
        [promtool(), *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


@pytest.fixture(scope="module")
def alert_rules() -> list[dict[str, Any]]:
    return read_alert_rules()


def test_promtool_checks_the_prometheus_config() -> None:
    output = run_promtool("check", "config", str(PROMETHEUS.relative_to(REPO)))
    assert re.search(r"\b1 rule files? found", output), output  # the rule file was checked too


def test_promtool_checks_the_alert_rules() -> None:
    run_promtool("check", "rules", str(ALERTS.relative_to(REPO)))


def test_promtool_alert_unit_tests_pass(alert_rules: list[dict[str, Any]]) -> None:
    """alerts_test.yml passes, and proves that every alert fires on its synthetic series
    (promtool happily passes a file with no tests)."""
    run_promtool("test", "rules", ALERTS_TEST.name, cwd=ALERTS_TEST.parent)
    data = yaml.safe_load(ALERTS_TEST.read_text())
    assert data["rule_files"] == [ALERTS.name]
    fired = {
        case["alertname"]
        for test in data["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert {"RouterSideErrorRatioHigh", "RouterFlagSourceNotReady"} <= fired
    untested = {rule["alert"] for rule in alert_rules if "alert" in rule} - fired
    assert not untested, f"alerts without a firing case in {ALERTS_TEST.name}: {untested}"


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return read_dashboard()


def test_dashboard_queries_parse_as_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """Each query, with Grafana's variables filled in, as a recording rule: promtool parses
    it (a typo in a bracket or a function name fails here, not in front of an SRE)."""
    rules = []
    for i, expr in enumerate(dashboard_exprs(dashboard)):
        filled = (
            expr.replace("$__rate_interval", "1m")
            .replace("$__interval", "1m")
            .replace("$__range", "1h")
        )
        filled = re.sub(r"\$\{?\w+\}?", ".*", filled)
        rules.append({"record": f"dashboard:query_{i}", "expr": filled})
    rule_file = tmp_path / "dashboard-queries.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_promtool("check", "rules", str(rule_file))


@pytest.fixture(scope="module")
def task() -> dict[str, Any]:
    return read_task_definition()


@pytest.fixture(scope="module")
def container(task: dict[str, Any]) -> dict[str, Any]:
    return router_container(task)


class _Readyz(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = type(self).status if self.path == "/readyz" else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def readyz_server() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Readyz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_task_health_check_command_exits_1_unless_ready(
    container: dict[str, Any], readyz_server: http.server.ThreadingHTTPServer
) -> None:
    """The exact command (its port moved to a local test server): 200 is healthy; 503, and
    nothing listening, are not. A proxy variable in the task's environment is ignored."""
    args = container["healthCheck"]["command"][2:]
    port = readyz_server.server_address[1]
    argv = [sys.executable, *(re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{port}", a) for a in args)]
    env = child_env({"http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"})

    def run() -> int:
        return subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode

    _Readyz.status = 200
    assert run() == 0
    _Readyz.status = 503
    assert run() != 0
    readyz_server.shutdown()
    readyz_server.server_close()
    assert run() != 0


@pytest.fixture(scope="module")
def demo_backends() -> Iterator[tuple[Any, Any]]:
    with Procs() as procs:
        yield procs.backend("legacy"), procs.backend("new")


def _run_locust(port: int, cwd: Path, tenants: int) -> tuple[int, dict[str, int]]:
    """Run the locustfile headless for a few seconds; (exit status, final totals)."""
    result = subprocess.run(
        [
            *(sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless"),
            *("-u", "4", "-r", "4", "-t", "3s", "--host", f"http://127.0.0.1:{port}"),
            *("--csv", str(cwd / "run"), "--only-summary", "--loglevel", "WARNING"),
        ],
        env=child_env({"LOCUST_TENANTS": str(tenants)}),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    with (cwd / "run_stats.csv").open() as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    total = rows["Aggregated"]
    return result.returncode, {
        "requests": int(total["Request Count"]),
        "failures": int(total["Failure Count"]),
    }


@pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="locust not installed")
def test_locustfile_rotates_tenants_and_passes_through_the_router(
    demo_backends: tuple[Any, Any], tmp_path: Path
) -> None:
    legacy, new = demo_backends
    flags = tmp_path / "flags.json"
    set_tenants(flags, ["tenant-0001", "tenant-0003"], "new", create=True)
    with Procs() as procs:
        router = procs.router(write_config(tmp_path / "router.yaml", legacy, new, flags))
        status, totals = _run_locust(router.port, tmp_path, tenants=8)
        metrics = router.admin("/metrics").body.decode()
    assert status == 0 and totals["requests"] > 0 and totals["failures"] == 0, totals
    # Only tenant-0001 and tenant-0003 are on new: both sides answered, so the users did
    # spread their requests over the tenants (Zipf: tenant-0000 is the busiest).
    answered: dict[str, float] = {}
    for labels, value in re.findall(r"^router_requests_total\{([^}]*)\} (\S+)$", metrics, re.M):
        target = re.search(r'target="(\w+)"', labels)
        if target:
            answered[target.group(1)] = answered.get(target.group(1), 0) + float(value)
    assert answered.get("legacy", 0) > 0 and answered.get("new", 0) > 0, answered


@pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="locust not installed")
def test_locustfile_fails_requests_answered_by_the_wrong_side(
    demo_backends: tuple[Any, Any], tmp_path: Path
) -> None:
    """A router whose `legacy` upstream is in fact the new backend: every answer says
    X-Routed-To: legacy and X-Backend-Side: new, and the load test must count failures."""
    _, new = demo_backends
    flags = tmp_path / "flags.json"
    set_tenants(flags, ["nobody"], "new", create=True)
    with Procs() as procs:
        router = procs.router(write_config(tmp_path / "router.yaml", new, new, flags))
        status, totals = _run_locust(router.port, tmp_path, tenants=4)
    assert status != 0 and totals["requests"] > 0
    assert totals["failures"] == totals["requests"], totals
