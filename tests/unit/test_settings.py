"""Settings: YAML file < environment variables, validated once, errors that name the key.

Every environment variable of the contract (docs/contracts.md) is checked against a YAML
file that sets the same setting differently, so a variable that stopped overriding (or
started applying to the wrong key) fails here rather than in an ECS task definition.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.settings import (
    ConfigError,
    HeaderExtractor,
    JwtExtractor,
    PathExtractor,
    Settings,
    load_settings,
)
from tests.support.contract_doc import env_contract
from tests.support.paths import REPO

BASE: dict[str, Any] = {
    "server": {"listen": "127.0.0.1:7000", "admin_listen": "127.0.0.1:7001", "workers": 3},
    "upstreams": {
        "legacy": {"url": "http://legacy.yaml:9001"},
        "new": {"url": "https://new.yaml"},
    },
    "flags": {"source": "file", "file": "/srv/yaml-flags.json"},
    "tenant": {"extractors": [{"type": "header", "name": "X-Yaml-Tenant"}, {"type": "jwt"}]},
    "log_level": "warning",
    "ledger": "sqlite:///yaml-ledger.db",
    "admin_token": "yaml-admin-token",
    "override_secret": "yaml-override-secret",
    "override_secret_previous": "yaml-previous-secret",
}


def write(tmp_path: Path, tree: dict[str, Any], name: str = "router.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return path


def header_names(settings: Settings) -> list[str]:
    return [e.name for e in settings.tenant.extractors if isinstance(e, HeaderExtractor)]


# (env var, value, what the YAML gives, what the env must give, accessor)
ENV_CASES: list[tuple[str, str, Any, Any, Callable[[Settings], Any]]] = [
    ("ROUTER_LISTEN", "127.0.0.1:8180", "127.0.0.1:7000", "127.0.0.1:8180",
     lambda s: s.server.listen),
    ("ROUTER_ADMIN_LISTEN", "[::1]:8181", "127.0.0.1:7001", "[::1]:8181",
     lambda s: s.server.admin_listen),
    ("ROUTER_LEGACY_URL", "https://legacy.env/", "http://legacy.yaml:9001", "https://legacy.env",
     lambda s: s.upstreams.legacy.url),
    ("ROUTER_NEW_URL", "http://new.env:8002", "https://new.yaml", "http://new.env:8002",
     lambda s: s.upstreams.new.url),
    ("ROUTER_FLAGS_FILE", "/etc/router/env-flags.json", Path("/srv/yaml-flags.json"),
     Path("/etc/router/env-flags.json"), lambda s: s.flags.file),
    ("ROUTER_TENANT_HEADER", "X-Env-Tenant", ["X-Yaml-Tenant"], ["X-Env-Tenant"], header_names),
    ("ROUTER_WORKERS", "5", 3, 5, lambda s: s.server.workers),
    ("ROUTER_LOG_LEVEL", "DEBUG", "warning", "debug", lambda s: s.log_level),
    ("ROUTER_LEDGER", "redis://cache.env:6379/2", "sqlite:///yaml-ledger.db",
     "redis://cache.env:6379/2", lambda s: s.ledger),
    ("ROUTER_ADMIN_TOKEN", "env-admin-token", "yaml-admin-token", "env-admin-token",
     lambda s: s.admin_token),
    ("ROUTER_OVERRIDE_SECRET", "env-override-secret", "yaml-override-secret",
     "env-override-secret", lambda s: s.override_secret),
    ("ROUTER_OVERRIDE_SECRET_PREVIOUS", "env-previous-secret", "yaml-previous-secret",
     "env-previous-secret", lambda s: s.override_secret_previous),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "value", "from_yaml", "from_env", "get"), ENV_CASES, ids=[c[0] for c in ENV_CASES]
)
def test_env_var_overrides_yaml(
    tmp_path: Path,
    name: str,
    value: str,
    from_yaml: Any,
    from_env: Any,
    get: Callable[[Settings], Any],
) -> None:
    path = write(tmp_path, BASE)
    assert get(load_settings(path, {})) == from_yaml
    assert get(load_settings(path, {name: value})) == from_env
    assert get(load_settings(path, {name: ""})) == from_yaml  # empty: not set


def test_flag_source_env_vars_override_yaml(tmp_path: Path) -> None:
    """ROUTER_FLAGS_SOURCE and LAUNCHDARKLY_SDK_KEY (they only make sense together)."""
    tree = {**BASE, "flags": {"source": "launchdarkly", "sdk_key": "sdk-yaml"}}
    path = write(tmp_path, tree)
    assert load_settings(path, {}).flags.sdk_key == "sdk-yaml"
    assert load_settings(path, {"LAUNCHDARKLY_SDK_KEY": "sdk-env"}).flags.sdk_key == "sdk-env"

    file_source = write(tmp_path, BASE, "file.yaml")
    assert load_settings(file_source, {}).flags.source == "file"
    settings = load_settings(
        file_source, {"ROUTER_FLAGS_SOURCE": "launchdarkly", "LAUNCHDARKLY_SDK_KEY": "sdk-env"}
    )
    assert (settings.flags.source, settings.flags.sdk_key) == ("launchdarkly", "sdk-env")
    with pytest.raises(ConfigError, match=r"flags\.sdk_key \(or LAUNCHDARKLY_SDK_KEY\)"):
        load_settings(file_source, {"ROUTER_FLAGS_SOURCE": "launchdarkly"})
    with pytest.raises(ConfigError, match=r"flags\.source: "):
        load_settings(file_source, {"ROUTER_FLAGS_SOURCE": "consul"})


def test_every_env_var_of_the_contract_is_tested() -> None:
    """The cases above cover exactly docs/contracts.md's table (a new variable needs a test)."""
    tested = {c[0] for c in ENV_CASES} | {"ROUTER_FLAGS_SOURCE", "LAUNCHDARKLY_SDK_KEY"}
    assert env_contract() == tested


