"""The CLI accepts exactly the tenant ids the router routes (issue 15): with a config that
sets `tenant.max_length` to 1024, an id of 129 to 1024 characters is routed by the router,
and `router flags set`, `router migrate` (its tenants file), `router sign` and
`router shadow` take it when given the same config; one character more, they refuse it,
as the router does. Without the config they keep the default bound (128)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from router.control.flagfile import read_flag_file, set_tenants, tenant_variation
from router.control.override import SIGNATURE_HEADER, TARGET_HEADER, OverrideVerifier
from router.domain import TENANT_ID_MAX_LENGTH_LIMIT
from router.proxy.identify import TenantIdentifier
from router.settings import load_settings
from tests.support.procs import run_router

SECRET = "s3cret-for-tests"
CLOSED_ADMIN = "http://127.0.0.1:9"  # the discard port: nothing listens there
ACCEPTED = [129, TENANT_ID_MAX_LENGTH_LIMIT]
TOO_LONG = TENANT_ID_MAX_LENGTH_LIMIT + 1


def tenant_of(length: int) -> str:
    return ("t-" + "x" * length)[:length]


@pytest.fixture
def flags(tmp_path: Path) -> Path:
    path = tmp_path / "flags.json"
    set_tenants(path, ["acme"], "legacy", create=True)
    return path


@pytest.fixture
def config(tmp_path: Path, flags: Path) -> Path:
    path = tmp_path / "router.yaml"
    tree = {
        "tenant": {"max_length": TENANT_ID_MAX_LENGTH_LIMIT},
        "flags": {"file": str(flags)},
        "upstreams": {
            "legacy": {"url": "http://127.0.0.1:9"},
            "new": {"url": "http://127.0.0.1:9"},
        },
        "ledger": f"sqlite:///{tmp_path / 'ledger.db'}",
    }
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.parametrize("length", [*ACCEPTED, TOO_LONG])
def test_the_router_routes_ids_up_to_its_configured_length(config: Path, length: int) -> None:
    identifier = TenantIdentifier(load_settings(config, {}).tenant)
    tenant = tenant_of(length)
    found = identifier.identify({"X-Tenant-Id": tenant}, None, "/")
    assert found == ((tenant, "header") if length in ACCEPTED else (None, "none"))


@pytest.mark.parametrize("length", ACCEPTED)
def test_flags_set_takes_a_long_id_with_the_config(config: Path, flags: Path, length: int) -> None:
    tenant = tenant_of(length)
    result = run_router("flags", "set", tenant, "new", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert tenant_variation(read_flag_file(flags), tenant) == "new"


def test_flags_set_refuses_beyond_the_configured_length(config: Path, flags: Path) -> None:
    before = flags.read_bytes()
    result = run_router("flags", "set", tenant_of(TOO_LONG), "new", "--config", str(config))
    assert result.returncode == 1
    assert "invalid tenant id" in result.stderr
    assert f"1 to {TENANT_ID_MAX_LENGTH_LIMIT} characters" in result.stderr
    assert flags.read_bytes() == before


def test_flags_set_without_the_config_keeps_the_default_bound(flags: Path) -> None:
    result = run_router("flags", "set", tenant_of(129), "new", "--file", str(flags))
    assert result.returncode == 1
    assert "1 to 128 characters" in result.stderr


def migrate_dry_run(tenants: Path, flags: Path, *more: str) -> list[str]:
    return [
        "migrate",
        "--tenants",
        str(tenants),
        "--flags-file",
        str(flags),
        "--admin",
        CLOSED_ADMIN,
        "--dry-run",
        *more,
    ]


@pytest.mark.parametrize("length", ACCEPTED)
def test_migrate_takes_a_long_id_with_the_config(
    tmp_path: Path, config: Path, flags: Path, length: int
) -> None:
    tenant = tenant_of(length)
    tenants = tmp_path / "tenants.txt"
    tenants.write_text(f"acme\n{tenant}\n")
    result = run_router(
        *migrate_dry_run(tenants, flags, "--config", str(config)),
        env={"ROUTER_ADMIN_TOKEN": "t"},
    )
    # The closed admin port makes the dry run exit 1; the plan still reads each id's flag
    # through the flag writer, which checks the id as the tenants file's reader did.
    assert result.returncode == 1, result.stderr
    assert f"  {tenant}: flag legacy: cut over" in result.stdout


def test_migrate_refuses_beyond_the_configured_length(
    tmp_path: Path, config: Path, flags: Path
) -> None:
    tenants = tmp_path / "tenants.txt"
    tenants.write_text(f"acme\n{tenant_of(TOO_LONG)}\n")
    result = run_router(
        *migrate_dry_run(tenants, flags, "--config", str(config)),
        env={"ROUTER_ADMIN_TOKEN": "t"},
    )
    assert result.returncode == 2
    assert f"{tenants}:2: invalid tenant id" in result.stderr
    assert result.stdout == ""


def test_migrate_without_the_config_keeps_the_default_bound(tmp_path: Path, flags: Path) -> None:
    tenants = tmp_path / "tenants.txt"
    tenants.write_text(f"{tenant_of(129)}\n")
    # cwd: the repository, whose config/router.yaml keeps the default max_length.
    result = run_router(*migrate_dry_run(tenants, flags), env={"ROUTER_ADMIN_TOKEN": "t"})
    assert result.returncode == 2
    assert f"{tenants}:1: invalid tenant id" in result.stderr


@pytest.mark.parametrize("length", [*ACCEPTED, TOO_LONG])
def test_sign_takes_what_the_configured_router_routes(config: Path, length: int) -> None:
    tenant = tenant_of(length)
    result = run_router(
        "sign", tenant, "new", "--config", str(config), env={"ROUTER_OVERRIDE_SECRET": SECRET}
    )
    if length == TOO_LONG:
        assert result.returncode == 2
        assert "is not a valid tenant id" in result.stderr
        return
    assert result.returncode == 0, result.stderr
    headers = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    verifier = OverrideVerifier(SECRET, 300)
    assert verifier.verify(headers[TARGET_HEADER], headers[SIGNATURE_HEADER], tenant) == "new"


@pytest.mark.parametrize("length", [*ACCEPTED, TOO_LONG])
def test_shadow_report_takes_what_the_configured_router_routes(config: Path, length: int) -> None:
    result = run_router(
        "shadow",
        "report",
        tenant_of(length),
        "--admin",
        CLOSED_ADMIN,
        "--config",
        str(config),
        env={"ROUTER_ADMIN_TOKEN": "t"},
    )
    if length == TOO_LONG:
        assert result.returncode == 2
        assert "is not a valid tenant id" in result.stderr
    else:  # the id passes; the (closed) router does not answer
        assert result.returncode == 1, result.stderr
        assert "no router answered" in result.stderr
