"""The client side the router runs itself (router/proxy/connection.py), on real loopback sockets.

test_fastpath.py holds what any fast path must get right (framing, pipelining, clients that
leave early); test_client_errors.py what the parser must refuse. This file holds what the
front decides on its own: a client that half-closes still gets its answer, idle keep-alive
connections close on time (busy ones do not), an answer given before the whole request body
arrived leaves the connection usable, a deep pipeline is answered in order, and the
response-head deadline fires on time without a timer per request (the header lookup the
handler reads: tests/unit/test_front_headers.py).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.conftest import Backends, RunningRouter, StartRouter
from tests.integration.test_fastpath import (
    IdUpstream,
    UpstreamFactory,
    answer,
    connect,
    exchange,
    fresh_id,
    id_body,
    read_reply,
    request,
    rest_until_close,
    start,
)

pytestmark = pytest.mark.usefixtures("no_error_logs")


async def test_half_closed_client_still_gets_its_answer(router: RunningRouter) -> None:
    """`printf 'GET ...' | nc -N`: the request, then FIN. The answer still comes back, then
    the router closes its side."""
    async with connect(router.port) as (reader, writer):
        writer.write(request("GET", "/hello", tenant="acme"))
        writer.write_eof()
        reply = await read_reply(reader)
        rest = await rest_until_close(reader)
    assert (reply.status, reply.get("x-backend-side")) == (200, "legacy")
    assert rest == b""


async def test_idle_connections_close_after_keepalive_timeout_busy_ones_do_not(
    backends: Backends, flag_file: Path, start_router: StartRouter
) -> None:
    legacy, new = backends.url("legacy"), backends.url("new")
    router = await start(start_router, flag_file, legacy, new, server__keepalive_timeout=0.3)
    async with connect(router.port) as (reader, writer):
        # Busy for twice the timeout: the answer still comes, on the same connection.
        writer.write(request("GET", "/__slow/0.6", tenant="acme"))
        assert (await read_reply(reader)).status == 200
        writer.write(request("GET", "/hello", tenant="acme"))
        assert (await read_reply(reader)).status == 200
        idle_from = time.monotonic()
        rest = await rest_until_close(reader, timeout=3.0)
        idle_for = time.monotonic() - idle_from
    assert rest == b""
    assert 0.25 <= idle_for < 2.0, idle_for


async def test_answer_before_the_body_leaves_the_connection_usable(
    flag_file: Path, start_router: StartRouter, raw_upstream: UpstreamFactory
) -> None:
    """The upstream answers a POST before reading its body (and closes). The client gets the
    answer with part of its body still unsent; the rest it sends anyway, followed by another
    request on the same connection: the router reads and drops the rest of that body, then
    answers the next request."""

    async def early(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str, rid: str,
        head: bytes,
    ) -> bool:  # fmt: skip
        writer.write(answer(rid, "early", "Connection: close"))
        await writer.drain()
        return False  # closes the upstream connection, body unread

    upstream = await raw_upstream(IdUpstream(special={"early": early}))
    router = await start(start_router, flag_file, upstream.url)
    body = b"b" * 300_000
    rid, next_rid = fresh_id("early"), fresh_id("after")
    async with connect(router.port) as (reader, writer):
        whole = request("POST", f"/early/{rid}", tenant="acme", body=body)
        writer.write(whole[:-200_000])
        first = await read_reply(reader)
        assert (first.status, first.body) == (200, id_body("early", rid))
        writer.write(whole[-200_000:] + request("GET", f"/id/{next_rid}", tenant="acme"))
        second = await read_reply(reader)
    assert (second.status, second.body) == (200, id_body("up", next_rid))


async def test_deep_pipeline_answered_in_order(
    flag_file: Path, start_router: StartRouter, raw_upstream: UpstreamFactory
) -> None:
    """200 requests pipelined in four writes of 50: each write queues more than the front
    holds before it stops reading the connection, so reading pauses, and must resume for
    the next write to be read at all. Every answer comes back in order, each its own."""
    upstream = await raw_upstream(IdUpstream())
    router = await start(start_router, flag_file, upstream.url)
    rids = [fresh_id("p") for _ in range(200)]
    replies = []
    async with connect(router.port) as (reader, writer):
        for batch in range(4):
            part = rids[batch * 50 : (batch + 1) * 50]
            writer.write(b"".join(request("GET", f"/id/{rid}", tenant="acme") for rid in part))
            replies += [await read_reply(reader) for _ in part]
    assert [(r.status, r.body) for r in replies] == [(200, id_body("up", rid)) for rid in rids]


async def test_repeated_transfer_encoding_is_refused(router: RunningRouter) -> None:
    """Two Transfer-Encoding fields hide which coding applies: 400, never forwarded."""
    data = (
        b"POST /echo HTTP/1.1\r\nHost: a\r\nX-Tenant-Id: acme\r\nTransfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    reply = await exchange(router.port, data)
    assert reply.status == 400
    assert reply.json()["error"] == "bad_request"
    assert reply.get("connection") == "close"


async def test_response_head_deadline_fires_on_time(
    flag_file: Path, start_router: StartRouter, raw_upstream: UpstreamFactory
) -> None:
    """No timer per request: a per-pool sweeper checks the deadlines at a tenth of the
    timeout. An upstream that never answers gets 504 after the timeout, not much later,
    and an upstream that answers just in time is not cut off."""

    async def silent(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str, rid: str,
        head: bytes,
    ) -> bool:  # fmt: skip
        await reader.read()  # until the router gives up on this connection
        return False

    upstream = await raw_upstream(IdUpstream(special={"silent": silent}))
    router = await start(
        start_router, flag_file, upstream.url, upstreams__legacy__response_header_timeout=0.5
    )
    began = time.monotonic()
    reply = await exchange(router.port, request("GET", "/silent/x", tenant="acme"))
    took = time.monotonic() - began
    assert (reply.status, reply.json()["error"]) == (504, "upstream_timeout")
    assert 0.45 <= took < 1.5, took
    rid = fresh_id("late")
    reply = await exchange(router.port, request("GET", f"/id/{rid}?delay=0.35", tenant="acme"))
    assert (reply.status, reply.body) == (200, id_body("up", rid))


async def test_host_bytes_outside_ascii_are_refused_not_mangled(router: RunningRouter) -> None:
    """llhttp lets obs-text through in field values, but a Host is ASCII (RFC 3986: an
    internationalised name travels as its A-label): such a Host is a 400 bad_request, not
    a failure in a re-encoding, and not relayed (issue 16; test_edge.py has the rest)."""
    data = b"GET /echo HTTP/1.1\r\nHost: caf\xe9\xff.test\r\nX-Tenant-Id: acme\r\n\r\n"
    reply = await exchange(router.port, data)
    assert reply.status == 400, reply
    assert reply.json()["error"] == "bad_request"


async def test_upgrade_request_answered_then_closed(router: RunningRouter) -> None:
    """`Connection: Upgrade` (curl --http2 on plain HTTP sends `Upgrade: h2c`): the router
    relays no protocol switch. The request is answered as plain HTTP/1.1 without the
    Upgrade field reaching the backend; what follows on the connection is not read as
    HTTP, and the connection closes."""
    async with connect(router.port) as (reader, writer):
        writer.write(
            b"GET /echo HTTP/1.1\r\nHost: a\r\nX-Tenant-Id: acme\r\nConnection: Upgrade, "
            b"HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
            + request("GET", "/hello", tenant="acme")
        )
        reply = await read_reply(reader)
        rest = await rest_until_close(reader)
    assert reply.status == 200
    seen = {name.lower() for name, _ in reply.json()["headers"]}
    assert not seen & {"upgrade", "connection", "http2-settings"}, seen
    assert rest == b""
