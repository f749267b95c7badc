"""The unit tier: no sockets, no subprocesses, so it runs in seconds and needs nothing but
the interpreter. A unit test that opens a network socket or spawns a process fails here
with the reason, instead of passing slowly; such a test belongs in tests/integration/
(sockets) or tests/system/ (processes)."""

from __future__ import annotations

import os
import socket
import subprocess
from typing import Any, NoReturn

import pytest

# An asyncio event loop talks to itself over an AF_UNIX socketpair (its self-pipe): that
# is the loop's plumbing, not the test's I/O, so only network families are refused.
_NETWORK_FAMILIES = frozenset({socket.AF_INET, socket.AF_INET6})


class NotAUnitTest(AssertionError):
    """Raised by the unit tier's guard: the test reached for a socket or a process."""


def _refuse(what: str) -> NoReturn:
    raise NotAUnitTest(
        f"a unit test {what}: move it to tests/integration/ (sockets) or tests/system/ (processes)"
    )


@pytest.fixture(autouse=True)
def no_network_and_no_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    open_socket = socket.socket.__init__

    def guarded_socket(
        self: socket.socket,
        family: int = -1,
        type: int = -1,
        proto: int = -1,
        fileno: int | None = None,
    ) -> None:
        if fileno is None and (family == -1 or family in _NETWORK_FAMILIES):
            _refuse(f"opened a socket (family {family})")
        open_socket(self, family, type, proto, fileno)

    def no_child(popen: subprocess.Popen[Any], args: Any, *_: Any, **__: Any) -> NoReturn:
        _refuse(f"started a process: {args!r}")

    def no_process(*args: Any, **kwargs: Any) -> NoReturn:
        _refuse(f"started a process: {args[:1]!r}")

    monkeypatch.setattr(socket.socket, "__init__", guarded_socket)
    # Popen's own set-up runs (so a refused Popen is still a well-formed object when it is
    # collected); the child is never started. asyncio's subprocesses go through it too.
    monkeypatch.setattr(subprocess.Popen, "_execute_child", no_child)
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system"):
        monkeypatch.setattr(os, name, no_process)
