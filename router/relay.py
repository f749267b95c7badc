"""Phases 3 and 4: forward the request to the chosen upstream and relay the response.

Both bodies stream: at most a bounded amount of either is buffered, whatever its size,
and each side's backpressure reaches the other (a slow client pauses the upstream socket,
a slow upstream pauses reading the client).

Header rules (RFC 9110 7.6.1), both directions:
- hop-by-hop fields are dropped: Connection and every field it names, Keep-Alive,
  Proxy-Connection, TE, Transfer-Encoding, Upgrade, Trailer (we never relay trailers);
- framing is rebuilt, never copied: Content-Length is sent when the client sent one,
  chunked otherwise; the response keeps the upstream's framing (Content-Length or chunked);
- the router's own fields replace whatever the client sent: Host (per the upstream's
  `host_header`), X-Forwarded-For (appended), X-Forwarded-Proto, X-Forwarded-Host,
  X-Request-Id; routing fields (X-Router-*) never reach an upstream, nor do
  underscore spellings of router-owned fields (`X_Tenant_Id`, `X_Forwarded_For`), which
  some backends (WSGI, CGI) read as the same variable.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from typing import TYPE_CHECKING, Final

from aiohttp import web
from aiohttp.http import HttpVersion11
from multidict import CIMultiDict

from router.errors import BadRequest, RouterError, UpstreamReset
from router.upstream import RETRYABLE_METHODS, UpstreamConnection, UpstreamPool, UpstreamResponse

if TYPE_CHECKING:
    from aiohttp.streams import StreamReader

HOP_BY_HOP: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
     b"transfer-encoding", b"upgrade"}
)  # fmt: skip
# Request fields the router sets itself; the client's values are dropped (or merged, for
# X-Forwarded-For) and rewritten.
_ROUTER_OWNED_REQUEST: Final = frozenset(
    {b"host", b"content-length", b"expect", b"x-forwarded-for", b"x-forwarded-proto",
     b"x-forwarded-host", b"x-request-id", b"x-router-target", b"x-router-signature"}
)  # fmt: skip
_DROP_REQUEST: Final = HOP_BY_HOP | _ROUTER_OWNED_REQUEST
_DROP_RESPONSE: Final = HOP_BY_HOP | {b"x-request-id", b"content-length"}

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
_CHUNK_END: Final = b"0\r\n\r\n"
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


def valid_request_id(value: str | None) -> bool:
    return value is not None and _REQUEST_ID.fullmatch(value) is not None


def connection_tokens(
    raw_headers: tuple[tuple[bytes, bytes], ...] | list[tuple[bytes, bytes]],
) -> frozenset[bytes]:
    """Field names listed in Connection (they are hop-by-hop for this message)."""
    names: set[bytes] = set()
    for name, value in raw_headers:
        if name.lower() == b"connection":
            names.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(names)


class HeaderRules:
    """What to drop from each direction; built once from the configuration."""

    __slots__ = ("underscore_spellings",)

    def __init__(self, tenant_headers: tuple[str, ...]) -> None:
        owned = {n.decode() for n in _ROUTER_OWNED_REQUEST} | {h.lower() for h in tenant_headers}
        # `x_tenant_id`, `x-tenant_id`, ...: any spelling with an underscore that a backend
        # could normalise to a router-owned field. Compared after mapping '_' to '-'.
        self.underscore_spellings = frozenset(n.encode() for n in owned)

    def drop_request_header(self, lname: bytes, connection_named: frozenset[bytes]) -> bool:
        if lname in _DROP_REQUEST or lname in connection_named:
            return True
        return b"_" in lname and lname.replace(b"_", b"-") in self.underscore_spellings


class ForwardInfo:
    """Per-request facts the relay needs, produced by the earlier phases."""

    __slots__ = ("host", "proto", "request_id", "target")

    def __init__(self, target: bytes, host: str, proto: str, request_id: str) -> None:
        self.target = target  # origin-form request target
        self.host = host  # the client's Host (after absolute-form normalisation)
        self.proto = proto
        self.request_id = request_id


def build_request_head(
    request: web.BaseRequest,
    info: ForwardInfo,
    pool: UpstreamPool,
    rules: HeaderRules,
    has_body: bool,
    chunked: bool,
) -> bytes:
    raw_headers = request.raw_headers
    connection_named = (
        connection_tokens(raw_headers) if "Connection" in request.headers else frozenset()
    )
    host = (
        info.host.encode("latin-1")
        if pool.settings.host_header == "preserve" and info.host
        else pool.authority
    )
    parts = [
        request.method.encode("ascii"),
        b" ",
        info.target,
        b" HTTP/1.1\r\nHost: ",
        host,
        b"\r\n",
    ]
    append = parts.append
    forwarded_for = b""
    forwarded_proto = b""
    forwarded_host = b""
    drop = rules.drop_request_header
    for name, value in raw_headers:
        lname = name.lower()
        if drop(lname, connection_named):
            if lname == b"x-forwarded-for":
                forwarded_for = value if not forwarded_for else forwarded_for + b", " + value
            elif lname == b"x-forwarded-proto":
                forwarded_proto = value
            elif lname == b"x-forwarded-host":
                forwarded_host = value
            continue
        append(name)
        append(b": ")
        append(value)
        append(b"\r\n")
    if has_body:
        if chunked:
            append(b"Transfer-Encoding: chunked\r\n")
        else:
            append(b"Content-Length: %d\r\n" % (request.content_length or 0))
    peer = request.remote or ""
    client = peer.encode("ascii", "replace")
    append(b"X-Forwarded-For: ")
    append(forwarded_for + b", " + client if forwarded_for else client)
    append(b"\r\nX-Forwarded-Proto: ")
    append(forwarded_proto or info.proto.encode("ascii"))
    append(b"\r\nX-Forwarded-Host: ")
    append(forwarded_host or info.host.encode("latin-1"))
    append(b"\r\nX-Request-Id: ")
    append(info.request_id.encode("ascii"))
    append(b"\r\n\r\n")
    return b"".join(parts)


class ProxyResponse(web.StreamResponse):
    """A StreamResponse that relays the upstream's head as is.

    aiohttp's own `_prepare_headers` adds Content-Type, Date and Server when missing and
    drops Content-Length from 304s; a transparent proxy must do none of that. Here only the
    framing is decided: the upstream's Content-Length if it sent one, else chunked (HTTP/1.1
    clients) or close-delimited (HTTP/1.0 clients).
    """

    __slots__ = ("_upstream_length",)

    def __init__(self, status: int, headers: CIMultiDict[str], content_length: int | None) -> None:
        super().__init__(status=status, headers=headers)
        self._upstream_length = content_length

    async def _prepare_headers(self) -> None:
        request = self._req
        writer = self._payload_writer
        assert request is not None and writer is not None
        keep_alive = request.keep_alive if self._keep_alive is None else self._keep_alive
        headers = self._headers
        if self._must_be_empty_body:  # HEAD, 204, 304: head only, framing fields as sent
            if self.status == 204 or self.status < 200:
                headers.popall("Content-Length", None)
            elif self._upstream_length is not None:
                headers["Content-Length"] = str(self._upstream_length)
        elif self._upstream_length is not None:
            writer.length = self._upstream_length
            headers["Content-Length"] = str(self._upstream_length)
        elif request.version >= HttpVersion11:
            writer.enable_chunking()
            headers["Transfer-Encoding"] = "chunked"
        else:
            keep_alive = False  # HTTP/1.0 client, unknown length: the close ends the body
        self._keep_alive = keep_alive
        if not keep_alive:
            headers["Connection"] = "close"
        elif request.version < HttpVersion11:
            headers["Connection"] = "keep-alive"


def response_headers(
    upstream: UpstreamResponse, request_id: str, routed_to: str | None
) -> CIMultiDict[str]:
    named = connection_tokens(upstream.headers)
    headers: CIMultiDict[str] = CIMultiDict()
    add = headers.add
    for name, value in upstream.headers:
        lname = name.lower()
        if lname in _DROP_RESPONSE or lname in named:
            continue
        add(name.decode("latin-1"), value.decode("latin-1"))
    add("X-Request-Id", request_id)
    if routed_to is not None:
        add("X-Routed-To", routed_to)
    return headers


class Exchange:
    """One request/response through an upstream pool, with byte counts for the record phase."""

    __slots__ = ("body_task", "bytes_in", "bytes_out", "conn", "connect_seconds", "upstream_status")

    def __init__(self) -> None:
        self.conn: UpstreamConnection | None = None
        self.body_task: asyncio.Task[None] | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.upstream_status = 0
        self.connect_seconds = 0.0  # time to open a new connection (0 when one was reused)

    async def send(
        self,
        request: web.BaseRequest,
        pool: UpstreamPool,
        head: bytes,
        has_body: bool,
        chunked: bool,
    ) -> UpstreamResponse:
        """Send the request and return the response head; retries once where safe."""
        method = request.method
        started = time.perf_counter()
        conn = await pool.acquire()
        if conn.requests == 0:
            self.connect_seconds = time.perf_counter() - started
        reused = conn.requests > 0
        try:
            return await self._attempt(conn, request, pool, head, has_body, chunked)
        except UpstreamReset:
            # A reused connection that died before any byte of a response came back: the
            # upstream closed it as we reused it (the stale-connection race). Resend once on
            # a fresh connection if the request can be replayed: no body was consumed, and
            # the method is idempotent.
            if not (
                reused and not conn.received_any and not has_body and method in RETRYABLE_METHODS
            ):
                raise
        conn = await pool.connect()
        return await self._attempt(conn, request, pool, head, has_body, chunked)

    async def _attempt(
        self,
        conn: UpstreamConnection,
        request: web.BaseRequest,
        pool: UpstreamPool,
        head: bytes,
        has_body: bool,
        chunked: bool,
    ) -> UpstreamResponse:
        self.conn = conn
        conn.start_request(head, request.method == "HEAD")
        if has_body:
            body_task = self.body_task = asyncio.ensure_future(
                self._send_body(request, conn, chunked, pool.response_header_timeout)
            )
            head_waiter = conn.head_waiter
            # The upstream may answer before reading the whole body (an early 413, say): wait
            # for whichever comes first, then give the response-header timeout to the rest.
            await asyncio.wait((body_task, head_waiter), return_when=asyncio.FIRST_COMPLETED)
            if body_task.done() and not head_waiter.done():
                body_task.result()  # raises if the client or the upstream side failed
        response = await conn.response_head(pool.response_header_timeout)
        self.upstream_status = response.status
        return response

    async def _send_body(
        self, request: web.BaseRequest, conn: UpstreamConnection, chunked: bool, timeout: float
    ) -> None:
        """Stream the request body; `timeout` bounds each wait for the upstream to read."""
        content: StreamReader = request.content
        if request.headers.get("Expect", "").lower() == "100-continue":
            # Answer the client's Expect ourselves (the Expect field is not forwarded) once
            # there is an upstream to send the body to.
            await request.writer.write(_CONTINUE)
        write = conn.write
        while True:
            chunk = await content.readany()
            if not chunk:
                break
            self.bytes_in += len(chunk)
            if chunked:
                write(b"%x\r\n" % len(chunk))
                write(chunk)
                write(b"\r\n")
            else:
                write(chunk)
            await conn.drain(timeout)
        if chunked:
            write(_CHUNK_END)

    async def relay(
        self,
        request: web.BaseRequest,
        upstream: UpstreamResponse,
        response: ProxyResponse,
        read_timeout: float,
    ) -> None:
        """Stream the upstream body to the client; on upstream failure, abort the client."""
        conn = self.conn
        assert conn is not None
        await response.prepare(request)
        write = response.write
        try:
            while True:
                chunk = await conn.read(read_timeout)
                if not chunk:
                    break
                self.bytes_out += len(chunk)
                await write(chunk)
        except RouterError:
            # Headers are gone: the only honest signal left is to abort the client
            # connection, so it cannot mistake a truncated body for a complete one.
            transport = request.transport
            if transport is not None:
                transport.abort()
            raise
        await response.write_eof()

    def finish(self, pool: UpstreamPool) -> None:
        """Return the connection to the pool if it is clean, else drop it."""
        conn, self.conn = self.conn, None
        body_task, self.body_task = self.body_task, None
        if body_task is not None and (
            not body_task.done() or body_task.cancelled() or body_task.exception() is not None
        ):
            # The request body was not fully sent (the upstream answered early, then the
            # client left or its body turned out malformed): the upstream still expects the
            # rest, and would read the next request's head as body. exception() above also
            # marks a failure as seen, so asyncio does not log it as never retrieved.
            body_task.cancel()
            if conn is not None:
                conn.abort()
        if conn is not None:
            pool.release(conn)


def origin_form(request: web.BaseRequest) -> tuple[bytes, str]:
    """The origin-form target and the effective Host of a request.

    An absolute-form target (`GET http://host/path`) is accepted as RFC 9112 3.2.2
    requires, but reduced to origin form: its authority only replaces Host (for tenant
    identification and X-Forwarded-Host), never the upstream, which is chosen from
    configuration alone. This is not an open proxy.
    """
    raw = request.raw_path
    host = request.headers.get("Host", "")
    if raw.startswith("/"):
        return raw.encode("latin-1"), host
    if raw == "*" and request.method == "OPTIONS":
        return b"*", host
    url = request.url
    if raw.lower().startswith(("http://", "https://")) and url.raw_host:
        return (url.raw_path_qs or "/").encode("latin-1"), url.raw_authority
    raise BadRequest(f"unsupported request target {raw[:100]!r}")


async def close_quietly(response: web.StreamResponse) -> None:
    with contextlib.suppress(Exception):
        await response.write_eof()
