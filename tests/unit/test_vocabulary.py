"""The domain's words are defined once (router/domain.py) and the settings speak them:
sides, flag values, the tenant-id rule and its bound, and the renamed settings keys that
still accept their old names."""

from __future__ import annotations

from typing import Any

import pytest

from router.control.flagfile import new_flag
from router.domain import (
    DEFAULT_FLAG_VALUE,
    DEFAULT_TENANT_ID_MAX_LENGTH,
    FLAG_VALUES,
    SIDES,
    TENANT_ID_MAX_LENGTH_LIMIT,
    is_tenant_id,
    tenant_id_problem,
)
from router.proxy.identify import TenantIdentifier
from router.settings import PinnedPath, Settings, TenantSettings

UPSTREAMS = {"legacy": {"url": "http://legacy:9001"}, "new": {"url": "http://new:9002"}}


def settings(**sections: Any) -> Settings:
    return Settings.model_validate(
        {"upstreams": UPSTREAMS, "flags": {"file": "/srv/flags.json"}, **sections}
    )


# ---- sides and flag values ---------------------------------------------------------------


def test_the_sides_and_flag_values() -> None:
    assert SIDES == ("legacy", "new")
    assert FLAG_VALUES == ("legacy", "hold", "new")
    assert DEFAULT_FLAG_VALUE == "legacy"


def test_a_new_routing_flag_has_the_flag_values_as_its_variations() -> None:
    flag = new_flag()
    assert flag["variations"] == list(FLAG_VALUES)
    assert flag["variations"][flag["fallthrough"]["variation"]] == DEFAULT_FLAG_VALUE


# ---- tenant.default_side (was default_target) ---------------------------------------------


def test_default_side() -> None:
    assert settings().tenant.default_side == "legacy"
    assert settings(tenant={"default_side": "new"}).tenant.default_side == "new"


def test_default_target_is_still_read_as_default_side() -> None:
    assert settings(tenant={"default_target": "new"}).tenant.default_side == "new"


def test_default_side_and_its_old_name_together_are_refused() -> None:
    with pytest.raises(ValueError, match=r"default_target \(its deprecated old name\)"):
        TenantSettings.model_validate({"default_side": "new", "default_target": "new"})


def test_default_side_must_be_a_side() -> None:
    with pytest.raises(ValueError, match="default_side"):
        TenantSettings.model_validate({"default_side": "hold"})


# ---- routing.pinned_paths[].side (was .target) -----------------------------------------------


def test_pinned_paths_name_a_side_and_still_read_target() -> None:
    routing = {
        "pinned_paths": [
            {"pattern": "/lifecycle/**", "side": "new"},
            {"pattern": "/hooks/*", "target": "legacy"},
        ]
    }
    pinned = settings(routing=routing).routing.pinned_paths
    assert [(p.pattern, p.side) for p in pinned] == [
        ("/lifecycle/**", "new"),
        ("/hooks/*", "legacy"),
    ]


def test_a_pinned_path_with_side_and_target_is_refused() -> None:
    with pytest.raises(ValueError, match="side and target"):
        PinnedPath.model_validate({"pattern": "/x", "side": "new", "target": "new"})


# ---- the tenant-id rule -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tenant", "max_length", "valid"),
    [
        ("acme", DEFAULT_TENANT_ID_MAX_LENGTH, True),
        ("Acme.eu_1:prod@x-y", DEFAULT_TENANT_ID_MAX_LENGTH, True),
        ("x" * DEFAULT_TENANT_ID_MAX_LENGTH, DEFAULT_TENANT_ID_MAX_LENGTH, True),
        ("x" * (DEFAULT_TENANT_ID_MAX_LENGTH + 1), DEFAULT_TENANT_ID_MAX_LENGTH, False),
        ("x" * TENANT_ID_MAX_LENGTH_LIMIT, TENANT_ID_MAX_LENGTH_LIMIT, True),
        ("", DEFAULT_TENANT_ID_MAX_LENGTH, False),
        ("a b", DEFAULT_TENANT_ID_MAX_LENGTH, False),
        ("acme/../x", DEFAULT_TENANT_ID_MAX_LENGTH, False),
        ("é", DEFAULT_TENANT_ID_MAX_LENGTH, False),
        ("ac\nme", DEFAULT_TENANT_ID_MAX_LENGTH, False),
        (None, DEFAULT_TENANT_ID_MAX_LENGTH, False),
    ],
)
def test_the_rule_and_what_the_router_identifies_agree(
    tenant: str | None, max_length: int, valid: bool
) -> None:
    assert is_tenant_id(tenant, max_length) is valid
    assert (tenant_id_problem(tenant, max_length) is None) is valid
    if isinstance(tenant, str):
        identifier = TenantIdentifier(TenantSettings(max_length=max_length))
        assert identifier.is_valid(tenant) is valid
        found = identifier.identify({"X-Tenant-Id": tenant}, None, "/")
        assert found == ((tenant, "header") if valid else (None, "none"))


def test_a_problem_names_the_id_and_the_rule() -> None:
    assert tenant_id_problem("a b", 64) == (
        "invalid tenant id 'a b': 1 to 64 characters of A-Z a-z 0-9 . _ : @ -"
    )


@pytest.mark.parametrize(
    ("max_length", "accepted"),
    [
        (1, True),
        (TENANT_ID_MAX_LENGTH_LIMIT, True),
        (0, False),
        (TENANT_ID_MAX_LENGTH_LIMIT + 1, False),
    ],
)
def test_the_configurable_bound_is_the_domains(max_length: int, accepted: bool) -> None:
    if accepted:
        assert TenantSettings(max_length=max_length).max_length == max_length
    else:
        with pytest.raises(ValueError, match="max_length"):
            TenantSettings(max_length=max_length)
    assert TenantSettings().max_length == DEFAULT_TENANT_ID_MAX_LENGTH
