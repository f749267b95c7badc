"""Shadow traffic (router/proxy/shadow.py) through a real router, against real backends on
loopback that differ on purpose (status, a header, a JSON field, body bytes, a noisy
timestamp, size) or agree, and a new side that is slow or down."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from router.control.cutover import cutover
from router.control.flagfile import read_flag_file, tenant_variation
from router.control.flagwriters import FileFlagWriter
from tests.conftest import (
    ADMIN_HEADERS,
    ADMIN_TOKEN,
    RunningRouter,
    StartRouter,
    router_settings,
    sample,
)
from tests.support.net import free_port

LARGE = 2 * 1024 * 1024  # over max_compare_bytes: compared by hash only


@dataclass
class Seen:
    """What a backend received: (method, path, X-Router-Shadow, X-Request-Id)."""

    requests: list[tuple[str, str, str | None, str | None]] = field(default_factory=list)

    def shadow_copies(self, marker: str = "new") -> list[tuple[str, str, str | None, str | None]]:
        return [r for r in self.requests if r[2] == marker]


def shadow_backend(side: str, seen: Seen, slow: float = 0.0) -> web.Application:
    """Endpoints that agree between the sides, and endpoints that differ on purpose."""
    counter = {"n": 0}

    async def record(request: web.Request) -> None:
        await request.read()
        seen.requests.append(
            (
                request.method,
                request.path_qs,
                request.headers.get("X-Router-Shadow"),
                request.headers.get("X-Request-Id"),
            )
        )
        if slow and request.headers.get("X-Router-Shadow"):
            await asyncio.sleep(slow)

    async def same(request: web.Request) -> web.Response:
        await record(request)
        return web.json_response({"id": 1, "items": [1, 2, 3], "name": "acme"})

    async def status(request: web.Request) -> web.Response:
        await record(request)
        return web.json_response({"ok": True}, status=200 if side == "legacy" else 500)

    async def header(request: web.Request) -> web.Response:
        await record(request)
        cache = "max-age=60" if side == "legacy" else "no-store"
        return web.json_response({"a": 1}, headers={"Cache-Control": cache})

    async def json_field(request: web.Request) -> web.Response:
        await record(request)
        return web.json_response({"order": {"total": 10 if side == "legacy" else 11, "n": 2}})

    async def stamped(request: web.Request) -> web.Response:
        # Differs between any two answers, legacy's included: noise.
        await record(request)
        counter["n"] += 1
        return web.json_response(
            {"total": 10, "generated_at": time.time(), "seq": f"{side}-{counter['n']}"}
        )

    async def raw_bytes(request: web.Request) -> web.Response:
        await record(request)
        text = "hello world" if side == "legacy" else "hello wOrld"
        return web.Response(text=text)

    async def large(request: web.Request) -> web.Response:
        await record(request)
        body = bytearray(b"x" * LARGE)
        if side == "new" and request.query.get("differ"):
            body[-1:] = b"y"
        return web.Response(body=bytes(body), content_type="application/octet-stream")

    async def write(request: web.Request) -> web.Response:
        await record(request)
        return web.json_response({"written": True})

    app = web.Application()
    app.router.add_get("/same", same)
    app.router.add_get("/status", status)
    app.router.add_get("/header", header)
    app.router.add_get("/json-field", json_field)
    app.router.add_get("/stamped", stamped)
    app.router.add_get("/bytes", raw_bytes)
    app.router.add_get("/large", large)
    app.router.add_route("*", "/write", write)
    return app


@dataclass
class Sides:
    legacy: Seen
    new: Seen
    legacy_url: str
    new_url: str


MakeSides = Callable[..., Awaitable[Sides]]


@pytest.fixture
async def make_sides(aiohttp_server: Any) -> MakeSides:
    async def make(new_slow: float = 0.0, new_down: bool = False) -> Sides:
        legacy, new = Seen(), Seen()
        legacy_server = await aiohttp_server(shadow_backend("legacy", legacy))
        if new_down:
            new_url = f"http://127.0.0.1:{free_port()}"
        else:
            new_server = await aiohttp_server(shadow_backend("new", new, slow=new_slow))
            new_url = str(new_server.make_url("")).rstrip("/")
        return Sides(legacy, new, str(legacy_server.make_url("")).rstrip("/"), new_url)

    return make


def shadow_router_settings(sides: Sides, flag_file: Path, **shadow: Any) -> Any:
    overrides = {f"shadow__{k}": v for k, v in shadow.items()}
    overrides.setdefault("shadow__tenants", {"acme": 1.0, "globex": 1.0})
    return router_settings(sides.legacy_url, sides.new_url, flag_file, **overrides)


async def get(
    client: aiohttp.ClientSession, router: RunningRouter, path: str, tenant: str = "acme"
) -> tuple[int, bytes]:
    async with client.get(router.url + path, headers={"X-Tenant-Id": tenant}) as response:
        return response.status, await response.read()


async def settled(router: RunningRouter, tenant: str, count: int, timeout: float = 10.0) -> Any:
    """The tenant's shadow stats once `count` copies have a verdict (or none is pending)."""
    shadower = router.app.shadower
    assert shadower is not None
    deadline = time.monotonic() + timeout
    while True:
        view = shadower.store.view(tenant)["tenants"].get(tenant)
        done = view and view["compared"] + view["noisy"] + view["incomplete"] >= count
        idle = shadower.active == 0 and shadower.queued == 0
        if (done and idle) or time.monotonic() > deadline:
            return view
        await asyncio.sleep(0.02)


