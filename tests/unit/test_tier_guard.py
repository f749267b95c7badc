"""The unit tier's guard (tests/unit/conftest.py) refuses what a unit test must not do, and
lets through the socketpair an asyncio event loop needs for itself."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys

import pytest

from tests.unit.conftest import NotAUnitTest


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_a_network_socket_is_refused(family: socket.AddressFamily) -> None:
    with pytest.raises(NotAUnitTest, match="opened a socket"):
        socket.socket(family, socket.SOCK_STREAM)


def test_a_connection_is_refused() -> None:
    with pytest.raises(NotAUnitTest, match="opened a socket"):
        socket.create_connection(("127.0.0.1", 9))


def test_a_subprocess_is_refused() -> None:
    with pytest.raises(NotAUnitTest, match="started a process"):
        subprocess.run([sys.executable, "-c", "pass"], check=False)


def test_a_fork_is_refused() -> None:
    with pytest.raises(NotAUnitTest, match="started a process"):
        os.fork()


async def test_an_event_loop_still_runs() -> None:
    """The loop's own AF_UNIX socketpair is not the test's I/O."""
    left, right = socket.socketpair()
    with left, right:
        left.sendall(b"x")
        assert right.recv(1) == b"x"
    assert await asyncio.sleep(0, result="ran") == "ran"
