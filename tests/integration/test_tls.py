"""TLS upstreams, with certificates made on the fly by trustme.

Verification is on by default (system CAs, or `ca_file`), SNI and the certificate check
use the upstream's host name, and TLS connections are pooled like plain ones. A TLS
failure is a connect failure (502), before anything was sent; once a response head has
gone out, a TLS upstream failing mid-body aborts the client like a plain one.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import (
    Backends,
    RawHandler,
    RawResponse,
    RunningRouter,
    StartRouter,
    raw_request,
    read_http_request,
    router_settings,
    sample,
)

pytestmark = pytest.mark.usefixtures("no_error_logs")

GET = b"GET /tls HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"


@dataclass
class Pki:
    ca: trustme.CA
    ca_file: Path
    server_context: ssl.SSLContext


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = trustme.CA()
    ca_file = tmp_path_factory.mktemp("pki") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)  # localhost only: no IP address
    return Pki(ca, ca_file, context)


@dataclass
class Seen:
    """What the TLS backend saw of each request."""

    peers: list[tuple[str, int]] = field(default_factory=list)  # one per request
    hosts: list[str] = field(default_factory=list)  # one per request
    sni: list[str | None] = field(default_factory=list)  # one per TLS handshake


@pytest.fixture
async def tls_backend(aiohttp_server: Any, pki: Pki) -> tuple[TestServer, Seen]:
    seen = Seen()

    def on_sni(_: ssl.SSLObject, name: str | None, __: ssl.SSLContext) -> None:
        # Server side, the name a client asked for is only visible here: the server's
        # SSLObject.server_hostname is always None.
        seen.sni.append(name)

    pki.server_context.sni_callback = on_sni

    async def handler(request: web.Request) -> web.Response:
        transport = request.transport
        assert transport is not None
        seen.peers.append(transport.get_extra_info("peername")[:2])
        seen.hosts.append(request.headers["Host"])
        return web.Response(text="secure", headers={"X-Backend-Side": "tls"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = await aiohttp_server(app, ssl=pki.server_context)
    return server, seen


async def tls_router(
    start_router: StartRouter, flag_file: Path, backends: Backends, url: str, **legacy: Any
) -> RunningRouter:
    """Every tenant but globex goes to `url` (the legacy side)."""
    settings = router_settings(
        url, backends.url("new"), flag_file, upstreams__legacy={"url": url, **legacy}
    )
    return await start_router(settings)


def assert_error(response: RawResponse, status: int, code: str) -> dict[str, Any]:
    assert response.status == status, response
    body = response.json()
    assert body["error"] == code, body
    assert body["request_id"] == response.headers["x-request-id"]
    return body


# ---- verification, SNI, Host, pooling ---------------------------------------------------


async def test_verified_with_ca_file_and_pooled(
    start_router: StartRouter, flag_file: Path, backends: Backends, pki: Pki,
    tls_backend: tuple[TestServer, Seen],
) -> None:  # fmt: skip
    server, seen = tls_backend
    url = f"https://localhost:{server.port}"
    router = await tls_router(start_router, flag_file, backends, url, ca_file=str(pki.ca_file))
    for _ in range(3):
        response = await raw_request(router.port, GET)
        assert (response.status, response.body) == (200, b"secure")
    assert len(seen.peers) == 3
    assert len(set(seen.peers)) == 1  # one TLS connection, reused
    assert seen.sni == ["localhost"]  # one handshake; SNI: the upstream's host name
    assert seen.hosts == ["app.test"] * 3  # host_header: preserve (the default)
    pool = router.app.pools["legacy"]
    assert pool.idle_count == 1


async def test_host_header_upstream(
    start_router: StartRouter, flag_file: Path, backends: Backends, pki: Pki,
    tls_backend: tuple[TestServer, Seen],
) -> None:  # fmt: skip
    server, seen = tls_backend
    url = f"https://localhost:{server.port}"
    router = await tls_router(
        start_router, flag_file, backends, url, ca_file=str(pki.ca_file), host_header="upstream"
    )
    assert (await raw_request(router.port, GET)).status == 200
    assert seen.hosts == [f"localhost:{server.port}"]


async def test_unknown_ca_is_a_connect_failure(
    start_router: StartRouter, flag_file: Path, backends: Backends,
    tls_backend: tuple[TestServer, Seen],
) -> None:  # fmt: skip
    """No ca_file: the system CAs, which do not know the trustme CA."""
    server, seen = tls_backend
    router = await tls_router(start_router, flag_file, backends, f"https://localhost:{server.port}")
    body = assert_error(await raw_request(router.port, GET), 502, "upstream_connect_failed")
    assert "certificate verify failed" in body["detail"]
    assert seen.peers == []  # no request went over an unverified connection
    assert router.app.pools["legacy"].active_count == 0
    other_side = GET.replace(b"\r\n\r\n", b"\r\nX-Tenant-Id: globex\r\n\r\n")
    assert (await raw_request(router.port, other_side)).status == 200  # the router is fine


async def test_host_name_mismatch_is_a_connect_failure(
    start_router: StartRouter, flag_file: Path, backends: Backends, pki: Pki,
    tls_backend: tuple[TestServer, Seen],
) -> None:  # fmt: skip
    """A trusted certificate for another name (localhost, reached as 127.0.0.1)."""
    server, seen = tls_backend
    url = f"https://127.0.0.1:{server.port}"
    router = await tls_router(start_router, flag_file, backends, url, ca_file=str(pki.ca_file))
    body = assert_error(await raw_request(router.port, GET), 502, "upstream_connect_failed")
    assert "127.0.0.1" in body["detail"]
    assert seen.peers == []


async def test_verify_tls_off(
    start_router: StartRouter, flag_file: Path, backends: Backends,
    tls_backend: tuple[TestServer, Seen],
) -> None:  # fmt: skip
    server, seen = tls_backend
    url = f"https://localhost:{server.port}"
    router = await tls_router(start_router, flag_file, backends, url, verify_tls=False)
    for _ in range(2):
        assert (await raw_request(router.port, GET)).status == 200
    assert len(set(seen.peers)) == 1
    assert seen.sni == ["localhost"]  # SNI is sent even without verification


async def test_tls_to_a_plain_http_port(
    start_router: StartRouter, flag_file: Path, backends: Backends
) -> None:
    url = f"https://localhost:{backends.legacy.port}"
    router = await tls_router(start_router, flag_file, backends, url)
    assert_error(await raw_request(router.port, GET), 502, "upstream_connect_failed")


# ---- failures of a raw TLS upstream ----------------------------------------------------


@pytest.fixture
async def tls_upstream(pki: Pki) -> AsyncIterator[Callable[[RawHandler], Awaitable[int]]]:
    """Raw TLS servers (misbehaving on purpose); yields a starter returning the port."""
    servers: list[asyncio.Server] = []

    async def start(handler: RawHandler, handshake: bool = True) -> int:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(
            on_connect, "127.0.0.1", 0, ssl=pki.server_context if handshake else None
        )
        servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def test_tls_handshake_timeout_is_a_connect_timeout(
    start_router: StartRouter, flag_file: Path, backends: Backends, pki: Pki,
    tls_upstream: Callable[..., Awaitable[int]],
) -> None:  # fmt: skip
    """Accepts TCP, never answers the ClientHello: bounded by connect_timeout."""

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    port = await tls_upstream(mute, handshake=False)
    router = await tls_router(
        start_router, flag_file, backends, f"https://localhost:{port}",
        ca_file=str(pki.ca_file), connect_timeout=0.3,
    )  # fmt: skip
    assert_error(await raw_request(router.port, GET), 504, "upstream_timeout")


async def test_tls_upstream_closing_mid_body_aborts_the_client(
    start_router: StartRouter, flag_file: Path, backends: Backends, pki: Pki,
    tls_upstream: Callable[..., Awaitable[int]],
) -> None:  # fmt: skip
    async def truncated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_http_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"t" * 1000)
        await writer.drain()
        writer.close()  # a TLS close_notify, then FIN: still short of Content-Length

    port = await tls_upstream(truncated)
    router = await tls_router(
        start_router, flag_file, backends, f"https://localhost:{port}", ca_file=str(pki.ca_file)
    )
    response = await raw_request(router.port, GET)
    assert response.status == 200 and response.headers["content-length"] == "100000"
    assert not response.complete and response.ended in ("eof", "reset")
    errors = sample(router, "router_upstream_errors_total", target="legacy", code="upstream_reset")
    assert errors == 1
    assert router.app.pools["legacy"].idle_count == 0


async def test_tls_upstream_silent_after_request_times_out(
    start_router: StartRouter, flag_file: Path, backends: Backends, pki: Pki,
    tls_upstream: Callable[..., Awaitable[int]],
) -> None:  # fmt: skip
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_http_request(reader)
        await reader.read()

    port = await tls_upstream(silent)
    router = await tls_router(
        start_router, flag_file, backends, f"https://localhost:{port}",
        ca_file=str(pki.ca_file), response_header_timeout=0.3,
    )  # fmt: skip
    assert_error(await raw_request(router.port, GET), 504, "upstream_timeout")
    pool = router.app.pools["legacy"]
    assert pool.idle_count + pool.active_count == 0