# ---- comparisons through a real router ---------------------------------------------------


async def test_identical_answers_match_and_the_client_gets_legacys(
    make_sides: MakeSides, flag_file: Path, start_router: StartRouter, client: Any
) -> None:
    sides = await make_sides()
    router = await start_router(shadow_router_settings(sides, flag_file))
    for _ in range(10):
        status, body = await get(client, router, "/same?x=1")
        assert status == 200 and json.loads(body)["name"] == "acme"
    stats = await settled(router, "acme", 10)
    assert stats["shadowed"] == 10
    assert (stats["compared"], stats["matched"], stats["mismatched"]) == (10, 10, 0)
    assert stats["match_rate"] == 1.0
    # Each copy reached new as the same request, marked, with the client's request id.
    copies = sides.new.shadow_copies()
    assert len(copies) == 10 and all(c[:2] == ("GET", "/same?x=1") for c in copies)
    client_ids = {r[3] for r in sides.legacy.requests if r[2] is None}
    assert {c[3] for c in copies} == client_ids
    assert not [r for r in sides.new.requests if r[2] is None]  # no client request on new
    assert sample(router, "router_shadow_requests_total") == 10
    assert sample(router, "router_shadow_comparisons_total", result="matched") == 10
    assert sample(router, "router_shadow_duration_seconds_count", side="new") == 10
    assert sample(router, "router_shadow_duration_seconds_count", side="legacy") == 10
    # A client cannot pass its own request off as a copy (backends may treat copies as
    # side-effect free): the field is the router's.
    async with client.get(
        router.url + "/write", headers={"X-Tenant-Id": "initech", "X-Router-Shadow": "new"}
    ) as response:
        assert response.status == 200
    assert sides.legacy.requests[-1][:3] == ("GET", "/write", None)


@pytest.mark.parametrize(
    ("path", "kind", "detail"),
    [
        ("/status", "status", None),
        ("/header", "header", "cache-control"),
        ("/json-field", "body", "$.order.total: 10 != 11"),
        ("/bytes", "body", "bytes differ from offset 7"),
        ("/large?differ=1", "body", "compared by hash"),
    ],
)
async def test_each_kind_of_difference_is_found_and_described(
    make_sides: MakeSides,
    flag_file: Path,
    start_router: StartRouter,
    client: Any,
    path: str,
    kind: str,
    detail: str | None,
) -> None:
    sides = await make_sides()
    router = await start_router(shadow_router_settings(sides, flag_file))
    for _ in range(3):
        status, _ = await get(client, router, path)
        assert status == 200  # legacy's answer, whatever new says
    stats = await settled(router, "acme", 3)
    assert (stats["compared"], stats["mismatched"]) == (3, 3)
    assert stats["mismatch_kinds"][kind] == 3
    assert sum(stats["mismatch_kinds"].values()) == 3  # nothing else was flagged
    assert sample(router, "router_shadow_mismatches_total", kind=kind) == 3
    recent = router.app.shadower.store.view("acme")["recent"]  # type: ignore[union-attr]
    assert len(recent) == 3 and recent[0]["kinds"] == [kind] and recent[0]["path"] == path
    if kind == "status":
        assert recent[0]["status"] == {"legacy": 200, "new": 500}
    elif kind == "header":
        assert recent[0]["headers"] == {
            "cache-control": {"legacy": "max-age=60", "new": "no-store"}
        }
    else:
        assert detail is not None
        assert any(detail in line for line in recent[0]["body"]["diff"]), recent[0]["body"]


