"""The router's forwarding core alone: aiohttp's low-level server, the router's upstream
pool and relay (router/upstream.py, router/relay.py), and none of the per-request features.

    python loadtests/bare_proxy.py PORT UPSTREAM_URL

No tenant, no decision, no header rules beyond the framing, no metrics, no access log,
no request id: the request line, Host and Content-Length go upstream, the answer comes
back through the same `Exchange` the router uses. Its place on the bench's ladder
(aiohttp_alone > bare_proxy > router) splits the router's cost per request into the
aiohttp front plus a second pair of socket calls (aiohttp_alone -> bare_proxy) and the
features (bare_proxy -> router).
"""

from __future__ import annotations

import asyncio
import sys

import uvloop
from aiohttp import web
from common import until_stopped

from router.relay import RELAYED_CLOSE, RELAYED_KEEP_ALIVE, Exchange, encode_response_head
from router.settings import UpstreamSettings
from router.upstream import UpstreamPool


async def serve(port: int, upstream_url: str) -> None:
    loop = asyncio.get_running_loop()
    pool = UpstreamPool("upstream", UpstreamSettings(url=upstream_url), loop)

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        has_body = request.body_exists
        chunked = has_body and request.content_length is None
        framing = (
            (b"Transfer-Encoding: chunked\r\n" if chunked else b"Content-Length: %d\r\n"
             % (request.content_length or 0))
            if has_body
            else b""
        )  # fmt: skip
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (
            request.method.encode(), request.raw_path.encode(), pool.authority, framing
        )  # fmt: skip
        exchange = Exchange()
        try:
            upstream = await exchange.send(request, pool, head, has_body, chunked)
            response_head, body_framing, keep_alive = encode_response_head(
                upstream, "-", None, request.method == "HEAD", 1, request.keep_alive
            )
            await exchange.relay(request, response_head, body_framing, pool.read_timeout)
        finally:
            exchange.finish(pool)
        return RELAYED_KEEP_ALIVE if keep_alive else RELAYED_CLOSE

    server = web.Server(handler, access_log=None, auto_decompress=False)
    listener = await loop.create_server(server, "127.0.0.1", port, backlog=4096)
    await until_stopped()
    listener.close()
    await pool.close()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), sys.argv[2]))
