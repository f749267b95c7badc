"""Issue 16, points 3 and 5: what a client may not choose at the edge, on real sockets.

A client cannot choose the X-Forwarded-Host / -Proto a backend sees (unless a setting says
the hop in front sets them), cannot send a Host that is not a Host (nor userinfo in an
absolute-form target), cannot hold a connection open with a partial head queued behind a
request being served, and cannot make one connection queue requests without bound.
Every check of "never forwarded" is made at a recording upstream, not inferred from the
status.
"""

from __future__ import annotations

import asyncio
import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from router.proxy.connection import FrontConnection, Request
from tests.conftest import StartRouter
from tests.integration.test_fastpath import (
    UpstreamFactory,
    answer,
    connect,
    read_body,
    read_reply,
    rest_until_close,
    start,
)
from tests.support.waiting import wait_for

pytestmark = pytest.mark.usefixtures("no_error_logs")


@dataclass
class Recorder:
    """A keep-alive upstream that records every request head it is sent, and how many it
    is handling at once. `GET /slow/<s>` answers after s seconds."""

    heads: list[bytes] = field(default_factory=list)
    busy: int = 0
    most_busy: int = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            self.heads.append(head)
            self.busy += 1
            self.most_busy = max(self.most_busy, self.busy)
            try:
                await read_body(reader, head)
                target = head.split(b" ")[1].decode()
                if target.startswith("/slow/"):
                    await asyncio.sleep(float(target.split("/")[2]))
                writer.write(answer("x"))
                await writer.drain()
            finally:
                self.busy -= 1

    def fields(self, index: int = -1) -> dict[str, list[str]]:
        seen: dict[str, list[str]] = {}
        for line in self.heads[index].decode("latin-1").split("\r\n")[1:]:
            if line:
                name, _, value = line.partition(":")
                seen.setdefault(name.strip().lower(), []).append(value.strip())
        return seen


async def recorded(
    start_router: StartRouter, flag_file: Path, raw_upstream: UpstreamFactory, **kw: Any
) -> tuple[Recorder, int]:
    recorder = Recorder()
    upstream = await raw_upstream(recorder)
    router = await start(start_router, flag_file, upstream.url, **kw)
    return recorder, router.port


async def one(port: int, data: bytes) -> tuple[int, bytes]:
    async with connect(port) as (reader, writer):
        writer.write(data)
        reply = await read_reply(reader)
    return reply.status, reply.body


# ---- forwarded fields ----------------------------------------------------------------

SPOOF = (
    b"GET /x HTTP/1.1\r\nHost: acme.example\r\nX-Tenant-Id: acme\r\n"
    b"X-Forwarded-Host: evil.example\r\nX-Forwarded-Proto: https\r\n\r\n"
)


async def test_client_forwarded_host_and_proto_are_not_believed_by_default(
    flag_file: Path, start_router: StartRouter, raw_upstream: UpstreamFactory
) -> None:
    """trusted_hops is 1 by default (the ALB), yet the ALB never sets X-Forwarded-Host: a
    client's value must not reach the backend as the host the user asked for."""
    recorder, port = await recorded(start_router, flag_file, raw_upstream)
    assert (await one(port, SPOOF))[0] == 200
    seen = recorder.fields()
    assert seen["x-forwarded-host"] == ["acme.example"]
    assert seen["x-forwarded-proto"] == ["http"]


async def test_forwarded_fields_believed_only_when_the_settings_say_so(
    flag_file: Path, start_router: StartRouter, raw_upstream: UpstreamFactory
) -> None:
    recorder, port = await recorded(
        start_router, flag_file, raw_upstream, server__trust_forwarded_proto=True
    )
    assert (await one(port, SPOOF))[0] == 200
    seen = recorder.fields()
    assert (seen["x-forwarded-proto"], seen["x-forwarded-host"]) == (["https"], ["acme.example"])
    recorder, port = await recorded(
        start_router, flag_file, raw_upstream,
        server__trust_forwarded_proto=True, server__trust_forwarded_host=True,
    )  # fmt: skip
    assert (await one(port, SPOOF))[0] == 200
    seen = recorder.fields()
    assert (seen["x-forwarded-proto"], seen["x-forwarded-host"]) == (["https"], ["evil.example"])
    # Trusted, but the hop in front did not set it: the router's own value.
    plain = b"GET /x HTTP/1.1\r\nHost: acme.example\r\nX-Tenant-Id: acme\r\n\r\n"
    assert (await one(port, plain))[0] == 200
    seen = recorder.fields()
    assert (seen["x-forwarded-proto"], seen["x-forwarded-host"]) == (["http"], ["acme.example"])


