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
import ipaddress
import re
import time
from collections.abc import Callable
from typing import Final

from yarl import URL

from router.errors import BadRequest, BodyTooLarge, ClientTimeout, RouterError, UpstreamReset
from router.proxy.connection import Request, status_line
from router.proxy.upstream import (
    RETRYABLE_METHODS,
    UpstreamConnection,
    UpstreamPool,
    UpstreamResponse,
)

HOP_BY_HOP: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
     b"transfer-encoding", b"upgrade"}
)  # fmt: skip
# Request fields the router sets itself; the client's values are dropped (or merged, for
# X-Forwarded-For) and rewritten.
_ROUTER_OWNED_REQUEST: Final = frozenset(
    {b"host", b"content-length", b"expect", b"x-forwarded-for", b"x-forwarded-proto",
     b"x-forwarded-host", b"x-request-id", b"x-router-target", b"x-router-signature",
     b"x-router-shadow"}
)  # fmt: skip
_DROP_REQUEST: Final = HOP_BY_HOP | _ROUTER_OWNED_REQUEST
_DROP_RESPONSE: Final = HOP_BY_HOP | {b"x-request-id", b"content-length"}
# A field whose name length is not among these cannot be in the set: most fields are
# kept after one len() and one lookup, without lower-casing their name.
_DROP_REQUEST_LENGTHS: Final = frozenset(map(len, _DROP_REQUEST))
_DROP_RESPONSE_LENGTHS: Final = frozenset(map(len, _DROP_RESPONSE))

_NOTHING: Final[frozenset[bytes]] = frozenset()
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
_CHUNK_END: Final = b"0\r\n\r\n"
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


def chunk_frame(data: bytes) -> bytes:
    """One non-empty chunk of a chunked body (RFC 9112 7.1), in one buffer."""
    return b"".join((b"%x\r\n" % len(data), data, b"\r\n"))


def valid_request_id(value: str | None) -> bool:
    return value is not None and _REQUEST_ID.fullmatch(value) is not None


def connection_tokens(
    raw_headers: tuple[tuple[bytes, bytes], ...] | list[tuple[bytes, bytes]],
) -> frozenset[bytes]:
    """Field names listed in Connection (hop-by-hop for this message), beyond the ones
    always dropped: empty for the usual `Connection: keep-alive` / `close`, so that the
    relay's per-field check stays a length test (encode_response_head)."""
    names: frozenset[bytes] = _NOTHING
    for name, value in raw_headers:
        if len(name) == 10 and name.lower() == b"connection":
            named = _CONNECTION_VALUES.get(value)
            if named is None:
                named = (
                    frozenset(t.strip().lower() for t in value.split(b",") if t.strip())
                    - HOP_BY_HOP
                )
                if len(_CONNECTION_VALUES) < 256:  # bounded: values come from peers
                    _CONNECTION_VALUES[value] = named
            names = names | named if names else named
    return names


# Connection field value -> the extra names it makes hop-by-hop; a handful of distinct
# values in practice ("keep-alive", "close", "Keep-Alive"), parsed once each.
_CONNECTION_VALUES: dict[bytes, frozenset[bytes]] = {}


class HeaderRules:
    """What to drop from each direction; built once from the configuration."""

    __slots__ = ("trust_host", "trust_proto", "trusted_hops", "underscore_spellings")

    def __init__(
        self,
        tenant_headers: tuple[str, ...],
        trusted_hops: int = 1,
        *,
        trust_forwarded_proto: bool = False,
        trust_forwarded_host: bool = False,
    ) -> None:
        # Proxies in front of us whose X-Forwarded-For entries we believe
        # (server.trusted_hops).
        self.trusted_hops = trusted_hops
        # Whether the hop in front sets X-Forwarded-Proto / -Host itself (server.
        # trust_forwarded_*): a hop that appends to X-Forwarded-For does not necessarily
        # set, or strip, the others (an ALB never touches X-Forwarded-Host), so trusting
        # the hop is not trusting every field it passes on. Never without a trusted hop.
        self.trust_proto = trust_forwarded_proto and trusted_hops > 0
        self.trust_host = trust_forwarded_host and trusted_hops > 0
        owned = {n.decode() for n in _ROUTER_OWNED_REQUEST} | {h.lower() for h in tenant_headers}
        # `x_tenant_id`, `x-tenant_id`, ...: any spelling with an underscore that a backend
        # could normalise to a router-owned field. Compared after mapping '_' to '-'.
        self.underscore_spellings = frozenset(n.encode() for n in owned)


