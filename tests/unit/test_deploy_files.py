"""Deployment and monitoring files against the router they deploy and watch.

- config/ecs/task-definition.json: keys of the real RegisterTaskDefinition API, Fargate
  sizing, environment names from docs/contracts.md, secrets from Secrets Manager, the
  health check, stopTimeout against the drain, ports against the config the task actually
  runs;
- config/prometheus/: the scrape target, the alerts' fields, every metric name;
- config/grafana/: the dashboard's PromQL (metric names from tests/support/metric_names.py, rate()
  only over counters), datasource wiring, layout, provisioning;
- loadtests/locustfile.py: compiles without locust.

Read as files only; what runs them through promtool, a shell and locust is in
tests/system/test_deploy_files_tools.py.
"""

from __future__ import annotations

import py_compile
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from router.settings import ServerSettings, Settings, load_settings
from tests.support.contract_doc import env_contract
from tests.support.deploy_files import (
    ALERTS,
    DASHBOARD,
    LOCUSTFILE,
    PROMETHEUS,
    PROVISIONING,
    dashboard_exprs,
    dashboard_panels,
    read_alert_rules,
    read_dashboard,
    read_task_definition,
    router_container,
)
from tests.support.metric_names import (
    COUNTERS,
    EXPORTED_METRICS,
    HISTOGRAMS,
    base_name,
)
from tests.support.paths import REPO
from tests.unit.test_packaging import (
    compose_mounts,
    dockerfile_stages,
    image_file_source,
)

# --- promtool ----------------------------------------------------------------------------


def test_ci_installs_promtool() -> None:
    script = (REPO / ".ci" / "run").read_text()
    calls = [line.split()[1:] for line in script.splitlines() if line.startswith("need_debs ")]
    assert any("promtool:prometheus" in call for call in calls), "add promtool:prometheus"


# --- PromQL ------------------------------------------------------------------------------

