"""The request phases, run for every request a client connection (connection.py) parsed:

    identify (identify.py) -> decide (decide.py) -> forward + relay (relay.py, upstream.py)
    -> record (metrics.py, accesslog.py): always, even on error.

`ProxyHandler` is the per-request function; the pieces it calls are built once by the
composition root (router/service/app.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from typing import TYPE_CHECKING, cast

from router.control.override import SIGNATURE_HEADER, TARGET_HEADER
from router.errors import (
    BodyTooLarge,
    HoldTimeout,
    MethodNotAllowed,
    NotReady,
    Overloaded,
    RouterError,
    UpstreamError,
)
from router.proxy.connection import (
    RELAYED_CLOSE,
    RELAYED_KEEP_ALIVE,
    LocalReply,
    Reply,
    Request,
    local_reply,
)
from router.proxy.decide import Route, compile_path_patterns
from router.proxy.relay import (
    Exchange,
    build_request_head,
    encode_response_head,
    origin_form,
    valid_request_id,
)
from router.proxy.shadow import SAFE_METHODS, ShadowJob
from router.proxy.upstream import UpstreamPool

if TYPE_CHECKING:
    from router.service.app import RouterApp

log = logging.getLogger("router.proxy.handler")


class RequestIds:
    """Request ids unique across workers and restarts: a random per-process prefix + a counter."""

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex() + "-"
        self._counter = itertools.count(1)

    def next(self) -> str:
        return self._prefix + format(next(self._counter), "x")


class ProxyHandler:
    __slots__ = (
        "_access_log",
        "_app",
        "_body_limits",
        "_client_body_timeout",
        "_debug_headers",
        "_decider",
        "_flags",
        "_hold_timeout",
        "_identifier",
        "_inflight",
        "_ledger",
        "_loop",
        "_max_body",
        "_max_inflight",
        "_metrics",
        "_pools",
        "_request_ids",
        "_rules",
        "_shadow",
        "active",
    )

    def __init__(self, app: RouterApp) -> None:
        self._loop = app.loop
        # The object, not its bound method: compiled (setup.py), a method call on a native
        # class is a direct C call; a stored bound method is a generic Python call.
        self._identifier = app.identifier
        self._decider = app.decider
        self._pools = app.pools
        self._rules = app.header_rules
        self._metrics = app.metrics
        self._access_log = app.access_log
        self._debug_headers = app.settings.server.debug_headers
        self._request_ids = app.request_ids
        self._flags = app.flags
        self._ledger = app.ledger
        self._inflight = app.tenant_inflight
        self._hold_timeout = app.settings.routing.hold_timeout
        limits = app.settings.limits
        self._max_inflight = limits.max_inflight
        self._client_body_timeout = app.settings.server.client_body_timeout
        self._max_body = limits.max_body_bytes
        self._body_limits = compile_path_patterns(
            [(rule.pattern, rule.max_bytes) for rule in limits.body_limits]
        )
        self._shadow = app.shadower
        self._app = app
        self.active = 0  # requests being proxied now (overload protection)

    def reject(self, error: RouterError, client: str | None) -> LocalReply:
        """Answer a request that never reached __call__ (the parser refused it) with the
        same JSON body, a request id, and a record phase like every other local reply.
        Whatever follows on the connection cannot be trusted: it closes after."""
        request_id = self._record_refusal(error, "-", client)
        reply = local_reply(error, request_id)
        reply.close = True
        return reply

    def internal_error(self, request: Request) -> LocalReply:
        """The last resort when __call__ itself failed (it answers its own errors)."""
        return self.reject(RouterError("internal error"), request.peer)

    def _record_refusal(self, error: RouterError, path: str, client: str | None) -> str:
        """The record phase of a reply made outside __call__ (no request was parsed, or
        none arrived): metrics and an access-log line. Returns the reply's request id."""
        request_id = self._request_ids.next()
        self._metrics.local_reply("-", error.status)
        self._access_log.record(
            request_id, None, "none", "none", "-", path, error.status, 0, 0, 0.0, None,
            error.code, client,
        )  # fmt: skip
        return request_id

    def _body_limit(self, path: str) -> int | None:
        """The body limit for this path: the first limits.body_limits match, else
        limits.max_body_bytes (None: no limit)."""
        if self._body_limits is not None:
            limit = self._body_limits(path)
            if limit is not None:
                return limit
        return self._max_body

    def shed_connection(self, transport: asyncio.BaseTransport) -> None:
        """Refuse a connection over limits.max_connections: 503 overloaded, then close."""
        self._metrics.shed_one("connections")
        self.refuse_connection(transport, Overloaded("too many open connections; retry"))

    def refuse_connection(
        self, transport: asyncio.BaseTransport, error: RouterError, log_path: str = "-"
    ) -> None:
        """Answer `error` on a connection with no request to answer (over the connection
        cap, or a head too slow to arrive), then close it; recorded like other replies."""
        reply = local_reply(error, self._record_refusal(error, log_path, None))
        writable = cast(asyncio.WriteTransport, transport)
        writable.write(reply.encode(1, keep_alive=False, head_request=False))
        writable.close()

    async def _held(
        self,
        route: Route,
        tenant: str | None,
        path: str,
        forced: str | None,
        signature: str | None,
        start: float,
    ) -> Route:
        """Wait while the tenant is in `hold`: every flag change wakes the held requests
        (oldest first) and each decides again; past hold_timeout, HoldTimeout (503)."""
        assert tenant is not None  # only a tenant's flag says hold
        self._metrics.decided("hold", route.reason)
        deadline = start + self._hold_timeout
        while route.side == "hold":
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise HoldTimeout("the tenant's cutover did not move on in time")
            await self._decider.holds.wait(tenant, remaining, self._loop)
            route = self._decider.decide_request(tenant, path, forced, signature)
        return route

    async def __call__(self, request: Request) -> Reply:
        # perf_counter, not loop.time(): uvloop's clock has millisecond resolution.
        clock = time.perf_counter
        start = clock()
        method = request.method
        request_id = request.headers.get("X-Request-Id")
        if request_id is None or not valid_request_id(request_id):
            request_id = self._request_ids.next()
        client = request.peer
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
        shadow: ShadowJob | None = None
        try:
            try:
                if method == "CONNECT":
                    raise MethodNotAllowed("CONNECT is not supported: this is not a forward proxy")
                if not self._flags.ready or not self._ledger.loaded:
                    raise NotReady("no flag data yet" if self._ledger.loaded else "no ledger yet")
                if self.active >= self._max_inflight or self._app.lagging:
                    self._metrics.shed_one(
                        "inflight" if self.active >= self._max_inflight else "loop_lag"
                    )
                    raise Overloaded("the router is overloaded; retry")
                request_target, host = origin_form(request)
                if request_target is not request.target:  # was absolute-form
                    path = request_target.decode("latin-1")
                headers = request.headers
                # Phase 1: identify
                tenant, _source = self._identifier.identify(headers, host, path)
                # Phase 2: decide
                forced = headers.get(TARGET_HEADER)
                signature = headers.get(SIGNATURE_HEADER) if forced is not None else None
                route = self._decider.decide_request(tenant, path, forced, signature)
                if route.side == "hold":
                    target = "hold"
                    route = await self._held(route, tenant, path, forced, signature, start)
                target = route.side
                reason = route.reason
                if target == "new" and reason == "flag" and tenant is not None:
                    # The ratchet: new serves a tenant only once the ledger says it may
                    # never go back (one durable write per tenant, then a set lookup).
                    pending = self._ledger.ensure(tenant)
                    if pending is not None:
                        await pending
                pool = self._pools[target]
                self.active += 1
                self._metrics.request_started(target, reason)
                if reason == "ratchet":
                    self._metrics.ratchet_refusals += 1
                if tenant is not None:
                    counts = self._inflight.get(tenant)
                    if counts is None:
                        counts = self._inflight[tenant] = {"legacy": 0, "new": 0}
                    counts[target] += 1
                # Phase 3: forward
                has_body = request.body_exists
                if (
                    route.shadow_rate
                    and method in SAFE_METHODS
                    and not has_body
                    and self._shadow is not None
                    and tenant is not None
                ):
                    # A copy for new, in the background (shadow.py): GET/HEAD only, sampled,
                    # dropped rather than queued when full; the client's answer is legacy's.
                    shadow = self._shadow.offer(
                        route.shadow_rate, tenant, method, path, request, request_target, host,
                        request_id, client,
                    )  # fmt: skip
                chunked = has_body and request.content_length is None
                body_limit = None
                if has_body:
                    body_limit = self._body_limit(path)
                    if body_limit is not None and (request.content_length or 0) > body_limit:
                        raise BodyTooLarge(f"request body over the {body_limit}-byte limit")
                head, client = build_request_head(
                    request, request_target, host, request_id, client, pool, self._rules,
                    has_body, chunked,
                )  # fmt: skip
                exchange = Exchange(self._client_body_timeout)
                upstream_start = clock()
                upstream = await exchange.send(request, pool, head, has_body, chunked, body_limit)
                if exchange.connect_seconds:
                    self._metrics.connected(target, exchange.connect_seconds)
                status = upstream.status
                # Phase 4: relay
                version = request.version
                response_head, framing, keep_alive = encode_response_head(
                    upstream,
                    request_id,
                    route.header_bytes if self._debug_headers else None,
                    method == "HEAD",
                    version.minor if version.major == 1 else 1,
                    request.keep_alive,
                )
                if shadow is None:
                    # A small answer is written whole without a coroutine (relay_start).
                    if not exchange.relay_start(request, response_head, framing):
                        await exchange.relay_rest(request, framing, pool.read_timeout)
                else:
                    shadow.legacy_head(upstream)
                    await exchange.relay(
                        request, response_head, framing, pool.read_timeout, shadow.digest.feed
                    )
                    shadow.legacy_done(clock() - upstream_start)
                return RELAYED_KEEP_ALIVE if keep_alive else RELAYED_CLOSE
            except RouterError as exc:
                error = exc.code
                if isinstance(exc, UpstreamError):
                    upstream_error = exc.code
                elif isinstance(exc, HoldTimeout):
                    self._metrics.hold_timeouts += 1
                if status:
                    # The response head already went out and relay() aborted the client
                    # connection; there is nothing more to say to it.
                    raise ConnectionResetError(exc.detail) from None
                status = exc.status
                return local_reply(exc, request_id)
        except (ConnectionError, asyncio.CancelledError):
            error = error or "client_disconnected"
            raise
        except Exception:
            log.exception("unexpected error", extra={"request_id": request_id})
            error = "internal_error"
            status = 500
            return local_reply(RouterError("internal error"), request_id)
        finally:
            # Phase 5: record, always.
            if exchange is not None and pool is not None:
                exchange.finish(pool)
            if shadow is not None:
                shadow.abandon()  # no-op once legacy_done() gave it the whole answer
            now = clock()
            bytes_in = exchange.bytes_in if exchange is not None else 0
            bytes_out = exchange.bytes_out if exchange is not None else 0
            if pool is None:  # answered here: never reached a side (or held, then refused)
                self._metrics.local_reply(method, status, target)
            else:
                self.active -= 1
                if tenant is not None:
                    counts = self._inflight[tenant]
                    counts[target] -= 1
                    if not counts["legacy"] and not counts["new"]:
                        del self._inflight[tenant]
                self._metrics.request_finished(
                    target, method, status, now - start, bytes_in, bytes_out, upstream_error
                )
            if self._access_log.enabled:
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
                    client,
                )
