"""Composition root: builds the pieces from Settings and runs the phases for each request.

    identify (tenant.py) -> decide (routing.py) -> forward + relay (relay.py, upstream.py)
    -> record (metrics.py, accesslog.py): always, even on error.

`RouterApp` owns everything with a start and an end (flag client, upstream pools, access
log); `ProxyHandler` is the per-request function aiohttp's low-level server calls.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from router.accesslog import AccessLog
from router.errors import (
    RETRY_AFTER_SECONDS,
    BadRequest,
    ClientError,
    HeadersTooLarge,
    MethodNotAllowed,
    NotReady,
    RouterError,
    UpstreamError,
    UriTooLong,
)
from router.flags import FlagSource
from router.metrics import Metrics
from router.relay import (
    Exchange,
    ForwardInfo,
    HeaderRules,
    ProxyResponse,
    build_request_head,
    origin_form,
    response_headers,
    valid_request_id,
)
from router.routing import Decider
from router.settings import TARGETS, HeaderExtractor, Settings
from router.tenant import TenantIdentifier
from router.upstream import UpstreamPool

log = logging.getLogger("router.app")


def error_response(error: RouterError, request_id: str) -> web.Response:
    body = json.dumps({"error": error.code, "detail": error.detail, "request_id": request_id})
    response = web.Response(
        status=error.status, body=body.encode(), content_type="application/json"
    )
    response.headers["X-Request-Id"] = request_id
    if error.status == 503:
        response.headers["Retry-After"] = RETRY_AFTER_SECONDS
    if error.source == "downstream":
        # The request itself was at fault; whatever follows on this connection is suspect.
        response.force_close()
    return response


# aiohttp's message for a header section with more than max_headers fields (both parsers).
_TOO_MANY_HEADERS: Final = "Too many headers received"


def parse_error(exc: BaseException | None, message: str | None, target_limit: int) -> ClientError:
    """The error for a request aiohttp's parser refused.

    aiohttp raises LineTooLong for an over-long request target and an over-long header field
    alike; its `args` are (line, limit crossed, size) in both its parsers, and the limit is
    the only reliable sign of which one it was (the message quotes client bytes, so
    matching words in it lets a client choose the answer). `target_limit` is kept distinct
    from the header limit for that reason (`RouterApp.proxy_server`).
    """
    if isinstance(exc, LineTooLong):
        if len(exc.args) > 1 and str(exc.args[1]) == str(target_limit):
            return UriTooLong("request line too long")
        return HeadersTooLarge("request header field too large")
    if isinstance(exc, BadHttpMessage) and exc.message == _TOO_MANY_HEADERS:
        return HeadersTooLarge("too many request header fields")
    return BadRequest(f"malformed request: {message or exc or 'bad request'}"[:300])


class RequestIds:
    """Request ids unique across workers and restarts: a random per-process prefix + a counter."""

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex()
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}-{next(self._counter):x}"


class ProxyHandler:
    __slots__ = (
        "_access_log",
        "_debug_headers",
        "_decider",
        "_identify",
        "_loop",
        "_metrics",
        "_pools",
        "_request_ids",
        "_rules",
        "_state",
    )

    def __init__(self, app: RouterApp) -> None:
        self._loop = app.loop
        self._identify = app.identifier.identify
        self._decider = app.decider
        self._pools = app.pools
        self._rules = app.header_rules
        self._metrics = app.metrics
        self._access_log = app.access_log
        self._debug_headers = app.settings.server.debug_headers
        self._request_ids = app.request_ids
        self._state = app

    def reject(self, error: RouterError, client: str | None) -> web.Response:
        """Answer a request that never reached __call__ (aiohttp refused to parse it) with
        the same JSON body, a request id, and a record phase like every other local reply."""
        request_id = self._request_ids.next()
        self._metrics.local_reply("-", error.status)
        self._access_log.record(
            request_id, None, "none", "none", "-", "-", error.status, 0, 0, 0.0, None,
            error.code, client,
        )  # fmt: skip
        response = error_response(error, request_id)
        # Whatever follows on the connection cannot be trusted: close it, and say so
        # explicitly, as aiohttp's stand-in for an unparsed request is HTTP/1.0.
        response.force_close()
        response.headers["Connection"] = "close"
        return response

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        # perf_counter, not loop.time(): uvloop's clock has millisecond resolution.
        clock = time.perf_counter
        start = clock()
        method = request.method
        request_id = request.headers.get("X-Request-Id")
        if not valid_request_id(request_id):
            request_id = self._request_ids.next()
        assert request_id is not None
        tenant: str | None = None
        target = "none"
        reason = "none"
        status = 0
        error: str | None = None
        upstream_error: str | None = None
        path = request.raw_path
        exchange: Exchange | None = None
        pool: UpstreamPool | None = None
        upstream_start = 0.0
        try:
            try:
                if method == "CONNECT":
                    raise MethodNotAllowed("CONNECT is not supported: this is not a forward proxy")
                if not self._state.flags.ready:
                    raise NotReady("no flag data yet")
                request_target, host = origin_form(request)
                path = request_target.decode("latin-1")
                # Phase 1: identify
                tenant, _source = self._identify(request.headers, host, path)
                # Phase 2: decide
                route = self._decider.decide(tenant)
                target = route.target
                reason = route.reason
                pool = self._pools[target]
                self._metrics.request_started(target, reason)
                # Phase 3: forward
                has_body = request.body_exists
                chunked = has_body and request.content_length is None
                head = build_request_head(
                    request,
                    ForwardInfo(request_target, host, "http", request_id),
                    pool,
                    self._rules,
                    has_body,
                    chunked,
                )
                exchange = Exchange()
                upstream_start = clock()
                upstream = await exchange.send(request, pool, head, has_body, chunked)
                if exchange.connect_seconds:
                    self._metrics.connected(target, exchange.connect_seconds)
                status = upstream.status
                # Phase 4: relay
                response = ProxyResponse(
                    upstream.status,
                    response_headers(
                        upstream, request_id, route.header_value if self._debug_headers else None
                    ),
                    None if upstream.chunked else upstream.content_length,
                )
                await exchange.relay(request, upstream, response, pool.read_timeout)
                return response
            except RouterError as exc:
                error = exc.code
                if isinstance(exc, UpstreamError):
                    upstream_error = exc.code
                if status:
                    # The response head already went out and relay() aborted the client
                    # connection; there is nothing more to say to it.
                    raise ConnectionResetError(exc.detail) from None
                status = exc.status
                return error_response(exc, request_id)
        except (ConnectionError, asyncio.CancelledError):
            error = error or "client_disconnected"
            raise
        except Exception:
            log.exception("unexpected error", extra={"request_id": request_id})
            error = "internal_error"
            status = 500
            return error_response(RouterError("internal error"), request_id)
        finally:
            # Phase 5: record, always.
            if exchange is not None and pool is not None:
                exchange.finish(pool)
            now = clock()
            bytes_in = exchange.bytes_in if exchange is not None else 0
            bytes_out = exchange.bytes_out if exchange is not None else 0
            if target == "none":
                self._metrics.local_reply(method, status)
            else:
                self._metrics.request_finished(
                    target, method, status, now - start, bytes_in, bytes_out, upstream_error
                )
            qmark = path.find("?")
            self._access_log.record(
                request_id,
                tenant,
                target,
                reason,
                method,
                path if qmark < 0 else path[:qmark],
                status,
                bytes_in,
                bytes_out,
                (now - start) * 1000.0,
                (now - upstream_start) * 1000.0 if upstream_start else None,
                error,
                request.remote,
            )


class JsonErrorRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering malformed requests with our JSON errors.

    aiohttp answers parse errors itself (plain text, always 400); an SRE's tooling expects
    the same JSON body and stable code as every other local reply, and 414/431 where the
    request line or the header section is over the limit.
    """

    __slots__ = ("_proxy", "_target_limit")

    def __init__(self, manager: ProxyServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        # Per-connection state
        self._proxy = manager.proxy
        self._target_limit = manager.target_limit

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # A parse error in the body of a request already being handled (a bad chunk size
        # that arrives after the head) is queued by aiohttp as the *next* message, while the
        # handler's body stream stays open, waiting for bytes that will never be parsed:
        # the request, and the upstream connection it holds, would hang until the client
        # leaves. Fail that body stream instead, and end it, so that aiohttp does not try
        # to read ("linger" on) the rest after the 400. One check per read, on a queue that
        # is empty while a request is being handled unless the client pipelines.
        messages = self._messages
        if messages and isinstance(messages[-1][0], _ErrInfo):
            request = self._current_request
            if request is not None and not request.content.is_eof():
                error = messages[-1][0]
                body = request.content
                body.set_exception(parse_error(error.exc, error.message, self._target_limit))
                body.feed_eof()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, ConnectionError) or request.writer.output_size > 0:
            # The client is gone (ProxyHandler re-raises its disconnects), or the response
            # has started: there is nobody, or no way, to answer. aiohttp drops the
            # connection quietly on ConnectionError.
            raise ConnectionError("client disconnected or response already started")
        error: RouterError
        if status == 400 or isinstance(exc, BadHttpMessage):
            error = parse_error(exc, message, self._target_limit)
            self.log_debug("rejected request", exc_info=exc)
        else:
            log.error("error handling request", exc_info=exc)
            error = RouterError("internal error")
        return self._proxy.reject(error, request.remote)


