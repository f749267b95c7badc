"""The command line as an operator uses it: real processes, exit statuses, stdout/stderr.

Exit statuses are a contract (router/cli/main.py): 0 ok, 1 the command failed, 2 bad
configuration or usage. A bad configuration must stop `serve` before it binds anything,
with a message that names the key and the problem.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import router
from router.cli import main as cli_main
from router.control.flagfile import new_flag, read_flag_file, set_tenants, tenant_variation
from router.service.native import build_state
from tests.support.paths import REPO
from tests.support.procs import ROUTER_SCRIPT, Procs, child_env, run_router

CONFIG = REPO / "config" / "router.yaml"


def config_tree(flag_file: Path | str = "flags.json") -> dict[str, Any]:
    return {
        "server": {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "drain_delay": 0},
        "flags": {"file": str(flag_file), "poll_interval": 0.1, "start_wait": 1.0},
        "upstreams": {
            "legacy": {"url": "http://legacy.internal:9001"},
            "new": {"url": "https://new.example.com", "host_header": "upstream"},
        },
        # Never the default (router-ledger.db in the working directory: the repo).
        "ledger": f"sqlite:///{Path(tempfile.mkdtemp(prefix='router-cli-')) / 'ledger.db'}",
    }


def config_ledger(config: Path) -> str:
    url: str = yaml.safe_load(config.read_text())["ledger"]
    return url


@pytest.fixture
def config(tmp_path: Path, flag_file: Path) -> Path:
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(config_tree()))  # flags.json, relative to the config
    return path


# ---- bad configuration: exit 2, for serve and check-config --------------------------

BAD_CONFIGS = {
    "shadow-rate-over-1": (
        lambda t: t.update(shadow={"tenants": {"acme": 1.5}}),
        "shadow.tenants.acme",
        "less than or equal to 1",
    ),
    "ftp-upstream": (
        lambda t: t["upstreams"]["legacy"].update(url="ftp://x"),
        "upstreams.legacy.url",
        "must be an http:// or https:// URL",
    ),
    "zero-workers": (
        lambda t: t["server"].update(workers=0),
        "server.workers",
        "greater than or equal to 1",
    ),
    "unknown-key": (
        lambda t: t["server"].update(drain_dealy=3),
        "server.drain_dealy",
        "Extra inputs are not permitted",
    ),
    "bad-ledger": (lambda t: t.update(ledger="redis:///0"), "ledger", "redis://host:port/db"),
}


@pytest.mark.parametrize("command", ["serve", "check-config"])
@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_bad_value_exits_2_naming_the_key(
    tmp_path: Path, flag_file: Path, command: str, case: str
) -> None:
    change, key, problem = BAD_CONFIGS[case]
    tree = config_tree()
    change(tree)
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(tree))
    result = run_router(command, "--config", str(path))
    assert result.returncode == 2, result.stderr
    assert "configuration error" in result.stderr
    assert f"{key}: " in result.stderr and problem in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""  # serve bound nothing, logged nothing


@pytest.mark.parametrize("command", ["serve", "check-config"])
@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("server: {listen: [unclosed\n", "not valid YAML"),
        (None, "cannot read: No such file or directory"),
    ],
    ids=["invalid-yaml", "missing-file"],
)
def test_an_unreadable_config_exits_2_naming_the_file(
    tmp_path: Path, command: str, text: str | None, problem: str
) -> None:
    path = tmp_path / "router.yaml"
    if text is not None:
        path.write_text(text)
    result = run_router(command, "--config", str(path))
    assert result.returncode == 2, result.stderr
    assert f"{path}: {problem}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "env"),
    [(["--workers", "0"], {}), ([], {"ROUTER_WORKERS": "0"}), ([], {"ROUTER_LISTEN": "x"})],
    ids=["--workers 0", "ROUTER_WORKERS=0", "ROUTER_LISTEN=x"],
)
def test_serve_rejects_bad_overrides_from_argv_and_env(
    config: Path, args: list[str], env: dict[str, str]
) -> None:
    result = run_router("serve", "--config", str(config), *args, env=env, timeout=15)
    assert result.returncode == 2, result.stderr
    key = "server.listen" if "ROUTER_LISTEN" in env else "server.workers"
    assert f"{key}: " in result.stderr


def test_check_config_on_the_shipped_config(tmp_path: Path) -> None:
    result = run_router("check-config", "--config", str(CONFIG), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"config ok: {CONFIG}")
    assert "legacy http://127.0.0.1:9001, new http://127.0.0.1:9002" in result.stdout
    assert str(REPO / "config" / "flags.json") in result.stdout


def test_check_config_reports_a_flags_file_problem(config: Path, flag_file: Path) -> None:
    flag_file.write_text("{not json")
    result = run_router("check-config", "--config", str(config))
    assert result.returncode == 2
    assert f"flags.file: {flag_file}: not valid JSON" in result.stderr
    flag_file.unlink()
    result = run_router("check-config", "--config", str(config))
    assert result.returncode == 2
    assert "flags file does not exist" in result.stderr


def test_serve_exits_1_when_its_port_is_taken(config: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_router(
            "serve", "--config", str(config), env={"ROUTER_LISTEN": f"127.0.0.1:{port}"}
        )
    assert result.returncode == 1, result.stderr
    assert f"cannot listen on server.listen 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


# ---- explain --------------------------------------------------------------------------


def test_explain_prints_target_reason_and_upstream(config: Path) -> None:
    result = run_router("explain", "globex", "--config", str(config))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["tenant", "globex"]
    assert lines[1].split() == ["target", "new", "(reason:", "flag)"]
    assert lines[2].split() == ["upstream", "https://new.example.com", "(Host:", "upstream)"]
    assert "tenant-routing = 'new'" in lines[3]

    result = run_router("explain", "acme", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "target    legacy  (reason: flag)" in result.stdout
    assert "upstream  http://legacy.internal:9001  (Host: preserve)" in result.stdout


def test_explain_json(config: Path, flag_file: Path) -> None:
    result = run_router("explain", "initech", "--json", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "tenant": "initech",
        "target": "legacy",
        "reason": "flag",
        "upstream": "http://legacy.internal:9001",
        "host_header": "preserve",
        "flag_key": "tenant-routing",
        "flag_value": "legacy",
        "flag_source": str(flag_file),
        "ledgered": False,
        "ledger": config_ledger(config),
        "shadow_rate": 0.0,
    }


def test_explain_shows_a_shadowed_tenants_rate(tmp_path: Path, flag_file: Path) -> None:
    tree = config_tree()
    tree["shadow"] = {"tenants": {"acme": 0.05}}
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(tree))
    result = run_router("explain", "acme", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "shadow    5.00% of GET/HEAD requests copied to new" in result.stdout
    result = run_router("explain", "initech", "--json", "--config", str(path))
    assert json.loads(result.stdout)["shadow_rate"] == 0.0


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["text", "json"])
def test_explain_an_invalid_tenant_exits_1(config: Path, json_flag: list[str]) -> None:
    result = run_router("explain", "bad tenant!", *json_flag, "--config", str(config))
    assert result.returncode == 1
    if json_flag:
        assert json.loads(result.stdout)["error"] == "not a valid tenant id"
    else:
        assert "not a valid tenant id" in result.stderr


def test_explain_without_flag_data_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(config_tree(tmp_path / "missing.json")))
    result = run_router("explain", "acme", "--json", "--config", str(path))
    assert result.returncode == 1
    assert json.loads(result.stdout)["error"] == "flag data could not be loaded"


# ---- flags set ------------------------------------------------------------------------


def test_flags_set_prints_the_transition_and_rewrites_the_file(flag_file: Path) -> None:
    before = read_flag_file(flag_file)["flags"]["tenant-routing"]["version"]
    result = run_router("flags", "set", "acme", "new", "--file", str(flag_file))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"acme: legacy -> new ({flag_file})\n"
    data = read_flag_file(flag_file)
    assert tenant_variation(data, "acme") == "new"
    assert tenant_variation(data, "globex") == "new"  # others untouched
    assert data["flags"]["tenant-routing"]["version"] == before + 1  # the SDK needs the bump

    again = run_router("flags", "set", "acme", "new", "--file", str(flag_file))
    assert again.returncode == 0
    assert again.stdout == f"acme: already new ({flag_file} unchanged)\n"
    assert read_flag_file(flag_file) == data

    hold = run_router("flags", "set", "globex", "hold", "--file", str(flag_file))
    assert hold.stdout == f"globex: new -> hold ({flag_file})\n"
    assert tenant_variation(read_flag_file(flag_file), "globex") == "hold"


def test_flags_set_uses_the_configs_file_and_flag_key(tmp_path: Path) -> None:
    flag_file = tmp_path / "flags.json"
    flag_file.write_text(json.dumps({"flags": {"acme-routing": new_flag("acme-routing")}}))
    tree = config_tree()
    tree["flags"]["flag_key"] = "acme-routing"
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(tree))
    result = run_router("flags", "set", "acme", "new", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"acme: legacy -> new ({flag_file})\n"
    data = read_flag_file(flag_file)
    # The flag the router reads, not a "tenant-routing" flag it never evaluates.
    assert set(data["flags"]) == {"acme-routing"}
    assert tenant_variation(data, "acme", flag_key="acme-routing") == "new"
    explained = run_router("explain", "acme", "--json", "--config", str(path))
    assert json.loads(explained.stdout)["target"] == "new"


def test_flags_set_an_invalid_value_is_a_usage_error(flag_file: Path) -> None:
    before = flag_file.read_bytes()
    result = run_router("flags", "set", "acme", "sideways", "--file", str(flag_file))
    assert result.returncode == 2
    assert "invalid choice: 'sideways'" in result.stderr
    assert result.stderr.startswith("usage: router flags set")
    assert flag_file.read_bytes() == before


@pytest.mark.parametrize(
    ("tenant", "file", "problem"),
    [
        ("bad tenant!", "flags.json", "invalid tenant id 'bad tenant!'"),
        ("acme", "missing.json", "flags file does not exist"),
    ],
)
def test_flags_set_failures_exit_1(tmp_path: Path, tenant: str, file: str, problem: str) -> None:
    set_tenants(tmp_path / "flags.json", ["acme"], "legacy", create=True)
    result = run_router("flags", "set", tenant, "new", "--file", str(tmp_path / file))
    assert result.returncode == 1
    assert problem in result.stderr
    assert not (tmp_path / "missing.json").exists()


# ---- help and entry points --------------------------------------------------------------


def test_help_from_the_console_script() -> None:
    result = subprocess.run(
        [str(ROUTER_SCRIPT), "--help"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: router")
    for command in ("serve", "check-config", "explain", "flags"):
        assert command in result.stdout
    sub = run_router("flags", "set", "--help")
    assert sub.returncode == 0 and "{legacy,hold,new}" in sub.stdout


def test_no_command_is_a_usage_error() -> None:
    result = run_router()
    assert result.returncode == 2
    assert "the following arguments are required: command" in result.stderr


@pytest.fixture
def procs() -> Iterator[Procs]:
    with Procs() as procs:
        yield procs


def test_python_dash_m_router_serves(procs: Procs, config: Path) -> None:
    """`python -m router serve` (docs/contracts.md) reaches the same code as the console script."""
    router = procs.router(config)
    assert router.admin("/healthz").json() == {"status": "ok"}
    assert router.proc.argv[:3] == [sys.executable, "-m", "router"]
    assert os.path.samefile(Path(f"/proc/{router.pid}/cwd").resolve(), REPO)


# ---- what the CLI says about itself ------------------------------------------------------

COMMANDS = (
    "serve",
    "check-config",
    "explain",
    "flags",
    "shadow",
    "cutover",
    "migrate",
    "tenants",
    "sign",
)


def test_version_prints_the_version_and_the_build() -> None:
    result = run_router("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"router {router.__version__} ({build_state().describe})\n"
    # One version: the package's metadata (pyproject.toml) and router.__version__ agree.
    assert importlib.metadata.version("router") == router.__version__


def test_help_says_what_each_command_does() -> None:
    result = run_router("--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for command in COMMANDS:
        line = re.search(rf"^    {re.escape(command)}\s+(\S.*)$", text, re.M)
        assert line is not None, f"{command}: no help line"
    assert "--version" in text
    assert "Exit status: 0 done, 1 the command failed, 2 bad usage or configuration" in text
    # What it does, not how the code is laid out.
    for design_word in ("module", "argv", "register"):
        assert design_word not in text


def test_every_command_group_is_registered() -> None:
    parser = cli_main.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert tuple(sub.choices) == COMMANDS


def test_a_missing_command_module_is_an_error_not_a_missing_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        cli_main, "COMMAND_MODULES", (*cli_main.COMMAND_MODULES, "router.cli.missing")
    )
    with pytest.raises(ModuleNotFoundError, match=r"router\.cli\.missing"):
        cli_main.build_parser()


def test_check_config_names_deprecated_keys_it_still_reads(tmp_path: Path, flag_file: Path) -> None:
    tree = config_tree()
    tree["tenant"] = {"default_target": "new"}
    tree["routing"] = {"pinned_paths": [{"pattern": "/hooks/**", "target": "legacy"}]}
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(tree))
    result = run_router("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "deprecated key, still read: tenant.default_target (now tenant.default_side)" in (
        result.stdout
    )
    assert "routing.pinned_paths[0].target (now routing.pinned_paths[0].side)" in result.stdout

    tree["tenant"] = {"default_side": "new"}
    tree["routing"] = {"pinned_paths": [{"pattern": "/hooks/**", "side": "legacy"}]}
    path.write_text(yaml.safe_dump(tree))
    result = run_router("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "deprecated" not in result.stdout
