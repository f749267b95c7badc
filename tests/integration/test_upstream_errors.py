"""Upstream failures on real sockets, one misbehaving upstream per test.

Before the response head went out, every failure is a JSON error with its stable code and
an `X-Request-Id`; after it, the client connection is aborted so that a truncated body can
never pass for a complete one. Either way the router stays up, and a connection that
failed is never handed out again.
"""

from __future__ import annotations

import asyncio
import io
import json
import select
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    Backends,
    RawHandler,
    RawResponse,
    RawUpstream,
    RunningRouter,
    StartRouter,
    raw_request,
    read_http_request,
    refused_url,
    router_settings,
    sample,
    serve_ok,
)
from tests.support.waiting import wait_for

pytestmark = pytest.mark.usefixtures("no_error_logs")

KEEP_ALIVE_OK = b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"
# `Connection: close` so that a JSON error (which keeps the connection open) still ends
# the raw read at once.
GET = b"GET /x HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"
GET_NEW = b"GET /x HTTP/1.1\r\nHost: app.test\r\nX-Tenant-Id: globex\r\nConnection: close\r\n\r\n"

MakeRouter = Callable[..., Awaitable[RunningRouter]]


@pytest.fixture
async def make_router(backends: Backends, flag_file: Path, start_router: StartRouter) -> MakeRouter:
    """A router whose legacy side (every tenant but globex) is the given upstream."""

    async def make(legacy_url: str, **legacy: Any) -> RunningRouter:
        settings = router_settings(
            legacy_url, backends.url("new"), flag_file,
            upstreams__legacy={"url": legacy_url, **legacy},
        )  # fmt: skip
        return await start_router(settings)

    return make


def assert_error(response: RawResponse, status: int, code: str) -> None:
    assert response.status == status, response
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["error"] == code, body
    assert body["detail"]
    assert body["request_id"] == response.headers["x-request-id"]
    assert response.complete


async def assert_alive(router: RunningRouter) -> None:
    """The router still proxies: a request to the other side succeeds."""
    response = await raw_request(router.port, GET_NEW)
    assert response.status == 200
    assert response.json()["side"] == "new"


def first_then_ok(bad: RawHandler) -> RawHandler:
    """Misbehave on the first connection only; serve normally on the next ones."""
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await (bad if connections == 1 else serve_ok)(reader, writer)

    return handler


def upstream_errors(router: RunningRouter, code: str) -> float:
    return sample(router, "router_upstream_errors_total", target="legacy", code=code)


def pool_connections(router: RunningRouter, side: str = "legacy") -> int:
    pool = router.app.pools[side]
    return pool.idle_count + pool.active_count


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST instead of a FIN (SO_LINGER 0)."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# ---- before the response head: a JSON error ------------------------------------------


async def test_connection_refused(make_router: MakeRouter) -> None:
    router = await make_router(refused_url())
    assert_error(await raw_request(router.port, GET), 502, "upstream_connect_failed")
    assert upstream_errors(router, "upstream_connect_failed") == 1
    await assert_alive(router)


async def test_no_response_head_times_out_and_drops_the_connection(
    make_router: MakeRouter, raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]]
) -> None:
    dropped = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await read_http_request(reader)
            await reader.read()  # returns at EOF: the router gave up on this connection
        finally:
            dropped.set()

    upstream = await raw_upstream(first_then_ok(silent))
    router = await make_router(upstream.url, response_header_timeout=0.3)
    started = time.perf_counter()
    response = await raw_request(router.port, GET)
    elapsed = time.perf_counter() - started
    assert_error(response, 504, "upstream_timeout")
    assert 0.3 <= elapsed < 1.5
    await asyncio.wait_for(dropped.wait(), 1.0)
    assert pool_connections(router) == 0
    # The next request gets a fresh connection, never the one that timed out.
    assert (await raw_request(router.port, GET)).status == 200
    assert upstream.connections == 2