# ---- Host ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [b"a b", b"x/y", b"user@x", b"user:pw@x", b"x\\y", b"x?y", b"x#y", b"x:80a", b"[::1",
     b"x:1:2", b"caf\xe9.test", b"x\ty", b"[zz::1]"],
)  # fmt: skip
async def test_an_invalid_host_is_refused_and_never_forwarded(
    flag_file: Path, start_router: StartRouter, raw_upstream: UpstreamFactory, host: bytes
) -> None:
    recorder, port = await recorded(start_router, flag_file, raw_upstream)
    data = b"GET /x HTTP/1.1\r\nHost: " + host + b"\r\nX-Tenant-Id: acme\r\n\r\n"
    async with connect(port) as (reader, writer):
        writer.write(data)
        reply = await read_reply(reader)
    assert reply.status == 400, reply
    assert reply.json()["error"] == "bad_request"
    assert recorder.heads == []


@pytest.mark.parametrize(
    "host", [b"acme.example", b"acme.example:8080", b"127.0.0.1:80", b"[::1]:8080", b"[::1]",
             b"xn--caf-dma.test", b"a_b~c.test", b"", b"ACME.Example."]
)  # fmt: skip
async def test_a_valid_host_is_forwarded(
    flag_file: Path, start_router: StartRouter, raw_upstream: UpstreamFactory, host: bytes
) -> None:
    recorder, port = await recorded(start_router, flag_file, raw_upstream)
    data = b"GET /x HTTP/1.1\r\nHost: " + host + b"\r\nX-Tenant-Id: acme\r\n\r\n"
    assert (await one(port, data))[0] == 200
    assert recorder.fields()["x-forwarded-host"] == [host.decode()]


@pytest.mark.parametrize(
    "target", [b"http://user:pw@acme.example/x", b"http://user@acme.example/x",
               b"https://@acme.example/x"]
)  # fmt: skip
async def test_userinfo_in_an_absolute_form_target_is_refused(
    flag_file: Path, start_router: StartRouter, raw_upstream: UpstreamFactory, target: bytes
) -> None:
    recorder, port = await recorded(start_router, flag_file, raw_upstream)
    data = b"GET " + target + b" HTTP/1.1\r\nHost: acme.example\r\nX-Tenant-Id: acme\r\n\r\n"
    async with connect(port) as (reader, writer):
        writer.write(data)
        reply = await read_reply(reader)
    assert reply.status == 400, reply
    assert reply.json()["error"] == "bad_request"
    assert recorder.heads == []


async def test_an_absolute_form_authority_becomes_the_host_and_is_validated(
    flag_file: Path, start_router: StartRouter, raw_upstream: UpstreamFactory
) -> None:
    """RFC 9112 3.2.2: the target's authority replaces Host (validated the same way)."""
    recorder, port = await recorded(start_router, flag_file, raw_upstream)
    data = b"GET http://acme.example:8080/x?q=1 HTTP/1.1\r\nHost: other.example\r\n" + (
        b"X-Tenant-Id: acme\r\n\r\n"
    )
    assert (await one(port, data))[0] == 200
    assert recorder.heads[-1].startswith(b"GET /x?q=1 HTTP/1.1\r\n")
    assert recorder.fields()["x-forwarded-host"] == ["acme.example:8080"]
    bad = b"GET http://a%20b{c}/x HTTP/1.1\r\nHost: acme.example\r\nX-Tenant-Id: acme\r\n\r\n"
    assert (await one(port, bad))[0] == 400
    assert len(recorder.heads) == 1


# ---- bounded connections ---------------------------------------------------------------


async def test_a_partial_head_behind_a_served_request_times_out(
    flag_file: Path, start_router: StartRouter, raw_upstream: UpstreamFactory
) -> None:
    """A complete request, then the start of a second head that never ends: the first is
    answered, then the connection is closed within header_timeout (not kept for good)."""
    recorder, port = await recorded(
        start_router, flag_file, raw_upstream, server__header_timeout=0.5
    )
    first = b"GET /slow/0.2 HTTP/1.1\r\nHost: a.test\r\nX-Tenant-Id: acme\r\n\r\n"
    partial = b"GET /x HTTP/1.1\r\nHost: a.test\r\nX-Ten"
    async with connect(port) as (reader, writer):
        sent = time.monotonic()
        writer.write(first + partial)
        reply = await read_reply(reader)
        assert reply.status == 200
        rest = await rest_until_close(reader, timeout=3.0)
        took = time.monotonic() - sent
    assert b" 408 " in rest.split(b"\r\n")[0] + b" ", rest[:100]
    assert took < 0.5 + 0.5, took
    assert len(recorder.heads) == 1


