"""router.control.flagfile: the flags-file writer, checked against the LaunchDarkly SDK
that reads it."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ldclient import Context, LDClient
from ldclient.config import Config
from ldclient.integrations import Files
from ldclient.interfaces import FlagChange

from router.control.flagfile import (
    FlagFileError,
    new_flag,
    read_flag_file,
    set_tenant,
    set_tenants,
    tenant_variation,
)
from router.domain import FLAG_VALUES
from tests.support.flag_files import FLAG, routing_flag, targets_of, write_json
from tests.support.paths import REPO
from tests.support.waiting import poll

# --- helpers -----------------------------------------------------------------------------


def version_of(path: Path) -> int:
    version: int = routing_flag(read_flag_file(path))["version"]
    return version


def tenant_context(tenant: str) -> Context:
    return Context.builder(tenant).kind("tenant").build()


@contextlib.contextmanager
def sdk_client(path: Path) -> Iterator[LDClient]:
    """A real SDK client on the file data source, configured as the router configures it."""
    config = Config(
        sdk_key="file-source",
        update_processor_class=Files.new_data_source(
            paths=[str(path)], auto_update=True, poll_interval=0.1, force_polling=True
        ),
        send_events=False,
        diagnostic_opt_out=True,
    )
    client = LDClient(config=config, start_wait=5)
    try:
        assert client.is_initialized(), f"the SDK did not load {path}"
        yield client
    finally:
        client.close()


def route(client: LDClient, tenant: str) -> str:
    value: str = client.variation(FLAG, tenant_context(tenant), "legacy")
    return value


def routes_to(client: LDClient, tenant: str, want: str, timeout: float = 2.0) -> bool:
    return bool(poll(lambda: route(client, tenant) == want, timeout))


# --- the flag object ---------------------------------------------------------------------


def test_new_flag_is_a_complete_flag() -> None:
    flag = new_flag("routing-x", default="new")
    assert flag["key"] == "routing-x"
    assert flag["on"] is True
    assert flag["variations"] == ["legacy", "hold", "new"]
    assert flag["offVariation"] == 2
    assert flag["fallthrough"] == {"variation": 2}
    assert flag["contextTargets"] == [
        {"contextKind": "tenant", "variation": i, "values": []} for i in range(3)
    ]
    assert flag["targets"] == flag["rules"] == flag["prerequisites"] == []
    assert isinstance(flag["salt"], str) and flag["salt"]
    assert flag["version"] == 1
    assert flag["clientSide"] is flag["trackEvents"] is flag["trackEventsFallthrough"] is False
    assert flag["deleted"] is False
    assert new_flag("routing-x", "new") == flag  # deterministic: same call, same file
    with pytest.raises(FlagFileError, match="'blue'"):
        new_flag(default="blue")


# --- writing -----------------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "flags.json"
    assert set_tenant(path, "acme", "new", create=True) == "legacy"
    data = read_flag_file(path)
    assert tenant_variation(data, "acme") == "new"
    assert tenant_variation(data, "someone-else") == "legacy"
    assert routing_flag(data)["version"] == 1  # the flag was created by this call
    assert path.read_text().startswith('{\n  "flags": {\n')  # pretty-printed for diffs


@pytest.mark.parametrize(("first", "second"), list(itertools.permutations(FLAG_VALUES, 2)))
def test_moves_a_tenant_between_values(flag_path: Path, first: str, second: str) -> None:
    set_tenant(flag_path, "bystander", "hold")
    assert set_tenant(flag_path, "acme", first) == "legacy"
    assert set_tenant(flag_path, "acme", second) == first
    targets = targets_of(flag_path)
    holding = [value for value, tenants in targets.items() if "acme" in tenants]
    assert holding == [second]  # in exactly one list
    assert tenant_variation(read_flag_file(flag_path), "acme") == second
    assert "bystander" in targets["hold"]
    assert version_of(flag_path) == 4


def test_version_bumps_once_per_effective_write_and_never_for_a_no_op(flag_path: Path) -> None:
    assert set_tenants(flag_path, ["a", "b", "c"], "new") == dict.fromkeys("abc", "legacy")
    assert version_of(flag_path) == 2  # three tenants, one write

    before = os.stat(flag_path)
    content = flag_path.read_bytes()
    assert set_tenants(flag_path, ["b", "a"], "new") == {"b": "new", "a": "new"}
    after = os.stat(flag_path)
    assert flag_path.read_bytes() == content
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # untouched

    assert set_tenants(flag_path, ["a", "d"], "new") == {"a": "new", "d": "legacy"}
    assert version_of(flag_path) == 3
    assert set_tenant(flag_path, "a", "hold") == "new"
    assert version_of(flag_path) == 4


def test_explicit_legacy_is_a_change_even_though_fallthrough_is_legacy(flag_path: Path) -> None:
    # An explicit target pins the tenant if the fallthrough ever changes; not a no-op.
    assert set_tenant(flag_path, "acme", "legacy") == "legacy"
    assert targets_of(flag_path)["legacy"] == ["acme"]
    assert version_of(flag_path) == 2


def test_target_lists_are_sorted_and_deduplicated(flag_path: Path) -> None:
    data = read_flag_file(flag_path)
    routing_flag(data)["contextTargets"][2]["values"] = ["zeta", "alpha", "zeta"]
    write_json(flag_path, data)
    set_tenants(flag_path, ["mid", "beta", "mid"], "new")
    assert targets_of(flag_path)["new"] == ["alpha", "beta", "mid", "zeta"]


def test_creates_a_missing_target_entry(flag_path: Path) -> None:
    data = read_flag_file(flag_path)
    routing_flag(data)["contextTargets"] = [{"contextKind": "tenant", "variation": 0, "values": []}]
    write_json(flag_path, data)
    assert set_tenant(flag_path, "acme", "hold") == "legacy"
    assert targets_of(flag_path) == {"legacy": [], "hold": ["acme"]}


def test_other_flags_segments_and_fields_are_preserved(tmp_path: Path) -> None:
    other = {
        "key": "checkout-v2",
        "version": 42,
        "on": True,
        "variations": [True, False, {"nested": [1, 2.5, None]}],
        "fallthrough": {"rollout": {"variations": [{"variation": 0, "weight": 100000}]}},
        "rules": [
            {
                "id": "r1",
                "clauses": [{"attribute": "plan", "op": "in", "values": ["gold"]}],
                "variation": 1,
            }
        ],
        "salt": "abc",
        "description": "not ours",
    }
    segments = {"beta": {"key": "beta", "version": 3, "included": ["x"], "salt": "s"}}
    mine = new_flag() | {"_maintainer": "sre"}
    path = tmp_path / "flags.json"
    write_json(
        path,
        {
            "flags": {"checkout-v2": other, FLAG: mine},
            "segments": segments,
            "flagValues": {"banner": "hello"},
        },
    )
    set_tenant(path, "acme", "new")
    data = read_flag_file(path)
    assert data["flags"]["checkout-v2"] == other
    assert data["segments"] == segments
    assert data["flagValues"] == {"banner": "hello"}
    assert list(data["flags"]) == ["checkout-v2", FLAG]  # order kept: small diffs
    assert routing_flag(data)["_maintainer"] == "sre"


def test_adds_the_flag_when_the_file_lacks_it(tmp_path: Path) -> None:
    path = tmp_path / "flags.json"
    write_json(path, {"flags": {"other": {"key": "other", "version": 9, "on": False}}})
    assert set_tenant(path, "acme", "hold") == "legacy"
    data = read_flag_file(path)
    assert data["flags"]["other"] == {"key": "other", "version": 9, "on": False}
    assert tenant_variation(data, "acme") == "hold"
    assert routing_flag(data)["version"] == 1


def test_custom_flag_key(tmp_path: Path) -> None:
    path = tmp_path / "flags.json"
    set_tenant(path, "acme", "new", flag_key="routing-b", create=True)
    data = read_flag_file(path)
    assert list(data["flags"]) == ["routing-b"]
    assert tenant_variation(data, "acme", flag_key="routing-b") == "new"
    assert tenant_variation(data, "acme") == "legacy"  # no tenant-routing flag: the default


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "NEW", "blue", None])
def test_bad_value(flag_path: Path, value: Any) -> None:
    with pytest.raises(FlagFileError, match=r"legacy, hold, new"):
        set_tenant(flag_path, "acme", value)
    assert version_of(flag_path) == 1


@pytest.mark.parametrize(
    "tenant", ["", "a b", "x" * 129, "acmé", "acme\n", "a/b", "a,b", "*", 7, None]
)
def test_bad_tenant(flag_path: Path, tenant: Any) -> None:
    content = flag_path.read_bytes()
    with pytest.raises(FlagFileError, match="invalid tenant id"):
        set_tenants(flag_path, ["good", tenant], "new")
    assert flag_path.read_bytes() == content  # all validated before anything is written


def test_a_bare_string_is_not_a_list_of_tenants(flag_path: Path) -> None:
    with pytest.raises(FlagFileError, match="not the string 'acme'"):
        set_tenants(flag_path, "acme", "new")
    assert version_of(flag_path) == 1


def test_longest_and_oddest_valid_tenant(flag_path: Path) -> None:
    tenant = "A-z.0_9:@" + "x" * 119
    assert len(tenant) == 128
    set_tenant(flag_path, tenant, "new")
    assert tenant_variation(read_flag_file(flag_path), tenant) == "new"


def test_missing_file_without_create(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(FlagFileError, match=r"nope\.json.*does not exist.*create=True"):
        set_tenant(path, "acme", "new")
    assert not path.exists()
    with pytest.raises(FlagFileError, match=r"nope\.json: flags file does not exist"):
        read_flag_file(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"flags": {', r"not valid JSON: .* at line 1 column 12"),
        ("", r"not valid JSON"),
        ("[1, 2]", r"top level must be a JSON object, not an array"),
        ('{"flagValues": {}}', r'no "flags" object'),
        ('{"flags": []}', r'"flags" must be an object, not an array'),
        ('{"flags": {"f": 3}}', r'flag "f" must be an object, not a number'),
        ('{"flags": {}, "flags": {}}', r"duplicate key 'flags'"),
        ("flags:\n  tenant-routing: {}\n", r"not valid JSON"),  # YAML is not what we write
    ],
)
def test_invalid_file(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "flags.json"
    path.write_text(content)
    with pytest.raises(FlagFileError, match=rf"{path}: {message}"):
        set_tenant(path, "acme", "new")
    assert path.read_text() == content


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "flags.json"
    path.write_bytes(b'{"flags": {"\xff": {}}}')
    with pytest.raises(FlagFileError, match="not UTF-8"):
        read_flag_file(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"on": False}, "is off"),
        ({"deleted": True}, "marked deleted"),
        ({"key": "other"}, "must match"),
        ({"variations": ["legacy", "new"]}, 'no variation "hold"'),
        ({"version": "7"}, "positive integer"),
        ({"contextTargets": [{"variation": 0, "values": "acme"}]}, "malformed contextTargets"),
    ],
)
def test_flag_that_cannot_be_written(flag_path: Path, change: dict[str, Any], message: str) -> None:
    data = read_flag_file(flag_path)
    routing_flag(data).update(change)
    write_json(flag_path, data)
    with pytest.raises(FlagFileError, match=rf'{flag_path}: flag "tenant-routing".*{message}'):
        set_tenant(flag_path, "acme", "hold")


def test_key_in_flag_values_is_refused(tmp_path: Path) -> None:
    # The SDK rejects a whole file that defines a key in both "flags" and "flagValues".
    path = tmp_path / "flags.json"
    write_json(path, {"flags": {}, "flagValues": {FLAG: "new"}})
    with pytest.raises(FlagFileError, match="flagValues"):
        set_tenant(path, "acme", "new")


def test_refuses_what_the_sdk_would_read_differently(tmp_path: Path) -> None:
    pytest.importorskip("yaml")  # only then does the SDK parse the file as YAML
    path = tmp_path / "flags.json"
    # json writes 1e16 as `1e+16`, which YAML 1.1 reads as a string.
    other = {"key": "limits", "version": 1, "on": True, "variations": [1e16]}
    write_json(path, {"flags": {"limits": other, FLAG: new_flag()}})
    content = path.read_bytes()
    with pytest.raises(FlagFileError, match=r"/flags/limits/variations/0 \(1e\+16 as '1e\+16'\)"):
        set_tenant(path, "acme", "new")
    assert path.read_bytes() == content
    assert sorted(os.listdir(tmp_path)) == ["flags.json", "flags.json.lock"]  # no temp file


# --- how the file is written -------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o640, 0o600, 0o444], ids=oct)
def test_file_mode_is_preserved(flag_path: Path, mode: int) -> None:
    flag_path.chmod(mode)
    set_tenant(flag_path, "acme", "new")
    assert stat.S_IMODE(os.stat(flag_path).st_mode) == mode
    assert tenant_variation(read_flag_file(flag_path), "acme") == "new"


def test_new_file_mode_follows_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        set_tenant(tmp_path / "flags.json", "acme", "new", create=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "flags.json").st_mode) == 0o640


def test_writes_through_a_symlink(flag_path: Path, tmp_path: Path) -> None:
    # The SDK polls the resolved path: replacing the link itself would hide every change.
    link = tmp_path / "current.json"
    link.symlink_to(flag_path)
    set_tenant(link, "acme", "new")
    assert link.is_symlink()
    assert tenant_variation(read_flag_file(flag_path), "acme") == "new"


def test_mtime_always_moves_forward(flag_path: Path) -> None:
    # The SDK reloads only when the mtime differs from its last poll; a write stamped
    # with the same time (coarse kernel clock, clock stepped back) would be missed.
    future = time.time_ns() + 30 * 10**9
    os.utime(flag_path, ns=(future, future))
    set_tenant(flag_path, "acme", "new")
    assert os.stat(flag_path).st_mtime_ns > future


def test_leaves_no_temp_files(flag_path: Path, tmp_path: Path) -> None:
    for i, value in enumerate(FLAG_VALUES * 3):
        set_tenant(flag_path, f"t{i}", value)
    assert sorted(os.listdir(tmp_path)) == ["flags.json", "flags.json.lock"]


def test_a_reader_never_sees_a_partial_file(flag_path: Path) -> None:
    # Big enough that a non-atomic write would be observed half done.
    set_tenants(flag_path, [f"tenant-{i:05d}" for i in range(5000)], "legacy")
    stop = threading.Event()
    reads = 0
    failures: list[str] = []

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            try:
                json.loads(flag_path.read_bytes())
            except ValueError as exc:
                failures.append(repr(exc))
            reads += 1

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(60):
            set_tenant(flag_path, f"tenant-{i:05d}", FLAG_VALUES[i % 3])
    finally:
        stop.set()
        thread.join()
    assert reads > 0
    assert failures == []


# --- reading like the router -------------------------------------------------------------


def test_tenant_variation_follows_sdk_order(flag_path: Path) -> None:
    set_tenants(flag_path, ["acme"], "new")
    data = read_flag_file(flag_path)
    flag = routing_flag(data)

    flag["on"] = False  # off: offVariation for everyone, targets included
    flag["offVariation"] = 1
    assert tenant_variation(data, "acme") == "hold"
    del flag["offVariation"]  # off without offVariation: the SDK returns the default
    assert tenant_variation(data, "acme") == "legacy"

    flag["on"] = True
    flag["variations"] = ["legacy", "hold", "purple"]  # not a route: the router uses legacy
    assert tenant_variation(data, "acme") == "legacy"
    flag["variations"] = list(FLAG_VALUES)

    flag["rules"] = [{"id": "r", "clauses": [], "variation": 2}]
    assert tenant_variation(data, "acme") == "new"  # targets come before rules
    with pytest.raises(FlagFileError, match="has rules"):
        tenant_variation(data, "untargeted")
    flag["rules"] = []
    flag["prerequisites"] = [{"key": "other", "variation": 0}]
    with pytest.raises(FlagFileError, match="prerequisites"):
        tenant_variation(data, "acme")


def test_sdk_sees_each_write_and_fires_a_change_event(flag_path: Path) -> None:
    set_tenants(flag_path, ["acme", "initech"], "legacy")
    set_tenant(flag_path, "globex", "new")
    changes: list[str] = []
    changed = threading.Event()

    def on_change(change: FlagChange) -> None:
        changes.append(change.key)
        changed.set()

    with sdk_client(flag_path) as client:
        data = read_flag_file(flag_path)
        for tenant in ("acme", "globex", "initech", "stranger"):
            assert route(client, tenant) == tenant_variation(data, tenant)
        assert route(client, "globex") == "new"
        client.flag_tracker.add_listener(on_change)

        for value in ("hold", "new"):
            assert set_tenant(flag_path, "acme", value) != value
            assert routes_to(client, "acme", value), f"the SDK missed acme -> {value} in 2 s"
            assert changed.wait(2.0), "no FlagChange after the write"
            assert changes[-1] == FLAG
            changed.clear()
        assert route(client, "initech") == "legacy"


def test_sdk_sees_back_to_back_writes(flag_path: Path) -> None:
    with sdk_client(flag_path) as client:
        for i in range(10):  # each pair lands within one poll interval
            set_tenant(flag_path, "acme", "hold")
            set_tenant(flag_path, "acme", "new" if i % 2 else "legacy")
            want = "new" if i % 2 else "legacy"
            assert routes_to(client, "acme", want), f"the SDK is stuck at round {i}"


def test_non_ascii_in_other_flags_reaches_the_sdk_intact(tmp_path: Path) -> None:
    path = tmp_path / "flags.json"
    banner = {"key": "banner", "version": 1, "on": True, "variations": ["déjà vu 😀"]}
    banner |= {"fallthrough": {"variation": 0}}
    write_json(path, {"flags": {"banner": banner}})
    set_tenant(path, "acme", "new")
    with sdk_client(path) as client:
        assert client.variation("banner", tenant_context("acme"), "") == "déjà vu 😀"
        assert route(client, "acme") == "new"


def test_demo_flags_file() -> None:
    path = REPO / "config" / "flags.json"
    data = read_flag_file(path)
    flag = routing_flag(data)
    assert flag["version"] == 1
    assert flag["variations"][flag["fallthrough"]["variation"]] == "legacy"
    assert targets_of(path) == {"legacy": ["acme", "initech"], "hold": [], "new": ["globex"]}
    want = {"acme": "legacy", "globex": "new", "initech": "legacy", "hooli": "legacy"}
    with sdk_client(path) as client:
        assert {t: route(client, t) for t in want} == want
    assert {t: tenant_variation(data, t) for t in want} == want