def test_settings_read_exactly_the_contract_env_vars() -> None:
    """Every variable the settings module reads is in docs/contracts.md, and every one there
    is read: an override added in code but not documented fails here."""
    source = (REPO / "router" / "settings.py").read_text(encoding="utf-8")
    read = set(re.findall(r'"((?:ROUTER|LAUNCHDARKLY)_[A-Z0-9_]+)"', source))
    assert read == env_contract()


def test_env_only_without_a_file() -> None:
    settings = load_settings(
        None,
        {
            "ROUTER_LEGACY_URL": "http://l:1",
            "ROUTER_NEW_URL": "http://n:2",
            "ROUTER_FLAGS_FILE": "/f.json",
            "ROUTER_WORKERS": "2",
        },
    )
    assert settings.upstreams.legacy.url == "http://l:1"
    assert settings.server.workers == 2
    assert settings.server.listen == "0.0.0.0:8080"  # built-in default


def test_tenant_header_env_var_adds_a_header_extractor_when_there_is_none(
    tmp_path: Path,
) -> None:
    only_path = {**BASE, "tenant": {"extractors": [{"type": "path", "pattern": "/t/{tenant}/"}]}}
    settings = load_settings(write(tmp_path, only_path), {"ROUTER_TENANT_HEADER": "X-Org"})
    kinds = [type(e) for e in settings.tenant.extractors]
    assert kinds == [HeaderExtractor, PathExtractor]  # first: a header wins
    assert header_names(settings) == ["X-Org"]

    no_tenant_section = {k: v for k, v in BASE.items() if k != "tenant"}
    settings = load_settings(write(tmp_path, no_tenant_section), {"ROUTER_TENANT_HEADER": "X-Org"})
    assert [type(e) for e in settings.tenant.extractors] == [HeaderExtractor, JwtExtractor]
    assert header_names(settings) == ["X-Org"]

    with pytest.raises(ConfigError, match=r"tenant\.extractors\.0\.name: not a valid header name"):
        load_settings(write(tmp_path, BASE), {"ROUTER_TENANT_HEADER": "X Org"})


@pytest.mark.parametrize(
    ("name", "value", "key", "problem"),
    [
        ("ROUTER_LISTEN", "8080", "server.listen", "expected host:port"),
        ("ROUTER_ADMIN_LISTEN", "host:99999", "server.admin_listen", "expected host:port"),
        ("ROUTER_LEGACY_URL", "ftp://x", "upstreams.legacy.url", "http:// or https://"),
        ("ROUTER_NEW_URL", "http://n:1/api", "upstreams.new.url", "must not carry a path"),
        ("ROUTER_WORKERS", "0", "server.workers", "greater than or equal to 1"),
        ("ROUTER_WORKERS", "two", "server.workers", "valid integer"),
        ("ROUTER_LOG_LEVEL", "verbose", "log_level", "'debug', 'info', 'warning' or 'error'"),
        ("ROUTER_LEDGER", "sqlite://ledger.db", "ledger", "sqlite:///path"),
        ("ROUTER_LEDGER", "postgres://db/x", "ledger", "sqlite:///path or redis://"),
    ],
)
def test_a_bad_env_value_names_the_key(
    tmp_path: Path, name: str, value: str, key: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, BASE), {name: value})
    message = str(caught.value)
    assert message.startswith(f"{key}: ")
    assert problem in message


