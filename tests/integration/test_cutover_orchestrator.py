"""The cutover orchestrator (router/control/cutover.py) in-process, against in-process routers on
real sockets, with flag writers that fail on purpose: which failures roll back to legacy
and which must not."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from router.control.cutover import Step, cutover
from router.control.flagfile import read_flag_file, set_tenants, tenant_variation
from router.control.flagwriters import FileFlagWriter, FlagWriterError
from tests.conftest import ADMIN_TOKEN, Backends, RunningRouter, StartRouter, router_settings


class Writer(FileFlagWriter):
    """The flag file, with failures injected per value, and `new` optionally written to
    another file (one no router reads)."""

    def __init__(self, path: Path, fail: dict[str, BaseException] | None = None) -> None:
        super().__init__(path)
        self.fail = fail or {}
        self.divert_new: Path | None = None
        self.calls: list[str] = []

    async def set(self, tenant: str, value: str) -> None:
        self.calls.append(value)
        if value in self.fail:
            raise self.fail[value]
        if value == "new" and self.divert_new is not None:
            await FileFlagWriter(self.divert_new).set(tenant, value)
            return
        await super().set(tenant, value)


@pytest.fixture
async def routers(
    backends: Backends, flag_file: Path, start_router: StartRouter
) -> list[RunningRouter]:
    return [
        await start_router(router_settings(backends.url("legacy"), backends.url("new"), flag_file))
        for _ in range(2)
    ]


def admins(routers: list[RunningRouter]) -> list[str]:
    return [r.admin_url for r in routers]


def flag(path: Path, tenant: str) -> str:
    return tenant_variation(read_flag_file(path), tenant)


async def test_steps_are_reported_as_they_happen(
    routers: list[RunningRouter], flag_file: Path
) -> None:
    seen: list[tuple[str, bool, float]] = []

    def on_step(step: Step) -> None:
        seen.append((step.name, step.ok, time.time()))
        assert step.ended_at <= time.time()

    result = await cutover(
        "acme", FileFlagWriter(flag_file), admins(routers), ADMIN_TOKEN, on_step=on_step
    )
    assert result.ok and result.outcome == "moved" and result.exit_code == 0
    assert [(n, ok) for n, ok, _ in seen] == [
        ("preflight", True),
        ("hold", True),
        ("drain", True),
        ("new", True),
        ("verify", True),
    ]
    assert [s.name for s in result.steps] == [n for n, _, _ in seen]
    assert result.total_ms >= sum(s.elapsed_ms for s in result.steps)
    assert flag(flag_file, "acme") == "new"


async def test_a_failed_write_of_new_does_not_go_back(
    routers: list[RunningRouter], flag_file: Path
) -> None:
    writer = Writer(flag_file, fail={"new": FlagWriterError("LaunchDarkly: 503 down")})
    result = await cutover("acme", writer, admins(routers), ADMIN_TOKEN)
    assert not result.ok and result.outcome == "stuck" and result.exit_code == 1
    assert [(s.name, s.ok) for s in result.steps][-1] == ("new", False)
    assert "rollback" not in [s.name for s in result.steps]
    assert writer.calls == ["hold", "new"]  # never legacy
    assert flag(flag_file, "acme") == "hold"
    assert "--resume-hold" in result.advice
    assert "503 down" in result.reason


async def test_a_failed_verify_does_not_go_back(
    routers: list[RunningRouter], flag_file: Path, tmp_path: Path
) -> None:
    writer = Writer(flag_file)
    writer.divert_new = tmp_path / "elsewhere.json"  # the routers never see new
    set_tenants(writer.divert_new, ["acme"], "legacy", create=True)
    started = time.monotonic()
    result = await cutover("acme", writer, admins(routers), ADMIN_TOKEN, verify_timeout=0.5)
    assert time.monotonic() - started < 5
    assert result.outcome == "stuck"
    assert [(s.name, s.ok) for s in result.steps] == [
        ("preflight", True),
        ("hold", True),
        ("drain", True),
        ("new", True),
        ("verify", False),
    ]
    assert "not every router routes to new" in result.reason
    assert "do NOT set the flag back to legacy" in result.advice
    assert writer.calls == ["hold", "new"]


@pytest.mark.parametrize(
    "error", [FlagWriterError("flag file locked"), RuntimeError("a bug in a writer")]
)
async def test_a_failed_hold_write_rolls_back(
    routers: list[RunningRouter], flag_file: Path, error: BaseException
) -> None:
    writer = Writer(flag_file, fail={"hold": error})
    result = await cutover("acme", writer, admins(routers), ADMIN_TOKEN)
    assert result.outcome == "rolled-back" and result.exit_code == 1
    assert [(s.name, s.ok) for s in result.steps] == [
        ("preflight", True),
        ("hold", False),
        ("rollback", True),
    ]
    assert str(error) in result.reason
    assert flag(flag_file, "acme") == "legacy"


async def test_a_failed_rollback_is_stuck_and_says_so(
    routers: list[RunningRouter], flag_file: Path
) -> None:
    writer = Writer(flag_file, fail={"legacy": FlagWriterError("disk full")})
    result = await cutover(
        "acme",
        writer,
        admins(routers),
        ADMIN_TOKEN,
        replication_check="exit 1",  # never caught up
        replication_timeout=0.3,
    )
    # Refused at preflight already: nothing written, nothing to roll back.
    assert result.outcome == "refused" and writer.calls == []
    assert "replication not caught up" in result.reason

    marker = flag_file.parent / "checked"
    result = await cutover(
        "acme",
        writer,
        admins(routers),
        ADMIN_TOKEN,
        replication_check=f"if [ -e {marker} ]; then exit 1; fi; touch {marker}",
        replication_timeout=0.3,
    )
    assert result.outcome == "stuck"
    assert "ROLLBACK FAILED" in result.reason and "disk full" in result.reason
    assert "router flags set acme legacy" in result.advice
    assert flag(flag_file, "acme") == "hold"


async def test_replication_lag_after_the_drain_must_not_reach_back_before_it(
    routers: list[RunningRouter], flag_file: Path, aiohttp_server: Any
) -> None:
    """A lag of 0.3 s passes the preflight (max_lag 5) but, after the drain, only once
    0.3 s have passed since it: writes made just before the drain may not be on new yet."""

    async def status(request: web.Request) -> web.Response:
        return web.json_response({"lag_seconds": 0.3})

    app = web.Application()
    app.router.add_get("/lag", status)
    server = await aiohttp_server(app)
    result = await cutover(
        "acme",
        FileFlagWriter(flag_file),
        admins(routers),
        ADMIN_TOKEN,
        replication_check=f"http://127.0.0.1:{server.port}/lag",
        replication_timeout=5,
    )
    assert result.outcome == "moved", result
    steps = {s.name: s for s in result.steps}
    assert "lag 0.3 s (<= 5 s)" in steps["preflight"].detail
    assert steps["replication"].elapsed_ms >= 250
    assert steps["replication"].started_at >= steps["drain"].ended_at - 0.001


async def test_preflight_waits_for_routers_to_agree_with_the_flag(
    routers: list[RunningRouter], flag_file: Path
) -> None:
    """A router that has not seen the latest flag yet is waited for, not a failure."""
    set_tenants(flag_file, ["initech"], "new")
    await wait_for_target(routers, "initech", "new")
    set_tenants(flag_file, ["initech"], "legacy")  # just flipped back: routers lag ~0.1 s
    result = await cutover("initech", FileFlagWriter(flag_file), admins(routers), ADMIN_TOKEN)
    assert result.outcome == "moved", result


async def wait_for_target(routers: list[RunningRouter], tenant: str, target: str) -> None:
    deadline = time.monotonic() + 5
    while any(r.app.decider.evaluate(tenant).side != target for r in routers):
        assert time.monotonic() < deadline, f"routers never saw {tenant} -> {target}"
        await asyncio.sleep(0.02)
