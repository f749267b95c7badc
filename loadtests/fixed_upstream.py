"""Fallback fixed-body upstream for the bench when nginx is not installed.

    python loadtests/fixed_upstream.py PORT

A uvloop `asyncio.Protocol` with the llhttp parser (httptools): keep-alive, pipelining,
and the same answers as the nginx upstream (common.py): GET /64k gets 64 KiB, a request
with a body has it read whole before the small answer, anything else the small body.
Slower than nginx, so the "direct" figures are lower with it; the bench says which
upstream it used.
"""

from __future__ import annotations

import asyncio
import sys

import httptools
import uvloop
from common import LARGE_BODY, PATH_LARGE, SMALL_BODY, until_stopped


def _response(body: bytes, content_type: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nServer: bench-fixed\r\nContent-Type: "
        + content_type
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


SMALL_RESPONSE = _response(SMALL_BODY, b"text/plain")
LARGE_RESPONSE = _response(LARGE_BODY, b"application/octet-stream")
LARGE_PATH = PATH_LARGE.encode()


class FixedProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        url, self.url = self.url, b""
        if self.transport is None:
            return
        large = url.split(b"?", 1)[0] == LARGE_PATH
        self.transport.write(LARGE_RESPONSE if large else SMALL_RESPONSE)
        if not self.parser.should_keep_alive():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(FixedProtocol, "127.0.0.1", port, backlog=4096)
    await until_stopped()
    listener.close()


def main() -> None:
    uvloop.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