async def test_a_partial_head_behind_a_slow_request_times_out_after_its_answer(
    flag_file: Path, start_router: StartRouter, raw_upstream: UpstreamFactory
) -> None:
    """The first request takes longer than header_timeout: its answer is still written
    whole, then the 408, then the close."""
    recorder, port = await recorded(
        start_router, flag_file, raw_upstream, server__header_timeout=0.3
    )
    first = b"GET /slow/0.8 HTTP/1.1\r\nHost: a.test\r\nX-Tenant-Id: acme\r\n\r\n"
    async with connect(port) as (reader, writer):
        sent = time.monotonic()
        writer.write(first + b"GET /x HTTP/1.1\r\nHo")
        reply = await read_reply(reader)
        assert (reply.status, reply.body) == (200, b"up:x")
        rest = await rest_until_close(reader, timeout=3.0)
        took = time.monotonic() - sent
    assert rest.startswith(b"HTTP/1.1 408 "), rest[:100]
    assert took < 0.8 + 0.5, took
    assert len(recorder.heads) == 1


def front_connections() -> list[FrontConnection]:
    return [o for o in gc.get_objects() if isinstance(o, FrontConnection)]


def queued_bytes(conn: FrontConnection) -> int:
    """What the requests queued on `conn` hold: their targets, fields and buffered bodies
    (counted here from the objects, not from the connection's own accounting)."""
    total = 0
    for item in conn._pipeline:
        if isinstance(item, Request):
            total += len(item.target) + sum(len(n) + len(v) for n, v in item.raw_headers)
            total += getattr(item.content, "_buffered", 0)
    return total


async def flood(
    port: int, data: bytes, first: bytes, watch_for: float, recorder: Recorder
) -> tuple[int, int]:
    """Send `first` (slow to answer), then `data` in one write; the most requests and bytes
    any connection queued meanwhile."""
    most, most_bytes = 0, 0
    async with connect(port) as (_reader, writer):
        writer.write(first + data)
        until = time.monotonic() + watch_for
        while time.monotonic() < until:
            for conn in front_connections():
                most = max(most, len(conn._pipeline))
                most_bytes = max(most_bytes, queued_bytes(conn))
            await asyncio.sleep(0.01)
    await wait_for(lambda: recorder.busy == 0, timeout=5.0)  # the slow one is done
    return most, most_bytes


async def test_a_pipelined_flood_queues_a_bounded_number_of_requests(
    flag_file: Path, start_router: StartRouter, raw_upstream: UpstreamFactory
) -> None:
    """Thousands of tiny pipelined requests in one write, behind a slow one: the router
    stops reading once max_pipelined (32 by default) are queued, rather than parsing them
    all into memory."""
    recorder, port = await recorded(start_router, flag_file, raw_upstream)
    tiny = b"GET /x HTTP/1.1\r\nHost: a\r\nX-Tenant-Id: acme\r\n\r\n"
    first = b"GET /slow/0.5 HTTP/1.1\r\nHost: a\r\nX-Tenant-Id: acme\r\n\r\n"
    most, _ = await flood(port, tiny * 3000, first, 0.4, recorder)
    # The bound, plus at most what one 4 KiB slice of a read completes.
    assert 32 <= most <= 32 + 4096 // len(tiny) + 1, most
    assert recorder.most_busy == 1


async def test_a_pipelined_flood_queues_a_bounded_number_of_bytes(
    flag_file: Path, start_router: StartRouter, raw_upstream: UpstreamFactory
) -> None:
    """Few requests, each with a large head: the bytes queued are bounded too."""
    recorder, port = await recorded(start_router, flag_file, raw_upstream)
    big = (
        b"GET /x HTTP/1.1\r\nHost: a\r\nX-Tenant-Id: acme\r\n"
        + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 8000) for i in range(3))
        + b"\r\n"
    )
    first = b"GET /slow/0.5 HTTP/1.1\r\nHost: a\r\nX-Tenant-Id: acme\r\n\r\n"
    _, most_bytes = await flood(port, big * 60, first, 0.4, recorder)
    # server.max_pipelined_bytes (256 KiB by default), plus the request that crossed it.
    assert 0 < most_bytes <= 256 * 1024 + len(big), most_bytes


async def test_a_paused_pipeline_resumes_and_answers_everything_in_order(
    flag_file: Path, start_router: StartRouter, raw_upstream: UpstreamFactory
) -> None:
    recorder, port = await recorded(
        start_router, flag_file, raw_upstream, server__max_pipelined=4,
        server__max_pipelined_bytes=4096,
    )  # fmt: skip
    reqs = [b"GET /n%d HTTP/1.1\r\nHost: a\r\nX-Tenant-Id: acme\r\n\r\n" % i for i in range(500)]
    async with connect(port) as (reader, writer):
        writer.write(b"".join(reqs))
        replies = [await read_reply(reader) for _ in reqs]
    assert all(r.status == 200 for r in replies)
    assert [h.split(b" ")[1] for h in recorder.heads] == [b"/n%d" % i for i in range(500)]