async def test_large_identical_bodies_match_by_hash(
    make_sides: MakeSides, flag_file: Path, start_router: StartRouter, client: Any
) -> None:
    sides = await make_sides()
    router = await start_router(shadow_router_settings(sides, flag_file))
    status, body = await get(client, router, "/large")
    assert status == 200 and len(body) == LARGE
    stats = await settled(router, "acme", 1)
    assert (stats["compared"], stats["matched"]) == (1, 1)


async def test_ignored_json_keys_do_not_count_as_differences(
    make_sides: MakeSides, flag_file: Path, start_router: StartRouter, client: Any
) -> None:
    sides = await make_sides()
    plain = await start_router(shadow_router_settings(sides, flag_file))
    normalised = await start_router(
        shadow_router_settings(sides, flag_file, ignore_json_keys=["generated_at", "$.seq"])
    )
    for router in (plain, normalised):
        for _ in range(3):
            await get(client, router, "/stamped")
    assert (await settled(plain, "acme", 3))["mismatched"] == 3
    stats = await settled(normalised, "acme", 3)
    assert (stats["matched"], stats["mismatched"]) == (3, 0)


async def test_noise_filter_learns_what_differs_between_two_legacy_answers(
    make_sides: MakeSides, flag_file: Path, start_router: StartRouter, client: Any
) -> None:
    sides = await make_sides()
    router = await start_router(shadow_router_settings(sides, flag_file, noise_filter=True))
    for _ in range(4):
        await get(client, router, "/stamped")
    stats = await settled(router, "acme", 4)
    assert stats["noise"]["json_paths"] == ["$.generated_at", "$.seq"]
    assert (stats["matched"], stats["mismatched"]) == (4, 0)
    # The replays reached legacy, marked as such.
    assert len(sides.legacy.shadow_copies("legacy-replay")) == 4
    # A real difference is not hidden by what was learned.
    for _ in range(2):
        await get(client, router, "/json-field")
    stats = await settled(router, "acme", 6)
    assert stats["mismatched"] == 2 and stats["mismatch_kinds"]["body"] == 2


