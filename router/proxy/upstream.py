"""Upstream connection pool: keep-alive HTTP/1.1 connections driven at the protocol level.

Why not aiohttp's ClientSession: on this machine it costs about twice the aiohttp server
side per request (PERFORMANCE.md); an `asyncio.Protocol` fed to llhttp (via httptools)
costs a fraction of that, and gives us exact control of the two things a proxy must get
right and a general client hides: which failures may be retried, and what a truncated
response looks like.

Shape:
    UpstreamPool            one per upstream (legacy, new): idle connections (LIFO, so hot
                            connections stay hot and the sweeper closes the cold tail), a
                            bound on connections, the TLS context, the timeouts.
    UpstreamConnection      one TCP (or TLS) connection: writes a request head and body,
                            parses the response, buffers at most a bounded amount of body
                            before pausing the socket (backpressure towards the upstream).
    UpstreamResponse        status, reason and raw headers of a response head.

Low-level exceptions are mapped to `router.errors` in exactly one place,
`UpstreamConnection._fail` and `UpstreamPool.connect`; callers only ever see RouterError.

Retries: the pool retries nothing by itself. `UpstreamPool.acquire` never hands out a
connection it already knows is dead (EOF seen, transport closing, idle too long), so a
request is never written to one; the relay retries exactly once, on a fresh connection,
when a *reused* connection failed before any response byte and the request is safe to
resend (see `RETRYABLE_METHODS` and `relay.py`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from collections.abc import Callable
from typing import Final, cast

import httptools

from router.errors import (
    RouterError,
    UpstreamBadResponse,
    UpstreamConnectFailed,
    UpstreamReset,
    UpstreamTimeout,
)
from router.settings import UpstreamSettings

# Methods whose request may be sent a second time if a reused connection died before any
# byte of the response came back (RFC 9110 9.2.2, idempotent methods). Only requests
# without a body are resent: a streamed body has been consumed and cannot be replayed.
RETRYABLE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

# Response body bytes buffered per connection before the socket is paused. Together with
# the client transport's write buffer this bounds memory per in-flight request, whatever
# the sizes.
_HIGH_WATER: Final = 256 * 1024
_LOW_WATER: Final = 64 * 1024

# Limits on a response head; beyond them the response is refused as upstream_bad_response
# rather than grown without bound.
# Lengths of "connection", "content-length" and "transfer-encoding".
_FRAMING_NAME_LENGTHS: Final = frozenset({10, 14, 17})

_PLAIN_CONNECTION: Final = frozenset({b"keep-alive", b"close"})

MAX_RESPONSE_HEADERS: Final = 200
MAX_RESPONSE_HEAD_BYTES: Final = 64 * 1024


class UpstreamResponse:
    __slots__ = (
        "chunked", "content_length", "has_connection_options", "headers", "keep_alive", "status"
    )  # fmt: skip

    def __init__(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        content_length: int | None,
        chunked: bool,
        keep_alive: bool,
        has_connection_options: bool,
    ) -> None:
        self.status = status
        self.headers = headers
        self.content_length = content_length
        self.chunked = chunked
        self.keep_alive = keep_alive
        # A Connection field with more than keep-alive/close: it names hop-by-hop fields.
        self.has_connection_options = has_connection_options


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection. Not reentrant: one request at a time (no pipelining)."""

    __slots__ = (
        "_body",
        "_body_buffered",
        "_body_done",
        "_body_waiter",
        "_chunked",
        "_content_length",
        "_drain_waiter",
        "_error",
        "_expect_no_body",
        "_head_bytes",
        "_head_received",
        "_head_waiter",
        "_headers",
        "_keep_alive",
        "_loop",
        "_parser",
        "_parser_feed",
        "_reading_paused",
        "_received_any",
        "_status",
        "_timer",
        "_write_paused",
        "closed",
        "eof",
        "head_deadline",
        "idle_since",
        "pool",
        "requests",
        "transport",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        # Per-connection state
        self.pool = pool
        self._loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        # Bound once (and again with a new parser): compiled (setup.py), a stored bound
        # method skips the by-name lookup of `self._parser.feed_data()` on every read.
        self._parser_feed: Callable[[bytes], None] = self._parser.feed_data
        self.closed = False
        self.eof = False  # the upstream sent FIN: never reuse
        self.idle_since = 0.0
        self.head_deadline = 0.0  # loop.time() by which a response head must come (0: none)
        self.requests = 0  # requests served on this connection (0 = fresh)
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        # Per-request state
        self._reset_request_state()

    def _reset_request_state(self) -> None:
        self._head_waiter: asyncio.Future[UpstreamResponse] | None = None
        self._body: collections.deque[bytes] = collections.deque()  # empty after a clean response
        self._body_buffered = 0
        self._body_done = False
        self._body_waiter: asyncio.Future[None] | None = None
        self._error: RouterError | None = None
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0  # header names and values, as parsed
        self._head_received = 0  # raw bytes of a head still incomplete
        self._content_length: int | None = None
        self._chunked = False
        self._keep_alive = False
        self._expect_no_body = False
        self._received_any = False
        self._timer: asyncio.TimerHandle | None = None

    # ---- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport does not subclass asyncio.Transport, but implements it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._head_waiter is None or self._body_done:
            # Bytes while no request is outstanding, or after its response completed: the
            # upstream is not speaking HTTP/1.1 keep-alive correctly. Drop the connection
            # rather than misattribute the bytes to the next request.
            self._keep_alive = False
            self._close()
            return
        self._received_any = True
        try:
            self._parser_feed(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamBadResponse("upstream switched protocols unexpectedly"))
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, RouterError):
                self._fail(cause)
            else:
                self._fail(UpstreamBadResponse(f"invalid response from upstream: {exc}"))
        else:
            if not self._status:
                # All of `data` belonged to a head that is still incomplete. llhttp holds a
                # header line until its end before on_header sees it, so a line that never
                # ends would grow without bound until the timeout: count raw bytes too.
                self._head_received += len(data)
                if self._head_received > MAX_RESPONSE_HEAD_BYTES:
                    self._fail(UpstreamBadResponse("upstream response head too large"))

    def eof_received(self) -> bool:
        self.eof = True
        self._on_eof()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.eof = True
        self.pool._forget(self)
        self._on_eof()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(
                self._error or UpstreamReset("upstream closed the connection")
            )

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ---- httptools callbacks (response parsing) ---------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if len(self._headers) >= MAX_RESPONSE_HEADERS or self._head_bytes > MAX_RESPONSE_HEAD_BYTES:
            raise UpstreamBadResponse("upstream response headers too large")
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if 100 <= status < 200:
            # Interim responses (100 Continue, 103 Early Hints) are not relayed: the router
            # answers Expect: 100-continue itself. Forget them and wait for the final one.
            self._headers = []
            self._head_bytes = 0
            return
        if not 200 <= status <= 599:
            # llhttp takes any three digits; a status outside RFC 9110's classes has no
            # meaning a client could act on (and aiohttp would write 099 as "99").
            raise UpstreamBadResponse(f"upstream sent status {status}")
        self._status = status
        content_length: int | None = None
        chunked = False
        has_connection_options = False
        for name, value in self._headers:
            if len(name) not in _FRAMING_NAME_LENGTHS:
                continue  # most fields: not one of the three below, no lower() needed
            lname = name.lower()
            if lname == b"connection":
                # Only a Connection field naming other fields needs the relay's attention
                # (they are hop-by-hop too); `keep-alive` and `close` name none.
                if value.lower() not in _PLAIN_CONNECTION:
                    has_connection_options = True
            elif lname == b"content-length":
                # llhttp already rejects malformed and conflicting values.
                content_length = int(value)
            elif lname == b"transfer-encoding":
                # Only plain chunked can be relayed. Any other coding (`gzip`, `gzip,
                # chunked`) leaves the body transfer-coded, and Transfer-Encoding is
                # hop-by-hop: the client would get the coded bytes unlabelled.
                if chunked or value.strip().lower() != b"chunked":
                    raise UpstreamBadResponse("upstream used a transfer coding other than chunked")
                chunked = True
        self._content_length = content_length
        self._chunked = chunked
        self._keep_alive = bool(parser.should_keep_alive())
        response = UpstreamResponse(
            status, self._headers, content_length, chunked, self._keep_alive, has_connection_options
        )
        waiter = self._head_waiter
        self.head_deadline = 0.0  # the head is here: the sweeper must not fail it now
        if self._expect_no_body or status in (204, 304):
            # A response to HEAD carries no body whatever its Content-Length says; llhttp
            # cannot be told so, so the message ends here and the next request gets a
            # fresh parser.
            self._parser = httptools.HttpResponseParser(self)
            self._parser_feed = self._parser.feed_data
            self._message_done()
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    def on_body(self, body: bytes) -> None:
        if self._body_done:
            return
        self._body.append(body)
        self._body_buffered += len(body)
        waiter = self._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._body_buffered > _HIGH_WATER and not self._reading_paused:
            self._reading_paused = True
            if self.transport is not None:
                self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._status == 0:  # end of an interim (1xx) response
            return
        self._message_done()

    # ---- request side ------------------------------------------------------------------

    def start_request(self, head: bytes, no_body_expected: bool) -> None:
        """Write a request head; the body (if any) follows via write().

        The per-request state is fresh: set by __init__ for a new connection, reset by
        UpstreamPool.release for a reused one (a failed connection is never reused).
        """
        self._expect_no_body = no_body_expected
        self._head_waiter = self._loop.create_future()
        self.requests += 1
        assert self.transport is not None
        self.transport.write(head)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    async def drain(self, timeout: float) -> None:
        """Wait while the upstream is not taking request bytes, up to `timeout` at a time."""
        if self.closed:
            raise self._error or UpstreamReset("upstream closed the connection")
        if not self._write_paused:
            return
        self._drain_waiter = self._loop.create_future()
        # An upstream that stopped reading the body will not answer either: without a bound
        # the request would hold this connection (and its client) for good.
        timer = self._loop.call_later(timeout, self._on_write_timeout)
        try:
            await self._drain_waiter
        finally:
            timer.cancel()
            self._drain_waiter = None

    async def response_head(self, timeout: float) -> UpstreamResponse:
        waiter = self._head_waiter
        assert waiter is not None
        if waiter.done():
            return waiter.result()
        # A deadline the pool's sweeper checks, not a timer per request: uvloop's
        # call_later + cancel costs about a microsecond, paid on every request.
        self.head_deadline = self._loop.time() + timeout
        self.pool.watch_head_deadlines(timeout)
        try:
            return await waiter
        finally:
            self.head_deadline = 0.0

    async def read(self, timeout: float) -> bytes:
        """Next chunk of the response body; b"" once the body is complete."""
        while True:
            if self._body:
                chunk = self._body.popleft()
                self._body_buffered -= len(chunk)
                if self._reading_paused and self._body_buffered < _LOW_WATER:
                    self._reading_paused = False
                    if self.transport is not None and not self.closed:
                        self.transport.resume_reading()
                return chunk
            if self._error is not None:
                raise self._error
            if self._body_done:
                return b""
            waiter = self._body_waiter = self._loop.create_future()
            self._timer = self._loop.call_later(timeout, self._on_read_timeout)
            try:
                await waiter
            finally:
                self._body_waiter = None
                self._cancel_timer()

    def take_buffered(self) -> bytes:
        """All response body bytes buffered so far (b"" if none), without waiting."""
        body = self._body
        if not body:
            return b""
        data = body.popleft() if len(body) == 1 else b"".join(body)
        body.clear()
        self._body_buffered = 0
        if self._reading_paused:
            self._reading_paused = False
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()
        return data

    @property
    def body_complete(self) -> bool:
        """The whole response body has arrived (and nothing of it is left buffered)."""
        return self._body_done and not self._body and self._error is None

    @property
    def head_waiter(self) -> asyncio.Future[UpstreamResponse]:
        assert self._head_waiter is not None
        return self._head_waiter

    @property
    def received_any(self) -> bool:
        """Whether any byte of a response to the current request arrived."""
        return self._received_any

    @property
    def reusable(self) -> bool:
        return (
            self._body_done
            and self._keep_alive
            and self._error is None
            and not self.eof
            and not self.closed
        )

    def abort(self) -> None:
        self._close()

    # ---- internals ---------------------------------------------------------------------

    def _message_done(self) -> None:
        self._body_done = True
        waiter = self._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_eof(self) -> None:
        if self._head_waiter is None:
            return  # idle connection closed by the upstream: nothing to report
        if self._status and not self._body_done:
            if self._content_length is None and not self._chunked:
                # Close-delimited body (no Content-Length, not chunked): EOF is its end.
                self._keep_alive = False
                self._message_done()
                return
            self._fail(UpstreamReset("upstream closed the connection mid-body"))
            return
        if not self._status:
            self._fail(UpstreamReset("upstream closed the connection before responding"))

    def on_head_timeout(self) -> None:
        """Called by the pool's sweeper once head_deadline has passed."""
        self.head_deadline = 0.0
        self._fail(UpstreamTimeout("no response headers from upstream in time"))

    def _on_write_timeout(self) -> None:
        self._fail(UpstreamTimeout("upstream stopped reading the request body"))

    def _on_read_timeout(self) -> None:
        self._timer = None
        self._fail(UpstreamTimeout("upstream body stalled"))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail(self, error: RouterError) -> None:
        """Record the request's failure, wake whoever waits, and drop the connection."""
        if self._error is None:
            self._error = error
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
            # Retrieved by the relay; mark it so asyncio does not log it if nobody awaits.
            waiter.exception()
        body_waiter = self._body_waiter
        if body_waiter is not None and not body_waiter.done():
            body_waiter.set_result(None)
        self._close()

    def _close(self) -> None:
        self._cancel_timer()
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                # abort(), not close(): a connection we give up on is in an unknown state,
                # and close() would wait to flush a request body nobody will read.
                self.transport.abort()
            self.pool._forget(self)


