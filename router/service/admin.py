"""Admin port: health, readiness, metrics and read-only tenant views.

Kept on its own port so the ALB's health checks and Prometheus scrapes never compete with,
or get routed like, customer traffic, and so it can be firewalled separately.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from router.domain import SIDES
from router.errors import AdminDisabled, BadRequest, RouterError, Unauthorized
from router.proxy.metrics import merge, render
from router.proxy.shadow import merge_views
from router.service.workers import ask_siblings

if TYPE_CHECKING:
    from router.service.app import RouterApp

ROUTER_APP = web.AppKey("router_app", object)


def _router(request: web.Request) -> RouterApp:
    app: RouterApp = request.app[ROUTER_APP]  # type: ignore[assignment]
    return app


async def healthz(request: web.Request) -> web.Response:
    """The process is alive and its event loop answers (ECS restarts it otherwise)."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Send traffic here? Only with flag data, live pools, and not draining, in this worker
    and in every sibling (the load balancer cannot tell them apart)."""
    app = _router(request)
    state = app.readiness()
    answers, missing = await ask_siblings(app.worker, "/internal/readiness")
    if app.worker is not None:
        workers = {str(app.worker.worker_id): state, **{str(k): v for k, v in answers.items()}}
        workers.update({str(k): {"ready": False, "error": "did not answer"} for k in missing})
        ready = all(w.get("ready") for w in workers.values())
        state = {**state, "ready": ready, "workers": workers}
    return web.json_response(state, status=200 if state["ready"] else 503)


async def metrics(request: web.Request) -> web.Response:
    """This task's figures: this worker's, plus every sibling's, summed."""
    app = _router(request)
    answers, missing = await ask_siblings(app.worker, "/internal/snapshot")
    snapshot = merge([app.metrics.snapshot(), *answers.values()])
    if missing:
        snapshot["gauges"]["router_workers"].append([["missing"], len(missing)])
    body = render(snapshot)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def internal_snapshot(request: web.Request) -> web.Response:
    return web.json_response(_router(request).metrics.snapshot())


async def internal_readiness(request: web.Request) -> web.Response:
    return web.json_response(_router(request).readiness())


def _error(error: RouterError) -> web.Response:
    return web.json_response({"error": error.code, "detail": error.detail}, status=error.status)


