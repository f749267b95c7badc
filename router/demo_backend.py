"""A demo/test backend: answers every request with a JSON description of what it received.

    python -m router.demo_backend --side legacy --port 9001 [--host 127.0.0.1]

Any method, any path: `{"side", "method", "path", "query", "http_version", "headers",
"raw_headers", "body_bytes", "body_sha256"}` with `X-Backend-Side: <side>`. `path` and
`query` are exactly as they arrived (not percent-decoded), so a test can check that the
router forwards them untouched. `headers` maps lower-cased names to values (repeats
joined with ", "); `raw_headers` is the list of `[name, value]` pairs in arrival order and
case. The request body is hashed as it streams in and never held whole.

Endpoints under `/__demo/` (GET), for tests and demos:
    /__demo/bytes/{n}      n bytes of b"x", chunked, written in 64 KiB chunks from one
                           precomputed buffer (`?framing=length` sends Content-Length instead)
    /__demo/status/{code}  answers with that status (200-599)
    /__demo/slow/{seconds} sleeps, then answers like any other request
    /__demo/redirect       302 with `Location: /elsewhere`

`--port 0` picks a free port. The one line printed on stdout once the socket is listening
is JSON (`{"event": "listening", "side", "host", "port", "pid"}`), so a test can read the
real port from it. Logs (access and server errors) are off unless `--log` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from aiohttp import web

SIDE = web.AppKey("side", str)
CHUNK_SIZE = 64 * 1024
_CHUNK = memoryview(b"x" * CHUNK_SIZE)  # every /__demo/bytes response reuses this buffer
MAX_SLEEP = 3600.0
MAX_BYTES = 1 << 40


def _headers(request: web.Request) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


async def echo(request: web.Request) -> web.Response:
    digest = hashlib.sha256()
    size = 0
    async for data in request.content.iter_any():
        digest.update(data)
        size += len(data)
    path, _, query = request.raw_path.partition("?")
    return web.json_response(
        {
            "side": request.app[SIDE],
            "method": request.method,
            "path": path,
            "query": query,
            "http_version": f"{request.version.major}.{request.version.minor}",
            "headers": _headers(request),
            "raw_headers": [
                [name.decode("latin-1"), value.decode("latin-1")]
                for name, value in request.raw_headers
            ],
            "body_bytes": size,
            "body_sha256": digest.hexdigest(),
        }
    )


def _int_arg(request: web.Request, name: str, low: int, high: int) -> int:
    raw = request.match_info[name]
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise web.HTTPBadRequest(text=f"{name} must be an integer in [{low}, {high}]\n")
    return int(raw)


async def demo_bytes(request: web.Request) -> web.StreamResponse:
    remaining = _int_arg(request, "n", 0, MAX_BYTES)
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    if request.query.get("framing") == "length":
        response.content_length = remaining
    else:
        response.enable_chunked_encoding()
    await response.prepare(request)
    while remaining > 0:
        step = min(remaining, CHUNK_SIZE)
        await response.write(_CHUNK[:step])
        remaining -= step
    await response.write_eof()
    return response


async def demo_status(request: web.Request) -> web.Response:
    code = _int_arg(request, "code", 200, 599)
    if code in (204, 304):
        return web.Response(status=code)
    return web.json_response({"side": request.app[SIDE], "status": code}, status=code)


async def demo_slow(request: web.Request) -> web.Response:
    try:
        seconds = float(request.match_info["seconds"])
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= MAX_SLEEP:
        raise web.HTTPBadRequest(text=f"seconds must be a number in [0, {MAX_SLEEP}]\n")
    await asyncio.sleep(seconds)
    return await echo(request)


async def demo_redirect(request: web.Request) -> web.Response:
    return web.Response(status=302, headers={"Location": "/elsewhere"})


async def _tag_side(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["X-Backend-Side"] = request.app[SIDE]


def make_app(side: str) -> web.Application:
    app = web.Application()
    app[SIDE] = side
    app.on_response_prepare.append(_tag_side)
    app.router.add_get("/__demo/bytes/{n}", demo_bytes)
    app.router.add_get("/__demo/status/{code}", demo_status)
    app.router.add_get("/__demo/slow/{seconds}", demo_slow)
    app.router.add_get("/__demo/redirect", demo_redirect)
    app.router.add_route("*", "/{tail:.*}", echo)  # last: everything else is echoed
    return app


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=1024)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but stay runnable
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m router.demo_backend", description=__doc__)
    parser.add_argument("--side", required=True, help="name reported in answers, e.g. legacy")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port")
    parser.add_argument(
        "--log", action="store_true", help="log each request, and server errors, to stderr"
    )
    args = parser.parse_args(argv)

    sock = _listen(args.host, args.port)
    started: dict[str, Any] = {
        "event": "listening",
        "side": args.side,
        "host": args.host,
        "port": sock.getsockname()[1],
        "pid": os.getpid(),
    }

    def announce(*_: object) -> None:
        print(json.dumps(started), flush=True)

    access_log = None
    if args.log:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
        access_log = logging.getLogger("aiohttp.access")
    else:
        # Quiet by default: a client (the router) hanging up mid-body is routine in tests.
        logging.getLogger("aiohttp").setLevel(logging.CRITICAL + 1)
    web.run_app(
        make_app(args.side),
        sock=sock,
        print=announce,
        access_log=access_log,
        # Idle keep-alive connections are kept 75 s (aiohttp's default), well above the
        # router's upstream idle_timeout, as a real backend's would be.
        keepalive_timeout=75.0,
        shutdown_timeout=2.0,  # Ctrl-C in `make run` should not wait on a /__demo/slow call
        # Generous limits: the backend must never be what rejects a large request head.
        max_line_size=65536,
        max_field_size=65536,
        max_headers=1024,
        loop=_new_loop(),
    )


if __name__ == "__main__":
    main()
