"""The router's forwarding core alone: its front (router/proxy/connection.py), its upstream pool and
relay (router/proxy/upstream.py, router/proxy/relay.py), and none of the per-request features.

    python loadtests/bare_proxy.py PORT UPSTREAM_URL

No tenant, no decision, no header rules beyond the framing, no metrics, no access log,
no request id: the request line, Host and Content-Length go upstream, the answer comes
back through the same `Exchange` the router uses. Its place on the bench's ladder
(aiohttp_alone, bare_proxy, router) splits the router's cost per request into the front
plus a second pair of socket calls (bare_proxy) and the features (bare_proxy -> router).
"""

from __future__ import annotations

import asyncio
import sys

import uvloop
from common import until_stopped

from router.errors import RouterError
from router.proxy.connection import (
    RELAYED_CLOSE,
    RELAYED_KEEP_ALIVE,
    FrontServer,
    LocalReply,
    Reply,
    Request,
    local_reply,
)
from router.proxy.relay import Exchange, encode_response_head
from router.proxy.upstream import UpstreamPool
from router.settings import UpstreamSettings


class BareHandler:
    """A FrontHandler with nothing but the forwarding."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool

    async def __call__(self, request: Request) -> Reply:
        pool = self.pool
        has_body = request.body_exists
        chunked = has_body and request.content_length is None
        framing = (
            (b"Transfer-Encoding: chunked\r\n" if chunked else b"Content-Length: %d\r\n"
             % (request.content_length or 0))
            if has_body
            else b""
        )  # fmt: skip
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (
            request.method.encode(), request.target, pool.authority, framing
        )  # fmt: skip
        exchange = Exchange()
        try:
            upstream = await exchange.send(request, pool, head, has_body, chunked)
            response_head, body_framing, keep_alive = encode_response_head(
                upstream, "-", None, request.method == "HEAD", 1, request.keep_alive
            )
            await exchange.relay(request, response_head, body_framing, pool.read_timeout)
        except RouterError as exc:
            return local_reply(exc, "-")
        finally:
            exchange.finish(pool)
        return RELAYED_KEEP_ALIVE if keep_alive else RELAYED_CLOSE

    def reject(self, error: RouterError, client: str | None) -> LocalReply:
        reply = local_reply(error, "-")
        reply.close = True
        return reply

    def internal_error(self, request: Request) -> LocalReply:
        return self.reject(RouterError("internal error"), None)

    def shed_connection(self, transport: asyncio.BaseTransport) -> None:
        transport.close()

    def refuse_connection(
        self, transport: asyncio.BaseTransport, error: RouterError, log_path: str = "-"
    ) -> None:
        transport.close()


async def serve(port: int, upstream_url: str) -> None:
    loop = asyncio.get_running_loop()
    pool = UpstreamPool("upstream", UpstreamSettings(url=upstream_url), loop)
    server = FrontServer(
        BareHandler(pool), loop, max_target=8190, max_field_size=8190, max_headers=100,
        keepalive_timeout=75.0, header_timeout=10.0, max_connections=100_000,
    )  # fmt: skip
    listener = await loop.create_server(server, "127.0.0.1", port, backlog=4096)
    await until_stopped()
    listener.close()
    await server.shutdown(1.0)
    await pool.close()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), sys.argv[2]))
