"""The ceiling of an aiohttp front: aiohttp's low-level `web.Server` on uvloop, no upstream.

    python loadtests/aiohttp_alone.py PORT

Answers what the bench's fixed upstream answers (common.py): GET /64k the 64 KiB body,
any request with a body has it read whole and then gets the small body, everything else
the small body. Whatever the router does per request on top of this is its own cost.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop
from aiohttp import web
from common import LARGE_BODY, PATH_LARGE, SMALL_BODY, until_stopped


async def handler(request: web.BaseRequest) -> web.Response:
    if request.body_exists:
        content = request.content
        while await content.readany():
            pass
        return web.Response(body=SMALL_BODY, content_type="text/plain")
    if request.path == PATH_LARGE:
        return web.Response(body=LARGE_BODY, content_type="application/octet-stream")
    return web.Response(body=SMALL_BODY, content_type="text/plain")


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = web.Server(handler, access_log=None, keepalive_timeout=75.0)
    listener = await loop.create_server(server, "127.0.0.1", port, backlog=4096)
    await until_stopped()
    listener.close()
    await server.shutdown(1.0)


def main() -> None:
    uvloop.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