@pytest.fixture
def blackhole_url() -> Iterator[str]:
    """A loopback listener whose accept queue is full: the kernel drops further SYNs, so a
    connect neither succeeds nor fails until the client gives up."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    filler = socket.create_connection(server.getsockname(), timeout=1.0)  # fills the queue
    probe = socket.socket()
    probe.setblocking(False)
    probe.connect_ex(server.getsockname())
    try:
        if select.select([], [probe], [], 0.2)[1]:
            pytest.skip("this kernel does not drop SYNs on a full accept queue")
        host, port = server.getsockname()
        yield f"http://{host}:{port}"
    finally:
        for sock in (probe, filler, server):
            sock.close()


async def test_connect_timeout(make_router: MakeRouter, blackhole_url: str) -> None:
    router = await make_router(blackhole_url, connect_timeout=0.3)
    started = time.perf_counter()
    response = await raw_request(router.port, GET)
    assert_error(response, 504, "upstream_timeout")
    assert "connect" in response.json()["detail"]
    assert 0.3 <= time.perf_counter() - started < 1.5
    assert pool_connections(router) == 0
    await assert_alive(router)


async def _close_after_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_http_request(reader)
    writer.close()


async def _reset_after_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_http_request(reader)
    reset(writer)


async def _close_mid_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_http_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
    await writer.drain()
    writer.close()


async def _close_after_interim(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_http_request(reader)
    writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
    await writer.drain()
    writer.close()


@pytest.mark.parametrize(
    "misbehave",
    [_close_after_head, _reset_after_head, _close_mid_head, _close_after_interim],
    ids=["fin", "rst", "fin-mid-head", "fin-after-1xx"],
)
async def test_closed_before_response_head(
    make_router: MakeRouter,
    raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]],
    misbehave: RawHandler,
) -> None:
    upstream = await raw_upstream(first_then_ok(misbehave))
    router = await make_router(upstream.url)
    assert_error(await raw_request(router.port, GET), 502, "upstream_reset")
    # A fresh connection is never retried: the upstream saw exactly one request.
    assert upstream.connections == 1
    assert pool_connections(router) == 0
    assert (await raw_request(router.port, GET)).status == 200


BAD_HEADS = {
    "content-length-not-a-number": b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n",
    "content-length-negative": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    "content-length-overflow": b"HTTP/1.1 200 OK\r\nContent-Length: 9999999999999999999999\r\n\r\n",
    "content-length-conflicting": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"
    ),
    "content-length-and-chunked": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
    ),
    "chunked-and-content-length": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
    ),
    "transfer-coding-not-chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    "garbage-status-line": b"FOO BAR BAZ\r\n\r\n",
    "bad-status-code": b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
    "status-below-100": b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n",
    "status-above-599": b"HTTP/1.1 600 Odd\r\nContent-Length: 0\r\n\r\n",
    "bare-lf": b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: b\r\n c\r\nContent-Length: 0\r\n\r\n",
    "content-length-twice-equal": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc"
    ),
    "header-without-colon": b"HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 0\r\n\r\n",
    "switching-protocols": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
    "too-many-headers": b"HTTP/1.1 200 OK\r\n"
    + b"".join(b"X-H%d: v\r\n" % i for i in range(201))
    + b"Content-Length: 0\r\n\r\n",
    "one-huge-header": b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
    "head-over-64k": b"HTTP/1.1 200 OK\r\n"
    + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(80))
    + b"Content-Length: 0\r\n\r\n",
}


@pytest.mark.parametrize("head", BAD_HEADS.values(), ids=BAD_HEADS.keys())
async def test_bad_response_head(
    make_router: MakeRouter,
    raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]],
    head: bytes,
) -> None:
    async def bad(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_http_request(reader)
        writer.write(head)
        await writer.drain()
        await reader.read()  # hold the connection open: the router must end it

    upstream = await raw_upstream(first_then_ok(bad))
    router = await make_router(upstream.url, response_header_timeout=5.0)
    assert_error(await raw_request(router.port, GET), 502, "upstream_bad_response")
    assert pool_connections(router) == 0
    assert (await raw_request(router.port, GET)).status == 200
    assert upstream.connections == 2


async def test_endless_response_head_is_refused_without_waiting_for_the_timeout(
    make_router: MakeRouter, raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]]
) -> None:
    """A header line that never ends: refused once over the head limit, not buffered on."""
    sent = 0

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await read_http_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        while sent < 32 << 20:  # a bound for the test's sake: then it closes
            writer.write(b"a" * 16384)
            sent += 16384
            await writer.drain()

    upstream = await raw_upstream(endless)
    router = await make_router(upstream.url, response_header_timeout=5.0)
    started = time.perf_counter()
    assert_error(await raw_request(router.port, GET), 502, "upstream_bad_response")
    assert time.perf_counter() - started < 2.0
    assert sent < 32 << 20  # cut off by the router, well before the end
    await assert_alive(router)


# ---- after the response head: the client connection is aborted -----------------------


def _truncated(framing: str, stall: bool) -> RawHandler:
    """Send a head promising 100000 bytes and 1000 of them, then close (or stall)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_http_request(reader)
        if framing == "length":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"a" * 1000)
        elif framing == "chunked":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(b"3e8\r\n" + b"a" * 1000 + b"\r\n")
        else:  # a chunk size that is not hexadecimal
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(b"3e8\r\n" + b"a" * 1000 + b"\r\nzz\r\n")
        await writer.drain()
        if stall:
            await reader.read()
        else:
            writer.close()

    return handler