def test_relative_flags_file_is_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc" / "router"
    conf_dir.mkdir(parents=True)
    tree = {**BASE, "flags": {"file": "flags/tenants.json"}}
    tree["upstreams"] = {
        "legacy": {"url": "https://l", "ca_file": "../ca.pem"},
        "new": {"url": "https://n"},
    }
    path = write(conf_dir, tree)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = load_settings(Path("..") / "etc" / "router" / "router.yaml", {})
    assert settings.flags.file == conf_dir / "flags" / "tenants.json"
    assert settings.upstreams.legacy.ca_file == tmp_path / "etc" / "ca.pem"
    # ...while a relative ROUTER_FLAGS_FILE is relative to the working directory.
    from_env = load_settings(path, {"ROUTER_FLAGS_FILE": "env.json"})
    assert from_env.flags.file == elsewhere / "env.json"


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        ({"server": {"lisen": "0.0.0.0:1"}}, "server.lisen: Extra inputs are not permitted"),
        ({"flag": {"file": "x.json"}}, "flag: Extra inputs are not permitted"),
        (
            {"upstreams": {"legacy": {"url": "http://l", "timeout": 3}}},
            "upstreams.legacy.timeout: Extra inputs are not permitted",
        ),
        (
            {"tenant": {"extractors": [{"type": "header", "nmae": "X-T"}]}},
            "tenant.extractors.0.nmae: Extra inputs are not permitted",
        ),
    ],
)
def test_a_misspelt_key_is_rejected(tmp_path: Path, tree: dict[str, Any], message: str) -> None:
    merged = yaml.safe_load(yaml.safe_dump(BASE))
    for section, values in tree.items():
        if isinstance(merged.get(section), dict):
            for key, value in values.items():
                if isinstance(value, dict) and isinstance(merged[section].get(key), dict):
                    merged[section][key].update(value)
                else:
                    merged[section][key] = value
        else:
            merged[section] = values
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, merged), {})
    assert message in str(caught.value).splitlines()


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    tree = yaml.safe_load(yaml.safe_dump(BASE))
    tree["server"]["workers"] = 0
    tree["upstreams"]["new"]["url"] = "ftp://x"
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, tree), {})
    keys = {line.split(":", 1)[0] for line in str(caught.value).splitlines()}
    assert keys == {"server.workers", "upstreams.new.url"}


def test_a_key_given_twice_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    text = yaml.safe_dump(BASE) + "flags:\n  file: /other.json\n"
    path.write_text(text)
    assert yaml.safe_load(text)["flags"] == {"file": "/other.json"}  # what PyYAML would do
    with pytest.raises(ConfigError, match=r"duplicate key 'flags'"):
        load_settings(path, {})


def test_yaml_merge_keys_may_still_override(tmp_path: Path) -> None:
    """`<<: *anchor` followed by a key it also merges is an override, not a duplicate."""
    path = tmp_path / "router.yaml"
    path.write_text(
        "flags: {file: /f.json}\n"
        "upstreams:\n"
        "  legacy: &up {url: 'http://l', idle_timeout: 2.0, connect_timeout: 1.5}\n"
        "  new:\n"
        "    <<: *up\n"
        "    url: 'http://n'\n"
    )
    new = load_settings(path, {}).upstreams.new
    assert (new.url, new.idle_timeout, new.connect_timeout) == ("http://n", 2.0, 1.5)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("server: [unclosed\n", "not valid YAML"),
        ("? [a, b]\n: 1\n", "found unhashable key"),
        ("- just\n- a list\n", "the top level must be a mapping"),
    ],
)
def test_a_file_that_is_not_a_settings_mapping(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=problem):
        load_settings(path, {})


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read: No such file"):
        load_settings(tmp_path / "nope.yaml", {})


def test_the_shipped_config_loads_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(REPO / "config" / "router.yaml", {})
    assert settings.flags.source == "file"
    assert settings.flags.file == REPO / "config" / "flags.json"
    assert settings.flags.file.is_file()
    assert settings.server.listen_addr == ("0.0.0.0", 8080)
    assert settings.server.admin_addr == ("0.0.0.0", 8081)
    assert (settings.upstreams.legacy.port, settings.upstreams.new.port) == (9001, 9002)
    assert settings.ledger == "sqlite:///router-ledger.db"


# ---- signed overrides and log redaction ------------------------------------------------


def test_a_previous_override_secret_needs_a_current_one(tmp_path: Path) -> None:
    tree = {k: v for k, v in BASE.items() if k != "override_secret"}
    with pytest.raises(ConfigError, match="override_secret_previous"):
        load_settings(write(tmp_path, tree), {})
    with pytest.raises(ConfigError, match="the same as override_secret"):
        load_settings(
            write(tmp_path, {**BASE, "override_secret_previous": "yaml-override-secret"}), {}
        )


def test_override_tenants_are_valid_tenant_ids(tmp_path: Path) -> None:
    routing = {"override_tenants": ["qa-1", "qa 2"]}
    with pytest.raises(ConfigError, match="invalid tenant id 'qa 2'"):
        load_settings(write(tmp_path, {**BASE, "routing": routing}), {})
    ok = load_settings(write(tmp_path, {**BASE, "routing": {"override_tenants": ["qa-1"]}}), {})
    assert ok.routing.override_tenants == ["qa-1"]
    assert load_settings(write(tmp_path, BASE), {}).routing.override_tenants is None


def test_redacted_query_params_default_and_validation(tmp_path: Path) -> None:
    assert "jwt" in load_settings(write(tmp_path, BASE), {}).redact_query_params
    custom = load_settings(write(tmp_path, {**BASE, "redact_query_params": ["JWT", "*"]}), {})
    assert custom.redact_query_params == ["jwt", "*"]
    for bad in ([], [""], [" "]):
        with pytest.raises(ConfigError):
            load_settings(write(tmp_path, {**BASE, "redact_query_params": bad}), {})
