"""The `launchdarkly` flag source against a local server speaking LaunchDarkly's stream protocol.

This is how a Relay Proxy is configured (`flags.stream_uri` / `base_uri` / `events_uri`):
the SDK opens `GET {stream_uri}/all` with the SDK key, receives a `put` event with every
flag, then `patch` events as flags change. The server here is real SSE over a real socket,
so the router's `launchdarkly` path runs exactly as in production, minus the internet.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from router.control.flagfile import new_flag
from tests.conftest import Backends, StartRouter, router_settings


class FakeLaunchDarkly:
    """Streams flag data the way LaunchDarkly (or its Relay Proxy) does."""

    def __init__(self, flag: dict[str, Any]) -> None:
        self.flag = flag
        self.auth_headers: list[str | None] = []
        self.streams: list[web.StreamResponse] = []

    async def stream_all(self, request: web.Request) -> web.StreamResponse:
        self.auth_headers.append(request.headers.get("Authorization"))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        put = {"path": "/", "data": {"flags": {self.flag["key"]: self.flag}, "segments": {}}}
        await response.write(f"event: put\ndata: {json.dumps(put)}\n\n".encode())
        self.streams.append(response)
        try:
            while True:
                await asyncio.sleep(0.5)
                await response.write(b":\n\n")  # SSE comment: keep-alive
        except (ConnectionError, asyncio.CancelledError):
            pass
        return response

    async def patch(self, flag: dict[str, Any]) -> None:
        self.flag = flag
        event = json.dumps({"path": f"/flags/{flag['key']}", "data": flag})
        for stream in self.streams:
            await stream.write(f"event: patch\ndata: {event}\n\n".encode())

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/all", self.stream_all)
        return app


def _target(flag: dict[str, Any], tenant: str, variation: int) -> dict[str, Any]:
    flag = json.loads(json.dumps(flag))
    for target in flag["contextTargets"]:
        if target["variation"] == variation:
            target["values"].append(tenant)
    flag["version"] += 1
    return flag


async def test_launchdarkly_stream_source_routes_and_follows_patches(
    backends: Backends, start_router: StartRouter, aiohttp_server: Any, tmp_path: Path
) -> None:
    flag = _target(new_flag(), "globex", variation=2)  # globex -> new
    fake = FakeLaunchDarkly(flag)
    server = await aiohttp_server(fake.app())
    base = f"http://127.0.0.1:{server.port}"
    settings = router_settings(
        backends.url("legacy"),
        backends.url("new"),
        None,
        flags={
            "source": "launchdarkly",
            "sdk_key": "sdk-test-key",
            "stream_uri": base,
            "base_uri": base,
            "events_uri": base,
            "send_events": False,
        },
    )
    router = await start_router(settings)
    assert fake.auth_headers == ["sdk-test-key"]

    async with aiohttp.ClientSession() as client:

        async def side(tenant: str) -> str:
            async with client.get(f"{router.url}/", headers={"X-Tenant-Id": tenant}) as r:
                assert r.status == 200
                body = await r.json()
                return str(body["side"])

        assert await side("globex") == "new"
        assert await side("acme") == "legacy"

        # A patch moves acme to new: the next requests follow, without a restart.
        started = time.monotonic()
        await fake.patch(_target(fake.flag, "acme", variation=2))
        while await side("acme") != "new":
            assert time.monotonic() - started < 2.0, "flag patch not applied within 2 s"
            await asyncio.sleep(0.02)
        assert router.app.flags.updates >= 1
