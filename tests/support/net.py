"""Loopback ports for tests that need one before anything listens on it."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nothing listens on right now (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
