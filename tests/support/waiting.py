"""Polling until a condition holds: one helper for threads and processes, one for the
event loop. A fixed sleep either wastes time or is too short on a loaded machine; these
return as soon as the condition holds and fail with what was awaited."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol


class HasOutput(Protocol):
    """A process whose recent output explains a timeout (tests/support/procs.py's Proc)."""

    def output(self, last: int = 40) -> str: ...


def poll(predicate: Callable[[], Any], timeout: float, interval: float = 0.02) -> Any:
    """`predicate()`'s first truthy value within `timeout` s, else its last (falsy) value:
    for a caller that asserts with a message of its own."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    interval: float = 0.02,
    what: str = "condition",
    proc: HasOutput | None = None,
) -> Any:
    """Poll until `predicate()` is truthy; return its value, or fail after `timeout` s
    (with `proc`'s recent output in the message)."""
    value = poll(predicate, timeout, interval)
    if not value:
        context = f"\n{proc.output()}" if proc is not None else ""
        raise AssertionError(f"timed out after {timeout} s waiting for {what}{context}")
    return value


async def wait_for(
    predicate: Callable[[], Any], timeout: float = 5.0, what: str = "condition"
) -> None:
    """On the event loop: poll until `predicate()` (or the coroutine it returns) is truthy,
    yielding to the loop in between, so the router under test keeps running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
