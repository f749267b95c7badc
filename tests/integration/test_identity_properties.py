"""Property (hypothesis): whatever tenant ids a request carries in its header, JWT, host
and path, if two of them differ, not a byte reaches either backend and the answer is 400
tenant_mismatch. Checked at the backends (raw sockets counting connections), against one
in-process router on its own event loop thread, so that hypothesis (synchronous) can send
a real request per example; modest example counts keep it to a few seconds.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.control.flagfile import set_tenants
from router.service.app import RouterApp
from tests.conftest import RawResponse, raw_request, router_settings
from tests.integration.test_identity import unsigned_jwt

T = TypeVar("T")


@dataclass
class Live:
    loop: asyncio.AbstractEventLoop
    port: int
    connections: dict[str, int]
    requests: dict[str, int]

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    connections = {"legacy": 0, "new": 0}
    requests = {"legacy": 0, "new": 0}
    tmp = Path(tempfile.mkdtemp(prefix="identity-props-"))
    flags = tmp / "flags.json"
    set_tenants(flags, ["globex"], "new", create=True)

    def upstream(side: str) -> Any:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections[side] += 1
            try:
                while await reader.readuntil(b"\r\n\r\n"):
                    requests[side] += 1
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    await writer.drain()
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        return serve

    async def setup() -> tuple[RouterApp, Any, list[asyncio.Server]]:
        servers = [
            await asyncio.start_server(upstream(s), "127.0.0.1", 0) for s in ("legacy", "new")
        ]
        urls = [f"http://127.0.0.1:{s.sockets[0].getsockname()[1]}" for s in servers]
        app = RouterApp(router_settings(urls[0], urls[1], flags), asyncio.get_running_loop())
        proxy = app.proxy_server()
        listener = await asyncio.get_running_loop().create_server(proxy, "127.0.0.1", 0)
        await app.ledger.start()
        await app.flags.start(wait=5.0)
        assert app.flags.ready
        return app, (proxy, listener), servers

    app, (proxy, listener), servers = asyncio.run_coroutine_threadsafe(setup(), loop).result(20)
    yield Live(loop, listener.sockets[0].getsockname()[1], connections, requests)

    async def teardown() -> None:
        listener.close()
        await proxy.shutdown(0.5)
        await app.close()
        for server in servers:
            server.close()
            await server.wait_closed()

    asyncio.run_coroutine_threadsafe(teardown(), loop).result(20)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


tenant_ids = st.from_regex(r"[a-z0-9][a-z0-9-]{0,11}", fullmatch=True)
SOURCES = ("header", "jwt", "host", "path")


def build(values: dict[str, str]) -> bytes:
    path = f"/t/{values['path']}/x" if "path" in values else "/x"
    host = f"{values['host']}.tenants.test" if "host" in values else "plain.example"
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
    if "header" in values:
        lines.append(f"X-Tenant-Id: {values['header']}")
    if "jwt" in values:
        lines.append(f"Authorization: Bearer {unsigned_jwt({'iss': values['jwt']})}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@st.composite
def disagreeing(draw: st.DrawFn) -> dict[str, str]:
    present = draw(st.lists(st.sampled_from(SOURCES), min_size=2, max_size=4, unique=True))
    values = {source: draw(tenant_ids) for source in present}
    # At least two present sources differ.
    first, second = present[0], present[1]
    if values[first] == values[second]:
        values[second] = values[second] + "x"
    return values


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(values=disagreeing())
def test_disagreeing_sources_never_reach_a_backend(live: Live, values: dict[str, str]) -> None:
    response: RawResponse = live.run(raw_request(live.port, build(values)))
    assert response.status == 400, (values, response)
    assert response.json()["error"] == "tenant_mismatch"
    assert live.connections == {"legacy": 0, "new": 0}, values


def test_agreeing_sources_do_reach_the_backend(live: Live) -> None:
    """The control: the same setup does forward when the sources agree (run after the
    property, so its connection counts stay at zero for it)."""
    values = dict.fromkeys(SOURCES, "globex")
    response: RawResponse = live.run(raw_request(live.port, build(values)))
    assert response.status == 200, response
    assert live.requests == {"legacy": 0, "new": 1}
