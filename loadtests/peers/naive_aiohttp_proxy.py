"""Peer baseline for benchmarks: the plainest honest streaming aiohttp reverse proxy.

This is what most teams write first: aiohttp server + one pooled aiohttp ClientSession,
streaming both bodies. The router's benchmark reports its throughput as a ratio to this.
It is a measuring stick, not part of the product; do not import it from router/.

    python naive_aiohttp_proxy.py LISTEN_PORT UPSTREAM_URL
    e.g. python naive_aiohttp_proxy.py 18090 http://127.0.0.1:19001
"""

import sys

import aiohttp
import uvloop
from aiohttp import web

UPSTREAM = sys.argv[2].rstrip("/")
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}


async def handler(request: web.Request) -> web.StreamResponse:
    session: aiohttp.ClientSession = request.app["session"]
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
    async with session.request(
        request.method,
        UPSTREAM + request.path_qs,
        headers=headers,
        data=request.content if request.body_exists else None,
        allow_redirects=False,
    ) as upstream:
        response = web.StreamResponse(
            status=upstream.status,
            headers={k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP},
        )
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def make_app() -> web.Application:
    app = web.Application()

    async def session_ctx(app: web.Application):
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
        app["session"] = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        yield
        await app["session"].close()

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


if __name__ == "__main__":
    uvloop.install()
    web.run_app(make_app(), host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
