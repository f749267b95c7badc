"""Shared fixtures: real upstream servers on loopback, a flag file, and a running router.

Nothing here is mocked: backends are aiohttp servers (or raw asyncio socket servers for
upstreams that misbehave on purpose), flags come from the LaunchDarkly SDK's own file
data source, and the router listens on a real socket.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
from aiohttp import web
from aiohttp.test_utils import TestServer

from router.control.flagfile import new_flag, set_tenants
from router.service.admin import build_admin_app
from router.service.app import RouterApp
from router.service.native import StaleBuild, build_state, check_fresh
from router.settings import Settings
from tests.support.flag_files import FLAG, write_json
from tests.support.net import free_port
from tests.support.paths import REPO
from tests.support.redis_server import RedisServer, start_redis

# ---- the build under test -----------------------------------------------------------


def pytest_report_header(config: pytest.Config) -> str:
    return f"router: {build_state().describe}"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Test what ships: never a compiled build older than its sources (it would shadow
    them), and under CI the compiled one (`make test` builds it first)."""
    try:
        state = check_fresh()
    except StaleBuild as exc:
        pytest.exit(str(exc), returncode=pytest.ExitCode.USAGE_ERROR)
    if not state.compiled and os.environ.get("CI") == "true":
        pytest.exit(
            "CI=true: the tests must run the compiled hot path; `make test` builds it"
            " (make compile)",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )


# ---- event loops --------------------------------------------------------------------

# The router serves on uvloop (server.py). Its error paths hang on transport behaviour
# (EOF, abort, paused reading, TLS) that uvloop implements apart from asyncio, so the
# error-path modules and the fast path's own duties (test_fastpath.py) run every test on
# both loops; the others keep the default loop.
_BOTH_LOOPS = frozenset(
    {"test_upstream_errors.py", "test_client_errors.py", "test_tls.py", "test_fastpath.py"}
)


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    if item.path.name in _BOTH_LOOPS:
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"default": asyncio.new_event_loop}  # one factory: test ids stay as they were


# ---- backends ------------------------------------------------------------------------

_CHUNK = b"x" * 65536


def make_backend(side: str) -> web.Application:
    """An upstream that says which side it is and exactly what it received."""

    async def echo(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        body = {
            "side": side,
            "method": request.method,
            "target": request.raw_path,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
            "body_bytes": size,
            "body_sha256": digest.hexdigest(),
            "chunked": "chunked" in request.headers.get("Transfer-Encoding", ""),
        }
        return web.json_response(body, headers={"X-Backend-Side": side})

    async def stream_bytes(request: web.Request) -> web.StreamResponse:
        size = int(request.match_info["n"])
        response = web.StreamResponse(headers={"X-Backend-Side": side})
        if request.query.get("framing") == "length":
            response.content_length = size
        else:
            response.enable_chunked_encoding()
        await response.prepare(request)
        remaining = size
        while remaining > 0:
            chunk = _CHUNK if remaining >= len(_CHUNK) else _CHUNK[:remaining]
            await response.write(chunk)
            remaining -= len(chunk)
        await response.write_eof()
        return response

    async def status(request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        headers = {"X-Backend-Side": side, "ETag": '"v1"'}
        if code in (204, 304):
            return web.Response(status=code, headers=headers)
        return web.Response(status=code, text=f"status {code}", headers=headers)

    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "/elsewhere", "X-Backend-Side": side})

    async def gzipped(request: web.Request) -> web.Response:
        import gzip

        payload = gzip.compress(b"hello compressed world" * 100)
        return web.Response(
            body=payload,
            headers={
                "Content-Encoding": "gzip",
                "Content-Type": "text/plain",
                "X-Backend-Side": side,
            },
        )

    async def hop_by_hop(request: web.Request) -> web.Response:
        return web.Response(
            text="hop",
            headers={
                "Connection": "X-Secret-Hop",
                "X-Secret-Hop": "must-not-pass",
                "Keep-Alive": "timeout=5",
                "Proxy-Connection": "keep-alive",
                "Upgrade": "h2c",
                "X-End-To-End": "kept",
                "X-Backend-Side": side,
            },
        )

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.match_info["seconds"]))
        return web.Response(text="slow", headers={"X-Backend-Side": side})

    app = web.Application(client_max_size=1 << 40)
    app.router.add_route("*", "/__bytes/{n}", stream_bytes)
    app.router.add_route("*", "/__status/{code}", status)
    app.router.add_get("/__redirect", redirect)
    app.router.add_get("/__gzip", gzipped)
    app.router.add_get("/__hop", hop_by_hop)
    app.router.add_get("/__slow/{seconds}", slow)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