def build_request_head(
    request: Request,
    target: bytes,
    host: str,
    request_id: str,
    client: str,
    pool: UpstreamPool,
    rules: HeaderRules,
    has_body: bool,
    chunked: bool,
) -> tuple[bytes, str]:
    """The request head for the upstream, and the client's address.

    The head: the client's fields minus the hop-by-hop and router-owned ones, then the
    router's own (Host, framing, X-Forwarded-*, X-Request-Id). `target` is the origin-form
    request target, `host` the client's effective Host (after absolute-form normalisation),
    `client` the peer address.

    X-Forwarded-For: only the last `rules.trusted_hops` entries are believed (each trusted
    proxy appends the address it saw; anything to their left was written by the client
    and may be forged). The upstream gets those entries plus the peer, so its leftmost
    entry is never one a client made up; the client address returned (for the access log)
    is the one the outermost trusted hop saw, or the peer when there is none.
    X-Forwarded-Proto and -Host are the client's only when the settings say the hop in
    front sets them (rules.trust_proto / trust_host); otherwise the router's own: its
    listener's scheme (plain HTTP: TLS ends in front of it) and the Host it received.
    """
    raw_headers = request.raw_headers
    connection_named = (
        connection_tokens(raw_headers) if "Connection" in request.headers else _NOTHING
    )
    # Back to the bytes the client sent: field values decode as UTF-8 with surrogate
    # escapes (front.Headers), so any byte llhttp let through round-trips.
    host_bytes = host.encode("utf-8", "surrogateescape")
    parts = [
        request.method.encode("ascii"),
        b" ",
        target,
        b" HTTP/1.1\r\nHost: ",
        host_bytes if pool.preserve_host and host else pool.authority,
        b"\r\n",
    ]
    forwarded_for = b""
    forwarded_proto = b""
    forwarded_host = b""
    underscored = rules.underscore_spellings
    check_all = bool(connection_named)
    for name, value in raw_headers:
        if not check_all and len(name) not in _DROP_REQUEST_LENGTHS and b"_" not in name:
            parts.extend((name, b": ", value, b"\r\n"))
            continue
        lname = name.lower()
        if (
            lname in _DROP_REQUEST
            or lname in connection_named
            or (b"_" in lname and lname.replace(b"_", b"-") in underscored)
        ):
            if lname == b"x-forwarded-for":
                forwarded_for = value if not forwarded_for else forwarded_for + b", " + value
            elif lname == b"x-forwarded-proto":
                forwarded_proto = value
            elif lname == b"x-forwarded-host":
                forwarded_host = value
            continue
        parts.extend((name, b": ", value, b"\r\n"))
    if has_body:
        if chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        else:
            parts.append(b"Content-Length: %d\r\n" % (request.content_length or 0))
    peer = client.encode("ascii", "replace")
    hops = rules.trusted_hops
    if not rules.trust_proto:
        forwarded_proto = b""
    if not rules.trust_host:
        forwarded_host = b""
    if hops == 0:  # nobody in front of us: every X-Forwarded-For entry came from the client
        forwarded_for = peer
    elif forwarded_for:
        trusted = [e for e in (x.strip() for x in forwarded_for.split(b",")) if e][-hops:]
        if trusted:
            client = trusted[0].decode("latin-1")
            forwarded_for = b", ".join(trusted) + b", " + peer
        else:
            forwarded_for = peer
    else:
        forwarded_for = peer
    parts.extend(
        (
            b"X-Forwarded-For: ",
            forwarded_for,
            b"\r\nX-Forwarded-Proto: ",
            forwarded_proto or b"http",
            b"\r\nX-Forwarded-Host: ",
            forwarded_host or host_bytes,
            b"\r\nX-Request-Id: ",
            request_id.encode("ascii"),
            b"\r\n\r\n",
        )
    )
    return b"".join(parts), client


# How the response body is delimited towards the client.
HEAD_ONLY: Final = 0  # HEAD, 204, 304: no body whatever the fields say
BY_LENGTH: Final = 1  # the upstream's Content-Length
CHUNKED: Final = 2  # unknown length, HTTP/1.1 client
BY_CLOSE: Final = 3  # unknown length, HTTP/1.0 client: the close ends the body


