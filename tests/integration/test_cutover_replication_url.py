"""`router cutover`'s replication check by URL (router/control/cutover.py), against a local
HTTP server that answers each tenant's replication status."""

from __future__ import annotations

from typing import Any

import httpx
from aiohttp import web

from router.control.cutover import check_replication


async def test_replication_check_by_url(aiohttp_server: Any) -> None:
    answers: dict[str, Any] = {}

    async def status(request: web.Request) -> web.Response:
        tenant = request.match_info["tenant"]
        body, code = answers[tenant]
        return web.json_response(body, status=code)

    app = web.Application()
    app.router.add_get("/replication/{tenant}", status)
    server = await aiohttp_server(app)
    url = f"http://127.0.0.1:{server.port}/replication/{{tenant}}"
    answers.update(
        {
            "a": ({"caught_up": True}, 200),
            "b": ({"caught_up": False}, 200),
            "c": ({"lag_seconds": 0.4}, 200),
            "d": ({"lag_seconds": 7}, 200),
            "e": ({"caught_up": True}, 500),
            "f": ({"something": 1}, 200),
        }
    )
    async with httpx.AsyncClient() as client:
        results = {t: await check_replication(url, t, 1.0, 5.0, client) for t in answers}
    assert results["a"] == (True, "caught up")
    assert results["b"] == (False, "not caught up")
    assert results["c"] == (True, "lag 0.4 s (<= 1 s)")
    assert results["d"] == (False, "lag 7 s (> 1 s)")
    assert results["e"] == (False, "replication check answered HTTP 500")
    assert results["f"][0] is False and "neither" in results["f"][1]
