"""router.control.gate: background jobs get the router's answer (flag, ratchet, hold)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from router.control.flagfile import set_tenants
from router.control.gate import Gate, TenantHeld
from router.errors import HoldTimeout
from router.settings import Settings
from tests.conftest import router_settings


def gate_settings(flag_file: Path, **overrides: object) -> Settings:
    return router_settings(
        "http://127.0.0.1:9", "http://127.0.0.1:9", flag_file,
        ledger=f"sqlite:///{flag_file.parent / 'gate-ledger.db'}", **overrides,
    )  # fmt: skip


async def eventually(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_owner_follows_the_flag_and_the_ratchet(flag_file: Path) -> None:
    async with Gate(gate_settings(flag_file)) as gate:
        assert await gate.owner("acme") == "legacy"
        assert await gate.owner("globex") == "new"
        # globex ran on new: it is ledgered, and a flip back does not move its jobs.
        set_tenants(flag_file, ["globex"], "legacy")
        await eventually(
            lambda: gate._flags is not None and gate._flags.variation("globex", "") == "legacy"
        )
        await asyncio.sleep(0.2)  # the change event, the ledger refresh
        assert await gate.owner("globex") == "new"
    # A second gate (another job runner) on the same ledger agrees.
    async with Gate(gate_settings(flag_file)) as other:
        assert await other.owner("globex") == "new"
        assert await other.owner("acme") == "legacy"


async def test_owner_waits_out_a_hold(flag_file: Path) -> None:
    set_tenants(flag_file, ["initech"], "hold")
    async with Gate(gate_settings(flag_file)) as gate:
        with pytest.raises(TenantHeld):
            await gate.owner("initech", wait=False)
        waiting = asyncio.ensure_future(gate.owner("initech"))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        set_tenants(flag_file, ["initech"], "new")
        assert await asyncio.wait_for(waiting, 5) == "new"


async def test_a_hold_past_the_timeout_raises(flag_file: Path) -> None:
    set_tenants(flag_file, ["initech"], "hold")
    async with Gate(gate_settings(flag_file), hold_timeout=0.3) as gate:
        started = time.monotonic()
        with pytest.raises(HoldTimeout):
            await gate.owner("initech")
        assert 0.25 < time.monotonic() - started < 2.0