@dataclass
class Backends:
    legacy: TestServer
    new: TestServer

    def url(self, side: str) -> str:
        server = self.legacy if side == "legacy" else self.new
        return f"http://127.0.0.1:{server.port}"


@pytest.fixture
async def backends(aiohttp_server: Any) -> Backends:
    # auto_decompress=False: the backends must report the bytes they were sent.
    legacy = await aiohttp_server(make_backend("legacy"), auto_decompress=False)
    new = await aiohttp_server(make_backend("new"), auto_decompress=False)
    return Backends(legacy, new)


# ---- raw upstreams that misbehave ----------------------------------------------------

RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class RawUpstream:
    port: int
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def read_request_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[RawHandler], Awaitable[RawUpstream]]]:
    servers: list[asyncio.Server] = []
    writers: list[asyncio.StreamWriter] = []

    async def start(handler: RawHandler) -> RawUpstream:
        upstream = RawUpstream(port=0)

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            upstream.connections += 1
            writers.append(writer)
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        servers.append(server)
        upstream.port = server.sockets[0].getsockname()[1]
        return upstream

    yield start
    for writer in writers:
        writer.close()
    for server in servers:
        server.close()
        await server.wait_closed()


def refused_url() -> str:
    """A loopback URL nothing listens on (bound then closed: connect is refused)."""
    return f"http://127.0.0.1:{free_port()}"


# ---- flags ---------------------------------------------------------------------------


@pytest.fixture
def flag_file(tmp_path: Path) -> Path:
    """acme -> legacy, globex -> new, everyone else legacy (fallthrough)."""
    path = tmp_path / "flags.json"
    set_tenants(path, ["acme"], "legacy", create=True)
    set_tenants(path, ["globex"], "new")
    return path


@pytest.fixture
def flag_path(tmp_path: Path) -> Path:
    """A flags file holding the routing flag alone, no tenant targeted."""
    path = tmp_path / "flags.json"
    write_json(path, {"flags": {FLAG: new_flag()}})
    return path


# ---- the router ----------------------------------------------------------------------


ADMIN_TOKEN = "test-admin-token"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def router_settings(
    legacy_url: str, new_url: str, flag_file: Path | None, **overrides: Any
) -> Settings:
    tree: dict[str, Any] = {
        "server": {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "debug_headers": True},
        "tenant": {
            "extractors": [
                {"type": "header", "name": "X-Tenant-Id"},
                {"type": "jwt", "claim": "iss"},
                {"type": "host", "pattern": "{tenant}.tenants.test"},
                {"type": "path", "pattern": "/t/{tenant}/"},
            ]
        },
        "flags": {
            "source": "file",
            "file": str(flag_file) if flag_file else None,
            "poll_interval": 0.1,
        },
        "upstreams": {"legacy": {"url": legacy_url}, "new": {"url": new_url}},
        "access_log": {"enabled": False},
        # Each router its own ledger, in the test's tmp dir: never the repo's cwd, and no
        # ratchet carried from one test to the next.
        "ledger": f"sqlite:///{Path(tempfile.mkdtemp(prefix='router-ledger-')) / 'ledger.db'}",
        "admin_token": ADMIN_TOKEN,
    }
    for dotted, value in overrides.items():
        node = tree
        *parents, last = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return Settings.model_validate(tree)


@dataclass
class RunningRouter:
    app: RouterApp
    port: int
    admin_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


StartRouter = Callable[..., Awaitable[RunningRouter]]


@pytest.fixture
async def start_router() -> AsyncIterator[StartRouter]:
    """Start routers in-process on free ports; each waits for flag data unless told not to."""
    cleanups: list[Callable[[], Awaitable[None]]] = []

    async def start(settings: Settings, wait_ready: bool = True) -> RunningRouter:
        loop = asyncio.get_running_loop()
        app = RouterApp(settings, loop)
        proxy = app.proxy_server()
        listener = await loop.create_server(proxy, "127.0.0.1", 0)
        admin = web.AppRunner(build_admin_app(app), access_log=None)
        await admin.setup()
        site = web.TCPSite(admin, "127.0.0.1", 0)
        await site.start()
        admin_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

        async def cleanup() -> None:
            listener.close()
            await proxy.shutdown(0.5)
            await admin.cleanup()
            await app.close()

        cleanups.append(cleanup)
        await app.ledger.start()
        await app.flags.start(wait=5.0 if wait_ready else 0.0)
        if wait_ready:
            assert app.flags.ready, "flag data did not load"
        return RunningRouter(app, listener.sockets[0].getsockname()[1], admin_port)

    yield start
    for cleanup in reversed(cleanups):
        await cleanup()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    # auto_decompress=False: tests must see exactly the bytes the router relayed.
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