async def test_writes_and_requests_with_bodies_are_never_shadowed(
    make_sides: MakeSides, flag_file: Path, start_router: StartRouter, client: Any
) -> None:
    sides = await make_sides()
    router = await start_router(shadow_router_settings(sides, flag_file))
    for method in ("POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        for data in (b"{}", None):  # with a body, and without one (the method alone)
            async with client.request(
                method, router.url + "/write", headers={"X-Tenant-Id": "acme"}, data=data
            ) as response:
                assert response.status == 200, method
    async with client.get(
        router.url + "/write", headers={"X-Tenant-Id": "acme"}, data=b"body"
    ) as response:
        assert response.status == 200
    await asyncio.sleep(0.2)
    assert sides.new.requests == []
    assert len(sides.legacy.requests) == 11
    assert sample(router, "router_shadow_requests_total") == 0


async def test_only_shadowed_tenants_on_legacy_are_copied(
    make_sides: MakeSides, flag_file: Path, start_router: StartRouter, client: Any
) -> None:
    sides = await make_sides()
    # acme: listed, on legacy; globex: listed, on new (nothing to compare against);
    # initech: on legacy, not listed.
    router = await start_router(shadow_router_settings(sides, flag_file))
    await get(client, router, "/same", "globex")
    await get(client, router, "/same", "initech")
    await get(client, router, "/same", "acme")
    await settled(router, "acme", 1)
    assert [r[1] for r in sides.new.shadow_copies()] == ["/same"]
    assert len([r for r in sides.new.requests if r[2] is None]) == 1  # globex's own request
    assert set(router.app.shadower.store.view()["tenants"]) == {"acme"}  # type: ignore[union-attr]


async def test_sample_rate_copies_about_that_fraction(
    make_sides: MakeSides, flag_file: Path, start_router: StartRouter, client: Any
) -> None:
    sides = await make_sides()
    router = await start_router(
        shadow_router_settings(sides, flag_file, tenants=["acme"], sample_rate=0.25)
    )
    for _ in range(200):
        await get(client, router, "/same")
    await asyncio.sleep(0.3)
    copies = len(sides.new.shadow_copies())
    # Binomial(200, 0.25): mean 50, sd 6.1; 20..80 is about 5 sd either side.
    assert 20 <= copies <= 80, copies


async def test_a_slow_new_side_does_not_slow_the_client(
    make_sides: MakeSides, flag_file: Path, start_router: StartRouter, client: Any
) -> None:
    """Copies to a new side that takes 0.5 s each: the clients' latency stays that of an
    unshadowed tenant (median ratio, generous bound), and copies beyond the bounds are
    dropped, not queued."""
    sides = await make_sides(new_slow=0.5)
    router = await start_router(
        shadow_router_settings(
            sides, flag_file, tenants=["acme"], sample_rate=1.0, max_concurrency=2, max_queue=2
        )
    )

    async def latencies(tenant: str) -> list[float]:
        times = []
        for _ in range(40):
            started = time.perf_counter()
            status, _ = await get(client, router, "/same", tenant)
            times.append(time.perf_counter() - started)
            assert status == 200
        return times

    await latencies("initech")  # warm up connections
    unshadowed = statistics.median(await latencies("initech"))
    shadowed_times = await latencies("acme")
    shadowed = statistics.median(shadowed_times)
    # The figures, for whoever runs this with -s (the closing note of issue 8 quotes them).
    print(
        f"\nmedian client latency: shadowed {shadowed * 1000:.3f} ms, unshadowed "
        f"{unshadowed * 1000:.3f} ms, ratio {shadowed / unshadowed:.2f}; max shadowed "
        f"{max(shadowed_times) * 1000:.3f} ms"
    )
    assert shadowed < 3 * unshadowed + 0.005, (shadowed, unshadowed)
    assert max(shadowed_times) < 0.25  # no client waited for a 0.5 s copy
    shadower = router.app.shadower
    assert shadower is not None
    assert shadower.active <= 2 and shadower.queued <= 2
    dropped = sample(router, "router_shadow_dropped_total", reason="queue_full")
    assert dropped >= 30  # 40 offered in about 40 ms; at most 4 fit
    assert shadower.store.view("acme")["tenants"]["acme"]["dropped"] == dropped


async def test_the_queue_bound_drops_a_burst_instead_of_growing(
    make_sides: MakeSides, flag_file: Path, start_router: StartRouter, client: Any
) -> None:
    sides = await make_sides(new_slow=0.3)
    router = await start_router(
        shadow_router_settings(sides, flag_file, max_concurrency=1, max_queue=2)
    )
    shadower = router.app.shadower
    assert shadower is not None
    results = await asyncio.gather(*(get(client, router, "/same") for _ in range(30)))
    assert all(status == 200 for status, _ in results)
    assert shadower.active <= 1 and shadower.queued <= 2
    stats = await settled(router, "acme", 3)
    assert stats["shadowed"] + stats["dropped"] == 30
    assert stats["shadowed"] <= 6 and stats["dropped"] >= 24
    assert sample(router, "router_shadow_dropped_total", reason="queue_full") == stats["dropped"]


async def test_a_new_side_that_is_down_is_an_error_mismatch_not_a_client_error(
    make_sides: MakeSides, flag_file: Path, start_router: StartRouter, client: Any
) -> None:
    sides = await make_sides(new_down=True)
    router = await start_router(shadow_router_settings(sides, flag_file))
    status, _ = await get(client, router, "/same")
    assert status == 200
    stats = await settled(router, "acme", 1)
    assert stats["mismatch_kinds"]["error"] == 1
    recent = router.app.shadower.store.view("acme")["recent"]  # type: ignore[union-attr]
    assert recent[0]["error"].startswith("upstream_connect_failed")


async def test_head_requests_compare_status_and_headers(
    make_sides: MakeSides, flag_file: Path, start_router: StartRouter, client: Any
) -> None:
    sides = await make_sides()
    router = await start_router(shadow_router_settings(sides, flag_file))
    for path in ("/same", "/header"):
        async with client.head(router.url + path, headers={"X-Tenant-Id": "acme"}) as response:
            assert response.status == 200
    stats = await settled(router, "acme", 2)
    assert (stats["matched"], stats["mismatched"]) == (1, 1)
    assert stats["mismatch_kinds"]["header"] == 1
    assert [c[0] for c in sides.new.shadow_copies()] == ["HEAD", "HEAD"]


async def test_excluded_paths_are_not_copied(
    make_sides: MakeSides, flag_file: Path, start_router: StartRouter, client: Any
) -> None:
    sides = await make_sides()
    router = await start_router(shadow_router_settings(sides, flag_file, exclude_paths=["/sa*"]))
    await get(client, router, "/same")
    await get(client, router, "/status")
    await settled(router, "acme", 1)
    assert [c[1] for c in sides.new.shadow_copies()] == ["/status"]


async def test_shadowing_by_flag_follows_flag_changes(
    make_sides: MakeSides, flag_file: Path, start_router: StartRouter, client: Any
) -> None:
    """shadow.flag_key: a boolean flag per tenant, in the same flag source as the routing
    flag; turning it off stops the copies at once (the decision cache is cleared)."""
    write_shadow_flag(flag_file, ["acme"], version=1)
    sides = await make_sides()
    router = await start_router(
        shadow_router_settings(
            sides, flag_file, tenants=[], flag_key="router-shadow", sample_rate=1.0
        )
    )
    await get(client, router, "/same", "acme")
    await get(client, router, "/same", "initech")
    await settled(router, "acme", 1)
    assert len(sides.new.shadow_copies()) == 1
    updates = router.app.flags.updates
    write_shadow_flag(flag_file, [], version=2)
    for _ in range(100):
        if router.app.flags.updates > updates:
            break
        await asyncio.sleep(0.05)
    assert router.app.flags.updates > updates, "the shadow flag's change was not seen"
    await get(client, router, "/same", "acme")
    await asyncio.sleep(0.2)
    assert len(sides.new.shadow_copies()) == 1


def write_shadow_flag(path: Path, tenants: list[str], version: int) -> None:
    data = read_flag_file(path)
    data["flags"]["router-shadow"] = {
        "key": "router-shadow",
        "version": version,
        "on": True,
        "variations": [False, True],
        "offVariation": 0,
        "fallthrough": {"variation": 0},
        "contextTargets": [{"contextKind": "tenant", "variation": 1, "values": tenants}],
        "targets": [],
        "rules": [],
        "prerequisites": [],
        "salt": "shadow",
    }
    before = path.stat().st_mtime_ns
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
    # The SDK polls the mtime: make sure it moved even within the clock's granularity.
    os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


async def test_a_client_that_leaves_mid_body_gives_no_verdict(
    make_sides: MakeSides, flag_file: Path, start_router: StartRouter
) -> None:
    sides = await make_sides()
    router = await start_router(shadow_router_settings(sides, flag_file))
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
    writer.write(b"GET /large HTTP/1.1\r\nHost: x\r\nX-Tenant-Id: acme\r\n\r\n")
    await writer.drain()
    await reader.read(1000)  # the head and a little of the body
    writer.transport.abort()
    stats = await settled(router, "acme", 1)
    assert stats["incomplete"] == 1 and stats["compared"] == 0


# ---- the admin API -------------------------------------------------------------------


async def test_admin_shadow_endpoint(
    make_sides: MakeSides, flag_file: Path, start_router: StartRouter, client: Any
) -> None:
    sides = await make_sides()
    router = await start_router(shadow_router_settings(sides, flag_file))
    await get(client, router, "/same")
    await get(client, router, "/status")
    await get(client, router, "/same", "globex")
    await settled(router, "acme", 2)
    async with client.get(router.admin_url + "/admin/shadow") as response:
        assert response.status == 401
    url = router.admin_url + "/admin/shadow?tenant=acme&limit=5"
    async with client.get(url, headers=ADMIN_HEADERS) as response:
        assert response.status == 200
        body = await response.json()
    assert body["enabled"] is True
    assert body["workers"] == {"answered": 1, "missing": 0}
    acme = body["tenants"]["acme"]
    assert (acme["compared"], acme["matched"], acme["mismatched"]) == (2, 1, 1)
    assert acme["match_rate"] == 0.5
    assert [e["path"] for e in body["recent"]] == ["/status"]
    async with client.get(
        router.admin_url + "/admin/shadow?tenant=a%20b", headers=ADMIN_HEADERS
    ) as response:
        assert response.status == 400 and (await response.json())["error"] == "bad_request"
    async with client.get(
        router.admin_url + "/admin/shadow?limit=x", headers=ADMIN_HEADERS
    ) as response:
        assert response.status == 400
    async with client.delete(
        router.admin_url + "/admin/shadow/acme", headers=ADMIN_HEADERS
    ) as response:
        assert response.status == 200 and (await response.json())["reset"] is True
    async with client.get(url, headers=ADMIN_HEADERS) as response:
        assert (await response.json())["tenants"] == {}


async def test_admin_shadow_without_shadowing_configured(
    make_sides: MakeSides, flag_file: Path, start_router: StartRouter, client: Any
) -> None:
    sides = await make_sides()
    router = await start_router(router_settings(sides.legacy_url, sides.new_url, flag_file))
    assert router.app.shadower is None
    await get(client, router, "/same")
    async with client.get(router.admin_url + "/admin/shadow", headers=ADMIN_HEADERS) as response:
        body = await response.json()
    assert body["enabled"] is False and body["tenants"] == {} and body["recent"] == []
    assert sides.new.requests == []


# ---- the cutover gate, end to end ----------------------------------------------------


async def test_cutover_requires_the_shadow_match_rate_of_a_real_router(
    make_sides: MakeSides, flag_file: Path, start_router: StartRouter, client: Any
) -> None:
    """`router cutover --require-shadow-match`: refused (flag untouched) with too few
    comparisons, refused below the rate, allowed once the router's figures are good."""
    sides = await make_sides()
    router = await start_router(shadow_router_settings(sides, flag_file))

    async def attempt() -> Any:
        return await cutover(
            "acme",
            FileFlagWriter(flag_file),
            [router.admin_url],
            ADMIN_TOKEN,
            shadow_match=0.99,
            shadow_min_samples=20,
        )

    for _ in range(10):
        await get(client, router, "/same")
    await settled(router, "acme", 10)
    result = await attempt()
    assert (result.outcome, tenant_variation(read_flag_file(flag_file), "acme")) == (
        "refused",
        "legacy",
    )
    assert "only 10 shadow comparisons for acme (need 20)" in result.reason
    for _ in range(10):
        await get(client, router, "/same")
    await get(client, router, "/status")
    await settled(router, "acme", 21)
    result = await attempt()
    assert result.outcome == "refused" and "below the required" in result.reason, result.reason
    assert tenant_variation(read_flag_file(flag_file), "acme") == "legacy"
    # new was fixed (say): count afresh, and only matches this time.
    async with client.delete(
        router.admin_url + "/admin/shadow/acme", headers=ADMIN_HEADERS
    ) as response:
        assert response.status == 200
    for _ in range(20):
        await get(client, router, "/same")
    await settled(router, "acme", 20)
    result = await attempt()
    assert result.outcome == "moved", (result.reason, result.steps)
    assert "shadow 100.00 % of 20" in result.steps[0].detail
    assert tenant_variation(read_flag_file(flag_file), "acme") == "new"
