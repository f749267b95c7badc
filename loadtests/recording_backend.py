"""A recording test backend for the load test: answers like the demo backend, and records
one JSON line per request (which tenant, which side, when, and the load generator's
sequence number) so the verdict can prove where every request went.

    python loadtests/recording_backend.py --side legacy --port 0 --record legacy.jsonl \
        [--latency-ms 0] [--error-rate 0] [--host 127.0.0.1]

Record line: {"ts": arrival time (time.time(), epoch s), "side", "tenant" (X-Tenant-Id,
"" if none), "seq" (X-Load-Seq, "" if none), "method", "path", "status", "bytes_in",
"fault": true when the answer was an injected error}. Lines are buffered and appended
every 0.2 s, and on SIGTERM/SIGINT before exiting.

Answers (any method, any path; `X-Backend-Side: <side>` on every answer):
    /__demo/bytes/{n}      n bytes (the 1 MiB downloads), in 64 KiB chunks
    /__demo/slow/{s}       a slow streaming answer: 10 chunks spread over s seconds
    anything else          a small JSON body, after reading the request body whole

Faults on demand: `--latency-ms` (added before answering), `--error-rate` (that share of
requests answers 500 with `X-Injected-Fault: 1`); change both while running with
`POST /__record/faults {"latency_ms": 50, "error_rate": 0.01}` (not recorded).

`--port 0` picks a free port; the first stdout line is JSON
`{"event": "listening", "side", "port", "pid"}`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

CHUNK = b"x" * 65536
MAX_BYTES = 64 << 20
MAX_SLOW = 60.0


class Recorder:
    def __init__(self, side: str, path: Path, latency_ms: float, error_rate: float) -> None:
        self.side = side
        self.path = path
        self.latency = latency_ms / 1000.0
        self.error_rate = error_rate
        self.buffer: list[str] = []
        self.file = path.open("a", encoding="utf-8")
        self.count = 0

    def record(
        self, request: web.BaseRequest, ts: float, status: int, size: int, fault: bool
    ) -> None:
        self.count += 1
        self.buffer.append(
            json.dumps(
                {
                    "ts": round(ts, 6),
                    "side": self.side,
                    "tenant": request.headers.get("X-Tenant-Id", ""),
                    "seq": request.headers.get("X-Load-Seq", ""),
                    "method": request.method,
                    "path": request.path,
                    "status": status,
                    "bytes_in": size,
                    "fault": fault,
                    # A shadow copy (router/proxy/shadow.py), not a client's request: "new", or
                    # "legacy-replay" for the noise filter's second legacy answer.
                    "shadow": request.headers.get("X-Router-Shadow"),
                },
                separators=(",", ":"),
            )
        )

    def flush(self) -> None:
        if self.buffer:
            self.file.write("\n".join(self.buffer) + "\n")
            self.buffer.clear()
            self.file.flush()

    async def flusher(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            self.flush()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        ts = time.time()
        if request.path == "/__record/faults" and request.method == "POST":
            settings = await request.json()
            self.latency = float(settings.get("latency_ms", self.latency * 1000)) / 1000.0
            self.error_rate = float(settings.get("error_rate", self.error_rate))
            return web.json_response(
                {"latency_ms": self.latency * 1000, "error_rate": self.error_rate}
            )
        size = 0
        async for data in request.content.iter_any():
            size += len(data)
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        headers = {"X-Backend-Side": self.side}
        if self.error_rate > 0 and random.random() < self.error_rate:
            self.record(request, ts, 500, size, True)
            headers["X-Injected-Fault"] = "1"
            return web.json_response({"error": "injected"}, status=500, headers=headers)
        self.record(request, ts, 200, size, False)
        path = request.path
        if path.startswith("/__demo/bytes/"):
            n = min(max(int(path.rsplit("/", 1)[1] or 0), 0), MAX_BYTES)
            response = web.StreamResponse(headers=headers)
            response.content_length = n
            await response.prepare(request)
            while n > 0:
                part = CHUNK if n >= len(CHUNK) else CHUNK[:n]
                await response.write(part)
                n -= len(part)
            await response.write_eof()
            return response
        if path.startswith("/__demo/slow/"):
            seconds = min(max(float(path.rsplit("/", 1)[1] or 0), 0.0), MAX_SLOW)
            response = web.StreamResponse(headers=headers)
            response.content_type = "text/plain"
            await response.prepare(request)
            for _ in range(10):
                await response.write(b"chunk " * 100 + b"\n")
                await asyncio.sleep(seconds / 10)
            await response.write_eof()
            return response
        return web.json_response(
            {"side": self.side, "method": request.method, "path": path, "body_bytes": size},
            headers=headers,
        )


async def serve(args: argparse.Namespace) -> None:
    recorder = Recorder(args.side, Path(args.record), args.latency_ms, args.error_rate)
    server = web.Server(recorder.handle, access_log=None)
    runner = web.ServerRunner(server, handle_signals=False)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    site = web.SockSite(runner, sock, backlog=1024)
    await site.start()
    print(
        json.dumps(
            {
                "event": "listening",
                "side": args.side,
                "port": sock.getsockname()[1],
                "pid": os.getpid(),
            }
        ),
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    flusher = asyncio.create_task(recorder.flusher())
    try:
        await stop.wait()
    finally:
        flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher
        with contextlib.suppress(Exception):
            await asyncio.wait_for(runner.cleanup(), 3)
        recorder.flush()
        recorder.file.close()
        print(json.dumps({"event": "stopped", "recorded": recorder.count}), flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", required=True, choices=("legacy", "new"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--record", required=True, help="JSON-lines file to append to")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--error-rate", type=float, default=0.0)
    args = parser.parse_args(argv)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    runner(serve(args))


if __name__ == "__main__":
    sys.exit(main())
