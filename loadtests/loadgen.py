"""The bench's own load generators, for what wrk cannot do. Each prints one JSON result.

    python loadtests/loadgen.py rate   --port P --rate 1000 --duration 10 --tenants-file F
    python loadtests/loadgen.py stream --port P --direction up|down --bytes N [--tenant T]
    python loadtests/loadgen.py idle   --port P --count 10000 --tenants-file F
    python loadtests/loadgen.py closed --port P --connections 64 --duration 8 [--method POST
                                       --body N] --path /small --tenants-file F

rate: open loop at a fixed rate (wrk keeps N requests in flight instead, which hides a
  stall: the requests it did not send while waiting are never measured, "coordinated
  omission"). Send times follow a fixed schedule t0 + i/rate; a Linux timerfd wakes the
  loop at each one (uvloop's own timers have millisecond resolution). Latency is measured
  from the INTENDED send time, so a stalled server, or a send delayed because every
  connection was busy, counts against the server. Raw keep-alive sockets (asyncio
  Protocols on uvloop, httptools for the responses), a fixed pool of connections.
stream: one request moving N bytes (upload: a POST body of N bytes whose sha256 the
  demo backend's answer must match; download: GET /__demo/bytes/N), blocking socket,
  1 MiB buffers; reports seconds and MB/s.
closed: wrk's job, for machines without wrk: N keep-alive connections, each sending its
  next request as soon as the previous answer is complete, for a fixed time; prints
  wrk's figures under wrk's names (bench.py reads either). One Python process on one
  core: it saturates near 80k req/s here, so a contender faster than that is measured
  at the generator's speed, and its ratios are understated (bench.py says which it used).
idle: opens COUNT keep-alive connections, each sends one GET and reads its answer, then
  they stay open and idle. Prints {"event": "opened", ...}, then waits for a line (or
  EOF) on stdin, reports how many are still open, closes them and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import ctypes.util
import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import httptools
import uvloop
from common import PATH_SMALL, TENANT_HEADER

CLOCK = time.CLOCK_MONOTONIC


def now() -> float:
    return time.clock_gettime(CLOCK)


def percentiles_ms(samples: Sequence[float]) -> dict[str, float | None]:
    """Nearest-rank percentiles of samples (seconds), in milliseconds."""
    if not samples:
        return {"p50": None, "p90": None, "p99": None, "p999": None, "max": None, "mean": None}
    ordered = sorted(samples)
    n = len(ordered)

    def rank(p: float) -> float:
        index = min(n - 1, max(0, int(-(-p * n // 100)) - 1))  # ceil(p/100 * n) - 1
        return round(ordered[index] * 1000.0, 3)

    return {
        "p50": rank(50),
        "p90": rank(90),
        "p99": rank(99),
        "p999": rank(99.9),
        "max": round(ordered[-1] * 1000.0, 3),
        "mean": round(sum(ordered) / n * 1000.0, 3),
    }


def read_tenants(path: str | None) -> list[str]:
    if not path:
        return ["bench-tenant"]
    with open(path, encoding="utf-8") as f:
        tenants = [line.strip() for line in f if line.strip()]
    return tenants or ["bench-tenant"]


def get_request(host: str, port: int, path: str, tenant: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{TENANT_HEADER}: {tenant}\r\n"
        "User-Agent: bench-loadgen\r\n\r\n"
    ).encode("latin-1")


# --- rate: open-loop fixed-rate generator ------------------------------------------------


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _timespec(seconds: float) -> _Timespec:
    whole = int(seconds)
    return _Timespec(whole, round((seconds - whole) * 1e9))


def timerfd_periodic(start: float, interval: float) -> int | None:
    """A non-blocking timerfd firing at `start` (CLOCK_MONOTONIC) then every `interval`."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        create = libc.timerfd_create
        settime = libc.timerfd_settime
    except (OSError, AttributeError):
        return None
    tfd_nonblock, tfd_cloexec, tfd_timer_abstime = 0o4000, 0o2000000, 1
    fd = int(create(CLOCK, tfd_nonblock | tfd_cloexec))
    if fd < 0:
        return None
    spec = _Itimerspec(_timespec(interval), _timespec(start))
    if settime(fd, tfd_timer_abstime, ctypes.byref(spec), None) != 0:
        os.close(fd)
        return None
    return fd