def encode_response_head(
    upstream: UpstreamResponse,
    request_id: str,
    routed_to: bytes | None,
    head_request: bool,
    client_minor: int,
    client_keep_alive: bool,
) -> tuple[bytes, int, bool]:
    """The response head for the client, its framing, and whether the connection stays open.

    The upstream's fields are relayed as they came (a transparent proxy adds no Date,
    Server or Content-Type), minus the hop-by-hop ones; only the framing is decided here.
    """
    status = upstream.status
    headers = upstream.headers
    named = connection_tokens(headers) if upstream.has_connection_options else _NOTHING
    parts = [status_line(client_minor, status)]
    for name, value in headers:
        if (named or len(name) in _DROP_RESPONSE_LENGTHS) and (
            (lname := name.lower()) in _DROP_RESPONSE or lname in named
        ):
            continue
        parts.extend((name, b": ", value, b"\r\n"))
    keep_alive = client_keep_alive
    length = None if upstream.chunked else upstream.content_length
    if head_request or status in (204, 304) or status < 200:
        framing = HEAD_ONLY
        # HEAD and 304 keep the length the upstream announced; 204 has none (RFC 9110 8.6).
        if length is not None and status != 204 and status >= 200:
            parts.append(b"Content-Length: %d\r\n" % length)
    elif length is not None:
        framing = BY_LENGTH
        parts.append(b"Content-Length: %d\r\n" % length)
    elif client_minor >= 1:
        framing = CHUNKED
        parts.append(b"Transfer-Encoding: chunked\r\n")
    else:
        framing = BY_CLOSE
        keep_alive = False
    if not keep_alive:
        parts.append(b"Connection: close\r\n")
    elif client_minor == 0:
        parts.append(b"Connection: keep-alive\r\n")
    parts.extend((b"X-Request-Id: ", request_id.encode("ascii"), b"\r\n"))
    if routed_to is not None:
        parts.extend((b"X-Routed-To: ", routed_to, b"\r\n"))
    parts.append(b"\r\n")
    return b"".join(parts), framing, keep_alive


