"""The request phases, run for every request a client connection (connection.py) parsed:

    admit -> identify (identify.py) -> decide (decide.py) -> forward (relay.py, upstream.py)
    -> relay (relay.py) -> record (metrics.py, accesslog.py): always, even on error.

`ProxyHandler` runs them, one method per phase, over a `RequestContext`: what the phases
of one request share. Like Pingora's ProxyHttp hooks, each phase reads what the earlier
ones left in the context and adds its own; the record phase reads the whole of it. The
pieces the phases call are built once by the composition root (router/service/app.py)
and handed over one by one: the data plane imports nothing from router.service.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from typing import cast

from router.control.flags import FlagSource
from router.control.override import SIGNATURE_HEADER, TARGET_HEADER
from router.errors import (
    BadRequest,
    BodyTooLarge,
    HoldTimeout,
    InvalidToken,
    MethodNotAllowed,
    NotReady,
    Overloaded,
    RouterError,
    TenantMismatch,
    UpstreamError,
)
from router.proxy.accesslog import AccessLog
from router.proxy.connection import (
    RELAYED_CLOSE,
    RELAYED_KEEP_ALIVE,
    LocalReply,
    Reply,
    Request,
    local_reply,
)
from router.proxy.decide import Decider, LedgerView, Route, compile_path_patterns
from router.proxy.identify import TenantIdentifier, UnknownKey
from router.proxy.metrics import Metrics
from router.proxy.relay import (
    Exchange,
    HeaderRules,
    build_request_head,
    connection_tokens,
    encode_response_head,
    origin_form,
    valid_request_id,
)
from router.proxy.shadow import SAFE_METHODS, Shadower, ShadowJob
from router.proxy.upstream import UpstreamPool, UpstreamResponse
from router.settings import Settings

log = logging.getLogger("router.proxy.handler")


class RequestIds:
    """Request ids unique across workers and restarts: a random per-process prefix + a counter."""

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex() + "-"
        self._counter = itertools.count(1)

    def next(self) -> str:
        return self._prefix + format(next(self._counter), "x")


class ProcessState:
    """What the service layer knows about this process, set by RouterApp (its loop-lag
    monitor, the shutdown): `lagging` is read by every request (admit), as a plain
    attribute of a native class (compiled: a field read, no property or call);
    `draining` by the readiness check."""

    __slots__ = ("draining", "lagging")

    def __init__(self) -> None:
        self.lagging = False  # event-loop lag above limits.max_loop_lag: shed new requests
        self.draining = False  # shutting down: readiness fails, so traffic moves away


class RequestContext:
    """What the phases of one request share. One object per request, typed attributes
    only: compiled, each is a C field (no dict, no per-request closure)."""

    __slots__ = (
        "body_limit",
        "chunked",
        "client",
        "error",
        "exchange",
        "framing",
        "has_body",
        "host",
        "keep_alive",
        "ledger_write",
        "method",
        "path",
        "pool",
        "reason",
        "request",
        "request_id",
        "request_target",
        "route",
        "shadow",
        "side",
        "start",
        "status",
        "tenant",
        "unknown_key",
        "upstream_error",
        "upstream_start",
    )

    def __init__(self, request: Request, request_id: str, start: float) -> None:
        self.request = request
        self.request_id = request_id
        self.start = start  # perf_counter() at the request's start
        self.method = request.method
        self.client: str = request.peer  # the client's address (X-Forwarded-For aware)
        # admit: the origin-form request target, the effective Host, the path as a str
        self.request_target = request.target
        self.host = ""
        self.path = request.raw_path
        # identify, decide
        self.tenant: str | None = None
        self.unknown_key: UnknownKey | None = None  # a token's kid to fetch keys for
        self.route: Route | None = None
        # The side for metrics and the access log: "none" until one is chosen, "hold"
        # while the tenant is held; the reason likewise "none" until the route is final.
        self.side = "none"
        self.reason = "none"
        # The ratchet's durable write that new's first request for a tenant waits for.
        self.ledger_write: asyncio.Future[None] | None = None
        # forward
        self.pool: UpstreamPool | None = None  # set once the request counts as the side's
        self.has_body = request.body_exists
        self.chunked = False
        self.body_limit: int | None = None
        self.shadow: ShadowJob | None = None
        self.exchange: Exchange | None = None
        self.upstream_start = 0.0
        # relay
        self.framing = 0
        self.keep_alive = False
        # record
        self.status = 0  # the answer's status: the upstream's once its head arrived
        self.error: str | None = None
        self.upstream_error: str | None = None


class ProxyHandler:
    """The request phases (module docstring), and the answers made without a request."""

    __slots__ = (
        "_access_log",
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
        "_mismatch_logged",
        "_pools",
        "_request_ids",
        "_rules",
        "_shadow",
        "_state",
        "active",
    )

    def __init__(
        self,
        settings: Settings,
        loop: asyncio.AbstractEventLoop,
        *,
        identifier: TenantIdentifier,
        decider: Decider,
        flags: FlagSource,
        ledger: LedgerView,
        pools: dict[str, UpstreamPool],
        header_rules: HeaderRules,
        shadower: Shadower | None,
        metrics: Metrics,
        access_log: AccessLog,
        request_ids: RequestIds,
        tenant_inflight: dict[str, dict[str, int]],
        state: ProcessState,
    ) -> None:
        self._loop = loop
        # The objects, not their bound methods: compiled (setup.py), a method call on a
        # native class is a direct C call; a stored bound method is a generic Python call.
        self._identifier = identifier
        self._decider = decider
        self._flags = flags
        self._ledger = ledger
        self._pools = pools
        self._rules = header_rules
        self._shadow = shadower
        self._metrics = metrics
        self._access_log = access_log
        self._request_ids = request_ids
        # tenant -> requests being proxied now, per side (a cutover waits for legacy's)
        self._inflight = tenant_inflight
        self._state = state
        self._debug_headers = settings.server.debug_headers
        self._client_body_timeout = settings.server.client_body_timeout
        self._hold_timeout = settings.routing.hold_timeout
        limits = settings.limits
        self._max_inflight = limits.max_inflight
        self._max_body = limits.max_body_bytes
        self._body_limits = compile_path_patterns(
            [(rule.pattern, rule.max_bytes) for rule in limits.body_limits]
        )
        self.active = 0  # requests being proxied now (overload protection)
        self._mismatch_logged = 0.0  # when a tenant_mismatch was last logged (rate limit)

    # ---- the phases --------------------------------------------------------------------

    async def __call__(self, request: Request) -> Reply:
        request_id = request.headers.get("X-Request-Id")
        if request_id is None or not valid_request_id(request_id):
            request_id = self._request_ids.next()
        # perf_counter, not loop.time(): uvloop's clock has millisecond resolution.
        ctx = RequestContext(request, request_id, time.perf_counter())
        try:
            try:
                self._admit(ctx)
                if not self._identify(ctx):
                    await self._identify_with_fresh_keys(ctx)
                if not self._decide(ctx):
                    await self._wait_for_route(ctx)
                upstream = await self._forward(ctx)
                if not self._relay(ctx, upstream):
                    await self._relay_rest(ctx)
                return RELAYED_KEEP_ALIVE if ctx.keep_alive else RELAYED_CLOSE
            except RouterError as exc:
                return self._refused(ctx, exc)
        except (ConnectionError, asyncio.CancelledError):
            ctx.error = ctx.error or "client_disconnected"
            raise
        except Exception:
            log.exception("unexpected error", extra={"request_id": request_id})
            ctx.error = "internal_error"
            ctx.status = 500
            return local_reply(RouterError("internal error"), request_id)
        finally:
            self._record(ctx)

    def _admit(self, ctx: RequestContext) -> None:
        """Refuse what the router will not proxy now (CONNECT; no flag data or ledger yet;
        overload), and read the request target in origin form."""
        if ctx.method == "CONNECT":
            raise MethodNotAllowed("CONNECT is not supported: this is not a forward proxy")
        if not self._flags.ready or not self._ledger.loaded:
            raise NotReady("no flag data yet" if self._ledger.loaded else "no ledger yet")
        if self.active >= self._max_inflight or self._state.lagging:
            self._metrics.shed_one("inflight" if self.active >= self._max_inflight else "loop_lag")
            raise Overloaded("the router is overloaded; retry")
        request = ctx.request
        request_target, ctx.host = origin_form(request)
        if request_target is not request.target:  # was absolute-form
            ctx.request_target = request_target
            ctx.path = request_target.decode("latin-1")

    def _identify(self, ctx: RequestContext) -> bool:
        """The request's tenant (identify.py: every source must agree). False when a token
        names a key id we do not know yet: _identify_with_fresh_keys fetches the keys."""
        request = ctx.request
        headers = request.headers
        identifier = self._identifier
        # A field named in Connection is hop-by-hop: the hop before us was told it is not
        # end-to-end, so it is no identity. Refused rather than ignored: a client that
        # tries it is probing (the usual Connection values name nothing: no tokens).
        if "Connection" in headers:
            named = connection_tokens(request.raw_headers)
            if named and not named.isdisjoint(identifier.routing_fields):
                raise BadRequest("an identity field is named in Connection (hop-by-hop)")
        try:
            ctx.tenant, _source = identifier.identify(headers, ctx.host, ctx.path)
        # Distinct names: compiled, one `exc` would be typed by its first except clause.
        except UnknownKey as unknown:
            ctx.unknown_key = unknown
            return False
        except TenantMismatch as mismatch:
            self._tenant_mismatch(ctx, mismatch)
            raise
        except InvalidToken:
            self._metrics.invalid_tokens += 1
            raise
        return True

    async def _identify_with_fresh_keys(self, ctx: RequestContext) -> None:
        """A token's kid is not in its key set: refetch the JWKS (rate-limited: a made-up
        kid costs at most one fetch per min_refetch_interval) and identify once more; a
        kid still unknown is a token we cannot trust: 401."""
        unknown = ctx.unknown_key
        assert unknown is not None
        await unknown.keys.refetch(unknown.kid)
        if not self._identify(ctx):
            self._metrics.invalid_tokens += 1
            raise InvalidToken(f"unknown key id {unknown.kid!r}")

    def _tenant_mismatch(self, ctx: RequestContext, exc: TenantMismatch) -> None:
        """Count every refusal; log at most one a second (a client can send thousands)."""
        self._metrics.tenant_mismatch(exc.sources)
        now = time.perf_counter()
        if now - self._mismatch_logged >= 1.0:
            self._mismatch_logged = now
            log.warning(
                "identity sources disagree on the tenant: refused (tenant_mismatch)",
                extra={"request_id": ctx.request_id, "sources": exc.sources,
                       "client": ctx.client},
            )  # fmt: skip

    def _decide(self, ctx: RequestContext) -> bool:
        """The request's route. False when it must wait for it: the tenant is held, or new
        serves the tenant for the first time (_wait_for_route)."""
        route = ctx.route = self._route(ctx)
        if route.side == "hold":
            ctx.side = "hold"
            self._metrics.decided("hold", route.reason)
            return False
        return self._settle(ctx, route)

    def _route(self, ctx: RequestContext) -> Route:
        headers = ctx.request.headers
        forced = headers.get(TARGET_HEADER)
        signature = headers.get(SIGNATURE_HEADER) if forced is not None else None
        return self._decider.decide_request(ctx.tenant, ctx.path, forced, signature)

    def _settle(self, ctx: RequestContext, route: Route) -> bool:
        """`route` is final: record its side and reason. False when new is about to serve
        the tenant for the first time: the ratchet's ledger write must be durable first
        (one write per tenant, all its first requests share it; then a set lookup)."""
        ctx.side = route.side
        ctx.reason = route.reason
        if route.side == "new" and route.reason == "flag" and ctx.tenant is not None:
            ctx.ledger_write = self._ledger.ensure(ctx.tenant)
            return ctx.ledger_write is None
        return True

    async def _wait_for_route(self, ctx: RequestContext) -> None:
        """Wait while the tenant is in `hold`: every flag change wakes the held requests
        (oldest first) and each decides again; past hold_timeout, HoldTimeout (503). Then
        wait for the ratchet's ledger write, if the route needs one."""
        route = ctx.route
        assert route is not None
        if route.side == "hold":
            tenant = ctx.tenant
            assert tenant is not None  # only a tenant's flag says hold
            deadline = ctx.start + self._hold_timeout
            while route.side == "hold":
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    raise HoldTimeout("the tenant's cutover did not move on in time")
                await self._decider.holds.wait(tenant, remaining, self._loop)
                route = ctx.route = self._route(ctx)
            self._settle(ctx, route)
        if ctx.ledger_write is not None:
            await ctx.ledger_write

    async def _forward(self, ctx: RequestContext) -> UpstreamResponse:
        """The request is the side's from here (counted in flight, per tenant too): offer
        a shadow copy, check the body's size, send the head (and body) upstream, and
        return the response head."""
        request = ctx.request
        route = ctx.route
        assert route is not None
        side = ctx.side
        tenant = ctx.tenant
        pool = ctx.pool = self._pools[side]
        self.active += 1
        self._metrics.request_started(side, ctx.reason)
        if ctx.reason == "ratchet":
            self._metrics.ratchet_refusals += 1
        if tenant is not None:
            counts = self._inflight.get(tenant)
            if counts is None:
                counts = self._inflight[tenant] = {"legacy": 0, "new": 0}
            counts[side] += 1
        has_body = ctx.has_body
        if (
            route.shadow_rate
            and ctx.method in SAFE_METHODS
            and not has_body
            and self._shadow is not None
            and tenant is not None
        ):
            # A copy for new, in the background (shadow.py): GET/HEAD only, sampled,
            # dropped rather than queued when full; the client's answer is legacy's.
            ctx.shadow = self._shadow.offer(
                route.shadow_rate, tenant, ctx.method, ctx.path, request, ctx.request_target,
                ctx.host, ctx.request_id, ctx.client,
            )  # fmt: skip
        ctx.chunked = has_body and request.content_length is None
        if has_body:
            ctx.body_limit = self._body_limit(ctx.path)
            if ctx.body_limit is not None and (request.content_length or 0) > ctx.body_limit:
                raise BodyTooLarge(f"request body over the {ctx.body_limit}-byte limit")
        head, ctx.client = build_request_head(
            request, ctx.request_target, ctx.host, ctx.request_id, ctx.client, pool,
            self._rules, has_body, ctx.chunked,
        )  # fmt: skip
        exchange = ctx.exchange = Exchange(self._client_body_timeout)
        ctx.upstream_start = time.perf_counter()
        upstream = await exchange.send(request, pool, head, has_body, ctx.chunked, ctx.body_limit)
        if exchange.connect_seconds:
            self._metrics.connected(side, exchange.connect_seconds)
        ctx.status = upstream.status
        return upstream

    def _relay(self, ctx: RequestContext, upstream: UpstreamResponse) -> bool:
        """Relay's first step, without a coroutine: the response head and the body that
        came with it, in one write. True when that was the whole answer (a small one);
        else _relay_rest streams the rest."""
        request = ctx.request
        exchange = ctx.exchange
        route = ctx.route
        assert exchange is not None and route is not None
        version = request.version
        response_head, ctx.framing, ctx.keep_alive = encode_response_head(
            upstream,
            ctx.request_id,
            route.header_bytes if self._debug_headers else None,
            ctx.method == "HEAD",
            version.minor if version.major == 1 else 1,
            request.keep_alive,
        )
        shadow = ctx.shadow
        if shadow is None:
            return exchange.relay_start(request, response_head, ctx.framing)
        shadow.legacy_head(upstream)
        if not exchange.relay_start(request, response_head, ctx.framing, shadow.digest.feed):
            return False
        shadow.legacy_done(time.perf_counter() - ctx.upstream_start)
        return True

    async def _relay_rest(self, ctx: RequestContext) -> None:
        """Stream the rest of the answer (on upstream failure, abort the client's
        connection: a truncated body must not look complete)."""
        exchange = ctx.exchange
        pool = ctx.pool
        assert exchange is not None and pool is not None
        shadow = ctx.shadow
        if shadow is None:
            await exchange.relay_rest(ctx.request, ctx.framing, pool.read_timeout)
            return
        await exchange.relay_rest(ctx.request, ctx.framing, pool.read_timeout, shadow.digest.feed)
        shadow.legacy_done(time.perf_counter() - ctx.upstream_start)

    def _refused(self, ctx: RequestContext, exc: RouterError) -> LocalReply:
        """The answer to a request a phase refused (the JSON error), or, when the response
        head already went out, a reset: relay aborted the client's connection and there
        is nothing more to say to it."""
        ctx.error = exc.code
        if isinstance(exc, UpstreamError):
            ctx.upstream_error = exc.code
        elif isinstance(exc, HoldTimeout):
            self._metrics.hold_timeouts += 1
        if ctx.status:
            raise ConnectionResetError(exc.detail) from None
        ctx.status = exc.status
        return local_reply(exc, ctx.request_id)

    def _record(self, ctx: RequestContext) -> None:
        """Always, whatever happened: hand the upstream connection back, release the
        request's counts, and count and log it."""
        exchange = ctx.exchange
        pool = ctx.pool
        tenant = ctx.tenant
        side = ctx.side
        if exchange is not None and pool is not None:
            exchange.finish(pool)
        if ctx.shadow is not None:
            ctx.shadow.abandon()  # no-op once legacy_done() gave it the whole answer
        now = time.perf_counter()
        bytes_in = exchange.bytes_in if exchange is not None else 0
        bytes_out = exchange.bytes_out if exchange is not None else 0
        if pool is None:  # answered here: never reached a side (or held, then refused)
            self._metrics.local_reply(ctx.method, ctx.status, side)
        else:
            self.active -= 1
            if tenant is not None:
                counts = self._inflight[tenant]
                counts[side] -= 1
                if not counts["legacy"] and not counts["new"]:
                    del self._inflight[tenant]
            self._metrics.request_finished(
                side, ctx.method, ctx.status, now - ctx.start, bytes_in, bytes_out,
                ctx.upstream_error,
            )  # fmt: skip
        if self._access_log.enabled:
            self._access_log.record(
                ctx.request_id,
                tenant,
                side,
                ctx.reason,
                ctx.method,
                ctx.path,  # the access log redacts its query (accesslog.QueryRedactor)
                ctx.status,
                bytes_in,
                bytes_out,
                (now - ctx.start) * 1000.0,
                (now - ctx.upstream_start) * 1000.0 if ctx.upstream_start else None,
                ctx.error,
                ctx.client,
            )

    def _body_limit(self, path: str) -> int | None:
        """The body limit for this path: the first limits.body_limits match, else
        limits.max_body_bytes (None: no limit)."""
        if self._body_limits is not None:
            limit = self._body_limits(path)
            if limit is not None:
                return limit
        return self._max_body

    # ---- answers without a request -----------------------------------------------------

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
