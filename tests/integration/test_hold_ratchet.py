"""The router's side of a cutover, in-process on real sockets: hold, the ratchet ledger,
in-flight accounting, admin auth, signed overrides and pinned paths."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from router.control.flagfile import set_tenants
from router.control.override import signed_headers
from tests.conftest import (
    ADMIN_HEADERS,
    Backends,
    RawUpstream,
    RunningRouter,
    StartRouter,
    echo_headers,
    http_response,
    read_http_request,
    router_settings,
    sample,
)
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_for

SECRET = "test-override-secret"


async def get(
    client: aiohttp.ClientSession, url: str, tenant: str | None = None, **kwargs: Any
) -> tuple[int, Mapping[str, str], Any]:
    headers = dict(kwargs.pop("headers", {}))
    if tenant is not None:
        headers["X-Tenant-Id"] = tenant
    async with client.get(url, headers=headers, **kwargs) as response:
        body = await response.json(content_type=None)
        return response.status, response.headers.copy(), body


async def admin(client: aiohttp.ClientSession, router: RunningRouter, path: str) -> Any:
    async with client.get(f"{router.admin_url}{path}", headers=ADMIN_HEADERS) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def start(
    backends: Backends, flag_file: Path, start_router: StartRouter, **overrides: Any
) -> RunningRouter:
    return await start_router(
        router_settings(backends.url("legacy"), backends.url("new"), flag_file, **overrides)
    )


# ---- hold ------------------------------------------------------------------------------


async def test_held_requests_wait_then_go_where_the_flag_points(
    backends: Backends, flag_file: Path, start_router: StartRouter, client: aiohttp.ClientSession
) -> None:
    router = await start(backends, flag_file, start_router)
    set_tenants(flag_file, ["acme"], "hold")
    await wait_for(lambda: router.app.decider.evaluate("acme").side == "hold", what="hold seen")
    held = [asyncio.ensure_future(get(client, f"{router.url}/h{i}", "acme")) for i in range(5)]
    await wait_for(lambda: router.app.decider.holds.held("acme") == 5, what="5 held")
    state = await admin(client, router, "/admin/tenants/acme")
    assert (state["target"], state["held"]) == ("hold", 5)
    assert sample(router, "router_held_requests") == 5
    assert not any(task.done() for task in held)  # waiting, not refused

    set_tenants(flag_file, ["acme"], "new")
    released = time.monotonic()
    results = await asyncio.wait_for(asyncio.gather(*held), 5)
    print(f"5 held requests released {time.monotonic() - released:.3f} s after the flag write")
    for status, headers, body in results:
        assert status == 200
        assert body["side"] == "new"
        assert headers["X-Routed-To"] == "new; reason=flag"
    assert router.app.decider.holds.total == 0
    assert sample(router, "router_route_decisions_total", target="hold", reason="flag") == 5


async def test_held_requests_are_released_in_arrival_order(
    raw_upstream: Any, flag_file: Path, start_router: StartRouter, client: aiohttp.ClientSession
) -> None:
    arrivals: list[str] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_http_request(reader)
            if not head:
                return
            arrivals.append(head.split(b" ")[1].decode())
            writer.write(http_response(b"{}", b"Content-Type: application/json"))
            await writer.drain()

    upstream: RawUpstream = await raw_upstream(record)
    router = await start_router(router_settings(upstream.url, upstream.url, flag_file))
    set_tenants(flag_file, ["acme"], "hold")
    await wait_for(lambda: router.app.decider.evaluate("acme").side == "hold")
    tasks = []
    for i in range(8):
        tasks.append(asyncio.ensure_future(get(client, f"{router.url}/order/{i}", "acme")))
        await wait_for(lambda i=i: router.app.decider.holds.held("acme") == i + 1)
    set_tenants(flag_file, ["acme"], "legacy")
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert arrivals == [f"/order/{i}" for i in range(8)]


async def test_a_hold_that_outlasts_its_timeout_is_a_503_with_retry_after(
    backends: Backends, flag_file: Path, start_router: StartRouter, client: aiohttp.ClientSession
) -> None:
    router = await start(backends, flag_file, start_router, routing__hold_timeout=0.4)
    set_tenants(flag_file, ["acme"], "hold")
    await wait_for(lambda: router.app.decider.evaluate("acme").side == "hold")
    started = time.monotonic()
    status, headers, body = await get(client, f"{router.url}/x", "acme")
    elapsed = time.monotonic() - started
    assert status == 503
    assert body["error"] == "hold_timeout"
    assert headers["Retry-After"] == "1"
    assert body["request_id"] == headers["X-Request-Id"]
    assert 0.35 < elapsed < 2.0
    assert sample(router, "router_hold_timeouts_total") == 1
    assert sample(router, "router_requests_total", target="hold", method="GET", code="503") == 1
    assert router.app.decider.holds.total == 0  # nothing left behind
    # Other tenants are not held meanwhile.
    status, _, body = await get(client, f"{router.url}/x", "globex")
    assert (status, body["side"]) == (200, "new")


async def test_held_requests_are_bounded_per_tenant_and_in_total(
    backends: Backends, flag_file: Path, start_router: StartRouter, client: aiohttp.ClientSession
) -> None:
    router = await start(
        backends, flag_file, start_router,
        routing__max_held_per_tenant=2, routing__max_held_total=3, routing__hold_timeout=5,
    )  # fmt: skip
    set_tenants(flag_file, ["acme", "initech"], "hold")
    await wait_for(lambda: router.app.decider.evaluate("initech").side == "hold")
    first = [asyncio.ensure_future(get(client, f"{router.url}/a", "acme")) for _ in range(2)]
    await wait_for(lambda: router.app.decider.holds.total == 2)
    # A third for acme: over the per-tenant bound, refused at once.
    started = time.monotonic()
    status, _, body = await get(client, f"{router.url}/a", "acme")
    assert (status, body["error"]) == (503, "hold_overflow")
    assert time.monotonic() - started < 1.0
    second = asyncio.ensure_future(get(client, f"{router.url}/i", "initech"))
    await wait_for(lambda: router.app.decider.holds.total == 3)
    # The total bound: initech is under its own bound but the router is full.
    status, _, body = await get(client, f"{router.url}/i", "initech")
    assert (status, body["error"]) == (503, "hold_overflow")
    set_tenants(flag_file, ["acme", "initech"], "legacy")
    for status, _, body in await asyncio.wait_for(asyncio.gather(*first, second), 5):
        assert (status, body["side"]) == (200, "legacy")


# ---- ratchet -----------------------------------------------------------------------------


def ledger_path(router: RunningRouter) -> Path:
    url = router.app.settings.ledger
    return Path(url.removeprefix("sqlite://"))


def ledgered(path: Path, tenant: str) -> bool:
    with sqlite3.connect(path) as db:
        tables = [r[0] for r in db.execute("select name from sqlite_master where type='table'")]
        for table in tables:
            columns = [r[1] for r in db.execute(f"pragma table_info({table})")]
            if "tenant" in columns:
                found = db.execute(f"select 1 from {table} where tenant = ?", (tenant,)).fetchone()
                if found:
                    return True
    return False


async def test_new_never_serves_a_tenant_before_its_ledger_entry_is_durable(
    raw_upstream: Any, flag_file: Path, start_router: StartRouter, client: aiohttp.ClientSession
) -> None:
    seen: list[bool] = []
    paths: dict[str, Path] = {}

    async def check_ledger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_http_request(reader)
            if not head:
                return
            # Read from another connection, as another process would after a crash.
            seen.append(ledgered(paths["ledger"], "globex"))
            writer.write(http_response(b"{}", b"Content-Type: application/json"))
            await writer.drain()

    legacy = await raw_upstream(check_ledger)
    new = await raw_upstream(check_ledger)
    router = await start_router(router_settings(legacy.url, new.url, flag_file))
    paths["ledger"] = ledger_path(router)
    assert not ledgered(paths["ledger"], "globex")
    results = await asyncio.gather(*(get(client, f"{router.url}/", "globex") for _ in range(10)))
    assert all(status == 200 for status, _, _ in results)
    assert seen == [True] * 10


async def test_the_ratchet_refuses_a_flip_back_to_legacy_and_survives_a_restart(
    backends: Backends, flag_file: Path, start_router: StartRouter, client: aiohttp.ClientSession
) -> None:
    ledger = Path(flag_file.parent / "ratchet.db")
    router = await start(backends, flag_file, start_router, ledger=f"sqlite:///{ledger}")
    status, _, body = await get(client, f"{router.url}/", "globex")
    assert (status, body["side"]) == (200, "new")
    assert (await admin(client, router, "/admin/tenants/globex"))["ledgered"] is True

    for value in ("legacy", "hold"):
        set_tenants(flag_file, ["globex"], value)
        await wait_for(lambda v=value: router.app.flags.variation("globex", "") == v)
        await wait_for(lambda: router.app.decider.decide("globex").reason == "ratchet")
        status, headers, body = await get(client, f"{router.url}/", "globex")
        assert (status, body["side"]) == (200, "new")
        assert headers["X-Routed-To"] == "new; reason=ratchet"
        state = await admin(client, router, "/admin/tenants/globex")
        assert (state["target"], state["reason"]) == ("new", "ratchet")
    assert sample(router, "router_ratchet_refusals_total") == 2
    # A tenant never served by new is not affected.
    status, _, body = await get(client, f"{router.url}/", "acme")
    assert body["side"] == "legacy"

    # A new router process (a restart) on the same SQLite ledger: still refused.
    set_tenants(flag_file, ["globex"], "legacy")
    restarted = await start(backends, flag_file, start_router, ledger=f"sqlite:///{ledger}")
    status, headers, body = await get(client, f"{restarted.url}/", "globex")
    assert (status, body["side"]) == (200, "new")
    assert headers["X-Routed-To"] == "new; reason=ratchet"


async def test_a_rollback_in_the_ledger_is_seen_on_the_next_flag_change(
    backends: Backends, flag_file: Path, start_router: StartRouter, client: aiohttp.ClientSession
) -> None:
    router = await start(backends, flag_file, start_router)
    await get(client, f"{router.url}/", "globex")
    assert router.app.ledger.ledger is not None
    assert await router.app.ledger.ledger.remove("globex")  # what `tenants rollback` does
    set_tenants(flag_file, ["globex"], "legacy")
    await wait_for(lambda: router.app.decider.decide("globex").side == "legacy")
    status, headers, body = await get(client, f"{router.url}/", "globex")
    assert (status, body["side"]) == (200, "legacy")
    assert headers["X-Routed-To"] == "legacy; reason=flag"


# ---- in-flight accounting and admin auth -------------------------------------------------


async def test_in_flight_requests_are_counted_per_tenant_and_side(
    router: RunningRouter, client: aiohttp.ClientSession
) -> None:
    async def slow_request(tenant: str) -> int:
        url = f"{router.url}/__slow/0.6"
        async with client.get(url, headers={"X-Tenant-Id": tenant}) as response:
            assert await response.text() == "slow"
            return response.status

    slow = [
        asyncio.ensure_future(slow_request("acme")),
        asyncio.ensure_future(slow_request("acme")),
        asyncio.ensure_future(slow_request("globex")),
    ]
    await wait_for(lambda: router.app.tenant_inflight.get("acme", {}).get("legacy") == 2)
    await wait_for(lambda: router.app.tenant_inflight.get("globex", {}).get("new") == 1)
    state = await admin(client, router, "/admin/tenants/acme")
    assert state["inflight"] == {"legacy": 2, "new": 0}
    assert (state["target"], state["reason"], state["held"]) == ("legacy", "flag", 0)
    listing = await admin(client, router, "/admin/inflight")
    assert listing["tenants"]["acme"]["legacy"] == 2
    assert listing["tenants"]["globex"]["new"] == 1
    assert await asyncio.wait_for(asyncio.gather(*slow), 5) == [200, 200, 200]
    assert (await admin(client, router, "/admin/tenants/acme"))["inflight"] == {
        "legacy": 0,
        "new": 0,
    }
    assert router.app.tenant_inflight == {}
    assert (await admin(client, router, "/admin/inflight"))["tenants"] == {}


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "test-admin-token"}],
    ids=["none", "wrong", "no-scheme"],
)
async def test_admin_routes_need_the_bearer_token(
    router: RunningRouter, client: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    for path in ("/admin/tenants/acme", "/admin/inflight"):
        async with client.get(f"{router.admin_url}{path}", headers=headers) as response:
            assert response.status == 401
            assert (await response.json())["error"] == "unauthorized"
    for path in ("/healthz", "/readyz", "/metrics"):  # what the ALB and Prometheus use
        async with client.get(f"{router.admin_url}{path}") as response:
            assert response.status == 200


async def test_admin_routes_are_closed_without_a_configured_token(
    backends: Backends, flag_file: Path, start_router: StartRouter, client: aiohttp.ClientSession
) -> None:
    router = await start(backends, flag_file, start_router, admin_token=None)
    async with client.get(f"{router.admin_url}/admin/inflight", headers=ADMIN_HEADERS) as r:
        assert r.status == 403
        assert (await r.json())["error"] == "admin_disabled"


# ---- signed overrides and pinned paths ---------------------------------------------------


async def test_a_signed_override_forces_the_side_and_is_never_forwarded(
    backends: Backends, flag_file: Path, start_router: StartRouter, client: aiohttp.ClientSession
) -> None:
    router = await start(backends, flag_file, start_router, override_secret=SECRET)
    status, headers, body = await get(
        client, f"{router.url}/echo", "acme", headers=signed_headers(SECRET, "new", "acme")
    )
    assert (status, body["side"]) == (200, "new")
    assert headers["X-Routed-To"] == "new; reason=override"
    seen = echo_headers(body)
    assert "x-router-target" not in seen and "x-router-signature" not in seen
    # An override to new is test traffic: it does not enter the ratchet ledger.
    assert "acme" not in router.app.ledger.tenants


@pytest.mark.parametrize(
    "make_headers",
    [
        lambda: {"X-Router-Target": "new"},
        lambda: signed_headers("another-secret", "new", "acme"),
        lambda: signed_headers(SECRET, "new", "globex"),  # signed for another tenant
        lambda: signed_headers(SECRET, "new", "acme", now=time.time() - 3600),  # expired
        lambda: {"X-Router-Target": "new", "X-Router-Signature": "t=1,v1=zz"},
    ],
    ids=["unsigned", "wrong-secret", "other-tenant", "expired", "garbage"],
)
async def test_an_unsigned_or_bad_override_is_ignored_and_counted(
    backends: Backends,
    flag_file: Path,
    start_router: StartRouter,
    client: aiohttp.ClientSession,
    make_headers: Any,
) -> None:
    router = await start(backends, flag_file, start_router, override_secret=SECRET)
    status, headers, body = await get(client, f"{router.url}/echo", "acme", headers=make_headers())
    assert (status, body["side"]) == (200, "legacy")
    assert headers["X-Routed-To"] == "legacy; reason=flag"
    seen = echo_headers(body)
    assert "x-router-target" not in seen and "x-router-signature" not in seen
    text = router.app.metrics.snapshot()["counters"]["router_override_rejections_total"]
    assert sum(v for _, v in text) == 1


async def test_an_override_to_legacy_cannot_beat_the_ratchet(
    backends: Backends, flag_file: Path, start_router: StartRouter, client: aiohttp.ClientSession
) -> None:
    router = await start(backends, flag_file, start_router, override_secret=SECRET)
    await get(client, f"{router.url}/", "globex")  # served by new: ledgered
    status, headers, body = await get(
        client, f"{router.url}/", "globex", headers=signed_headers(SECRET, "legacy", "globex")
    )
    assert (status, body["side"]) == (200, "new")
    assert headers["X-Routed-To"] == "new; reason=ratchet"


async def test_pinned_paths_always_go_to_their_side(
    backends: Backends, flag_file: Path, start_router: StartRouter, client: aiohttp.ClientSession
) -> None:
    pinned = [
        {"pattern": "/lifecycle/**", "target": "new"},
        {"pattern": "/hooks/*/legacy", "target": "legacy"},
    ]
    router = await start(backends, flag_file, start_router, routing__pinned_paths=pinned)
    cases = [
        ("/lifecycle/installed", "acme", "new", "pinned-path"),
        ("/lifecycle/a/b?x=1", "acme", "new", "pinned-path"),
        ("/lifecyclex", "acme", "legacy", "flag"),
        ("/hooks/x/legacy", "globex", "legacy", "pinned-path"),
        ("/hooks/x/y/legacy", "globex", "new", "flag"),  # * stays within one segment
    ]
    for path, tenant, side, reason in cases:
        status, headers, body = await get(client, f"{router.url}{path}", tenant)
        assert (status, body["side"], headers["X-Routed-To"]) == (
            200,
            side,
            f"{side}; reason={reason}",
        ), path


async def test_two_routers_sharing_a_redis_ledger_both_refuse_the_flip_back(
    backends: Backends,
    flag_file: Path,
    start_router: StartRouter,
    client: aiohttp.ClientSession,
    redis_server: RedisServer,
) -> None:
    """A fleet: router B never served globex, but router A did. After the flag goes back
    to legacy, B refuses too: it re-reads the shared ledger on the flag change."""
    ledger = redis_server.url()
    a = await start(backends, flag_file, start_router, ledger=ledger)
    b = await start(backends, flag_file, start_router, ledger=ledger)
    assert "globex" not in b.app.ledger.tenants
    status, _, body = await get(client, f"{a.url}/", "globex")  # served by new, through A
    assert (status, body["side"]) == (200, "new")
    assert "globex" not in b.app.ledger.tenants  # B has not re-read the ledger yet

    set_tenants(flag_file, ["globex"], "legacy")
    for router in (a, b):
        await wait_for(lambda r=router: r.app.flags.variation("globex", "") == "legacy")
        await wait_for(lambda r=router: r.app.decider.decide("globex").reason == "ratchet")
        status, headers, body = await get(client, f"{router.url}/", "globex")
        assert (status, body["side"]) == (200, "new")
        assert headers["X-Routed-To"] == "new; reason=ratchet"
    # A tenant that neither served on new follows the flag both ways on both routers.
    status, _, body = await get(client, f"{b.url}/", "acme")
    assert body["side"] == "legacy"
