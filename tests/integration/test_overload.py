"""Overload protection (settings.limits): connections, requests in flight and event-loop
lag each shed new work with 503 overloaded + Retry-After, and the router recovers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import Backends, StartRouter, raw_request, router_settings, sample


async def test_connections_over_the_cap_get_a_503_and_open_ones_keep_working(
    backends: Backends, flag_file: Path, start_router: StartRouter
) -> None:
    router = await start_router(
        router_settings(
            backends.url("legacy"), backends.url("new"), flag_file, limits__max_connections=3
        )
    )
    held = [await asyncio.open_connection("127.0.0.1", router.port) for _ in range(3)]
    await asyncio.sleep(0.1)
    refused = await raw_request(router.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert refused.status == 503
    assert refused.json()["error"] == "overloaded"
    assert refused.headers["retry-after"] == "1"
    assert sample(router, "router_shed_requests_total", reason="connections") == 1
    # The open connections are still served.
    for reader, writer in held:
        writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Tenant-Id: acme\r\n\r\n")
        line = await asyncio.wait_for(reader.readline(), 5)
        assert line.startswith(b"HTTP/1.1 200"), line
        writer.close()
    await asyncio.sleep(0.2)  # the closes reach the router: room again
    again = await raw_request(
        router.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert again.status == 200


async def test_requests_over_the_in_flight_bound_are_shed_at_once(
    backends: Backends, flag_file: Path, start_router: StartRouter, client: aiohttp.ClientSession
) -> None:
    router = await start_router(
        router_settings(
            backends.url("legacy"), backends.url("new"), flag_file, limits__max_inflight=2
        )
    )

    async def slow() -> int:
        async with client.get(f"{router.url}/__slow/0.6", headers={"X-Tenant-Id": "acme"}) as r:
            await r.read()
            return r.status

    busy = [asyncio.ensure_future(slow()) for _ in range(2)]
    deadline = time.monotonic() + 5
    while sample(router, "router_inflight_requests", target="legacy") < 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    started = time.monotonic()
    async with client.get(f"{router.url}/x", headers={"X-Tenant-Id": "acme"}) as response:
        body = await response.json()
        assert response.status == 503
        assert body["error"] == "overloaded"
        assert response.headers["Retry-After"] == "1"
    assert time.monotonic() - started < 0.5  # refused at once, not queued
    assert sample(router, "router_shed_requests_total", reason="inflight") == 1
    assert await asyncio.gather(*busy) == [200, 200]
    async with client.get(f"{router.url}/x", headers={"X-Tenant-Id": "acme"}) as response:
        assert response.status == 200


async def test_a_lagging_event_loop_sheds_until_it_recovers(
    backends: Backends, flag_file: Path, start_router: StartRouter, client: aiohttp.ClientSession
) -> None:
    router = await start_router(
        router_settings(
            backends.url("legacy"), backends.url("new"), flag_file, limits__max_loop_lag=0.2
        )
    )
    await router.app.start()  # the lag monitor (the fixture starts flags and ledger only)
    await asyncio.sleep(0.25)
    assert not router.app.state.lagging
    time.sleep(0.6)  # noqa: ASYNC251 -- blocking the router's loop is the point
    await asyncio.sleep(0.01)  # the monitor's timer fires 0.5 s late
    assert router.app.state.lagging
    async with client.get(f"{router.url}/x", headers={"X-Tenant-Id": "acme"}) as response:
        assert response.status == 503
        assert (await response.json())["error"] == "overloaded"
    assert sample(router, "router_shed_requests_total", reason="loop_lag") == 1
    assert sample(router, "router_event_loop_lag_seconds") > 0.2
    await asyncio.sleep(0.35)  # a few on-time ticks
    assert not router.app.state.lagging
    async with client.get(f"{router.url}/x", headers={"X-Tenant-Id": "acme"}) as response:
        assert response.status == 200


async def test_request_bodies_over_the_limit_get_413(
    backends: Backends, flag_file: Path, start_router: StartRouter, client: aiohttp.ClientSession
) -> None:
    router = await start_router(
        router_settings(
            backends.url("legacy"), backends.url("new"), flag_file,
            limits__max_body_bytes=1000,
            limits__body_limits=[{"pattern": "/upload/**", "max_bytes": 100_000}],
        )
    )  # fmt: skip
    headers = {"X-Tenant-Id": "acme"}
    # Declared too large: refused before any upstream sees it, and the connection closes.
    declared = await raw_request(
        router.port,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nX-Tenant-Id: acme\r\nContent-Length: 5000\r\n\r\n"
        + b"x" * 5000,
    )
    assert declared.status == 413
    assert declared.json()["error"] == "body_too_large"
    assert declared.headers["connection"] == "close"
    assert sample(router, "router_requests_total", target="legacy", method="POST", code="200") == 0

    # Chunked, found too large while streaming: 413, and the next request is fine.
    async def chunks() -> Any:
        for _ in range(10):
            yield b"y" * 500

    async with client.post(f"{router.url}/echo", headers=headers, data=chunks()) as response:
        assert response.status == 413
        assert (await response.json())["error"] == "body_too_large"
    async with client.post(f"{router.url}/echo", headers=headers, data=b"z" * 1000) as response:
        assert response.status == 200
        assert (await response.json())["body_bytes"] == 1000

    # A path with its own, larger limit.
    async with client.post(f"{router.url}/upload/a", headers=headers, data=b"u" * 50_000) as r:
        assert r.status == 200
    async with client.post(f"{router.url}/upload/a", headers=headers, data=b"u" * 100_001) as r:
        assert r.status == 413


async def test_a_slow_request_head_gets_408_and_the_connection_closes(
    backends: Backends, flag_file: Path, start_router: StartRouter, client: aiohttp.ClientSession
) -> None:
    router = await start_router(
        router_settings(
            backends.url("legacy"), backends.url("new"), flag_file, server__header_timeout=0.3
        )
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
    started = time.monotonic()
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # ...and never the end of the head
    raw = await asyncio.wait_for(reader.read(), 5)  # read() returns at the close
    elapsed = time.monotonic() - started
    assert raw.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), raw[:100]
    assert b'"error": "client_timeout"' in raw
    assert 0.25 < elapsed < 2.0
    writer.close()
    # An idle connection (no bytes yet) is not timed out by it, and a complete head that
    # arrives in pieces within the bound is served.
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
    await asyncio.sleep(0.5)
    for piece in (b"GET /ok HTTP/1.1\r\n", b"Host: x\r\n", b"X-Tenant-Id: acme\r\n\r\n"):
        writer.write(piece)
        await asyncio.sleep(0.05)
    line = await asyncio.wait_for(reader.readline(), 5)
    assert line.startswith(b"HTTP/1.1 200"), line
    writer.close()


async def test_a_stalled_request_body_gets_408_and_the_upstream_connection_is_dropped(
    backends: Backends, flag_file: Path, start_router: StartRouter, client: aiohttp.ClientSession
) -> None:
    router = await start_router(
        router_settings(
            backends.url("legacy"), backends.url("new"), flag_file,
            server__client_body_timeout=0.3,
        )
    )  # fmt: skip
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nX-Tenant-Id: acme\r\nContent-Length: 1000\r\n\r\n"
        + b"x" * 10
    )
    raw = await asyncio.wait_for(reader.read(), 5)
    assert raw.startswith(b"HTTP/1.1 408"), raw[:100]
    assert b'"error": "client_timeout"' in raw
    writer.close()
    pool = router.app.pools["legacy"]
    assert pool.active_count == 0 and pool.idle_count == 0  # half a request: not reused
    async with client.post(f"{router.url}/echo", headers={"X-Tenant-Id": "acme"}, data=b"ok") as r:
        assert r.status == 200