class ProxyServer(web.Server):
    """aiohttp's low-level server (no URL dispatcher: every request goes to one handler)."""

    def __init__(self, proxy: ProxyHandler, *, target_limit: int, **kwargs: Any) -> None:
        super().__init__(proxy, max_line_size=target_limit, **kwargs)
        self.proxy = proxy
        self.target_limit = target_limit

    def __call__(self) -> RequestHandler:
        return JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class RouterApp:
    """Everything with a start and an end, built once from Settings."""

    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.settings = settings
        self.loop = loop or asyncio.get_running_loop()
        self.metrics = Metrics()
        self.identifier = TenantIdentifier(settings.tenant)
        self.flags = FlagSource(settings.flags, self.loop)
        self.decider = Decider(settings, self.flags)
        self.pools: dict[str, UpstreamPool] = {
            name: UpstreamPool(name, getattr(settings.upstreams, name), self.loop)
            for name in TARGETS
        }
        tenant_headers = tuple(
            e.name for e in settings.tenant.extractors if isinstance(e, HeaderExtractor)
        )
        self.header_rules = HeaderRules(tenant_headers)
        self.access_log = AccessLog(
            self.loop,
            settings.access_log.sample_rate,
            enabled=settings.access_log.enabled,
        )
        self.request_ids = RequestIds()
        self.draining = False
        self.flags.add_change_callback(self.metrics.flag_updates.inc)
        self.flags.add_ready_callback(lambda: self.metrics.flag_ready.set(1))

    async def start(self) -> None:
        await self.flags.start()

    async def close(self) -> None:
        for pool in self.pools.values():
            await pool.close()
        await self.flags.close()
        self.access_log.flush()

    def readiness(self) -> dict[str, Any]:
        checks = {
            "flags_loaded": self.flags.ready,
            "upstream_pools": all(not p._closing for p in self.pools.values()),
            "not_draining": not self.draining,
        }
        return {"ready": all(checks.values()), "checks": checks, "flag_source": self.flags.state}

    def proxy_server(self, **kwargs: Any) -> ProxyServer:
        s = self.settings.server
        # aiohttp applies max_line_size to the request target alone, and says which of its
        # two line limits a request crossed only by the limit's value (`parse_error`), so
        # the two must differ. When configured equal, the target gets one byte less: a
        # target that long makes a request line (`GET ` + target + ` HTTP/1.1`) over the
        # limit anyway, so no request line within the limit is refused.
        target_limit = s.max_request_line
        if target_limit == s.max_header_size:
            target_limit -= 1
        return ProxyServer(
            ProxyHandler(self),
            target_limit=target_limit,
            loop=self.loop,
            access_log=None,
            # Request bodies are relayed as sent, never decompressed.
            auto_decompress=False,
            keepalive_timeout=s.keepalive_timeout,
            max_field_size=s.max_header_size,
            max_headers=s.max_headers,
            **kwargs,
        )