@web.middleware
async def require_token(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Admin routes (everything but health and metrics) need `Authorization: Bearer
    <ROUTER_ADMIN_TOKEN>`; with no token configured they are closed, never open."""
    if not request.path.startswith("/admin/"):
        return await handler(request)
    token = _router(request).settings.admin_token
    if not token:
        return _error(AdminDisabled("admin routes need ROUTER_ADMIN_TOKEN to be set"))
    given = request.headers.get("Authorization", "")
    scheme, _, credentials = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        credentials.strip().encode(), token.encode()
    ):
        return _error(Unauthorized("missing or wrong bearer token"))
    return await handler(request)


async def tenant(request: web.Request) -> web.Response:
    """Where this tenant goes now and what is in flight for it, over every worker."""
    app = _router(request)
    tenant_id = request.match_info["tenant"]
    if not app.identifier.is_valid(tenant_id):
        return _error(BadRequest("invalid tenant id"))
    state = app.tenant_state(tenant_id)
    answers, missing = await ask_siblings(app.worker, f"/internal/tenants/{tenant_id}")
    for other in answers.values():
        for side in SIDES:
            state["inflight"][side] += other["inflight"][side]
        state["held"] += other["held"]
        state["ledgered"] = state["ledgered"] or other["ledgered"]
        if other["target"] != state["target"]:
            # Workers read the same flag but not at the same instant: say "not yet agreed"
            # rather than one worker's view (a cutover waits until they agree).
            state["target"] = "mixed"
            state["reason"] = "workers-disagree"
    state["flag_key"] = app.flags.flag_key
    upstream = {"legacy": app.settings.upstreams.legacy.url, "new": app.settings.upstreams.new.url}
    state["upstream"] = upstream.get(state["target"])
    state["workers"] = {"answered": 1 + len(answers), "missing": len(missing)}
    status = 200 if not missing else 503
    return web.json_response(state, status=status)


async def inflight(request: web.Request) -> web.Response:
    """Tenants with requests in flight now (and held), summed over every worker."""
    app = _router(request)
    answers, missing = await ask_siblings(app.worker, "/internal/inflight")
    totals: dict[str, dict[str, int]] = {}
    for view in (_inflight_view(app), *answers.values()):
        for tenant_id, counts in view.items():
            total = totals.setdefault(tenant_id, {"legacy": 0, "new": 0, "held": 0})
            for key in ("legacy", "new", "held"):
                total[key] += counts.get(key, 0)
    body = {"tenants": totals, "workers": {"answered": 1 + len(answers), "missing": len(missing)}}
    return web.json_response(body, status=200 if not missing else 503)


def _inflight_view(app: RouterApp) -> dict[str, dict[str, int]]:
    view: dict[str, dict[str, int]] = {t: dict(c) for t, c in app.tenant_inflight.items()}
    for tenant_id, held in app.decider.holds.held_by_tenant().items():
        view.setdefault(tenant_id, {"legacy": 0, "new": 0})["held"] = held
    return view


async def internal_tenant(request: web.Request) -> web.Response:
    return web.json_response(_router(request).tenant_state(request.match_info["tenant"]))


async def internal_inflight(request: web.Request) -> web.Response:
    return web.json_response(_inflight_view(_router(request)))


# ---- shadow traffic (shadow.py) ---------------------------------------------------------

DEFAULT_SHADOW_LIMIT = 50


def _shadow_query(request: web.Request) -> tuple[str | None, int]:
    """?tenant= (optional, validated) and ?limit= (recent mismatches, 0..1000)."""
    tenant_id = request.query.get("tenant")
    if tenant_id is not None and not _router(request).identifier.is_valid(tenant_id):
        raise BadRequest("invalid tenant id")
    text = request.query.get("limit", str(DEFAULT_SHADOW_LIMIT))
    if not text.isdigit() or int(text) > 1000:
        raise BadRequest(f"limit must be an integer 0..1000, got {text[:20]!r}")
    return tenant_id, int(text)


def _shadow_view(app: RouterApp, tenant_id: str | None, limit: int) -> dict[str, Any]:
    if app.shadower is None:
        return {"tenants": {}, "recent": []}
    return app.shadower.store.view(tenant_id, limit)


async def shadow(request: web.Request) -> web.Response:
    """Shadow comparisons (per tenant counts, recent mismatches), summed over every worker."""
    app = _router(request)
    try:
        tenant_id, limit = _shadow_query(request)
    except BadRequest as exc:
        return _error(exc)
    query = f"?limit={limit}" + (f"&tenant={quote(tenant_id, safe='')}" if tenant_id else "")
    answers, missing = await ask_siblings(app.worker, f"/internal/shadow{query}")
    merged = merge_views([_shadow_view(app, tenant_id, limit), *answers.values()], limit)
    body = {
        "enabled": app.shadower is not None,
        **merged,
        "workers": {"answered": 1 + len(answers), "missing": len(missing)},
    }
    return web.json_response(body, status=200 if not missing else 503)


async def shadow_reset(request: web.Request) -> web.Response:
    """Forget a tenant's shadow counts, mismatches and learned noise, in every worker (an
    SRE starts counting afresh once new has been fixed)."""
    app = _router(request)
    tenant_id = request.match_info["tenant"]
    if not app.identifier.is_valid(tenant_id):
        return _error(BadRequest("invalid tenant id"))
    if app.shadower is not None:
        app.shadower.store.reset(tenant_id)
    answers, missing = await ask_siblings(
        app.worker, f"/internal/shadow/{quote(tenant_id, safe='')}", method="DELETE"
    )
    body = {
        "tenant": tenant_id,
        "reset": not missing,
        "workers": {"answered": 1 + len(answers), "missing": len(missing)},
    }
    return web.json_response(body, status=200 if not missing else 503)


async def internal_shadow(request: web.Request) -> web.Response:
    tenant_id, limit = _shadow_query(request)
    return web.json_response(_shadow_view(_router(request), tenant_id, limit))


async def internal_shadow_reset(request: web.Request) -> web.Response:
    app = _router(request)
    if app.shadower is not None:
        app.shadower.store.reset(request.match_info["tenant"])
    return web.json_response({"reset": True})


def build_admin_app(router_app: RouterApp) -> web.Application:
    app = web.Application(middlewares=[require_token])
    app[ROUTER_APP] = router_app
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/tenants/{tenant}", tenant)
    app.router.add_get("/admin/inflight", inflight)
    app.router.add_get("/admin/shadow", shadow)
    app.router.add_delete("/admin/shadow/{tenant}", shadow_reset)
    return app


def build_internal_app(router_app: RouterApp) -> web.Application:
    """The private admin app each worker serves on its unix socket, for its siblings: its
    own figures only (never a fan-out, so no worker ever waits on itself)."""
    app = web.Application()
    app[ROUTER_APP] = router_app
    app.router.add_get("/internal/snapshot", internal_snapshot)
    app.router.add_get("/internal/readiness", internal_readiness)
    app.router.add_get("/internal/tenants/{tenant}", internal_tenant)
    app.router.add_get("/internal/inflight", internal_inflight)
    app.router.add_get("/internal/shadow", internal_shadow)
    app.router.add_delete("/internal/shadow/{tenant}", internal_shadow_reset)
    return app
