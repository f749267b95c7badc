"""Composition root: builds the pieces from Settings once, owns everything with a start
and an end (flag source, ledger view, upstream pools, shadower, access log), and gives the
proxy listener its handler (router/proxy/handler.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from router.control.flags import FlagSource
from router.control.ledger import open_ledger
from router.control.override import OverrideVerifier
from router.domain import SIDES
from router.proxy.accesslog import AccessLog, QueryRedactor
from router.proxy.connection import FrontServer
from router.proxy.decide import Decider, LedgerView
from router.proxy.handler import ProcessState, ProxyHandler, RequestIds
from router.proxy.identify import TenantIdentifier, key_sets
from router.proxy.metrics import Metrics
from router.proxy.relay import HeaderRules
from router.proxy.shadow import Shadower, ShadowPolicy, shadow_pools
from router.proxy.upstream import UpstreamPool
from router.service.workers import WorkerInfo
from router.settings import HeaderExtractor, Settings

log = logging.getLogger("router.app")


class RouterApp:
    """Everything with a start and an end, built once from Settings."""

    def __init__(
        self,
        settings: Settings,
        loop: asyncio.AbstractEventLoop | None = None,
        worker: WorkerInfo | None = None,
    ) -> None:
        self.settings = settings
        self.loop = loop or asyncio.get_running_loop()
        self.metrics = Metrics()
        # The JWKS key sets of verifying jwt extractors (control/jwks.py), by URL.
        self.jwks = key_sets(settings.tenant)
        self.identifier = TenantIdentifier(settings.tenant, self.jwks)
        self.flags = FlagSource(settings.flags, self.loop)
        self.ledger = LedgerView(open_ledger(settings.ledger), self.loop)
        self.verifier = OverrideVerifier(
            settings.override_secret,
            settings.routing.override_window,
            previous=settings.override_secret_previous,
            tenants=settings.routing.override_tenants,
        )
        # Query values that never reach a log line or an admin view (accesslog.py).
        self.redactor = QueryRedactor(settings.redact_query_params)
        shadow = settings.shadow
        self.shadow_policy: ShadowPolicy | None = None
        if shadow.enabled:
            self.shadow_policy = ShadowPolicy(shadow, self.flags.evaluate)
            if shadow.flag_key is not None:
                self.flags.watch(shadow.flag_key)
        self.decider = Decider(
            settings,
            self.flags,
            self.ledger,
            self.verifier,
            self.shadow_policy.rate if self.shadow_policy is not None else None,
        )
        # tenant -> requests being proxied now, per side (cutover waits for legacy's to end)
        self.tenant_inflight: dict[str, dict[str, int]] = {}
        self.pools: dict[str, UpstreamPool] = {
            name: UpstreamPool(name, getattr(settings.upstreams, name), self.loop) for name in SIDES
        }
        tenant_headers = tuple(
            e.name for e in settings.tenant.extractors if isinstance(e, HeaderExtractor)
        )
        server = settings.server
        self.header_rules = HeaderRules(
            tenant_headers,
            server.trusted_hops,
            trust_forwarded_proto=server.trust_forwarded_proto,
            trust_forwarded_host=server.trust_forwarded_host,
        )
        self.shadower: Shadower | None = None
        if shadow.enabled:
            self.shadower = Shadower(
                shadow,
                shadow_pools(shadow, settings.upstreams, self.loop),
                self.header_rules,
                self.metrics,
                self.loop,
                self.redactor,
            )
            shadower = self.shadower
            self.metrics.shadow_pending = lambda: (shadower.active, shadower.queued)
        self.access_log = AccessLog(
            self.loop,
            settings.access_log.sample_rate,
            enabled=settings.access_log.enabled,
            redactor=self.redactor,
        )
        self.request_ids = RequestIds()
        # Whether the loop lags (the request phases shed new requests) and whether this
        # process drains (readiness fails): set here, read by the handler per request.
        self.state = ProcessState()
        self.worker = worker
        self._lag_monitor: asyncio.Future[None] | None = None
        self.flags.add_change_callback(self.metrics.flag_updated)
        self.metrics.held = lambda: self.decider.holds.total
        self.decider.on_override_rejected = self.metrics.override_rejected
        self.metrics.flag_ready = lambda: self.flags.ready
        self.metrics.pool_sizes = lambda: (
            (name, pool.idle_count, pool.active_count) for name, pool in self.pools.items()
        )

    async def start(self) -> None:
        if self._lag_monitor is None:
            self._lag_monitor = asyncio.ensure_future(self._watch_loop_lag())
        self.start_jwks()
        await asyncio.gather(self.flags.start(), self._start_ledger())

    def start_jwks(self) -> None:
        """Fetch the JWKS key sets in the background (readiness waits for the first)."""
        for keys in self.jwks.values():
            keys.start()

    async def _watch_loop_lag(self) -> None:
        """How late a 100 ms timer fires: past limits.max_loop_lag the loop has accepted
        more than it can serve, and new requests are shed until it catches up."""
        interval = 0.1
        clock = time.perf_counter
        limit = self.settings.limits.max_loop_lag
        while True:
            started = clock()
            await asyncio.sleep(interval)
            lag = max(0.0, clock() - started - interval)
            self.metrics.loop_lag = lag
            if (lag > limit) != self.state.lagging:
                self.state.lagging = lag > limit
                log.warning(
                    "event loop lagging: shedding new requests"
                    if self.state.lagging
                    else "event loop caught up: no longer shedding",
                    extra={"lag_ms": round(lag * 1000, 1), "limit_ms": limit * 1000},
                )

    async def _start_ledger(self) -> None:
        """Open the ledger and read it, retrying: until then the router is not ready (it
        cannot apply the ratchet, so it must not route at all)."""
        delay = 0.5
        while True:
            try:
                await self.ledger.start()
                return
            except Exception as exc:
                log.error(
                    "ratchet ledger unavailable; not ready until it is",
                    extra={"ledger": self.ledger.ledger.url if self.ledger.ledger else None,
                           "error": str(exc)[:300], "retry_in": delay},
                )  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def close(self) -> None:
        if self._lag_monitor is not None:
            self._lag_monitor.cancel()
        if self.shadower is not None:
            await self.shadower.close()
        for pool in self.pools.values():
            await pool.close()
        await self.flags.close()
        for keys in self.jwks.values():
            await keys.close()
        with contextlib.suppress(Exception):
            await self.ledger.close()
        self.access_log.flush()

    def readiness(self) -> dict[str, Any]:
        checks = {
            "flags_loaded": self.flags.ready,
            "ledger_loaded": self.ledger.loaded,
            "upstream_pools": all(not p._closing for p in self.pools.values()),
            "not_draining": not self.state.draining,
        }
        if self.jwks:
            # A verifying router without keys can only refuse credentialed requests
            # (503 not_ready): not ready is the fail-closed answer until the first fetch.
            checks["jwks_loaded"] = all(keys.loaded for keys in self.jwks.values())
        return {"ready": all(checks.values()), "checks": checks, "flag_source": self.flags.state}

    def tenant_state(self, tenant: str) -> dict[str, Any]:
        """This worker's view of a tenant (admin.py sums the workers' counts). Its "target" is
        the side requests get now (the cache), not a fresh evaluation: between a flag
        change and the cache clear that follows the ledger re-read, requests still get the
        old decision, and a cutover must not see `hold` before they do."""
        route = self.decider.decide(tenant)
        counts = self.tenant_inflight.get(tenant, {})
        return {
            "tenant": tenant,
            "target": route.side,
            "reason": route.reason,
            "inflight": {"legacy": counts.get("legacy", 0), "new": counts.get("new", 0)},
            "held": self.decider.holds.held(tenant),
            "ledgered": tenant in self.ledger.tenants,
        }

    def proxy_server(self) -> FrontServer:
        """The protocol factory for the proxy's listener (router/proxy/connection.py)."""
        s = self.settings.server
        return FrontServer(
            ProxyHandler(
                self.settings,
                self.loop,
                identifier=self.identifier,
                decider=self.decider,
                flags=self.flags,
                ledger=self.ledger,
                pools=self.pools,
                header_rules=self.header_rules,
                shadower=self.shadower,
                metrics=self.metrics,
                access_log=self.access_log,
                request_ids=self.request_ids,
                tenant_inflight=self.tenant_inflight,
                state=self.state,
            ),
            self.loop,
            max_target=s.max_request_line,
            max_field_size=s.max_header_size,
            max_headers=s.max_headers,
            keepalive_timeout=s.keepalive_timeout,
            header_timeout=s.header_timeout,
            max_connections=self.settings.limits.max_connections,
            max_pipelined=s.max_pipelined,
            max_pipelined_bytes=s.max_pipelined_bytes,
        )
