"""The client side of the proxy: HTTP/1.1 connections driven at the protocol level.

Why not aiohttp's server: per request it builds a request object, a header multidict of
decoded strings, a stream reader, a payload and a response writer, and it costs more CPU
than the whole rest of the router's work (docs/benchmarks.md: aiohttp alone answering a
fixed body costs ~19 us a request on the bench machine; the router's features ~11 us).
This module parses with llhttp (httptools), as upstream.py does for the other side, and
keeps per request only what the proxy reads: the raw fields, a case-insensitive lookup
built in the pass that checks the framing fields, and a body stream only when there is a
body.

Shape:
    FrontServer     the protocol factory given to loop.create_server: limits, open
                    connections, graceful shutdown.
    FrontConnection one client connection: parses requests, runs the handler for each in
                    turn (pipelined requests wait their turn), writes local replies, and
                    owns the connection's timers (slow head, keep-alive idle, linger).
    Request         what the handler sees of one request.
    BodyStream      a request body, streamed, with backpressure on the client's socket.
    LocalReply      an answer the router makes itself (the JSON errors).

The handler is `async (Request) -> Reply`: it either relays the upstream's answer through
`request.writer` itself and returns RELAYED_KEEP_ALIVE or RELAYED_CLOSE, or returns a
LocalReply for the connection to write.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import Final, Protocol, TypeVar, cast, overload

import httptools

from router.errors import (
    RETRY_AFTER_SECONDS,
    BadRequest,
    ClientError,
    ClientTimeout,
    HeadersTooLarge,
    RouterError,
    UriTooLong,
)

log = logging.getLogger("router.proxy.connection")

# Request body bytes buffered per request before the client's socket is paused (reading
# resumes once the handler has taken what is buffered).
_BODY_HIGH_WATER: Final = 256 * 1024
# A read larger than this is parsed in slices of it, the queue's bounds checked between
# slices (server.max_pipelined, max_pipelined_bytes): llhttp parses whatever it is given,
# and one read (up to 256 KiB in uvloop) of tiny pipelined requests would otherwise queue
# thousands of them at once. A slice completes at most ~4096 / 18 (the shortest request)
# requests beyond the bound. The body of the request being answered, when its length is
# known, is parsed in one piece, not sliced.
_FEED_SLICE: Final = 4096
# After an answer that did not need the rest of the request body: how long, and how many
# bytes, the connection keeps reading and discarding it, so the client sees the answer
# rather than a reset, before giving up and closing.
_LINGER_SECONDS: Final = 5.0
_LINGER_BYTES: Final = 4 * 1024 * 1024


class HttpVersion:
    __slots__ = ("major", "minor")

    def __init__(self, major: int, minor: int) -> None:
        self.major = major
        self.minor = minor


_T = TypeVar("_T")

_SINGLE_FIELDS: Final = frozenset({b"host", b"transfer-encoding"})
_METHODS: Final = {
    m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
}
_VERSIONS: Final = {"1.1": HttpVersion(1, 1), "1.0": HttpVersion(1, 0)}

# Header names the router looks up, lower-cased once; any other name is lowered per call.
_LOWER_NAMES: dict[str, bytes] = {}


def _lower_name(name: str) -> bytes:
    key = name.lower().encode("latin-1")
    if len(_LOWER_NAMES) < 1024:  # names come from code and configuration: a handful
        _LOWER_NAMES[name] = key
    return key


class Headers(Mapping[str, str]):
    """Case-insensitive, first-value-wins lookup over a request's raw fields (as aiohttp's
    `headers.get` answers). Values decode as UTF-8 with surrogate escapes, as aiohttp's
    parser does. The index (lower-cased name -> first value) is built by the connection
    in the same pass that checks the framing fields."""

    __slots__ = ("_index", "_raw")

    def __init__(
        self, raw: list[tuple[bytes, bytes]], index: dict[bytes, bytes] | None = None
    ) -> None:
        self._raw = raw
        if index is None:
            index = {}
            for name, value in raw:
                index.setdefault(name.lower(), value)
        self._index = index

    @overload
    def get(self, name: str, /) -> str | None: ...

    @overload
    def get(self, name: str, default: str, /) -> str: ...

    @overload
    def get(self, name: str, default: _T, /) -> str | _T: ...

    def get(self, name: str, default: object = None, /) -> object:
        key = _LOWER_NAMES.get(name)
        value = self._index.get(key if key is not None else _lower_name(name))
        if value is None:
            return default
        return value.decode("utf-8", "surrogateescape")

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        key = _LOWER_NAMES.get(name)
        return (key if key is not None else _lower_name(name)) in self._index

    def __getitem__(self, name: str) -> str:
        value: str | None = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[str]:
        return (name.decode("latin-1") for name, _ in self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def getall(self, name: str) -> list[str]:
        key = _LOWER_NAMES.get(name) or _lower_name(name)
        return [
            value.decode("utf-8", "surrogateescape")
            for lname, value in self._raw
            if lname.lower() == key
        ]


class BodyStream:
    """A request body as it arrives: `readany()` returns the next bytes, b"" at its end.
    Above a high-water mark the client's socket is paused until the reader catches up."""

    __slots__ = ("_buffered", "_chunks", "_conn", "_eof", "_exception", "_waiter", "total")

    def __init__(self, conn: FrontConnection) -> None:
        self._conn = conn
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._eof = False
        self._exception: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.total = 0  # bytes received so far

    def feed_data(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        self.total += len(data)
        self._wake()
        if self._buffered > _BODY_HIGH_WATER:
            self._conn.pause_reading_for_body()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        self._exception = exc
        self._wake()

    def is_eof(self) -> bool:
        return self._eof

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def readany(self) -> bytes:
        while True:
            if self._exception is not None:
                raise self._exception
            if self._chunks:
                data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
                self._chunks.clear()
                self._buffered = 0
                self._conn.resume_reading_for_body()
                return data
            if self._eof:
                return b""
            self._waiter = self._conn.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def unread_all(self) -> None:
        """Forget what is buffered (the handler is done with this request)."""
        self._chunks.clear()
        self._buffered = 0


class _EmptyBody:
    """The body of a request without one."""

    __slots__ = ()
    total = 0

    async def readany(self) -> bytes:
        return b""

    def is_eof(self) -> bool:
        return True

    def set_exception(self, exc: BaseException) -> None:
        pass

    def feed_eof(self) -> None:
        pass


EMPTY_BODY: Final = _EmptyBody()


class Request:
    """One parsed request: the raw request target and fields, as the client sent them."""

    __slots__ = (
        "body_exists",
        "chunked",
        "content",
        "content_length",
        "headers",
        "keep_alive",
        "method",
        "peer",
        "queued_size",
        "raw_headers",
        "raw_path",
        "target",
        "version",
        "writer",
    )

    def __init__(
        self,
        writer: FrontConnection,
        method: str,
        target: bytes,
        headers: Headers,
        version: HttpVersion,
        keep_alive: bool,
        content_length: int | None,
        chunked: bool,
    ) -> None:
        self.writer = writer
        self.method = method
        self.target = target
        self.raw_path = target.decode("latin-1")
        self.raw_headers = headers._raw
        self.headers = headers
        self.version = version
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.chunked = chunked
        self.body_exists = chunked or bool(content_length)
        self.peer = writer.peer  # the client's address
        self.content: BodyStream | _EmptyBody = EMPTY_BODY
        # Bytes it holds (target, fields, body so far) while queued behind another request
        # (the connection's pipeline bound); -1 when not queued.
        self.queued_size = -1

    @property
    def transport(self) -> asyncio.Transport | None:
        return self.writer.transport


class Relayed:
    """The handler wrote the answer itself; only whether the connection stays open is left."""

    __slots__ = ("keep_alive",)

    def __init__(self, keep_alive: bool) -> None:
        self.keep_alive = keep_alive


RELAYED_KEEP_ALIVE: Final = Relayed(keep_alive=True)
RELAYED_CLOSE: Final = Relayed(keep_alive=False)


class LocalReply:
    """An answer the router makes itself: status, JSON body, a few fields."""

    __slots__ = ("body", "close", "fields", "status")

    def __init__(
        self, status: int, body: bytes, fields: list[tuple[str, str]], close: bool = False
    ) -> None:
        self.status = status
        self.body = body
        self.fields = fields
        self.close = close  # the connection closes after it

    def encode(self, minor: int, keep_alive: bool, head_request: bool) -> bytes:
        lines = [f"Date: {http_date()}"]
        lines.extend(f"{name}: {value}" for name, value in self.fields)
        lines.append(f"Content-Length: {len(self.body)}")
        if not keep_alive:
            lines.append("Connection: close")
        elif minor == 0:
            lines.append("Connection: keep-alive")
        head = status_line(minor, self.status) + ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if head_request else head + self.body


Reply = Relayed | LocalReply

_STATUS_LINES: dict[tuple[int, int], bytes] = {}


def status_line(minor: int, status: int) -> bytes:
    """`HTTP/1.x NNN Phrase\\r\\n`, built once per (version, status): RFC 9110's phrase, or
    none for codes it does not name (the reason phrase carries no meaning). For relayed
    answers (relay.py) and local ones alike."""
    line = _STATUS_LINES.get((minor, status))
    if line is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        line = _STATUS_LINES[(minor, status)] = f"HTTP/1.{minor} {status} {phrase}\r\n".encode()
    return line


class FrontHandler(Protocol):
    """What the connections call: the request handler, and the answers made without one."""

    def __call__(self, request: Request) -> Awaitable[Reply]: ...

    def reject(self, error: RouterError, client: str | None) -> LocalReply:
        """The answer to a request the parser refused (the connection closes after)."""
        ...

    def internal_error(self, request: Request) -> LocalReply:
        """The answer when the handler itself failed."""
        ...

    def shed_connection(self, transport: asyncio.BaseTransport) -> None:
        """Refuse a connection over the cap (answer, then close)."""
        ...

    def refuse_connection(
        self, transport: asyncio.BaseTransport, error: RouterError, log_path: str = "-"
    ) -> None:
        """Answer `error` on a connection with no request to answer, then close it."""
        ...


_date_cache: tuple[int, str] = (0, "")


def http_date() -> str:
    """The Date field's value, formatted once a second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]


class _Refused:
    """A request the parser refused, queued behind the requests before it."""

    __slots__ = ("error",)

    def __init__(self, error: ClientError) -> None:
        self.error = error


# A connection's state: what it is doing with its requests, one at a time (pipelined ones
# wait in its queue). Ints, not an enum.Enum: compiled, a comparison of two C ints.
#
#   IDLE -> SERVING -> IDLE            then the next request in the queue, the idle timer,
#   IDLE -> WAITING -> SERVING         or the close
#   SERVING -> LINGERING -> IDLE
#   WAITING -> IDLE                    the parser refused the rest of the read that
#                                      completed the request
#   any -> CLOSED                      the transport is gone (final)
IDLE: Final = 0  # no request to answer: the keep-alive timer runs
# `_current` is complete; its handler starts at the end of the read that completed it, so
# that an error later in the same bytes (a bad chunk) refuses it whole, before anything
# is sent upstream.
WAITING: Final = 1
SERVING: Final = 2  # `_current`'s handler runs
# `_current` is answered before its body ended: the rest is read and dropped (bounded in
# time and bytes), so the client reads the answer rather than a reset, then the next.
LINGERING: Final = 3
CLOSED: Final = 4  # connection_lost: nothing more happens
# The transitions _become() allows, by state: a bit per next state.
_NEXT_STATES: Final = (
    1 << WAITING | 1 << SERVING | 1 << CLOSED,  # from IDLE
    1 << SERVING | 1 << IDLE | 1 << CLOSED,  # from WAITING
    1 << LINGERING | 1 << IDLE | 1 << CLOSED,  # from SERVING
    1 << IDLE | 1 << CLOSED,  # from LINGERING
    0,  # from CLOSED
)

# The reading side, separate: HTTP/1.1 pipelining reads the next request's head while the
# current one is served, so where the parser is does not follow from the state above.
READING: Final = 0  # between requests, or in a body
READING_HEAD: Final = 1  # a head began, its end not yet: its bytes are counted and timed
# Read no more: the parser refused something, an Upgrade, or the client half-closed.
NOT_READING: Final = 2


class FrontConnection(asyncio.Protocol):
    """One client connection: parse, hand each request to the handler in turn, answer.

    Its state is `_state` (IDLE, WAITING, SERVING, LINGERING, CLOSED), changed only by
    _become(), and `_reading` for the parser's side. The other flags are facts of their
    own, independent of both: `closing` (no keep-alive after the current answer: learned
    in any state, from an EOF, an Upgrade, a refusal or the shutdown, and acted on when
    an answer ends), `_pipeline_paused` and `_body_paused` (two reasons to pause reading,
    which can hold together; with the first, `_backlog` may hold bytes read but not yet
    parsed, parsed before reading resumes), `_write_paused` (the transport's flow control), and
    `_feeding` (a read is being parsed: requests it completes wait, see WAITING)."""

    __slots__ = (
        "_backlog",
        "_body_paused",
        "_current",
        "_discarded",
        "_feeding",
        "_head_bytes",
        "_head_count",
        "_head_size",
        "_head_timer",
        "_headers",
        "_idle_since",
        "_idle_timer",
        "_linger_timer",
        "_parser",
        "_parser_feed",
        "_parser_keep_alive",
        "_parser_method",
        "_parser_version",
        "_parsing",
        "_pipeline",
        "_pipeline_paused",
        "_queued_bytes",
        "_reading",
        "_server",
        "_state",
        "_task",
        "_url",
        "_wake",
        "_write_paused",
        "_write_waiter",
        "closing",
        "loop",
        "output_size",
        "peer",
        "transport",
    )

    def __init__(self, server: FrontServer) -> None:
        self._server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self._parser = parser = httptools.HttpRequestParser(self)
        # The parser's methods that run on every request, bound once: compiled (setup.py),
        # a call through a stored bound method skips the by-name lookup of `parser.x()`.
        self._parser_feed: Callable[[bytes], None] = parser.feed_data
        self._parser_method: Callable[[], bytes] = parser.get_method
        self._parser_version: Callable[[], str] = parser.get_http_version
        self._parser_keep_alive: Callable[[], bool] = parser.should_keep_alive
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0  # raw bytes of the head being parsed (limits)
        self._head_count = 0
        self._head_size = 0  # bytes of the head's target and fields (the pipeline's bound)
        self._state = IDLE
        self._reading = READING
        self._parsing: Request | None = None  # the request whose body is being parsed
        # The request answered now (WAITING, SERVING) or whose body is dropped (LINGERING).
        self._current: Request | None = None
        self._task: asyncio.Task[None] | None = None  # the connection's (_serve)
        self._wake: asyncio.Future[None] | None = None  # set while _serve is parked
        self._feeding = False  # data_received is parsing a read (see WAITING)
        self._pipeline: collections.deque[Request | _Refused] = collections.deque()
        self._pipeline_paused = False
        self._queued_bytes = 0  # what the queued requests hold (Request.queued_size)
        # Bytes read but not parsed yet: the queue reached a bound mid-read. Parsed, in
        # order, before reading resumes (_feed_backlog).
        self._backlog = b""
        self._body_paused = False
        self._discarded = 0  # bytes dropped while LINGERING
        self._head_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0  # loop.time() the connection last became idle
        self._linger_timer: asyncio.TimerHandle | None = None
        self._write_paused = False
        self._write_waiter: asyncio.Future[None] | None = None
        self.closing = False  # close once the current answer is written
        self.output_size = 0  # bytes of answers written (the handler's 'response started')

    # ---- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport does not subclass asyncio.Transport, but implements it.
        self.transport = cast(asyncio.Transport, transport)
        server = self._server
        server.connections.add(self)
        if len(server.connections) > server.max_connections:
            # Over the cap: a clean refusal (a 503 the client can read, then the close),
            # rather than an accept that is never served. Open connections keep working.
            server.handler.shed_connection(transport)
            return
        peername = transport.get_extra_info("peername")
        if isinstance(peername, (list, tuple)) and peername:
            self.peer = str(peername[0])
        elif peername:
            self.peer = str(peername)  # a unix socket path
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        self.transport = None
        self._become(CLOSED)
        self.closing = True
        for timer in (self._head_timer, self._idle_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._idle_timer = self._linger_timer = None
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)  # a parked _serve sees the transport gone and ends
        gone = ConnectionResetError("client disconnected")
        for request in (self._current, self._parsing, *self._pipeline):
            if isinstance(request, Request) and not request.content.is_eof():
                request.content.set_exception(gone)
        self._pipeline.clear()
        waiter = self._write_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(gone)
            waiter.exception()  # retrieved by write(); not "never retrieved" if nobody waits

    def eof_received(self) -> bool:
        # The client half-closed. A body still arriving never will: its reader fails (the
        # handler then drops the upstream connection, which holds half a request).
        # Requests already received are still answered (the transport stays open for
        # writing); nothing more is read.
        parsing = self._parsing
        if parsing is not None:
            self._parsing = None
            parsing.content.set_exception(ConnectionResetError("client closed mid-body"))
        self._reading = NOT_READING
        self.closing = True
        return self._state != IDLE or bool(self._pipeline)  # False: idle, close now

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._write_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._reading == NOT_READING:
            return
        if self._backlog:  # not expected (reading is paused meanwhile): keep the order
            self._backlog += data
            return
        self._feeding = True
        try:
            if len(data) <= _FEED_SLICE:
                self._feed(data)
            else:
                self._feed_sliced(data)
        finally:
            self._feeding = False
            if self._state == WAITING:
                self._become(SERVING)
                self._resume()

    def _feed_sliced(self, data: bytes) -> None:
        """Parse a large read in slices, stopping once the queue reaches a bound: the rest
        waits in _backlog, reading paused, until the queue drains (_next)."""
        start = 0
        end = len(data)
        while start < end:
            if self._pipeline_paused:
                self._backlog = data[start:]
                return
            size = _FEED_SLICE
            parsing = self._parsing
            if parsing is not None and parsing.queued_size < 0:
                # The body of the request being answered: not queued, so not bounded here
                # (BodyStream's high-water mark pauses it); in one piece when its length
                # is known.
                content = parsing.content
                length = parsing.content_length
                if length is not None and isinstance(content, BodyStream):
                    size = max(size, length - content.total)
            if not self._feed(data[start : start + size] if start or size < end else data):
                return
            start += size

    def _feed(self, data: bytes) -> bool:
        """Parse `data`; False when nothing more is to be read (refused, or an Upgrade)."""
        try:
            self._parser_feed(data)
        except httptools.HttpParserUpgrade:
            # Upgrade (or CONNECT): the router relays neither; the request as parsed gets its
            # answer (the handler refuses CONNECT; an Upgrade field is hop-by-hop and
            # dropped). What follows on the connection cannot be read as HTTP: close after.
            self._reading = NOT_READING
            self.closing = True
            if self.transport is not None:
                self.transport.pause_reading()
            return False
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            error = cause if isinstance(cause, ClientError) else _parse_error(exc)
            self._refuse(error)
            return False
        if self._reading == READING_HEAD:
            # llhttp holds an unfinished field line until its end, so a line that never
            # ends would grow without bound: count raw bytes of the head too.
            self._head_bytes += len(data)
            if self._head_bytes > self._server.max_head_bytes:
                self._refuse(HeadersTooLarge("request header section too large"))
                return False
            if self._head_timer is None:
                # Slow headers (slowloris): a complete head must follow in time. Also for a
                # head begun behind a request being answered (pipelining): its timeout is
                # answered in turn (_head_too_slow).
                self._head_timer = self.loop.call_later(
                    self._server.header_timeout, self._head_too_slow
                )
        pipeline = self._pipeline
        if pipeline and not self._pipeline_paused:
            server = self._server
            if (
                len(pipeline) >= server.max_pipelined
                or self._queued_bytes >= server.max_pipelined_bytes
            ):
                # Enough queued: read no more until the queue drains (_next), so the
                # client's sends meet TCP backpressure rather than the router's memory.
                self._pipeline_paused = True
                if self.transport is not None:
                    self.transport.pause_reading()
        return True

    # ---- httptools callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reading = READING_HEAD
        self._url = b""
        self._headers = []
        self._head_count = 0
        self._head_bytes = 0
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if len(self._url) > self._server.max_target:
            raise UriTooLong("request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        server = self._server
        size = len(name) + len(value) + 2
        if size > server.max_field_size:
            raise HeadersTooLarge("request header field too large")
        self._head_size += size
        self._head_count += 1
        if self._head_count > server.max_headers:
            raise HeadersTooLarge("too many request header fields")
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._reading = READING
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        # One pass: the lookup index (first value wins) and the fields that frame the
        # request, whose repetition is refused rather than resolved.
        index: dict[bytes, bytes] = {}
        for name, value in self._headers:
            lname = name.lower()
            if lname not in index:
                index[lname] = value
            elif lname in _SINGLE_FIELDS:
                # Two Host fields could route the tenant by one and reach the backend with
                # the other (RFC 9112 3.2); two Transfer-Encodings hide the coding.
                raise BadRequest(f"more than one {name.decode('latin-1')} field")
        content_length: int | None = None
        length_field = index.get(b"content-length")
        if length_field is not None:
            content_length = int(length_field)  # llhttp already refused malformed values
        chunked = False
        coding = index.get(b"transfer-encoding")
        if coding is not None:
            if coding.strip().lower() != b"chunked":
                # Only chunked is a coding we can read; anything else would leave the
                # body's end unknown (RFC 9112 6.3 says: refuse with 400, then close).
                raise BadRequest("unsupported Transfer-Encoding")
            chunked = True
        version = _VERSIONS.get(self._parser_version())
        if version is None:
            raise BadRequest("unsupported HTTP version")
        if version.minor == 1 and b"host" not in index:
            raise BadRequest("an HTTP/1.1 request needs a Host field")  # RFC 9112 3.2
        if chunked and version.minor == 0:
            # HTTP/1.0 has no chunked coding (RFC 9112 6.1): its end would be ambiguous.
            raise BadRequest("Transfer-Encoding in an HTTP/1.0 request")
        method = self._parser_method()
        request = Request(
            self,
            _METHODS.get(method) or method.decode("ascii"),
            self._url,
            Headers(self._headers, index),
            version,
            bool(self._parser_keep_alive()) and not self._server.closing,
            content_length,
            chunked,
        )
        if chunked or content_length:
            request.content = BodyStream(self)
            self._parsing = request
        self._enqueue(request)

    def on_body(self, body: bytes) -> None:
        request = self._parsing
        if request is None:
            return
        if self._state == LINGERING and request is self._current:
            self._discard(len(body))
            return
        content = request.content
        assert isinstance(content, BodyStream)
        content.feed_data(body)
        if request.queued_size >= 0:  # the body of a queued request counts to its bound
            request.queued_size += len(body)
            self._queued_bytes += len(body)

    def on_message_complete(self) -> None:
        request = self._parsing
        if request is not None:
            self._parsing = None
            request.content.feed_eof()
            if self._state == LINGERING and request is self._current:
                if self._linger_timer is not None:
                    self._linger_timer.cancel()
                    self._linger_timer = None
                self._next()

    # ---- requests in turn --------------------------------------------------------------

    def _become(self, state: int) -> None:
        """The one place the state changes: only along the transitions drawn above."""
        assert _NEXT_STATES[self._state] >> state & 1, f"state {self._state} -> {state}"
        self._state = state

    def _enqueue(self, item: Request | _Refused) -> None:
        if self._state == IDLE and not self._pipeline:
            self._start(item)
            return
        if isinstance(item, Request):
            item.queued_size = self._head_size
            self._queued_bytes += self._head_size
        # The bounds are checked once the slice being parsed is done (_feed).
        self._pipeline.append(item)

    def _dequeue(self) -> Request | _Refused:
        item = self._pipeline.popleft()
        if isinstance(item, Request) and item.queued_size >= 0:
            self._queued_bytes -= item.queued_size
            item.queued_size = -1
        return item

    def _drained(self) -> bool:
        """Whether the queue is down to half its bounds (reading resumes)."""
        server = self._server
        return len(self._pipeline) <= server.max_pipelined // 2 and (
            self._queued_bytes <= server.max_pipelined_bytes // 2 or not self._pipeline
        )

    def _feed_backlog(self) -> None:
        """The queue drained: parse what was read before it paused, then read again (unless
        the backlog filled the queue again)."""
        if self.transport is None or not self._pipeline_paused or not self._drained():
            return
        self._pipeline_paused = False
        data = self._backlog
        self._backlog = b""
        if data:
            self.data_received(data)
        if (
            not self._pipeline_paused
            and not self._body_paused
            and self._reading != NOT_READING
            and self.transport is not None
        ):
            self.transport.resume_reading()

    def _start(self, item: Request | _Refused) -> None:
        if isinstance(item, _Refused):
            self._write_refusal(item.error)
            return
        self._current = item
        if self._feeding:
            self._become(WAITING)  # data_received starts it once the read is parsed
        else:
            self._become(SERVING)
            self._resume()

    def _resume(self) -> None:
        """Have the connection's task handle `_current`: start the task on the first
        request, wake it on the next ones. One task per connection, parked between
        requests, rather than one per request: creating (and registering) a task costs
        more than a wake-up."""
        if self._task is None or self._task.done():
            self._task = self.loop.create_task(self._serve())
        elif self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def _serve(self) -> None:
        """Handle the connection's requests in turn, then park until the next one (or the
        connection's end). The handler is awaited here, not in a coroutine of its own:
        one frame fewer to create and to resume per request."""
        server = self._server
        handler = server.handler
        while self.transport is not None:
            request = self._current
            if request is None or self._state != SERVING:
                self._wake = self.loop.create_future()
                try:
                    await self._wake
                finally:
                    self._wake = None
                continue
            server.in_flight += 1
            keep_alive = False
            try:
                reply: Reply | None
                try:
                    reply = await handler(request)
                except ConnectionError:
                    reply = None  # the client is gone: just close
                except Exception:  # the handler answers its own errors; a last resort
                    log.exception("error handling request")
                    gone = self.output_size or self.transport is None
                    reply = None if gone else handler.internal_error(request)
                if reply is not None:
                    keep_alive = self._answer(request, reply)
            finally:
                # Also on cancellation (shutdown out of patience): the count, then the close.
                server.in_flight -= 1
                waiter = server.idle_waiter
                if server.in_flight == 0 and waiter is not None and not waiter.done():
                    waiter.set_result(None)
                self._done(request, keep_alive)

    def _answer(self, request: Request, reply: Reply) -> bool:
        """Write a local reply (a relayed one is written already); whether the connection
        stays open."""
        if isinstance(reply, Relayed):
            return reply.keep_alive
        keep_alive = request.keep_alive and not reply.close
        transport = self.transport
        if transport is None:
            return False
        version = request.version
        data = reply.encode(
            version.minor if version.major == 1 else 1, keep_alive, request.method == "HEAD"
        )
        self.output_size += len(data)
        transport.write(data)
        return keep_alive

    def _done(self, request: Request, keep_alive: bool) -> None:
        """The answer to `request` is written: on to the next one, linger, or close."""
        transport = self.transport
        if transport is None:  # CLOSED
            self._current = None
            return
        if not keep_alive or self.closing or self._server.closing:
            self._close_after_answer(transport)
            return
        content = request.content
        if not content.is_eof():
            # Answered before the whole body came (an early error, an upstream that did not
            # read it): read and drop the rest, then carry on, so the client reads the
            # answer rather than a reset. Bounded in time and bytes. Not after Expect:
            # 100-continue, where the client may never send the body, and its next request
            # would be read as body.
            assert isinstance(content, BodyStream)
            length = request.content_length
            if "Expect" in request.headers or (
                length is not None and length - content.total > _LINGER_BYTES
            ):
                self._close_after_answer(transport)
                return
            content.unread_all()
            self._become(LINGERING)
            self._discarded = 0
            self.resume_reading_for_body()
            self._linger_timer = self.loop.call_later(_LINGER_SECONDS, self._linger_over)
            return
        self._next()

    def _close_after_answer(self, transport: asyncio.Transport) -> None:
        self._current = None
        self._become(IDLE)
        transport.close()  # flushes what is written, then closes

    def _next(self) -> None:
        """From SERVING or LINGERING: the next request in the queue, or IDLE until one comes."""
        self._current = None
        self._become(IDLE)
        if self._pipeline:
            item = self._dequeue()
            if self._pipeline_paused and self._drained():
                if self._backlog:
                    # Parsed first, in order, before reading resumes; not from here, which
                    # may run inside the parser (a LINGERING body's end).
                    self.loop.call_soon(self._feed_backlog)
                else:
                    self._pipeline_paused = False
                    # Two reasons to pause reading (a full pipeline, a body nobody reads
                    # yet): reading resumes when neither holds.
                    if self.transport is not None and not self._body_paused:
                        self.transport.resume_reading()
            self._start(item)
        else:
            self._arm_idle()

    def _discard(self, size: int) -> None:
        self._discarded += size
        if self._discarded > _LINGER_BYTES:
            self._linger_over()

    def _linger_over(self) -> None:
        self._linger_timer = None
        if self.transport is not None:
            self.transport.close()

    # ---- writing -----------------------------------------------------------------------

    def send(self, data: bytes) -> bool:
        """Write part of an answer now; True when the client is not keeping up and the
        caller must `await drain()` before writing more. (A coroutine per write, as
        write() is, costs more than the write itself for a small answer.)"""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client disconnected")
        self.output_size += len(data)
        transport.write(data)
        return self._write_paused

    async def drain(self) -> None:
        """Wait until the client reads again (its socket buffer drained)."""
        if self._write_paused:
            if self.transport is None:
                raise ConnectionResetError("client disconnected")
            waiter = self._write_waiter = self.loop.create_future()
            try:
                await waiter
            finally:
                self._write_waiter = None

    async def write(self, data: bytes) -> None:
        """Write part of an answer, waiting while the client is not reading."""
        if self.send(data):
            await self.drain()

    # ---- flow control of request bodies ------------------------------------------------

    def pause_reading_for_body(self) -> None:
        if not self._body_paused and self.transport is not None:
            self._body_paused = True
            self.transport.pause_reading()

    def resume_reading_for_body(self) -> None:
        if self._body_paused:
            self._body_paused = False
            if self.transport is not None and not self._pipeline_paused:
                self.transport.resume_reading()

    # ---- timers and refusals -----------------------------------------------------------

    def _arm_idle(self) -> None:
        """The connection is idle from now: it closes after keepalive_timeout unless a
        request comes. One timer per connection, not per request: it is left running and
        re-armed for the rest of the time when it fires early (see _idle)."""
        if self._server.closing:
            if self.transport is not None:
                self.transport.close()
            return
        self._idle_since = self.loop.time()
        if self._idle_timer is None and self.transport is not None:
            self._idle_timer = self.loop.call_later(self._server.keepalive_timeout, self._idle)

    def _idle(self) -> None:
        self._idle_timer = None
        if self.transport is None:
            return
        timeout = self._server.keepalive_timeout
        if self._state != IDLE or self._pipeline or self._reading == READING_HEAD:
            delay = timeout  # busy: _arm_idle runs again when it is done
        else:
            delay = self._idle_since + timeout - self.loop.time()
            if delay <= 0:
                self.transport.close()
                return
        self._idle_timer = self.loop.call_later(delay, self._idle)

    def _head_too_slow(self) -> None:
        self._head_timer = None
        transport = self.transport
        if self._reading != READING_HEAD or transport is None:
            return
        if self._pipeline_paused or self._body_paused:
            # The router stopped reading, not the client: the rest of the head may be in
            # the socket or the backlog. Timed again from now.
            self._head_timer = self.loop.call_later(
                self._server.header_timeout, self._head_too_slow
            )
            return
        error = ClientTimeout("request head not received in time")
        if self._state == IDLE and not self._pipeline:
            self._reading = NOT_READING
            self._server.handler.refuse_connection(transport, error, "header_timeout")
            return
        # Behind requests still being answered (pipelining): read no more; the 408 comes
        # in turn after their answers, then the close. Without this, a complete request
        # followed by a partial head kept the connection open for good.
        self._refuse(error)

    def _refuse(self, error: ClientError) -> None:
        """The parser refused the request: answer it in turn, then close."""
        self._reading = NOT_READING
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        parsing = self._parsing
        if parsing is not None:
            self._parsing = None
            if not parsing.content.is_eof():
                # A body the parser gave up on (a bad chunk size, say): its reader fails
                # with the parser's error rather than waiting for bytes never parsed.
                parsing.content.set_exception(error)
                parsing.content.feed_eof()
            self.closing = True
            if self._state == WAITING and parsing is self._current:
                # Its handler has not started: refused whole, nothing goes upstream.
                self._current = None
                self._become(IDLE)
            elif parsing in self._pipeline:
                self._pipeline.remove(parsing)
                self._queued_bytes -= max(parsing.queued_size, 0)
                parsing.queued_size = -1
            else:
                return  # its handler answers (the body read fails), then the close
        if self.transport is not None:
            self.transport.pause_reading()
        self._enqueue(_Refused(error))

    def _write_refusal(self, error: ClientError) -> None:
        transport = self.transport
        if transport is None:
            return
        reply = self._server.handler.reject(error, self.peer)
        data = reply.encode(1, False, False)
        self.output_size += len(data)
        transport.write(data)
        transport.close()

    def close_if_idle(self) -> None:
        """Close now if no request is being handled or queued, else after the current
        answer (shutdown)."""
        if self._state == IDLE and not self._pipeline and self.transport is not None:
            self.transport.close()
        else:
            self.closing = True

    def cancel(self) -> None:
        """Stop the request being handled (shutdown out of patience) and close."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self.transport is not None:
            self.transport.abort()


def _parse_error(exc: httptools.HttpParserError) -> ClientError:
    message = str(exc) or "bad request"
    return BadRequest(f"malformed request: {message}"[:300])


class FrontServer:
    """The protocol factory for the proxy's listener, and the state all its connections
    share: limits, the set of open connections, shutdown."""

    def __init__(
        self,
        handler: FrontHandler,
        loop: asyncio.AbstractEventLoop,
        *,
        max_target: int,
        max_field_size: int,
        max_headers: int,
        keepalive_timeout: float,
        header_timeout: float,
        max_connections: int,
        max_pipelined: int = 32,
        max_pipelined_bytes: int = 256 * 1024,
    ) -> None:
        self.handler = handler
        self.loop = loop
        self.max_target = max_target
        self.max_field_size = max_field_size
        self.max_headers = max_headers
        # A head's raw bytes: its request line and every field at their limits.
        self.max_head_bytes = max_target + 16 + max_headers * (max_field_size + 2) + 2
        self.keepalive_timeout = keepalive_timeout
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        # A connection's queue of pipelined requests: past either, it is not read until
        # the queue drains to half (server.max_pipelined, max_pipelined_bytes).
        self.max_pipelined = max_pipelined
        self.max_pipelined_bytes = max_pipelined_bytes
        self.connections: set[FrontConnection] = set()
        self.in_flight = 0  # requests being handled now
        self.idle_waiter: asyncio.Future[None] | None = None
        self.closing = False

    def __call__(self) -> FrontConnection:
        return FrontConnection(self)

    def pre_shutdown(self) -> None:
        """Stop keeping connections alive: idle ones close now, busy ones after their
        current answer."""
        self.closing = True
        for conn in list(self.connections):
            conn.close_if_idle()

    async def wait_idle(self) -> None:
        """Until no request is being handled."""
        while self.in_flight:
            self.idle_waiter = self.loop.create_future()
            try:
                await self.idle_waiter
            finally:
                self.idle_waiter = None

    def cancel_all(self) -> None:
        """Cancel every request still being handled and drop every connection."""
        for conn in list(self.connections):
            conn.cancel()

    async def shutdown(self, timeout: float, interrupt: asyncio.Event | None = None) -> None:
        """pre_shutdown, then let requests in flight finish for up to `timeout` s (or until
        `interrupt` is set: an operator's second signal), then cancel what is left and
        drop their connections."""
        self.pre_shutdown()
        waits: set[asyncio.Future[object]] = {asyncio.ensure_future(self.wait_idle())}
        if interrupt is not None:
            waits.add(asyncio.ensure_future(interrupt.wait()))
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        self.cancel_all()
        await asyncio.sleep(0)  # let the cancelled handlers run their clean-up (record phase)


def local_reply(error: RouterError, request_id: str) -> LocalReply:
    """The JSON answer for `error`, with the request id (and Retry-After on a 503)."""
    body = json.dumps({"error": error.code, "detail": error.detail, "request_id": request_id})
    fields = [("Content-Type", "application/json"), ("X-Request-Id", request_id)]
    if error.status == 503:
        fields.append(("Retry-After", RETRY_AFTER_SECONDS))
    # The request itself was at fault: whatever follows on this connection is suspect.
    return LocalReply(error.status, body.encode(), fields, close=error.source == "downstream")


__all__ = [
    "EMPTY_BODY",
    "RELAYED_CLOSE",
    "RELAYED_KEEP_ALIVE",
    "BodyStream",
    "FrontConnection",
    "FrontServer",
    "Headers",
    "LocalReply",
    "Relayed",
    "Reply",
    "Request",
    "local_reply",
]
