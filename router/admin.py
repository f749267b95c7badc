"""Admin port: health, readiness, metrics and read-only tenant views.

Kept on its own port so the ALB's health checks and Prometheus scrapes never compete with,
or get routed like, customer traffic, and so it can be firewalled separately.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from router.errors import BadRequest
from router.settings import TARGETS

if TYPE_CHECKING:
    from router.app import RouterApp

ROUTER_APP = web.AppKey("router_app", object)


def _router(request: web.Request) -> RouterApp:
    app: RouterApp = request.app[ROUTER_APP]  # type: ignore[assignment]
    return app


async def healthz(request: web.Request) -> web.Response:
    """The process is alive and its event loop answers (ECS restarts it otherwise)."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Send traffic here? Only with flag data, live pools, and not draining."""
    state = _router(request).readiness()
    return web.json_response(state, status=200 if state["ready"] else 503)


async def metrics(request: web.Request) -> web.Response:
    app = _router(request)
    gauge = app.metrics.pool_connections
    for name, pool in app.pools.items():
        gauge.labels(name, "idle").set(pool.idle_count)
        gauge.labels(name, "active").set(pool.active_count)
    body = generate_latest(app.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def tenant(request: web.Request) -> web.Response:
    app = _router(request)
    tenant_id = request.match_info["tenant"]
    if not app.identifier.is_valid(tenant_id):
        error = BadRequest("invalid tenant id")
        return web.json_response({"error": error.code, "detail": error.detail}, status=400)
    route = app.decider.evaluate(tenant_id)
    return web.json_response(
        {
            "tenant": tenant_id,
            "target": route.target,
            "reason": route.reason,
            "flag_key": app.flags.flag_key,
            "upstream": app.settings.upstreams.legacy.url
            if route.target == "legacy"
            else app.settings.upstreams.new.url,
            "inflight": dict.fromkeys(TARGETS, 0),
            "held": 0,
            "ledgered": False,
        }
    )


def build_admin_app(router_app: RouterApp) -> web.Application:
    app = web.Application()
    app[ROUTER_APP] = router_app
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/tenants/{tenant}", tenant)
    return app
