"""Client-side failures on raw sockets: malformed requests and clients that vanish.

A malformed request is answered with the JSON error for its code and the connection is
closed; nothing of it reaches an upstream. A client that disconnects mid-request or
mid-response costs the upstream connection it was using (it is in an unknown state) and
nothing else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    RawHandler,
    RawResponse,
    RawUpstream,
    RunningRouter,
    StartRouter,
    raw_request,
    read_http_request,
    recording_upstream,
    router_settings,
    sample,
    serve_ok,
)

pytestmark = pytest.mark.usefixtures("no_error_logs")

# Distinct limits, so that a wrong mapping cannot pass by accident.
LIMITS = {
    "server__max_request_line": 512,
    "server__max_header_size": 1024,
    "server__max_headers": 20,
}

UpstreamFactory = Callable[[RawHandler], Awaitable[RawUpstream]]


@pytest.fixture
async def upstream(raw_upstream: UpstreamFactory) -> RawUpstream:
    """A well-behaved upstream that records every request head it is sent."""
    return await recording_upstream(raw_upstream)


async def start(
    start_router: StartRouter, flag_file: Path, legacy_url: str, new_url: str, **overrides: Any
) -> RunningRouter:
    return await start_router(router_settings(legacy_url, new_url, flag_file, **overrides))


def assert_rejected(response: RawResponse, status: int, code: str) -> None:
    assert response.status == status, response
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["error"] == code, body
    assert body["request_id"] == response.headers["x-request-id"] != ""
    assert response.headers["connection"] == "close"
    assert response.ended == "eof"  # ... and closed


async def assert_alive(router: RunningRouter) -> None:
    response = await raw_request(
        router.port, b"GET /after HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    assert (response.status, response.body) == (200, b"ok")


HEAD = b"POST /x HTTP/1.1\r\nHost: a\r\n"
MALFORMED = {
    # 400 bad_request
    "garbage-request-line": (b"\x00\x01\x02garbage\r\n\r\n", 400, "bad_request"),
    "not-http": (b"HELLO WORLD\r\n\r\n", 400, "bad_request"),
    "tls-on-plain-port": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400, "bad_request"),
    "bad-version": (b"GET / HTTP/7.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
    "space-in-target": (b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
    "content-length-and-chunked": (
        HEAD + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        400, "bad_request",
    ),
    "content-length-not-a-number": (HEAD + b"Content-Length: abc\r\n\r\n", 400, "bad_request"),
    "content-length-negative": (HEAD + b"Content-Length: -5\r\n\r\n", 400, "bad_request"),
    "content-length-conflicting": (
        HEAD + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400, "bad_request"
    ),
    "bad-chunk-size": (
        HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", 400, "bad_request"
    ),
    "header-without-colon": (b"GET / HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n", 400, "bad_request"),
    # Ambiguous framing and header syntax (RFC 9112): 400 and close, never forwarded.
    "chunked-not-final": (
        HEAD + b"Transfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        400, "bad_request",
    ),
    "chunked-obfuscated": (
        HEAD + b"Transfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        400, "bad_request",
    ),
    "transfer-encoding-twice": (
        HEAD + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
        400, "bad_request",
    ),
    "http10-with-chunked": (
        b"POST /x HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
        400, "bad_request",
    ),
    "bad-chunk-extension": (
        HEAD + b"Transfer-Encoding: chunked\r\n\r\n5;a\"b\r\nhello\r\n0\r\n\r\n",
        400, "bad_request",
    ),
    "space-before-colon": (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400, "bad_request"),
    "obs-fold": (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n", 400, "bad_request"),
    "bare-cr-in-header": (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\rc\r\n\r\n", 400, "bad_request"),
    "nul-in-header": (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\x00c\r\n\r\n", 400, "bad_request"),
    "missing-host": (b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n", 400, "bad_request"),
    "duplicate-host": (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "bad_request"),
    # 414 uri_too_long: the request line over server.max_request_line
    "long-target": (b"GET /" + b"a" * 600 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414, "uri_too_long"),
    "long-target-with-url-in-it": (
        b"GET /url/" + b"a" * 600 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414, "uri_too_long"
    ),
    # 431 headers_too_large: one field over server.max_header_size, or too many fields
    "long-header-value": (
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * 1100 + b"\r\n\r\n",
        431, "headers_too_large",
    ),
    "long-header-value-like-a-url": (
        b"GET / HTTP/1.1\r\nHost: a\r\nReferer: /url/request line/" + b"v" * 1100 + b"\r\n\r\n",
        431, "headers_too_large",
    ),
    "long-header-name": (
        b"GET / HTTP/1.1\r\nHost: a\r\nX-" + b"n" * 1100 + b": v\r\n\r\n",
        431, "headers_too_large",
    ),
    "too-many-headers": (
        b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(25))
        + b"\r\n",
        431, "headers_too_large",
    ),
}  # fmt: skip


@pytest.mark.parametrize(("data", "status", "code"), MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_request(
    flag_file: Path,
    start_router: StartRouter,
    upstream: RawUpstream,
    data: bytes,
    status: int,
    code: str,
) -> None:
    router = await start(start_router, flag_file, upstream.url, upstream.url, **LIMITS)
    # A valid request pipelined behind the bad one must not be forwarded either.
    response = await raw_request(router.port, data + b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
    assert_rejected(response, status, code)
    assert upstream.connections == 0 and upstream.requests == []
    assert sample(router, "router_requests_total", target="none", method="OTHER", code=str(status))
    await assert_alive(router)
    assert len(upstream.requests) == 1


LONG_SLASH_HEADER = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: /" + b"v" * 9000 + b"\r\n\r\n"


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414, "uri_too_long"),
        (LONG_SLASH_HEADER, 431, "headers_too_large"),
    ],
    ids=["long-target", "long-header-starting-with-a-slash"],
)
async def test_line_limits_told_apart_when_equal(
    flag_file: Path,
    start_router: StartRouter,
    upstream: RawUpstream,
    data: bytes,
    status: int,
    code: str,
) -> None:
    """The defaults give the request line and a header line the same limit (8190)."""
    router = await start(start_router, flag_file, upstream.url, upstream.url)
    assert_rejected(await raw_request(router.port, data), status, code)
    assert upstream.connections == 0


async def test_within_limits_is_forwarded(
    flag_file: Path, start_router: StartRouter, upstream: RawUpstream
) -> None:
    """The limits are not off by one the other way: requests just under them pass."""
    router = await start(start_router, flag_file, upstream.url, upstream.url, **LIMITS)
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(18))  # + Host + Connection = 20
    data = (
        b"GET /" + b"a" * 500 + b" HTTP/1.1\r\nHost: a\r\n" + headers[: -len(b"X-H17: v\r\n")]
        + b"X-Big: " + b"v" * 1000 + b"\r\nConnection: close\r\n\r\n"
    )  # fmt: skip
    response = await raw_request(router.port, data)
    assert (response.status, response.body) == (200, b"ok")
    assert len(upstream.requests) == 1


async def test_malformed_chunk_after_the_request_was_forwarded(
    flag_file: Path, start_router: StartRouter, raw_upstream: UpstreamFactory
) -> None:
    """The head went upstream before the body turned out malformed: the client gets a 400
    (no response head had gone out yet) and the upstream connection is aborted."""
    upstream_closed = asyncio.Event()
    upstream_got = bytearray()

    async def reads_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            while chunk := await reader.read(65536):
                upstream_got.extend(chunk)
        finally:
            upstream_closed.set()

    upstream = await raw_upstream(reads_body)
    router = await start(start_router, flag_file, upstream.url, upstream.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
    try:
        writer.write(HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)  # the router has forwarded the head and the first chunk
        writer.write(b"zz\r\n")
        async with asyncio.timeout(2.0):
            raw = await reader.read()
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), raw
    assert b'"error": "bad_request"' in body
    await asyncio.wait_for(upstream_closed.wait(), 1.0)
    # Never the bad chunk, never an end. (An abort may come as an RST, which can discard
    # what the upstream had received but not yet read: hence the empty case.)
    assert bytes(upstream_got) in (b"", b"5\r\nhello\r\n")
    pool = router.app.pools["legacy"]
    assert pool.idle_count + pool.active_count == 0


# ---- clients that disconnect ----------------------------------------------------------


async def test_client_disconnects_mid_upload(
    flag_file: Path, start_router: StartRouter, raw_upstream: UpstreamFactory
) -> None:
    """10 MB announced, 1 MB sent, then the client is gone: the upstream connection is
    aborted (the request can never be completed on it), not returned to the pool."""
    got = 0
    upstream_closed = asyncio.Event()
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal got, connections
        connections += 1
        if connections > 1:
            return await serve_ok(reader, writer)
        try:
            await reader.readuntil(b"\r\n\r\n")
            while chunk := await reader.read(65536):
                got += len(chunk)
        finally:
            upstream_closed.set()

    upstream = await raw_upstream(handler)
    router = await start(start_router, flag_file, upstream.url, upstream.url)
    _, writer = await asyncio.open_connection("127.0.0.1", router.port)
    writer.write(HEAD + b"Content-Length: 10000000\r\n\r\n")
    for _ in range(16):
        writer.write(b"u" * 65536)
        await writer.drain()
    writer.close()
    await writer.wait_closed()
    await asyncio.wait_for(upstream_closed.wait(), 2.0)
    assert 0 < got < 10_000_000
    pool = router.app.pools["legacy"]
    assert pool.idle_count + pool.active_count == 0
    await assert_alive(router)
    assert upstream.connections == 2


async def test_client_disconnects_mid_download(
    flag_file: Path, start_router: StartRouter, raw_upstream: UpstreamFactory
) -> None:
    """The client reads part of a large response and leaves: the upstream connection,
    still mid-body, is aborted rather than returned to the pool."""
    sent = 0
    stopped = asyncio.Event()
    connections = 0

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent, connections
        connections += 1
        if connections > 1:
            return await serve_ok(reader, writer)
        await read_http_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n")
        try:
            while sent < 1_000_000_000:
                writer.write(b"d" * 65536)
                sent += 65536
                await writer.drain()
        finally:
            stopped.set()

    upstream = await raw_upstream(big)
    router = await start(start_router, flag_file, upstream.url, upstream.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
    writer.write(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
    received = 0
    while received < 1 << 20:
        received += len(await reader.read(65536))
    writer.close()
    await writer.wait_closed()
    await asyncio.wait_for(stopped.wait(), 2.0)
    assert sent < 1_000_000_000
    pool = router.app.pools["legacy"]
    assert pool.idle_count + pool.active_count == 0
    await assert_alive(router)
    assert upstream.connections == 2


@pytest.mark.parametrize("body_end", ["still-sending", "malformed"])
async def test_upstream_answering_before_the_body_ended_is_not_reused(
    flag_file: Path, start_router: StartRouter, raw_upstream: UpstreamFactory, body_end: str
) -> None:
    """The upstream answers before reading the whole request body (an early 413, say), and
    the body then stays unfinished or fails while the response is relayed. The upstream
    still waits for the rest of that body, so the connection must not carry another
    request: its head would be read as body bytes (request desync)."""
    after_response = bytearray()
    connections = 0

    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        if connections > 1:
            return await serve_ok(reader, writer)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 10\r\n\r\nearly")
        await writer.drain()
        await asyncio.sleep(0.2)  # the client's body fails meanwhile
        writer.write(b"-done")
        await writer.drain()
        while chunk := await reader.read(65536):
            after_response.extend(chunk)

    early_upstream = await raw_upstream(early)
    router = await start(start_router, flag_file, early_upstream.url, early_upstream.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
    try:
        writer.write(HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413 ")
        if body_end == "malformed":
            writer.write(b"zz\r\n")
            await writer.drain()
        assert await reader.readexactly(10) == b"early-done"
    finally:
        writer.close()
    await assert_alive(router)
    assert connections == 2  # not the connection with a request half sent
    assert b"GET /after" not in after_response