class RateConnection(asyncio.Protocol):
    def __init__(self, gen: RateGenerator) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.intended = 0.0
        self.sent = 0.0
        self.busy = False
        self.warm: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes, intended: float) -> None:
        assert self.transport is not None
        self.busy = True
        self.intended = intended
        self.sent = now()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.gen.failed(self, "bad_response")
            if self.transport is not None:
                self.transport.abort()

    def on_message_complete(self) -> None:
        if self.warm is not None and not self.warm.done():
            self.warm.set_result(None)
            return
        self.gen.completed(self, self.parser.get_status_code())

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.warm is not None and not self.warm.done():
            self.warm.set_exception(ConnectionError("closed during warm-up"))
        self.gen.lost(self)


class RateGenerator:
    def __init__(
        self,
        host: str,
        port: int,
        requests: list[bytes],
        rate: float,
        duration: float,
        connections: int,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.host, self.port = host, port
        self.requests = requests
        self.interval = 1.0 / rate
        self.rate = rate
        self.duration = duration
        self.total = int(rate * duration)
        self.n_connections = connections
        self.idle: list[RateConnection] = []
        self.pending: collections.deque[float] = collections.deque()
        self.next_index = 0
        self.request_index = 0
        self.t0 = 0.0
        self.latency: list[float] = []  # from the intended send time
        self.service: list[float] = []  # from the actual send time
        self.lateness: list[float] = []  # actual - intended send time
        self.status: collections.Counter[int] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.done = self.loop.create_future()
        self.finished = 0
        self.timer = "timerfd"

    async def _connect(self) -> RateConnection:
        _, conn = await self.loop.create_connection(
            lambda: RateConnection(self), self.host, self.port
        )
        conn.warm = self.loop.create_future()
        assert conn.transport is not None
        conn.transport.write(self.requests[0])
        await asyncio.wait_for(conn.warm, 10.0)
        conn.warm = None
        return conn

    async def run(self) -> dict[str, Any]:
        conns = await asyncio.gather(*(self._connect() for _ in range(self.n_connections)))
        self.idle.extend(conns)
        self.t0 = now() + 0.05
        fd = timerfd_periodic(self.t0, self.interval)
        ticker: asyncio.TimerHandle | None = None
        if fd is not None:
            self.loop.add_reader(fd, self._on_timerfd, fd)
        else:  # millisecond resolution: send times are late by up to ~1 ms
            self.timer = "loop.call_at"
            ticker = self.loop.call_at(self.loop.time() + 0.05, self._on_tick_fallback)
        try:
            await asyncio.wait_for(asyncio.shield(self.done), self.duration + 15.0)
        except TimeoutError:
            self.errors["unfinished"] += self.total - self.finished
        finally:
            if fd is not None:
                self.loop.remove_reader(fd)
                os.close(fd)
            if ticker is not None:
                ticker.cancel()
            for conn in conns:
                if conn.transport is not None:
                    conn.transport.close()
        elapsed = (max(self.t0 + self.duration, now()) - self.t0) if self.finished else 0.0
        return {
            "rate": self.rate,
            "duration": self.duration,
            "connections": self.n_connections,
            "timer": self.timer,
            "scheduled": self.total,
            "completed": len(self.latency),
            "achieved_rate": round(len(self.latency) / elapsed, 1) if elapsed else 0.0,
            "status": {str(k): v for k, v in sorted(self.status.items())},
            "errors": dict(self.errors),
            "latency_ms": percentiles_ms(self.latency),
            "service_ms": percentiles_ms(self.service),
            "send_lateness_ms": percentiles_ms(self.lateness),
        }

    def _on_timerfd(self, fd: int) -> None:
        try:
            os.read(fd, 8)
        except BlockingIOError:
            return
        self._release_due()

    def _on_tick_fallback(self) -> None:
        self._release_due()
        if self.next_index < self.total:
            due = self.t0 + self.next_index * self.interval
            delay = max(0.0, due - now())
            self.loop.call_at(self.loop.time() + delay, self._on_tick_fallback)

    def _release_due(self) -> None:
        t = now()
        while self.next_index < self.total:
            intended = self.t0 + self.next_index * self.interval
            if intended > t:
                break
            self.pending.append(intended)
            self.next_index += 1
        self._dispatch()

    def _dispatch(self) -> None:
        while self.pending and self.idle:
            conn = self.idle.pop()
            request = self.requests[self.request_index]
            self.request_index = (self.request_index + 1) % len(self.requests)
            conn.send(request, self.pending.popleft())

    def completed(self, conn: RateConnection, status: int) -> None:
        t = now()
        conn.busy = False
        self.latency.append(t - conn.intended)
        self.service.append(t - conn.sent)
        self.lateness.append(conn.sent - conn.intended)
        self.status[status] += 1
        self.idle.append(conn)
        self._one_finished()
        self._dispatch()

    def failed(self, conn: RateConnection, reason: str) -> None:
        if conn.busy:
            conn.busy = False
            self.errors[reason] += 1
            self._one_finished()

    def lost(self, conn: RateConnection) -> None:
        if conn in self.idle:
            self.idle.remove(conn)
        self.failed(conn, "connection_closed")
        if not self.done.done() and self.next_index < self.total:
            self.loop.create_task(self._replace())

    async def _replace(self) -> None:
        try:
            conn = await self._connect()
        except (OSError, TimeoutError):
            self.errors["reconnect_failed"] += 1
            return
        self.idle.append(conn)
        self._dispatch()

    def _one_finished(self) -> None:
        self.finished += 1
        if self.finished >= self.total and not self.done.done():
            self.done.set_result(None)


async def run_rate(args: argparse.Namespace) -> dict[str, Any]:
    tenants = read_tenants(args.tenants_file)
    requests = [get_request(args.host, args.port, args.path, t) for t in tenants]
    gen = RateGenerator(args.host, args.port, requests, args.rate, args.duration, args.connections)
    return await gen.run()


# --- closed: wrk's closed loop, in Python -------------------------------------------------


class ClosedConnection(asyncio.Protocol):
    def __init__(self, gen: ClosedLoop) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.sent = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.gen.send(self)

    def data_received(self, data: bytes) -> None:
        self.gen.bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.gen.errors["read_errors"] += 1
            if self.transport is not None:
                self.transport.abort()

    def on_message_complete(self) -> None:
        self.gen.completed(self, self.parser.get_status_code())

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.gen.lost(self)


class ClosedLoop:
    """N connections, one request in flight on each, until the deadline."""

    def __init__(self, args: argparse.Namespace, requests: list[bytes]) -> None:
        self.loop = asyncio.get_running_loop()
        self.args = args
        self.requests = requests
        self.index = 0
        self.latency: list[float] = []
        self.bytes = 0
        self.status_errors = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.deadline = 0.0
        self.open = 0
        self.done = self.loop.create_future()

    def send(self, conn: ClosedConnection) -> None:
        assert conn.transport is not None
        request = self.requests[self.index]
        self.index = (self.index + 1) % len(self.requests)
        conn.sent = now()
        conn.transport.write(request)

    def completed(self, conn: ClosedConnection, status: int) -> None:
        t = now()
        self.latency.append(t - conn.sent)
        if not 200 <= status < 400:
            self.status_errors += 1
        if t < self.deadline and conn.transport is not None:
            self.send(conn)
        elif conn.transport is not None:
            conn.transport.close()

    def lost(self, conn: ClosedConnection) -> None:
        self.open -= 1
        if now() < self.deadline and not self.done.done():
            self.errors["connect_errors" if conn.sent == 0.0 else "read_errors"] += 1
            self.loop.create_task(self._connect())
        elif self.open <= 0 and not self.done.done():
            self.done.set_result(None)

    async def _connect(self) -> None:
        try:
            await self.loop.create_connection(
                lambda: ClosedConnection(self), self.args.host, self.args.port
            )
            self.open += 1
        except OSError:
            self.errors["connect_errors"] += 1

    async def run(self) -> dict[str, Any]:
        started = now()
        self.deadline = started + self.args.duration
        await asyncio.gather(*(self._connect() for _ in range(self.args.connections)))
        try:
            await asyncio.wait_for(asyncio.shield(self.done), self.args.duration + 10.0)
        except TimeoutError:
            self.errors["timeouts"] += self.open
        elapsed = now() - started
        us = {k: (v or 0.0) * 1000.0 for k, v in percentiles_ms(self.latency).items()}
        return {
            "generator": "loadgen.py closed (Python, uvloop, httptools)",
            "requests": len(self.latency),
            "duration_us": round(elapsed * 1e6),
            "bytes": self.bytes,
            "p50_us": us["p50"],
            "p90_us": us["p90"],
            "p99_us": us["p99"],
            "p999_us": us["p999"],
            "max_us": us["max"],
            "mean_us": us["mean"],
            "status_errors": self.status_errors,
            "connect_errors": self.errors["connect_errors"],
            "read_errors": self.errors["read_errors"],
            "write_errors": 0,
            "timeouts": self.errors["timeouts"],
        }


async def run_closed(args: argparse.Namespace) -> dict[str, Any]:
    tenants = read_tenants(args.tenants_file)[: args.tenants_limit or None]
    if args.body:
        body = b"x" * args.body
        requests = [
            (
                f"{args.method} {args.path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
                f"{TENANT_HEADER}: {t}\r\nContent-Length: {args.body}\r\n"
                "User-Agent: bench-loadgen\r\n\r\n"
            ).encode("latin-1")
            + body
            for t in tenants
        ]
    else:
        requests = [get_request(args.host, args.port, args.path, t) for t in tenants]
        if args.method != "GET":
            requests = [r.replace(b"GET ", args.method.encode() + b" ", 1) for r in requests]
    return await ClosedLoop(args, requests).run()


# --- stream: one large upload or download -------------------------------------------------


class _ResponseSink:
    """httptools callbacks: counts body bytes; keeps the body only when it is small."""

    def __init__(self, keep_body: bool) -> None:
        self.keep_body = keep_body
        self.body_bytes = 0
        self.body = bytearray()
        self.complete = False

    def on_body(self, data: bytes) -> None:
        self.body_bytes += len(data)
        if self.keep_body:
            self.body += data

    def on_message_complete(self) -> None:
        self.complete = True


def _read_response(sock: socket.socket, keep_body: bool) -> tuple[int, _ResponseSink]:
    sink = _ResponseSink(keep_body)
    parser = httptools.HttpResponseParser(sink)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while not sink.complete:
        n = sock.recv_into(buf)
        if n == 0:
            raise ConnectionError(f"connection closed after {sink.body_bytes} body bytes")
        parser.feed_data(view[:n])
    return parser.get_status_code(), sink


def run_stream(args: argparse.Namespace) -> dict[str, Any]:
    size: int = args.bytes
    block = os.urandom(1 << 20)
    expected_sha = ""
    if args.direction == "up":
        digest = hashlib.sha256()
        full, rest = divmod(size, len(block))
        for _ in range(full):
            digest.update(block)
        digest.update(block[:rest])
        expected_sha = digest.hexdigest()
    host_header = f"{args.host}:{args.port}"
    started = now()
    with socket.create_connection((args.host, args.port), timeout=args.timeout) as sock:
        if args.direction == "up":
            sock.sendall(
                (
                    f"POST /stream-upload HTTP/1.1\r\nHost: {host_header}\r\n"
                    f"{TENANT_HEADER}: {args.tenant}\r\nContent-Type: application/octet-stream\r\n"
                    f"Content-Length: {size}\r\n\r\n"
                ).encode()
            )
            full, rest = divmod(size, len(block))
            for _ in range(full):
                sock.sendall(block)
            if rest:
                sock.sendall(block[:rest])
            status, sink = _read_response(sock, keep_body=True)
            answer = json.loads(bytes(sink.body)) if status == 200 else {}
            ok = (
                status == 200
                and answer.get("body_bytes") == size
                and answer.get("body_sha256") == expected_sha
            )
            detail = {"upstream_body_bytes": answer.get("body_bytes"), "sha256_ok": ok}
        else:
            sock.sendall(
                (
                    f"GET /__demo/bytes/{size}?framing=length HTTP/1.1\r\nHost: {host_header}\r\n"
                    f"{TENANT_HEADER}: {args.tenant}\r\n\r\n"
                ).encode()
            )
            status, sink = _read_response(sock, keep_body=False)
            ok = status == 200 and sink.body_bytes == size
            detail = {"received_bytes": sink.body_bytes}
    seconds = now() - started
    return {
        "direction": args.direction,
        "bytes": size,
        "status": status,
        "ok": ok,
        "seconds": round(seconds, 3),
        "mb_per_s": round(size / seconds / 1e6, 1),
        **detail,
    }


# --- idle: many open, idle keep-alive connections ------------------------------------------


class IdleConnection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.answered: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.open = True

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if not self.answered.done():
                self.answered.set_exception(exc)

    def on_message_complete(self) -> None:
        if not self.answered.done():
            self.answered.set_result(self.parser.get_status_code())

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        if not self.answered.done():
            self.answered.set_exception(ConnectionError("closed before the answer"))


async def run_idle(args: argparse.Namespace, emit: Callable[[dict[str, Any]], None]) -> None:
    loop = asyncio.get_running_loop()
    tenants = read_tenants(args.tenants_file)
    gate = asyncio.Semaphore(args.concurrency)
    conns: list[IdleConnection] = []
    errors: collections.Counter[str] = collections.Counter()

    async def open_one(i: int) -> None:
        async with gate:
            try:
                _, conn = await asyncio.wait_for(
                    loop.create_connection(IdleConnection, args.host, args.port), 10.0
                )
                assert conn.transport is not None
                conn.transport.write(
                    get_request(args.host, args.port, args.path, tenants[i % len(tenants)])
                )
                status = await asyncio.wait_for(conn.answered, 10.0)
            except (OSError, TimeoutError, ConnectionError, httptools.HttpParserError) as exc:
                errors[
                    type(exc).__name__ + (f" {exc.errno}" if isinstance(exc, OSError) else "")
                ] += 1
                return
            if status != 200:
                errors[f"status {status}"] += 1
            conns.append(conn)

    started = now()
    await asyncio.gather(*(open_one(i) for i in range(args.count)))
    emit(
        {
            "event": "opened",
            "requested": args.count,
            "opened": len(conns),
            "errors": dict(errors),
            "seconds": round(now() - started, 2),
        }
    )
    await loop.run_in_executor(None, sys.stdin.readline)
    emit({"event": "closing", "still_open": sum(1 for c in conns if c.open)})
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    await asyncio.sleep(0.2)


# --- command line ----------------------------------------------------------------------


def emit_json(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, required=True)

    rate = sub.add_parser("rate")
    common(rate)
    rate.add_argument("--rate", type=float, default=1000.0)
    rate.add_argument("--duration", type=float, default=10.0)
    rate.add_argument("--connections", type=int, default=32)
    rate.add_argument("--path", default=PATH_SMALL)
    rate.add_argument("--tenants-file")

    stream = sub.add_parser("stream")
    common(stream)
    stream.add_argument("--direction", choices=("up", "down"), required=True)
    stream.add_argument("--bytes", type=int, default=1 << 30)
    stream.add_argument("--tenant", default="bench-tenant")
    stream.add_argument("--timeout", type=float, default=120.0)

    idle = sub.add_parser("idle")
    common(idle)
    idle.add_argument("--count", type=int, default=10_000)
    idle.add_argument("--concurrency", type=int, default=256)
    idle.add_argument("--path", default=PATH_SMALL)
    idle.add_argument("--tenants-file")

    closed = sub.add_parser("closed")
    common(closed)
    closed.add_argument("--connections", type=int, default=64)
    closed.add_argument("--duration", type=float, default=8.0)
    closed.add_argument("--method", default="GET")
    closed.add_argument("--path", default=PATH_SMALL)
    closed.add_argument("--body", type=int, default=0, help="request body bytes")
    closed.add_argument("--tenants-file")
    closed.add_argument("--tenants-limit", type=int, default=0, help="use the first N")

    args = parser.parse_args(argv)
    if args.mode == "closed":
        emit_json(uvloop.run(run_closed(args)))
    elif args.mode == "rate":
        emit_json(uvloop.run(run_rate(args)))
    elif args.mode == "stream":
        emit_json(run_stream(args))
    else:
        uvloop.run(run_idle(args, emit_json))


if __name__ == "__main__":
    main()