@pytest.fixture
async def router(backends: Backends, flag_file: Path, start_router: StartRouter) -> RunningRouter:
    return await start_router(
        router_settings(backends.url("legacy"), backends.url("new"), flag_file)
    )


def echo_headers(body: dict[str, Any]) -> dict[str, list[str]]:
    """Headers the echo backend received, lower-cased name -> values in order."""
    seen: dict[str, list[str]] = {}
    for name, value in body["headers"]:
        seen.setdefault(name.lower(), []).append(value)
    return seen


async def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes to the router, read until it closes (or the timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        chunks = []
        try:
            async with asyncio.timeout(timeout):
                while chunk := await reader.read(65536):
                    chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)
    finally:
        writer.close()


def parse_json_body(raw: bytes) -> dict[str, Any]:
    _, _, body = raw.partition(b"\r\n\r\n")
    result: dict[str, Any] = json.loads(body)
    return result


# ---- raw HTTP at both ends (error-path tests) ----------------------------------------


@dataclass
class RawResponse:
    """What a raw-socket client saw: the head, the body bytes as sent, and how it ended."""

    status: int
    headers: dict[str, str]  # lower-cased names, last value wins
    body: bytes  # as on the wire (chunked framing included)
    ended: str  # "eof", "reset" or "timeout"

    @property
    def complete(self) -> bool:
        """Whether the body is a complete message per its own framing."""
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            return self.body.endswith(b"0\r\n\r\n")
        if "content-length" in self.headers:
            return len(self.body) == int(self.headers["content-length"])
        return self.ended == "eof"

    def json(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.body)
        return result


async def raw_request(port: int, data: bytes, timeout: float = 5.0) -> RawResponse:
    """Send raw bytes to the router; read one response until EOF, reset or the timeout.

    Bytes are kept as they arrive, so a reset after part of a body still shows that part.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = bytearray()
    ended = "timeout"
    try:
        writer.write(data)
        await writer.drain()
        try:
            async with asyncio.timeout(timeout):
                while chunk := await reader.read(65536):
                    received += chunk
                ended = "eof"
        except ConnectionResetError:
            ended = "reset"
        except TimeoutError:
            pass
    finally:
        writer.close()
    head, sep, body = bytes(received).partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {bytes(received[:200])!r}"
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return RawResponse(int(status_line.split(" ")[1]), headers, body, ended)


async def read_http_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request off an upstream socket: its head and its (de-chunked) body."""
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    if b"\r\ntransfer-encoding: chunked\r\n" in lower:
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            body += await reader.readexactly(size + 2)
            if size == 0:
                return head, bytes(body[:-2])
            del body[-2:]
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return head, await reader.readexactly(int(line.split(b":")[1]))
    return head, b""


def http_response(body: bytes = b"ok", *headers: bytes) -> bytes:
    """A complete keep-alive 200 with a Content-Length body."""
    extra = b"".join(h + b"\r\n" for h in headers)
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def serve_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A well-behaved keep-alive upstream: answers every request on the connection."""
    while True:
        try:
            await read_http_request(reader)
        except asyncio.IncompleteReadError:
            return
        writer.write(http_response())
        await writer.drain()


def sample(router: RunningRouter, name: str, **labels: str) -> float:
    """A metric's current value on the router's own registry (0 when never set)."""
    value = router.app.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


@pytest.fixture
def no_error_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail a test whose failures were handled but still logged as errors (or as asyncio's
    "exception was never retrieved"): an expected upstream or client failure is a metric
    and an access-log field, not an error log with a traceback."""
    yield
    records = [*caplog.get_records("setup"), *caplog.get_records("call"), *caplog.records]
    errors = [r for r in records if r.levelno >= logging.ERROR]
    assert not errors, [f"{r.name}: {r.getMessage()}" for r in errors]


@pytest.fixture(scope="session", autouse=True)
def tests_leave_no_ledger_in_the_repo() -> Iterator[None]:
    """The default ledger (sqlite:///router-ledger.db) is relative to the working
    directory: a test that forgot to point it at its tmp dir would share ratchet state with
    every later test and with `make run`. Fail the session if one did."""
    stray = REPO / "router-ledger.db"
    existed = stray.exists()
    yield
    assert existed or not stray.exists(), "a test wrote router-ledger.db into the repo"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session (tests/support/redis_server.py)."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


async def recording_upstream(
    raw_upstream: Callable[[RawHandler], Awaitable[RawUpstream]],
) -> RawUpstream:
    """An upstream that records every request head it is sent (`requests`) and answers
    200 ok: what tests check "never forwarded" against."""
    server: RawUpstream | None = None

    async def recording(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head, _ = await read_http_request(reader)
            except asyncio.IncompleteReadError:
                return
            assert server is not None
            server.requests.append(head)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    server = await raw_upstream(recording)
    return server