_STRING = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|`[^`]*`")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool"})
_KEYWORDS |= {"and", "or", "unless", "offset", "atan2", "inf", "nan"}
_IDENT = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(\s*\()?")
_RATED = re.compile(r"\b(?:rate|irate|increase)\s*\(\s*([A-Za-z_:][\w:]*)")


def promql_metric_names(expr: str) -> set[str]:
    """The series names an expression selects: every identifier that is not a function,
    keyword, label name (matchers, by/without/on/...) or part of a string or duration."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery durations
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        word, call = match.group(1), match.group(2)
        if call is None and word.lower() not in _KEYWORDS:
            names.add(word)
    return names


def check_metric_names(expr: str, also_allowed: frozenset[str] = frozenset()) -> set[str]:
    """Fail unless every series `expr` selects is exported by the router (as its exposition
    spells it); return their base names."""
    names = promql_metric_names(expr)
    assert names, f"no metric in {expr!r}"
    bases = set()
    for name in names - also_allowed:
        base = base_name(name)
        assert base in EXPORTED_METRICS, f"{name!r} is not a router metric ({expr!r})"
        if base in HISTOGRAMS:
            assert name != base, f"histogram {name} has only _bucket/_sum/_count series"
        bases.add(base)
    for name in _RATED.findall(_STRING.sub('""', expr)):
        if name in also_allowed:
            continue
        assert name in COUNTERS or base_name(name) in HISTOGRAMS, (
            f"rate()/increase() of {name}, which is not a counter ({expr!r})"
        )
    if "histogram_quantile" in expr:
        assert re.search(r"\bby\s*\([^)]*\ble\b", expr), f"histogram_quantile without le: {expr}"
    return bases


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'sum by (target) (rate(router_requests_total{code=~"5.."}[5m]))',
            {"router_requests_total"},
        ),
        (
            'histogram_quantile(0.99, sum by (le) (rate(a_bucket{x="y"}[$__rate_interval])))',
            {"a_bucket"},
        ),
        ("a / on(target) group_left(code) b offset 5m > bool 1e3", {"a", "b"}),
        ('up{job="router"} == 0 and sum without (x) (c)', {"up", "c"}),
    ],
)
def test_promql_metric_names_parser(expr: str, names: set[str]) -> None:
    assert promql_metric_names(expr) == names


def test_metric_names_module() -> None:
    assert "router_requests_total" in EXPORTED_METRICS
    assert base_name("router_request_duration_seconds_bucket") == "router_request_duration_seconds"
    assert base_name("router_requests_created") == "router_requests_total"
    assert base_name("router_inflight_requests") == "router_inflight_requests"
    assert all(name.startswith("router_") for name in EXPORTED_METRICS)
    assert all(name.endswith("_total") for name in COUNTERS)


# --- Prometheus --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings(REPO / "config" / "router.yaml", env={})


@pytest.fixture(scope="module")
def alert_rules() -> list[dict[str, Any]]:
    return read_alert_rules()


def test_prometheus_scrapes_the_router_admin_port(
    settings: Settings, alert_rules: list[dict[str, Any]]
) -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert config["rule_files"] == [ALERTS.name]
    assert (PROMETHEUS.parent / ALERTS.name).is_file()
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["router"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    assert targets == [f"router:{settings.server.admin_addr[1]}"], "the compose router's admin port"
    # The alerts select this job where they name one.
    for rule in alert_rules:
        for job_name in re.findall(r'job="([^"]+)"', rule["expr"]):
            assert job_name in jobs, f"{rule['alert']} selects unknown job {job_name}"


def test_compose_mounts_the_prometheus_directory() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    prometheus = compose["prometheus"]
    assert "monitoring" in prometheus["profiles"]
    mounted = {(REPO / src).resolve(): dest for src, dest in compose_mounts(prometheus)}
    config_file = next(
        w.partition("=")[2] for w in prometheus["command"] if w.startswith("--config.file=")
    )
    # Both files are visible where Prometheus looks: the config, and the rule file beside it.
    assert mounted.get(PROMETHEUS.parent) == str(Path(config_file).parent), mounted
    assert Path(config_file).name == PROMETHEUS.name


def test_alerts_have_severity_summary_and_description(alert_rules: list[dict[str, Any]]) -> None:
    names = [rule["alert"] for rule in alert_rules if "alert" in rule]
    assert len(names) == len(set(names)), "duplicate alert names"
    for rule in alert_rules:
        name = rule.get("alert") or rule.get("record")
        if "alert" not in rule:
            continue
        assert rule.get("labels", {}).get("severity") in ("critical", "warning"), name
        annotations = rule.get("annotations", {})
        assert annotations.get("summary", "").strip(), f"{name}: no summary"
        # What to check, not just what happened: a description an SRE can act on.
        assert len(annotations.get("description", "")) >= 200, f"{name}: description too thin"


def test_alerts_use_router_metrics_and_cover_the_issue(alert_rules: list[dict[str, Any]]) -> None:
    used: set[str] = set()
    for rule in alert_rules:
        used |= check_metric_names(rule["expr"], also_allowed=frozenset({"up"}))
    exprs = {rule["alert"]: rule["expr"] for rule in alert_rules if "alert" in rule}
    assert {
        "router_requests_total",
        "router_upstream_errors_total",
        "router_request_duration_seconds",
        "router_flag_source_ready",
        "router_ratchet_refusals_total",
        "router_hold_timeouts_total",
    } <= used
    # Error ratio and p99 are per side.
    per_side = [e for e in exprs.values() if "router_requests_total" in e or "_bucket" in e]
    assert per_side and all(re.search(r"by \([^)]*\btarget\b", e) for e in per_side)
    assert any("histogram_quantile(0.99" in e for e in exprs.values())


# --- Grafana -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return read_dashboard()


def test_dashboard_queries_use_only_exported_metrics(dashboard: dict[str, Any]) -> None:
    used: set[str] = set()
    for expr in dashboard_exprs(dashboard):
        used |= check_metric_names(expr)
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        for metric in re.findall(r"label_values\(\s*([A-Za-z_:][\w:]*)\s*,", text):
            assert base_name(metric) in EXPORTED_METRICS, f"variable {variable['name']}: {metric}"
    # The issue's panels: traffic split, errors by side and code, p50/p99, in-flight, held,
    # pool connections, flag updates, route decisions by reason.
    assert {
        "router_requests_total",
        "router_upstream_errors_total",
        "router_request_duration_seconds",
        "router_inflight_requests",
        "router_held_requests",
        "router_pool_connections",
        "router_flag_updates_total",
        "router_route_decisions_total",
    } <= used
    exprs = " ".join(dashboard_exprs(dashboard))
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.99," in exprs
    assert re.search(r"by \(target, code\) \(rate\(router_requests_total", exprs)
    assert re.search(r"by \(target, reason\) \(rate\(router_route_decisions_total", exprs)


def test_dashboard_is_an_importable_model_with_a_datasource_variable(
    dashboard: dict[str, Any],
) -> None:
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    assert dashboard.get("id") is None, "an exported id would clash on import"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    inputs = {i["name"] for i in dashboard.get("__inputs", []) if i.get("type") == "datasource"}
    allowed = {f"${{{name}}}" for name in inputs}
    for name, variable in variables.items():
        if variable["type"] == "datasource":
            assert variable["query"] == "prometheus"
            allowed |= {f"${{{name}}}", f"${name}"}
    assert allowed, "no datasource variable or ${DS_...} input"
    panels = dashboard_panels(dashboard)
    for panel in panels:
        sources = [panel.get("datasource")] + [
            t.get("datasource") for t in panel.get("targets", [])
        ]
        for source in filter(None, sources):
            uid = source.get("uid") if isinstance(source, dict) else source
            assert uid in allowed, f"panel {panel.get('title')!r}: hard-wired datasource {uid!r}"
        if panel["type"] != "row":
            assert panel.get("targets"), f"panel {panel.get('title')!r} has no query"
            ref_ids = [t["refId"] for t in panel["targets"]]
            assert len(ref_ids) == len(set(ref_ids)), panel["title"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"


def test_dashboard_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in dashboard_panels(dashboard):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"{panel['title']!r} overlaps {taken[(x, y)]!r}"
                taken[(x, y)] = panel["title"]


def test_grafana_provisioning_matches_compose() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    grafana = compose["grafana"]
    assert "monitoring" in grafana["profiles"]
    mounts = {(REPO / src).resolve(): dest for src, dest in compose_mounts(grafana)}
    assert mounts.get(PROVISIONING.resolve()) == "/etc/grafana/provisioning"
    dashboard_in_container = mounts.get(DASHBOARD.resolve())
    assert dashboard_in_container, "the dashboard is not mounted"

    providers = [
        provider
        for file in sorted((PROVISIONING / "dashboards").glob("*.y*ml"))
        for provider in yaml.safe_load(file.read_text())["providers"]
    ]
    assert any(
        p["type"] == "file" and Path(dashboard_in_container).parent == Path(p["options"]["path"])
        for p in providers
    ), "no file provider loads the mounted dashboard"

    sources = [
        source
        for file in sorted((PROVISIONING / "datasources").glob("*.y*ml"))
        for source in yaml.safe_load(file.read_text())["datasources"]
    ]
    prometheus = [s for s in sources if s["type"] == "prometheus"]
    assert prometheus, "no Prometheus data source"
    url = urlsplit(prometheus[0]["url"])
    assert url.hostname in compose, f"data source host {url.hostname} is no compose service"
    published = {str(p).split(":")[-1] for p in compose[url.hostname].get("ports", [])}
    assert str(url.port) in published


# --- ECS task definition -----------------------------------------------------------------


# Members of the RegisterTaskDefinition request and its nested shapes, from the ECS API
# reference (botocore's ecs service model, 2025): a misspelt key ("healthcheck") would be
# rejected by the API, so it is rejected here first.
def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


TASK_KEYS = _words(
    "containerDefinitions cpu enableFaultInjection ephemeralStorage executionRoleArn family "
    "inferenceAccelerators ipcMode memory networkMode pidMode placementConstraints "
    "proxyConfiguration requiresCompatibilities runtimePlatform tags taskRoleArn "
    "volumes"
)
CONTAINER_KEYS = _words(
    "command cpu credentialSpecs dependsOn disableNetworking dnsSearchDomains dnsServers "
    "dockerLabels dockerSecurityOptions entryPoint environment environmentFiles essential "
    "extraHosts firelensConfiguration healthCheck hostname image interactive links "
    "linuxParameters logConfiguration memory memoryReservation mountPoints name portMappings "
    "privileged pseudoTerminal readonlyRootFilesystem repositoryCredentials "
    "resourceRequirements restartPolicy secrets startTimeout stopTimeout systemControls "
    "ulimits user versionConsistency volumesFrom workingDirectory"
)
NESTED_KEYS = {
    "portMappings": frozenset(
        {"appProtocol", "containerPort", "containerPortRange", "hostPort", "name", "protocol"}
    ),
    "environment": frozenset({"name", "value"}),
    "secrets": frozenset({"name", "valueFrom"}),
    "healthCheck": frozenset({"command", "interval", "retries", "startPeriod", "timeout"}),
    "logConfiguration": frozenset({"logDriver", "options", "secretOptions"}),
    "ulimits": frozenset({"name", "softLimit", "hardLimit"}),
    "linuxParameters": frozenset(
        {"capabilities", "devices", "initProcessEnabled", "maxSwap", "sharedMemorySize"}
        | {"swappiness", "tmpfs"}
    ),
}
# Fargate's task sizes: cpu units -> allowed memory (MiB).
FARGATE_SIZES = {
    256: {512, 1024, 2048},
    512: set(range(1024, 4097, 1024)),
    1024: set(range(2048, 8193, 1024)),
    2048: set(range(4096, 16385, 1024)),
    4096: set(range(8192, 30721, 1024)),
    8192: set(range(16384, 61441, 4096)),
    16384: set(range(32768, 122881, 8192)),
}
SENSITIVE = frozenset({"LAUNCHDARKLY_SDK_KEY", "ROUTER_ADMIN_TOKEN", "ROUTER_OVERRIDE_SECRET"})


@pytest.fixture(scope="module")
def task() -> dict[str, Any]:
    return read_task_definition()


@pytest.fixture(scope="module")
def container(task: dict[str, Any]) -> dict[str, Any]:
    return router_container(task)


def _task_env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("environment", [])}


@pytest.fixture(scope="module")
def task_settings(container: dict[str, Any]) -> Settings:
    """The settings the task runs with: the config its command names (as the image holds
    it) plus its environment, with placeholder values for the secrets."""
    final_stage = dockerfile_stages((REPO / "Dockerfile").read_text())[-1]
    command = container["command"]
    assert command[0] == "serve", "the image's ENTRYPOINT is `router`: the command is serve ..."
    config = image_file_source(final_stage, command[command.index("--config") + 1])
    env = _task_env(container)
    env.update({secret["name"]: "placeholder-secret" for secret in container["secrets"]})
    return load_settings(REPO / config, env=env)


def test_task_definition_keys_are_the_ecs_api_keys(
    task: dict[str, Any], container: dict[str, Any]
) -> None:
    assert set(task) <= TASK_KEYS, f"not RegisterTaskDefinition keys: {set(task) - TASK_KEYS}"
    assert set(container) <= CONTAINER_KEYS, f"unknown: {set(container) - CONTAINER_KEYS}"
    for key, allowed in NESTED_KEYS.items():
        value = container.get(key)
        for item in value if isinstance(value, list) else [value] if value else []:
            assert set(item) <= allowed, f"{key}: unknown keys {set(item) - allowed}"
    assert {"name", "image", "essential"} <= set(container) and container["essential"] is True


def test_task_definition_is_a_fargate_task_sized_for_its_workers(
    task: dict[str, Any], task_settings: Settings
) -> None:
    assert task["requiresCompatibilities"] == ["FARGATE"]
    assert task["networkMode"] == "awsvpc"
    assert task["executionRoleArn"].startswith("arn:aws:iam::"), "awslogs and secrets need it"
    cpu, memory = int(task["cpu"]), int(task["memory"])
    assert memory in FARGATE_SIZES[cpu], f"{cpu} cpu units cannot have {memory} MiB on Fargate"
    # One event loop per worker process: a vCPU each.
    assert task_settings.server.workers >= 2
    assert cpu >= 1024 * task_settings.server.workers
    assert memory >= 1024 * task_settings.server.workers


def test_task_definition_image_is_an_ecr_placeholder(container: dict[str, Any]) -> None:
    assert re.fullmatch(
        r"ACCOUNT\.dkr\.ecr\.REGION\.amazonaws\.com/[\w.-]+:TAG", container["image"]
    )


def test_task_environment_is_the_design_contract(container: dict[str, Any]) -> None:
    contract = env_contract()
    env = _task_env(container)
    secrets = {secret["name"]: secret["valueFrom"] for secret in container["secrets"]}
    assert len(env) == len(container["environment"]), "an environment variable is set twice"
    assert len(secrets) == len(container["secrets"]), "a secret is set twice"
    assert not set(env) & set(secrets), "set both in plain text and as a secret"
    unknown = (set(env) | set(secrets)) - contract
    assert not unknown, f"not in docs/contracts.md's environment variables: {sorted(unknown)}"
    # Every contract variable is set, except the flag file (this task uses LaunchDarkly)
    # and the previous override secret, set only during a rotation (docs/operations.md).
    missing = (
        contract
        - set(env)
        - set(secrets)
        - {"ROUTER_FLAGS_FILE", "ROUTER_OVERRIDE_SECRET_PREVIOUS"}
    )
    assert not missing, f"the task definition does not set {sorted(missing)}"
    assert env["ROUTER_FLAGS_SOURCE"] == "launchdarkly"
    assert set(secrets) >= SENSITIVE, "keys and tokens come from Secrets Manager, not plain text"
    for name, arn in secrets.items():
        assert re.fullmatch(
            r"arn:aws:secretsmanager:[\w-]+:\w+:secret:[\w/+=.@-]+(:[\w-]*:[\w-]*:[\w-]*)?", arn
        ), f"{name}: not a Secrets Manager ARN: {arn}"


def test_task_settings_are_valid_for_a_fleet(
    container: dict[str, Any], task_settings: Settings
) -> None:
    assert task_settings.flags.source == "launchdarkly"
    # Every task must refuse the same rollbacks: the ledger is shared (docs/deployment.md).
    assert urlsplit(task_settings.ledger).scheme in ("redis", "rediss")
    assert task_settings.server.debug_headers is False, "no X-Routed-To for customers"
    if container.get("readonlyRootFilesystem"):
        # `router serve` writes no file with these settings (a SQLite ledger or a flag file
        # lock would need a writable path).
        assert not task_settings.ledger.startswith("sqlite:")


def test_task_ports_match_the_config(
    container: dict[str, Any], task_settings: Settings, settings: Settings
) -> None:
    mappings = container["portMappings"]
    ports = {m["containerPort"] for m in mappings}
    expected = {task_settings.server.listen_addr[1], task_settings.server.admin_addr[1]}
    assert ports == expected
    # The same ports as config/router.yaml, the Dockerfile's EXPOSE and docker-compose.yml.
    assert expected == {settings.server.listen_addr[1], settings.server.admin_addr[1]}
    for mapping in mappings:
        assert mapping.get("hostPort", mapping["containerPort"]) == mapping["containerPort"]
        assert mapping.get("protocol", "tcp") == "tcp"


def test_task_health_check_asks_admin_readyz(
    container: dict[str, Any], task_settings: Settings
) -> None:
    check = container["healthCheck"]
    command = check["command"]
    assert command[0] == "CMD", "exec form: the image has no shell tools to rely on"
    assert command[1] == "python", "the slim image has no curl"
    url = re.search(r"http://127\.0\.0\.1:(\d+)/readyz\b", " ".join(command))
    assert url and int(url.group(1)) == task_settings.server.admin_addr[1]
    # ECS's limits, and the request's own timeout inside the check's.
    assert 5 <= check["interval"] <= 300 and 2 <= check["timeout"] <= 60
    assert 1 <= check["retries"] <= 10 and 0 <= check["startPeriod"] <= 300
    inner = re.search(r"timeout=(\d+(?:\.\d+)?)", command[-1])
    assert inner and float(inner.group(1)) < check["timeout"]
    assert check["startPeriod"] >= task_settings.flags.start_wait


def test_task_stop_timeout_outlasts_the_drain(
    container: dict[str, Any], task_settings: Settings
) -> None:
    """ECS sends SIGKILL stopTimeout seconds after SIGTERM: the router's drain (readyz 503
    for drain_delay, then up to shutdown_timeout for requests in flight) must fit."""
    stop = container["stopTimeout"]
    assert isinstance(stop, int) and stop <= 120, "Fargate allows at most 120 s"
    fields = ServerSettings.model_fields
    default = float(fields["drain_delay"].default) + float(fields["shutdown_timeout"].default)
    configured = task_settings.server.drain_delay + task_settings.server.shutdown_timeout
    # A few seconds more for closing pools and the flag client after the wait.
    assert stop >= max(default, configured) + 5


def test_task_limits_and_logs(container: dict[str, Any]) -> None:
    nofile = [u for u in container["ulimits"] if u["name"] == "nofile"]
    assert nofile, "a proxy holds two sockets per request: raise nofile"
    assert 65536 <= nofile[0]["softLimit"] <= nofile[0]["hardLimit"] <= 1048576
    logs = container["logConfiguration"]
    assert logs["logDriver"] == "awslogs"
    options = logs["options"]
    assert {"awslogs-group", "awslogs-region", "awslogs-stream-prefix"} <= set(options)
    # A slow CloudWatch must not block the router's stdout (and so its event loop).
    assert options.get("mode") == "non-blocking"
    assert container.get("readonlyRootFilesystem") is True


# --- locust ------------------------------------------------------------------------------


def test_locustfile_compiles(tmp_path: Path) -> None:
    """Without locust installed (it is in the `load` extra only)."""
    py_compile.compile(str(LOCUSTFILE), cfile=str(tmp_path / "locustfile.pyc"), doraise=True)
    source = LOCUSTFILE.read_text()
    assert "LOCUST_TENANTS" in source and "X-Tenant-Id" in source