class Exchange:
    """One request/response through an upstream pool, with byte counts for the record phase."""

    __slots__ = (
        "body_pending", "body_task", "body_timeout", "bytes_in", "bytes_out", "conn",
        "connect_seconds", "drain_pending",
    )  # fmt: skip

    def __init__(self, body_timeout: float = 60.0) -> None:
        self.body_timeout = body_timeout  # longest wait for the client's next body bytes
        self.conn: UpstreamConnection | None = None
        self.body_task: asyncio.Task[None] | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.connect_seconds = 0.0  # time to open a new connection (0 when one was reused)
        # Left for relay_rest() by relay_start(): a drain, the rest of the body.
        self.drain_pending = False
        self.body_pending = False

    async def send(
        self,
        request: Request,
        pool: UpstreamPool,
        head: bytes,
        has_body: bool,
        chunked: bool,
        body_limit: int | None = None,
    ) -> UpstreamResponse:
        """Send the request and return the response head; retries once where safe.
        `body_limit`: a body that grows past it fails with BodyTooLarge (413)."""
        conn = pool.acquire_idle()
        if conn is None:
            started = time.perf_counter()
            conn = await pool.acquire()
            if conn.requests == 0:
                self.connect_seconds = time.perf_counter() - started
        reused = conn.requests > 0
        try:
            if has_body:
                return await self._attempt(conn, request, pool, head, chunked, body_limit)
            # No body (most requests): the same as _attempt, one coroutine fewer.
            self.conn = conn
            conn.start_request(head, request.method == "HEAD")
            return await conn.response_head(pool.response_header_timeout)
        except UpstreamReset:
            # A reused connection that died before any byte of a response came back: the
            # upstream closed it as we reused it (the stale-connection race). Resend once on
            # a fresh connection if the request can be replayed: no body was consumed, and
            # the method is idempotent.
            if not (
                reused
                and not conn.received_any
                and not has_body
                and request.method in RETRYABLE_METHODS
            ):
                raise
        started = time.perf_counter()
        conn = await pool.connect()
        self.connect_seconds = time.perf_counter() - started
        return await self._attempt(conn, request, pool, head, chunked, body_limit)

    async def _attempt(
        self,
        conn: UpstreamConnection,
        request: Request,
        pool: UpstreamPool,
        head: bytes,
        chunked: bool,
        body_limit: int | None,
    ) -> UpstreamResponse:
        """Send the head, stream the body alongside, return the response head."""
        self.conn = conn
        conn.start_request(head, request.method == "HEAD")
        body_task = self.body_task = asyncio.ensure_future(
            self._send_body(request, conn, chunked, pool.response_header_timeout, body_limit)
        )
        head_waiter = conn.head_waiter
        # The upstream may answer before reading the whole body (an early 413, say): wait
        # for whichever comes first, then give the response-header timeout to the rest.
        await asyncio.wait((body_task, head_waiter), return_when=asyncio.FIRST_COMPLETED)
        if body_task.done() and not head_waiter.done():
            body_task.result()  # raises if the client or the upstream side failed
        return await conn.response_head(pool.response_header_timeout)

    async def _send_body(
        self,
        request: Request,
        conn: UpstreamConnection,
        chunked: bool,
        timeout: float,
        limit: int | None,
    ) -> None:
        """Stream the request body; `timeout` bounds each wait for the upstream to read.
        Past `limit` bytes: BodyTooLarge (finish() then drops the upstream connection, which
        holds a truncated request)."""
        content = request.content
        if request.headers.get("Expect", "").lower() == "100-continue":
            # Answer the client's Expect ourselves (the Expect field is not forwarded) once
            # there is an upstream to send the body to.
            await request.writer.write(_CONTINUE)
        write = conn.write
        loop = asyncio.get_running_loop()
        body_timeout = self.body_timeout
        stalled = ClientTimeout(f"no request body bytes for {body_timeout:g} s")
        while True:
            # A timer per read (not wait_for, which costs a task per chunk): if the client
            # stalls, the read fails with ClientTimeout and finish() drops the upstream
            # connection, which holds half a request.
            timer = loop.call_later(body_timeout, content.set_exception, stalled)
            try:
                chunk = await content.readany()
            finally:
                timer.cancel()
            if not chunk:
                break
            self.bytes_in += len(chunk)
            if limit is not None and self.bytes_in > limit:
                raise BodyTooLarge(f"request body over the {limit}-byte limit")
            if chunked:
                write(chunk_frame(chunk))
            else:
                write(chunk)
            await conn.drain(timeout)
        if chunked:
            write(_CHUNK_END)

    async def relay(
        self,
        request: Request,
        head: bytes,
        framing: int,
        read_timeout: float,
        tap: Callable[[bytes], None] | None = None,
    ) -> None:
        """Write the response head, then stream the body; on upstream failure, abort the
        client connection (a truncated body must not look complete). `tap` sees every
        body piece as relayed (shadow.py's digest of legacy's answer)."""
        if not self.relay_start(request, head, framing, tap):
            await self.relay_rest(request, framing, read_timeout, tap)

    def relay_start(
        self,
        request: Request,
        head: bytes,
        framing: int,
        tap: Callable[[bytes], None] | None = None,
    ) -> bool:
        """relay()'s first step, without a coroutine: the head and whatever body arrived
        with it, in one write (for a small answer, the whole of it, in one syscall).
        True when that was all: the answer is complete and the client keeps up; else
        `await relay_rest(...)` finishes the job."""
        conn = self.conn
        assert conn is not None
        writer = request.writer
        if framing == HEAD_ONLY:
            self.drain_pending = writer.send(head)
            self.body_pending = False
            return not self.drain_pending
        body = conn.take_buffered()
        if body:
            self.bytes_out += len(body)
            if tap is not None:
                tap(body)
            if framing == CHUNKED:
                body = chunk_frame(body)
        done = conn.body_complete
        if done and framing == CHUNKED:
            body += _CHUNK_END
        self.drain_pending = writer.send(head + body if body else head)
        self.body_pending = not done
        return done and not self.drain_pending

    async def relay_rest(
        self,
        request: Request,
        framing: int,
        read_timeout: float,
        tap: Callable[[bytes], None] | None = None,
    ) -> None:
        """The rest of relay() after relay_start() returned False."""
        writer = request.writer
        if self.drain_pending:
            await writer.drain()
        if not self.body_pending:
            return
        conn = self.conn
        assert conn is not None
        write = writer.write
        try:
            while True:
                chunk = await conn.read(read_timeout)
                if not chunk:
                    break
                self.bytes_out += len(chunk)
                if tap is not None:
                    tap(chunk)
                if framing == CHUNKED:
                    await write(chunk_frame(chunk))
                else:
                    await write(chunk)
        except RouterError:
            # Headers are gone: the only honest signal left is to abort the client
            # connection, so it cannot mistake a truncated body for a complete one.
            transport = request.transport
            if transport is not None:
                transport.abort()
            raise
        if framing == CHUNKED:
            await write(_CHUNK_END)

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


