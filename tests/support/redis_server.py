"""A real redis-server for tests (Debian package redis-server): one process of ours on a
free 127.0.0.1 port, without persistence, stopped by its pid. Without the binary, tests
that need it skip locally and FAIL with CI=true (CI must not go green by skipping)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.support.net import free_port


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@dataclass
class RedisServer:
    """One redis-server process of ours, on 127.0.0.1:port, stopped by its pid."""

    popen: subprocess.Popen[bytes]
    port: int
    dir: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def url(self, db: int = 0, *, prefix: str | None = None) -> str:
        """A URL on this server; a fresh key prefix by default, so tests never share keys."""
        prefix = prefix if prefix is not None else f"test:{uuid.uuid4().hex[:12]}"
        query = f"?prefix={prefix}" if prefix else ""
        return f"redis://127.0.0.1:{self.port}/{db}{query}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, decode_responses=True)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()  # SIGTERM to our pid, never by name
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(directory: Path) -> RedisServer:
    exe = shutil.which("redis-server")
    if exe is None:
        message = "redis-server is not installed (apt-get install redis-server)"
        if _in_ci():
            pytest.fail(f"{message}; CI=true: the Redis ledger must be tested")
        pytest.skip(f"{message}; with CI=true this fails")
    directory.mkdir(parents=True, exist_ok=True)
    for _ in range(5):  # a free port can be taken between our probe and redis's bind
        port = free_port()
        argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
        argv += ["no", "--dir", str(directory), "--daemonize", "no", "--logfile", ""]
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        server = RedisServer(popen, port, directory)
        deadline = time.monotonic() + 10
        while popen.poll() is None and time.monotonic() < deadline:
            if _ping(port):
                return server
            time.sleep(0.02)
        server.stop()
    raise AssertionError("redis-server did not start on a free port in 5 tries")