@pytest.mark.parametrize(
    ("framing", "stall", "code"),
    [
        ("length", False, "upstream_reset"),
        ("chunked", False, "upstream_reset"),
        ("length", True, "upstream_timeout"),
        ("chunked", True, "upstream_timeout"),
        ("bad-chunk", True, "upstream_bad_response"),
    ],
    ids=["length-closed", "chunked-closed", "length-stalled", "chunked-stalled", "bad-chunk"],
)
async def test_failure_mid_body_aborts_the_client(
    make_router: MakeRouter,
    raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]],
    framing: str,
    stall: bool,
    code: str,
) -> None:
    upstream = await raw_upstream(first_then_ok(_truncated(framing, stall)))
    router = await make_router(upstream.url, read_timeout=0.3)
    access_log, stream = router.app.access_log, io.BytesIO()
    access_log.enabled, access_log._stream = True, stream
    response = await raw_request(router.port, GET)
    assert response.status == 200  # the head had gone out before the failure
    assert response.ended in ("eof", "reset")
    assert not response.complete
    if framing == "length":
        assert response.headers["content-length"] == "100000"
        assert len(response.body) <= 1000
    else:
        assert response.headers["transfer-encoding"] == "chunked"
        assert b"0\r\n\r\n" not in response.body
    assert upstream_errors(router, code) == 1
    access_log.flush()
    (line,) = (json.loads(x) for x in stream.getvalue().splitlines())
    assert (line["status"], line["error"], line["request_id"]) == (
        200, code, response.headers["x-request-id"],
    )  # fmt: skip
    assert pool_connections(router) == 0
    assert (await raw_request(router.port, GET)).status == 200
    await assert_alive(router)


async def test_close_delimited_body_ends_cleanly(
    make_router: MakeRouter, raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]]
) -> None:
    """No Content-Length, not chunked: the upstream's close is the end, not an error."""

    async def close_delimited(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_http_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"b" * 5000)
        await writer.drain()
        writer.close()

    upstream = await raw_upstream(close_delimited)
    router = await make_router(upstream.url)
    response = await raw_request(router.port, GET)
    assert response.status == 200 and response.complete
    assert response.headers["transfer-encoding"] == "chunked"
    assert response.body.endswith(b"0\r\n\r\n") and response.body.count(b"b") == 5000
    assert upstream_errors(router, "upstream_reset") == 0
    assert pool_connections(router) == 0  # Connection: close, never reused


# ---- retries and the pool ------------------------------------------------------------


def stale_after_first(requests: list[bytes]) -> RawHandler:
    """First connection: answer one request with keep-alive, then close on receiving the
    second without answering (the upstream's idle timeout firing as the router reuses the
    connection). Later connections: answer normally."""
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        first = connections == 1
        while True:
            head, _ = await read_http_request(reader)
            requests.append(head)
            if first and len(requests) > 1:
                writer.close()
                return
            writer.write(KEEP_ALIVE_OK)
            await writer.drain()

    return handler


async def test_stale_connection_get_is_retried_once_on_a_fresh_connection(
    make_router: MakeRouter, raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]]
) -> None:
    requests: list[bytes] = []
    upstream = await raw_upstream(stale_after_first(requests))
    router = await make_router(upstream.url)
    first = await raw_request(router.port, GET)
    second = await raw_request(router.port, GET)
    assert (first.status, first.body, second.status, second.body) == (200, b"ok", 200, b"ok")
    assert upstream.connections == 2
    assert len(requests) == 3  # the second request was sent twice: once per connection
    assert upstream_errors(router, "upstream_reset") == 0


async def test_stale_connection_post_with_body_is_not_retried(
    make_router: MakeRouter, raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]]
) -> None:
    requests: list[bytes] = []
    upstream = await raw_upstream(stale_after_first(requests))
    router = await make_router(upstream.url)
    assert (await raw_request(router.port, GET)).status == 200
    post = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    assert_error(await raw_request(router.port, post), 502, "upstream_reset")
    assert upstream.connections == 1
    assert [r.split(b" ", 1)[0] for r in requests] == [b"GET", b"POST"]
    await assert_alive(router)


async def test_connection_closed_while_idle_is_never_used(
    make_router: MakeRouter, raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]]
) -> None:
    async def one_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_http_request(reader)
        writer.write(KEEP_ALIVE_OK)
        await writer.drain()
        if head.startswith(b"GET"):
            writer.close()  # FIN while the connection sits idle in the router's pool
        else:
            await reader.read()

    upstream = await raw_upstream(one_then_close)
    router = await make_router(upstream.url)
    assert (await raw_request(router.port, GET)).status == 200
    await wait_for(lambda: pool_connections(router) == 0)
    post = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    response = await raw_request(router.port, post)
    assert (response.status, response.body) == (200, b"ok")
    assert upstream.connections == 2