class UpstreamPool:
    """Keep-alive connections to one upstream, bounded, with idle expiry."""

    def __init__(self, name: str, settings: UpstreamSettings, loop: asyncio.AbstractEventLoop):
        self.name = name
        self.settings = settings
        self.loop = loop
        self.host = settings.host
        self.port = settings.port
        self.authority = settings.authority.encode("ascii")
        self.preserve_host = settings.host_header == "preserve"
        self.idle_timeout = settings.idle_timeout
        self.connect_timeout = settings.connect_timeout
        self.response_header_timeout = settings.response_header_timeout
        self.read_timeout = settings.read_timeout
        self.max_connections = settings.max_connections
        self.ssl_context = _make_ssl_context(settings) if settings.scheme == "https" else None
        # Global state of the pool
        # Oldest first. A list, not a deque: the hot path only appends and pops at the end,
        # which compiled (setup.py) are direct C calls; popping the oldest is the idle
        # sweeper's, seldom, over at most max_connections.
        self._idle: list[UpstreamConnection] = []
        self._all: set[UpstreamConnection] = set()
        self._connecting = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._head_sweeper: asyncio.TimerHandle | None = None
        self._head_tick = 0.5
        self._closing = False

    # ---- stats (metrics, readiness) ----------------------------------------------------

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @property
    def active_count(self) -> int:
        return len(self._all) - len(self._idle)

    # ---- acquire / release -------------------------------------------------------------

    def acquire_idle(self) -> UpstreamConnection | None:
        """The most recently used live idle connection, or None (the common case, no await)."""
        idle = self._idle
        if not idle:
            return None
        now = self.loop.time()
        while idle:
            conn = idle.pop()
            if conn.eof or conn.closed or now - conn.idle_since >= self.idle_timeout:
                conn.abort()
                continue
            return conn
        return None

    async def acquire(self) -> UpstreamConnection:
        """A live connection: the most recently used idle one, or a new one."""
        idle = self._idle
        now = self.loop.time()
        while idle:
            conn = idle.pop()
            if conn.eof or conn.closed or now - conn.idle_since >= self.idle_timeout:
                conn.abort()
                continue
            return conn
        while len(self._all) + self._connecting >= self.max_connections:
            # At the bound: wait for a connection to come back or go away. The wait is part
            # of the connect budget; a pool that stays full is an overloaded upstream.
            waiter: asyncio.Future[None] = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, self.connect_timeout)
            except TimeoutError:
                raise UpstreamTimeout(
                    f"all {self.max_connections} connections to {self.name} busy"
                ) from None
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            if idle:
                return await self.acquire()
        return await self.connect()

    async def connect(self) -> UpstreamConnection:
        """Open a fresh connection (never taken from the idle list)."""
        self._connecting += 1
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: UpstreamConnection(self),
                    self.host,
                    self.port,
                    ssl=self.ssl_context,
                    server_hostname=self.host if self.ssl_context else None,
                ),
                self.connect_timeout,
            )
        except TimeoutError:
            raise UpstreamTimeout(f"connect to {self.name} timed out") from None
        except ssl.SSLError as exc:
            raise UpstreamConnectFailed(f"TLS handshake with {self.name} failed: {exc}") from None
        except OSError as exc:
            raise UpstreamConnectFailed(
                f"cannot connect to {self.name}: {exc.strerror or exc}"
            ) from None
        finally:
            self._connecting -= 1
        self._all.add(conn)
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Return a connection after its response completed; closes it if not reusable."""
        if not conn.reusable or self._closing:
            conn.abort()
            self._wake_one()
            return
        conn._reset_request_state()
        conn.idle_since = self.loop.time()
        self._idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self.idle_timeout, self._sweep)
        self._wake_one()

    def _forget(self, conn: UpstreamConnection) -> None:
        if conn in self._all:
            self._all.discard(conn)
            with contextlib.suppress(ValueError):
                self._idle.remove(conn)
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def watch_head_deadlines(self, timeout: float) -> None:
        """Make sure a sweeper checks the connections' response-head deadlines. It ticks at
        a tenth of the timeout (10 ms to 0.5 s): a timeout fires at most that late."""
        if self._head_sweeper is None and not self._closing:
            self._head_tick = min(max(timeout / 10, 0.01), 0.5)
            self._head_sweeper = self.loop.call_later(self._head_tick, self._sweep_heads)

    def _sweep_heads(self) -> None:
        self._head_sweeper = None
        now = self.loop.time()
        expired = []
        waiting = False
        for conn in self._all:
            deadline = conn.head_deadline
            if deadline:
                if deadline <= now:
                    expired.append(conn)
                else:
                    waiting = True
        for conn in expired:
            conn.on_head_timeout()  # fails the request, drops the connection
        if waiting and not self._closing:
            self._head_sweeper = self.loop.call_later(self._head_tick, self._sweep_heads)

    def _sweep(self) -> None:
        """Close connections idle for idle_timeout; the oldest are at the left."""
        self._sweeper = None
        deadline = self.loop.time() - self.idle_timeout
        idle = self._idle
        while idle and idle[0].idle_since <= deadline:
            idle.pop(0).abort()
        if idle:
            self._sweeper = self.loop.call_later(
                idle[0].idle_since + self.idle_timeout - self.loop.time() + 0.01, self._sweep
            )

    async def close(self) -> None:
        self._closing = True
        for timer in (self._sweeper, self._head_sweeper):
            if timer is not None:
                timer.cancel()
        self._sweeper = self._head_sweeper = None
        for conn in list(self._all):
            conn.abort()
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(UpstreamConnectFailed("pool closed"))
                waiter.exception()
        self._waiters.clear()


def _make_ssl_context(settings: UpstreamSettings) -> ssl.SSLContext:
    """Built once per pool: verification on by default, system CAs or the configured file."""
    context = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
    if not settings.verify_tls:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context
