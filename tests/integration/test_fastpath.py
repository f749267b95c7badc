"""What a fast proxy path must handle itself, on real loopback sockets.

Raw sockets on the client side, real upstreams (aiohttp backends, or raw asyncio servers
that answer exactly as scripted) on the other. Nothing here looks inside the router
except `pool.idle_count` / `pool.active_count`: the tests hold whatever the request path
is made of.

- framing: chunked request bodies (sent in awkward pieces) and chunked responses (chunk
  extensions, trailers) arrive intact, chunked to HTTP/1.1 clients and close-delimited to
  HTTP/1.0 ones; a Content-Length response stays Content-Length;
- upstream closes: `Connection: close`, a silent close of an idle kept-alive connection,
  a close in the middle of a Content-Length body;
- pipelining: responses in order, complete, on one connection;
- clients that leave early (slow response, slow download, mid-upload): the upstream
  connection they held is never handed to the next request in an unknown state; every
  later answer is checked against a per-request id, so a response left over from the
  abandoned request would show;
- client keep-alive: 100 requests on one connection; `Connection: close` honoured;
- HEAD, 204, 304 on a kept-alive connection: no body bytes, the next response intact.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    RawHandler,
    RawUpstream,
    RunningRouter,
    StartRouter,
    router_settings,
)
from tests.support.waiting import wait_for

pytestmark = pytest.mark.usefixtures("no_error_logs")

UpstreamFactory = Callable[[RawHandler], Awaitable[RawUpstream]]
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]

TIMEOUT = 5.0  # any single wait in these tests; a hang fails here, not at pytest's limit


# ---- client side: raw requests, raw responses ----------------------------------------


def request(
    method: str,
    path: str,
    *,
    tenant: str | None = None,
    body: bytes | None = None,
    headers: tuple[str, ...] = (),
    close: bool = False,
    version: str = "1.1",
) -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: app.test"]
    if tenant is not None:
        lines.append(f"X-Tenant-Id: {tenant}")
    lines.extend(headers)
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


@dataclass
class Reply:
    version: str
    status: int
    headers: list[tuple[str, str]]  # lower-cased names, in order
    body: bytes = b""  # the payload (de-chunked)
    wire: bytes = b""  # the body as it was on the wire
    trailers: list[bytes] = field(default_factory=list)

    def get(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n == name]
        return values[-1] if values else None

    def json(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.body)
        return result


async def read_reply(
    reader: asyncio.StreamReader, *, head: bool = False, timeout: float = TIMEOUT
) -> Reply:
    """One response off a client connection, delimited as HTTP/1.1 says (HEAD, 204 and 304
    have no body; then chunked, Content-Length, or the close)."""
    async with asyncio.timeout(timeout):
        raw_head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = raw_head[:-4].decode("latin-1").split("\r\n")
        version, status = status_line.split(" ")[:2]
        headers = []
        for line in lines:
            name, _, value = line.partition(":")
            headers.append((name.strip().lower(), value.strip()))
        reply = Reply(version, int(status), headers)
        if head or reply.status in (204, 304):
            return reply
        coding = reply.get("transfer-encoding")
        if coding is not None:
            assert coding.lower() == "chunked", reply
            assert reply.get("content-length") is None, reply
            wire, body = bytearray(), bytearray()
            while True:
                line = await reader.readuntil(b"\r\n")
                wire += line
                size = int(line.split(b";")[0], 16)
                if size == 0:
                    break
                data = await reader.readexactly(size + 2)
                assert data.endswith(b"\r\n"), data[-10:]
                wire += data
                body += data[:-2]
            while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                wire += line
                reply.trailers.append(line)
            wire += line
            reply.body, reply.wire = bytes(body), bytes(wire)
        elif (length := reply.get("content-length")) is not None:
            reply.body = reply.wire = await reader.readexactly(int(length))
        else:
            reply.body = reply.wire = await reader.read()  # close-delimited
        return reply


async def rest_until_close(reader: asyncio.StreamReader, timeout: float = 2.0) -> bytes:
    """Whatever else the router sends before it closes (a timeout if it never does)."""
    async with asyncio.timeout(timeout):
        try:
            return await reader.read()
        except ConnectionResetError:
            return b""


@contextlib.asynccontextmanager
async def connect(port: int) -> AsyncIterator[Streams]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def exchange(port: int, data: bytes, *, head: bool = False) -> Reply:
    """One request on a fresh client connection, one response."""
    async with connect(port) as (reader, writer):
        writer.write(data)
        return await read_reply(reader, head=head)


def pool_settled(router: RunningRouter, side: str = "legacy") -> Callable[[], bool]:
    """No upstream connection of the pool is still checked out."""
    pool = router.app.pools[side]
    return lambda: pool.active_count == 0


# ---- upstream side: raw servers that answer as scripted ------------------------------


async def read_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    """The (de-chunked) body of a request whose head was read."""
    lower = head.lower()
    if b"\r\ntransfer-encoding: chunked\r\n" in lower:
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailer fields
                return bytes(body)
            body += (await reader.readexactly(size + 2))[:-2]
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return await reader.readexactly(int(line.split(b":")[1]))
    return b""


def id_body(name: str, rid: str) -> bytes:
    return f"{name}:{rid}".encode()


def answer(rid: str, name: str = "up", *headers: str) -> bytes:
    """A keep-alive 200 whose body names the request it answers."""
    body = id_body(name, rid)
    extra = "".join(f"{h}\r\n" for h in headers)
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


# special(reader, writer, method, rid, head) -> keep serving this connection?
Special = Callable[[asyncio.StreamReader, asyncio.StreamWriter, str, str, bytes], Awaitable[bool]]


@dataclass
class IdUpstream:
    """A keep-alive upstream: `GET /id/<rid>[?delay=s]` answers `<name>:<rid>`. Paths
    `/<kind>/<rid>` with a kind in `special` are handed to that coroutine instead.
    `targets` keeps, per connection, the request targets it was sent."""

    name: str = "up"
    special: dict[str, Special] = field(default_factory=dict)
    targets: list[list[str]] = field(default_factory=list)

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen: list[str] = []
        self.targets.append(seen)
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            method, target = head.decode("latin-1").split(" ")[:2]
            seen.append(target)
            path, _, query = target.partition("?")
            kind, _, rid = path.strip("/").partition("/")
            if kind in self.special:
                if not await self.special[kind](reader, writer, method, rid, head):
                    return
                continue
            await read_body(reader, head)
            if query.startswith("delay="):
                await asyncio.sleep(float(query[len("delay=") :]))
            writer.write(answer(rid, self.name))
            await writer.drain()


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST instead of a FIN (SO_LINGER 0)."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def start(
    start_router: StartRouter, flag_file: Path, legacy: str, new: str | None = None, **kw: Any
) -> RunningRouter:
    return await start_router(router_settings(legacy, new or legacy, flag_file, **kw))


_ids = itertools.count(1)


def fresh_id(prefix: str) -> str:
    return f"{prefix}{next(_ids)}"


async def assert_answers_are_their_own(
    router: RunningRouter, sequential: int = 20, tenant: str = "acme", name: str = "up"
) -> None:
    """`sequential` requests one after the other (fresh client connections), then a burst
    of concurrent ones, at least one per idle upstream connection and each held upstream
    for a moment: every pooled connection gets used, and every answer must name the
    request it answers. A connection pooled with a stale response on it would answer the
    wrong id."""
    for _ in range(sequential):
        rid = fresh_id("s")
        reply = await exchange(router.port, request("GET", f"/id/{rid}", tenant=tenant))
        assert (reply.status, reply.body) == (200, id_body(name, rid)), reply
    side = "new" if tenant == "globex" else "legacy"
    rids = [fresh_id("c") for _ in range(router.app.pools[side].idle_count + 2)]
    replies = await asyncio.gather(
        *(exchange(router.port, request("GET", f"/id/{r}?delay=0.05", tenant=tenant)) for r in rids)
    )
    assert [(r.status, r.body) for r in replies] == [(200, id_body(name, r)) for r in rids]


# ---- 1. framing ----------------------------------------------------------------------

# Chunk payloads chosen to trip naive framing: a single byte, one that looks like the end
# of a chunked body, one larger than any socket read, one with CRLFs in it.
CHUNKS = [
    b"a",
    b"hello world",
    b"0\r\n\r\n",
    bytes(range(256)) * 300,
    b"\r\n\r\n\r\n",
    b"z" * 4097,
]


def chunked_wire(chunks: list[bytes], extensions: bool, trailers: bool) -> bytes:
    parts = []
    for index, chunk in enumerate(chunks):
        ext = f';ext{index}="v;{index}"' if extensions and index % 2 == 0 else ""
        parts.append(f"{len(chunk):x}{ext}\r\n".encode() + chunk + b"\r\n")
    parts.append(b"0\r\n")
    if trailers:
        parts.append(b"X-Checksum: abc\r\nX-Other: 1\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def awkward_pieces(data: bytes) -> list[bytes]:
    """Small pieces at first (splitting size lines, CRLFs and extensions), then larger."""
    pieces = [data[i : i + 3] for i in range(0, 120, 3)]
    pieces += [data[i : i + 7001] for i in range(120, len(data), 7001)]
    return [p for p in pieces if p]


@pytest.mark.parametrize("trailers", [False, True], ids=["no-trailers", "trailers"])
async def test_chunked_request_body_reaches_the_upstream_intact(
    router: RunningRouter, trailers: bool
) -> None:
    """A chunked upload trickled in awkward pieces: the upstream gets exactly the payload,
    still chunked (no Content-Length invented), and the end of the body, trailers and all,
    is consumed: the next request on the same client connection is answered normally."""
    expected = b"".join(CHUNKS)
    wire = chunked_wire(CHUNKS, extensions=True, trailers=trailers)
    async with connect(router.port) as (reader, writer):
        writer.write(
            b"POST /upload HTTP/1.1\r\nHost: app.test\r\nX-Tenant-Id: globex\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        for piece in awkward_pieces(wire):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.002)
        reply = await read_reply(reader)
        assert reply.status == 200, reply
        echo = reply.json()
        assert echo["side"] == "new"
        assert echo["body_bytes"] == len(expected)
        assert echo["body_sha256"] == hashlib.sha256(expected).hexdigest()
        assert echo["chunked"] is True
        assert "content-length" not in {name.lower() for name, _ in echo["headers"]}

        writer.write(request("GET", "/after", tenant="acme"))
        after = await read_reply(reader)
        assert (after.status, after.json()["target"], after.json()["side"]) == (
            200, "/after", "legacy",
        )  # fmt: skip


def scripted_response(framing: str) -> tuple[bytes, bytes]:
    """(wire bytes of a response, its payload) for `GET /body/...`."""
    payload = b"".join(CHUNKS)
    if framing == "length":
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Framing: length\r\n\r\n" % len(payload)
        return head + payload, payload
    trailers = framing == "chunked-trailers"
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Framing: chunked\r\n"
    if trailers:
        head += b"Trailer: X-Checksum, X-Other\r\n"
    return head + b"\r\n" + chunked_wire(CHUNKS, extensions=True, trailers=trailers), payload


@pytest.mark.parametrize("client_version", ["1.1", "1.0"])
@pytest.mark.parametrize("framing", ["chunked", "chunked-trailers", "length"])
async def test_response_framing_reaches_the_client_intact(
    start_router: StartRouter,
    flag_file: Path,
    raw_upstream: UpstreamFactory,
    framing: str,
    client_version: str,
) -> None:
    """The upstream trickles a chunked (extensions; trailers or not) or a Content-Length
    response. An HTTP/1.1 client gets it chunked (resp. with the same Content-Length) and
    can send its next request on the same connection; an HTTP/1.0 client, which cannot
    read chunked, gets a close-delimited body (resp. the Content-Length). Either way the
    payload is exact and the upstream connection is kept for the next request."""
    wire, payload = scripted_response(framing)

    async def trickle(
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        method: str,
        rid: str,
        head: bytes,
    ) -> bool:
        for index, piece in enumerate(awkward_pieces(wire)):
            if index:
                await asyncio.sleep(0.002)  # between pieces: none after the last one
            writer.write(piece)
            await writer.drain()
        return True

    upstream_script = IdUpstream(special={"body": trickle})
    upstream = await raw_upstream(upstream_script)
    router = await start(start_router, flag_file, upstream.url)
    async with connect(router.port) as (reader, writer):
        if client_version == "1.1":
            writer.write(request("GET", "/body/1"))
        else:
            writer.write(b"GET /body/1 HTTP/1.0\r\nHost: app.test\r\n\r\n")
        reply = await read_reply(reader)
        assert reply.status == 200, reply
        assert reply.version == f"HTTP/{client_version}"
        assert reply.get("x-framing") == framing.split("-")[0]
        assert reply.body == payload
        if framing == "length":
            assert reply.get("content-length") == str(len(payload))
            assert reply.get("transfer-encoding") is None
        elif client_version == "1.1":
            assert reply.get("transfer-encoding") == "chunked"
            assert reply.get("content-length") is None
        else:
            assert reply.get("transfer-encoding") is None
            assert reply.get("content-length") is None
            assert await rest_until_close(reader) == b""  # the close was the end
        if client_version == "1.1":
            rid = fresh_id("next")
            writer.write(request("GET", f"/id/{rid}", close=True))
            after = await read_reply(reader)
            assert (after.status, after.body) == (200, id_body("up", rid)), after
            assert await rest_until_close(reader) == b""
    if client_version == "1.1":
        # Both requests on one upstream connection: the end of the body (trailers
        # included) was recognised, nothing was left over on that connection.
        assert upstream_script.targets == [["/body/1", f"/id/{rid}"]]


# ---- 2. the upstream closes a kept-alive connection ----------------------------------


@pytest.mark.parametrize("when", ["at-once", "later"])
async def test_upstream_connection_close_is_never_reused(
    start_router: StartRouter, flag_file: Path, raw_upstream: UpstreamFactory, when: str
) -> None:
    """Every answer says `Connection: close`. The upstream closes at once, or only some
    time later (reading meanwhile): the router must go by the field, not wait to see the
    FIN, and send each request on a fresh connection. The client's own connection is not
    the upstream's business: it stays open for the next request."""
    sent_on_closed: list[bytes] = []
    closed = 0

    async def once_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal closed
        head = await reader.readuntil(b"\r\n\r\n")
        await read_body(reader, head)
        rid = head.split(b" ")[1].rsplit(b"/", 1)[1].decode()
        writer.write(answer(rid, "up", "Connection: close"))
        await writer.drain()
        if when == "later":
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.3):
                    while data := await reader.read(65536):
                        sent_on_closed.append(data)
        writer.close()
        closed += 1

    upstream = await raw_upstream(once_then_close)
    router = await start(start_router, flag_file, upstream.url)
    async with connect(router.port) as (reader, writer):
        for index, method in enumerate(["GET", "POST", "GET", "POST"]):
            rid = fresh_id("cc")
            body = b"payload" if method == "POST" else None
            writer.write(request(method, f"/id/{rid}", body=body))
            reply = await read_reply(reader)
            assert (reply.status, reply.body) == (200, id_body("up", rid)), reply
            assert reply.get("connection") is None  # hop-by-hop: not the client's
            assert upstream.connections == index + 1
    await wait_for(lambda: closed == 4)  # every connection's time to misuse is over
    assert sent_on_closed == []
    await wait_for(lambda: router.app.pools["legacy"].idle_count == 0)


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_upstream_closing_an_idle_connection(
    start_router: StartRouter, flag_file: Path, raw_upstream: UpstreamFactory, how: str
) -> None:
    """The upstream drops a kept-alive connection after 100 ms idle (the router keeps them
    4 s). Requests come at delays around that: long after it (the router has seen the
    close), right around it (the router may reuse the connection as it closes) and well
    before it. A GET always succeeds; a POST with a body succeeds or gets a clean 502
    `upstream_reset` (it cannot be replayed); nothing hangs."""
    idle = 0.1

    async def idle_closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                async with asyncio.timeout(idle):
                    head = await reader.readuntil(b"\r\n\r\n")
            except TimeoutError:
                if how == "rst":
                    reset(writer)
                else:
                    writer.close()
                return
            body = await read_body(reader, head)
            rid = head.split(b" ")[1].rsplit(b"/", 1)[1].decode()
            assert body in (b"", b"payload-" + rid.encode())
            writer.write(answer(rid))
            await writer.drain()

    upstream = await raw_upstream(idle_closing)
    router = await start(start_router, flag_file, upstream.url)
    post_statuses = []
    delays = [0.3, 0.15, 0.105, 0.1, 0.095, 0.05, 0.0]
    for delay in delays:
        rid = fresh_id("g")
        reply = await exchange(router.port, request("GET", f"/id/{rid}", tenant="acme"))
        assert (reply.status, reply.body) == (200, id_body("up", rid)), (delay, reply)
        await asyncio.sleep(delay)
        rid = fresh_id("p")
        data = request("POST", f"/id/{rid}", tenant="acme", body=b"payload-" + rid.encode())
        reply = await exchange(router.port, data)
        post_statuses.append(reply.status)
        if reply.status == 200:
            assert reply.body == id_body("up", rid), (delay, reply)
        else:
            assert reply.status == 502, (delay, reply)
            assert (reply.get("content-type") or "").startswith("application/json")
            assert reply.json()["error"] == "upstream_reset", reply
        await asyncio.sleep(delay)
    # The long delays did see the upstream close its connections.
    assert upstream.connections >= 4
    assert post_statuses[:2] == [200, 200]  # long after the close: never a 502
    await wait_for(pool_settled(router))


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_upstream_closing_mid_body_aborts_the_client(
    start_router: StartRouter, flag_file: Path, raw_upstream: UpstreamFactory, how: str
) -> None:
    """On a reused upstream connection and a kept-alive client connection: the upstream
    promises 1 000 000 bytes, sends 300 000 (in pieces, so the head and part of the body
    went out), then closes. The client sees fewer bytes than announced and a closed
    connection, never a next response; the next request gets a fresh upstream
    connection."""
    total, cut = 1_000_000, 300_000

    async def cut_short(
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        method: str,
        rid: str,
        head: bytes,
    ) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        for _ in range(cut // 30_000):
            writer.write(b"c" * 30_000)
            await writer.drain()
            await asyncio.sleep(0.005)
        if how == "rst":
            reset(writer)
        else:
            writer.close()
        return False

    upstream_script = IdUpstream(special={"cut": cut_short})
    upstream = await raw_upstream(upstream_script)
    router = await start(start_router, flag_file, upstream.url)
    async with connect(router.port) as (reader, writer):
        rid = fresh_id("before")
        writer.write(request("GET", f"/id/{rid}"))
        reply = await read_reply(reader)
        assert (reply.status, reply.body) == (200, id_body("up", rid))
        writer.write(request("GET", "/cut/1"))
        async with asyncio.timeout(TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert b"\r\nContent-Length: 1000000\r\n" in head
        received = await rest_until_close(reader, timeout=TIMEOUT)
    assert len(received) <= cut
    assert set(received) <= {ord("c")}  # body bytes only: nothing after them
    assert upstream_script.targets[0] == [f"/id/{rid}", "/cut/1"]  # the reused connection
    await wait_for(pool_settled(router))
    rid = fresh_id("after")
    reply = await exchange(router.port, request("GET", f"/id/{rid}"))
    assert (reply.status, reply.body) == (200, id_body("up", rid))
    assert upstream.connections == 2


# ---- 3. pipelining -------------------------------------------------------------------


async def test_pipelined_requests_answered_in_order(router: RunningRouter) -> None:
    """Three requests in one write: a slow GET (legacy), a POST with a body (new), a HEAD
    (legacy) that closes. Three complete responses, in order, from the right sides, the
    HEAD without a body, then the close and nothing else."""
    post_body = b"pipelined body \r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n"
    async with connect(router.port) as (reader, writer):
        writer.write(
            request("GET", "/__slow/0.2", tenant="acme")
            + request("POST", "/echo?n=2", tenant="globex", body=post_body)
            + request("HEAD", "/__bytes/1000?framing=length", tenant="acme", close=True)
        )
        slow = await read_reply(reader)
        echo = await read_reply(reader)
        head = await read_reply(reader, head=True)
        rest = await rest_until_close(reader)
    assert (slow.status, slow.body, slow.get("x-backend-side")) == (200, b"slow", "legacy")
    assert (echo.status, echo.get("x-backend-side")) == (200, "new")
    body = echo.json()
    assert (body["method"], body["target"], body["body_bytes"]) == (
        "POST", "/echo?n=2", len(post_body),
    )  # fmt: skip
    assert body["body_sha256"] == hashlib.sha256(post_body).hexdigest()
    assert (head.status, head.get("x-backend-side")) == (200, "legacy")
    assert head.get("content-length") == "1000"
    assert rest == b""
    ids = [r.get("x-request-id") for r in (slow, echo, head)]
    assert None not in ids and len(set(ids)) == 3


# ---- 4. clients that leave early -----------------------------------------------------


@pytest.mark.parametrize("slow", ["head", "length-body", "chunked-body"])
async def test_client_leaving_early_does_not_poison_the_pool(
    start_router: StartRouter, flag_file: Path, raw_upstream: UpstreamFactory, slow: str
) -> None:
    """A client asks for a slow response (a head after 0.5 s, or a 2 MB body trickled
    over about a second) and leaves before it is done. Whatever the router does with the
    upstream connection (finish reading it, or drop it), no later request may get a
    byte of that response: 20 sequential requests and a burst that uses every pooled
    connection each get their own answer, and no connection stays checked out."""
    finished = asyncio.Event()  # the slow answer was fully written, or cut off
    sent = 0
    size, piece = 2 << 20, 32 << 10

    async def slow_answer(
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        method: str,
        rid: str,
        head: bytes,
    ) -> bool:
        nonlocal sent
        try:
            if slow == "head":
                await asyncio.sleep(0.5)
                writer.write(answer(rid))
                await writer.drain()
                return True
            chunked = slow == "chunked-body"
            writer.write(
                b"HTTP/1.1 200 OK\r\n"
                + (
                    b"Transfer-Encoding: chunked\r\n"
                    if chunked
                    else b"Content-Length: %d\r\n" % size
                )
                + b"\r\n"
            )
            data = rid.encode().ljust(piece, b".")
            while sent < size:
                writer.write(b"%x\r\n%s\r\n" % (piece, data) if chunked else data)
                sent += piece
                await writer.drain()
                await asyncio.sleep(0.015)
            if chunked:
                writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        finally:
            finished.set()

    upstream = await raw_upstream(IdUpstream(special={"slow": slow_answer}))
    # Idle connections live longer than the test: the sweeper cannot hide a bad one.
    router = await start(start_router, flag_file, upstream.url, upstreams__legacy__idle_timeout=60)
    # Warm the pool: the slow request goes out on a reused connection.
    assert (await exchange(router.port, request("GET", "/id/warm"))).status == 200
    async with connect(router.port) as (reader, writer):
        writer.write(request("GET", "/slow/gone"))
        if slow == "head":
            await asyncio.sleep(0.1)
        else:
            async with asyncio.timeout(TIMEOUT):
                await reader.readuntil(b"\r\n\r\n")
                got = 0
                while got < 4 * piece:
                    got += len(await reader.read(65536))
    # The client is gone; the slow answer is still on its way.
    await assert_answers_are_their_own(router)
    await asyncio.wait_for(finished.wait(), TIMEOUT)
    await asyncio.sleep(0.1)
    await assert_answers_are_their_own(router)
    await wait_for(pool_settled(router))


@pytest.mark.parametrize("framing", ["chunked", "length"])
async def test_client_leaving_mid_upload_drops_the_upstream_connection(
    start_router: StartRouter, flag_file: Path, raw_upstream: UpstreamFactory, framing: str
) -> None:
    """The client uploads part of a large body, slowly, and leaves. The upstream still
    expects the rest: that connection must be closed, never given another request (its
    head would be read as body bytes). Later requests all get their own answers."""
    received = bytearray()
    upload_closed = asyncio.Event()

    async def swallow(
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        method: str,
        rid: str,
        head: bytes,
    ) -> bool:
        try:
            while data := await reader.read(65536):
                received.extend(data)
        finally:
            upload_closed.set()
        return False

    upstream_script = IdUpstream(special={"upload": swallow})
    upstream = await raw_upstream(upstream_script)
    router = await start(start_router, flag_file, upstream.url, upstreams__legacy__idle_timeout=60)
    assert (await exchange(router.port, request("GET", "/id/warm"))).status == 200
    async with connect(router.port) as (_, writer):
        framing_field = (
            "Transfer-Encoding: chunked" if framing == "chunked" else "Content-Length: 10000000"
        )
        writer.write(request("PUT", "/upload/1", headers=(framing_field,)))
        for _ in range(8):
            data = b"u" * 32768
            writer.write(b"8000\r\n" + data + b"\r\n" if framing == "chunked" else data)
            await writer.drain()
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the router has forwarded what came
    await asyncio.sleep(0.1)  # ... and seen the client leave
    await assert_answers_are_their_own(router)
    await asyncio.wait_for(upload_closed.wait(), 2.0)  # dropped, not left to expire
    assert b"u" * 32768 in received  # the upload did reach the upstream ...
    assert b"HTTP/1.1" not in received  # ... and nothing after it on that connection
    assert upstream_script.targets[0] == ["/id/warm", "/upload/1"]
    await wait_for(pool_settled(router))


# ---- 5. keep-alive on the client side ------------------------------------------------


async def test_hundred_requests_on_one_client_connection(
    start_router: StartRouter, flag_file: Path, raw_upstream: UpstreamFactory
) -> None:
    """100 sequential requests (both sides, GET and POST) on one client connection, each
    answered by its own response; the upstream side reuses one connection per side."""
    legacy = await raw_upstream(IdUpstream(name="legacy"))
    new = await raw_upstream(IdUpstream(name="new"))
    router = await start(start_router, flag_file, legacy.url, new.url)
    answered = 0
    async with connect(router.port) as (reader, writer):
        for index in range(100):
            tenant, side = ("globex", "new") if index % 2 else ("acme", "legacy")
            rid = fresh_id("ka")
            body = b"b" * index if index % 3 == 0 else None
            method = "POST" if body is not None else "GET"
            writer.write(request(method, f"/id/{rid}", tenant=tenant, body=body))
            reply = await read_reply(reader)
            assert (reply.status, reply.body) == (200, id_body(side, rid)), (index, reply)
            assert reply.get("connection") is None
            answered += 1
    assert answered == 100
    assert (legacy.connections, new.connections) == (1, 1)


@pytest.mark.parametrize("client", ["http/1.1 close", "http/1.0"])
async def test_client_connection_close_is_honoured(
    start_router: StartRouter, flag_file: Path, raw_upstream: UpstreamFactory, client: str
) -> None:
    """`Connection: close` (or HTTP/1.0 without keep-alive) after a few kept-alive
    requests: the router answers it, says so, and closes the connection. The upstream
    connection is not the client's business: it stays pooled."""
    upstream_script = IdUpstream()
    upstream = await raw_upstream(upstream_script)
    router = await start(start_router, flag_file, upstream.url)
    async with connect(router.port) as (reader, writer):
        if client == "http/1.1 close":
            for rid in ("k1", "k2"):
                writer.write(request("GET", f"/id/{rid}"))
                reply = await read_reply(reader)
                assert (reply.status, reply.body) == (200, id_body("up", rid))
            writer.write(request("GET", "/id/last", close=True))
        else:
            writer.write(b"GET /id/last HTTP/1.0\r\nHost: app.test\r\n\r\n")
        reply = await read_reply(reader)
        rest = await rest_until_close(reader)
    assert (reply.status, reply.body) == (200, id_body("up", "last"))
    assert reply.get("connection") == "close"
    assert rest == b""
    assert upstream.connections == 1
    await wait_for(lambda: router.app.pools["legacy"].idle_count == 1)


# ---- 6. responses without a body on a kept-alive connection --------------------------


async def test_bodyless_responses_keep_both_connections_in_step(
    start_router: StartRouter, flag_file: Path, raw_upstream: UpstreamFactory
) -> None:
    """HEAD (announcing a Content-Length, or chunked), 304 with a Content-Length, 204: no
    body on the wire in either direction. Each is followed by a GET on the same client
    connection, which must get its own intact answer, and all of it goes over one
    upstream connection (the router did not wait for, or read, a body that never comes)."""

    async def no_body(
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        method: str,
        rid: str,
        head: bytes,
    ) -> bool:
        if rid == "head-length":
            assert method == "HEAD"
            writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 5000\r\nETag: "v1"\r\n\r\n')
        elif rid == "head-chunked":
            assert method == "HEAD"
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        elif rid == "304":
            writer.write(b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 5000\r\n\r\n')
        else:
            writer.write(b"HTTP/1.1 204 No Content\r\nX-Done: yes\r\n\r\n")
        await writer.drain()
        return True

    upstream_script = IdUpstream(special={"nobody": no_body})
    upstream = await raw_upstream(upstream_script)
    router = await start(start_router, flag_file, upstream.url)
    cases = [("HEAD", "head-length", 200), ("HEAD", "head-chunked", 200),
             ("GET", "304", 304), ("GET", "204", 204), ("HEAD", "head-length", 200)]  # fmt: skip
    async with connect(router.port) as (reader, writer):
        for method, kind, status in cases:
            writer.write(request(method, f"/nobody/{kind}"))
            reply = await read_reply(reader, head=method == "HEAD")
            assert reply.status == status, reply
            if kind in ("head-length", "304"):
                assert reply.get("content-length") == "5000"
            if kind == "204":
                assert reply.get("content-length") is None
                assert reply.get("transfer-encoding") is None
            rid = fresh_id(f"after-{kind}-")
            writer.write(request("GET", f"/id/{rid}"))
            after = await read_reply(reader)
            assert (after.status, after.body) == (200, id_body("up", rid)), (kind, after)
        writer.write(request("GET", "/id/last", close=True))
        last = await read_reply(reader)
        assert (last.status, last.body) == (200, id_body("up", "last"))
        assert await rest_until_close(reader) == b""
    assert upstream.connections == 1
    assert len(upstream_script.targets[0]) == 2 * len(cases) + 1