# A Host field value (RFC 9110 7.2: uri-host [ ":" port ], RFC 3986 3.2.2): an IP literal
# in brackets, or a reg-name (which also covers IPv4 addresses): unreserved, pct-encoded
# and sub-delims characters only, so no userinfo ("@"), no spaces, slashes, "?", "#", "\\"
# or bytes outside ASCII; then an optional port of digits. Empty is allowed (RFC 9112
# 3.2: a target URI without an authority). IP literals are checked further below.
_HOST: Final = re.compile(
    r"(?:(\[[0-9A-Fa-f:.]{2,45}\])|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*)"
    r"(?::[0-9]{0,5})?"
)
# Host value -> valid?, for the values seen: most requests repeat a handful of hosts, so
# the check is a dict lookup. Bounded, as values come from clients: past the bound, new
# values are checked each time and not stored.
_HOST_VALIDITY: dict[str, bool] = {}
_HOST_CACHE_SIZE: Final = 4096


def valid_host(host: str) -> bool:
    """Whether `host` is a Host field value per RFC 9110 7.2 (see _HOST)."""
    known = _HOST_VALIDITY.get(host)
    if known is not None:
        return known
    match = _HOST.fullmatch(host)
    valid = match is not None
    if match is not None and match.group(1) is not None:
        try:  # [IPv6]: the characters are right, the address must be too
            ipaddress.IPv6Address(match.group(1)[1:-1])
        except ValueError:
            valid = False
    if len(_HOST_VALIDITY) < _HOST_CACHE_SIZE:
        _HOST_VALIDITY[host] = valid
    return valid


def origin_form(request: Request) -> tuple[bytes, str]:
    """The origin-form target and the effective Host of a request.

    An absolute-form target (`GET http://host/path`) is accepted as RFC 9112 3.2.2
    requires, but reduced to origin form: its authority only replaces Host (for tenant
    identification and X-Forwarded-Host), never the upstream, which is chosen from
    configuration alone. This is not an open proxy. Userinfo in it is refused (RFC 9110
    4.2.4: a sender must not generate it; a recipient should treat it as an error).

    The Host field and an absolute-form authority must both be valid Hosts (valid_host):
    400 bad_request otherwise (RFC 9112 3.2: "a Host header field with an invalid field
    value"), before the tenant is identified by it or anything is forwarded.
    """
    host = request.headers.get("Host", "")
    if host and not valid_host(host):
        raise BadRequest("invalid Host field")
    if request.target[:1] == b"/":
        return request.target, host
    raw = request.raw_path
    if raw == "*" and request.method == "OPTIONS":
        return b"*", host
    if raw.lower().startswith(("http://", "https://")):
        try:
            url = URL(raw, encoded=True)
        except ValueError:
            raise BadRequest(f"unsupported request target {raw[:100]!r}") from None
        # Userinfo is looked for in the raw authority (up to the first "/", "?" or "#"),
        # not in what the URL parser made of it: `http://@host/` has an empty one.
        start = raw.index("://") + 3
        end = len(raw)
        for delimiter in "/?#":
            found = raw.find(delimiter, start)
            if found != -1 and found < end:
                end = found
        if "@" in raw[start:end]:
            raise BadRequest("userinfo in the request target")
        authority = url.raw_authority
        if url.raw_host:
            if not valid_host(authority):
                raise BadRequest("invalid authority in the request target")
            return (url.raw_path_qs or "/").encode("latin-1"), authority
    raise BadRequest(f"unsupported request target {raw[:100]!r}")