async def test_idle_connections_expire(
    make_router: MakeRouter, raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]]
) -> None:
    upstream = await raw_upstream(serve_ok)
    router = await make_router(upstream.url, idle_timeout=0.2)
    for _ in range(3):  # back to back: one connection, reused
        assert (await raw_request(router.port, GET)).status == 200
    assert upstream.connections == 1
    await asyncio.sleep(0.4)
    assert pool_connections(router) == 0  # the sweeper closed it
    assert (await raw_request(router.port, GET)).status == 200
    assert upstream.connections == 2


async def test_idle_expiry_checked_on_reuse(
    make_router: MakeRouter, raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]]
) -> None:
    """Even before the sweeper runs, a connection idle for too long is not handed out."""
    upstream = await raw_upstream(serve_ok)
    router = await make_router(upstream.url, idle_timeout=0.2)
    assert (await raw_request(router.port, GET)).status == 200
    pool = router.app.pools["legacy"]
    assert pool._sweeper is not None
    pool._sweeper.cancel()  # stand in for a sweeper that is late
    pool._sweeper = None
    await asyncio.sleep(0.3)
    assert pool.idle_count == 1
    assert (await raw_request(router.port, GET)).status == 200
    assert upstream.connections == 2


def slow_upstream(delay: float, active: list[int]) -> RawHandler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        active.append(active[-1] + 1 if active else 1)
        try:
            while True:
                try:
                    await read_http_request(reader)
                except asyncio.IncompleteReadError:
                    return
                await asyncio.sleep(delay)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        finally:
            active.append(active[-1] - 1)

    return handler


async def test_max_connections_makes_the_extra_request_wait(
    make_router: MakeRouter, raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]]
) -> None:
    active: list[int] = []  # concurrent upstream connections, after each change
    upstream = await raw_upstream(slow_upstream(0.3, active))
    router = await make_router(upstream.url, max_connections=2, connect_timeout=2.0)
    started = time.perf_counter()
    responses = await asyncio.gather(*(raw_request(router.port, GET) for _ in range(3)))
    assert [r.status for r in responses] == [200, 200, 200]
    assert max(active) == 2
    assert upstream.connections == 2  # the third request reused a released connection
    assert time.perf_counter() - started >= 0.6  # ... after waiting for it


async def test_max_connections_wait_bounded_by_connect_timeout(
    make_router: MakeRouter, raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]]
) -> None:
    active: list[int] = []
    upstream = await raw_upstream(slow_upstream(0.6, active))
    router = await make_router(upstream.url, max_connections=2, connect_timeout=0.2)
    responses = await asyncio.gather(*(raw_request(router.port, GET) for _ in range(3)))
    assert sorted(r.status for r in responses) == [200, 200, 504]
    (busy,) = (r for r in responses if r.status == 504)
    assert_error(busy, 504, "upstream_timeout")
    assert "busy" in busy.json()["detail"]
    assert max(active) == 2


async def test_upstream_not_reading_the_request_body_times_out(
    make_router: MakeRouter, raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]]
) -> None:
    """The upstream takes the head, then neither reads the body nor answers: once the
    sockets' buffers are full the router's writes stall, and response_header_timeout bounds
    that wait as it bounds waiting for a head, instead of holding both sides forever."""
    release = asyncio.Event()

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await release.wait()  # reads nothing more: its socket buffers fill, then the router's

    upstream = await raw_upstream(first_then_ok(deaf))
    router = await make_router(upstream.url, response_header_timeout=0.3)
    size = 64 << 20
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)

    async def send_body() -> None:
        writer.write(b"PUT /up HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size)
        chunk = b"p" * (1 << 20)
        try:
            for _ in range(size // len(chunk)):
                writer.write(chunk)
                await writer.drain()
        except ConnectionError:
            pass

    sender = asyncio.ensure_future(send_body())
    started = time.perf_counter()
    try:
        async with asyncio.timeout(5.0):
            head = await reader.readuntil(b"\r\n\r\n")
        elapsed = time.perf_counter() - started
        assert head.startswith(b"HTTP/1.1 504 "), head
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        assert b'"error": "upstream_timeout"' in await reader.readexactly(length)
    finally:
        sender.cancel()
        writer.close()
        release.set()
    assert elapsed < 3.0
    assert pool_connections(router) == 0
    assert (await raw_request(router.port, GET)).status == 200
