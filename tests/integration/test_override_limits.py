"""Signed overrides stay a test tool (issue 16, point 4), through a real router on real
sockets, against upstreams that record every request they receive: an override naming a
tenant outside `routing.override_tenants` is not honoured, an override never skips hold,
and the secret can be rotated (the previous one is accepted alongside the current one).

"Never forwarded" and "forwarded to X" are checked at the recording upstreams, not
inferred from the router's answer."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from router.control.flagfile import set_tenants
from router.control.override import signed_headers
from tests.conftest import (
    RawUpstream,
    RunningRouter,
    StartRouter,
    http_response,
    read_http_request,
    router_settings,
)
from tests.support.waiting import wait_for

SECRET = "current-override-secret"
PREVIOUS = "previous-override-secret"


@dataclass
class Recording:
    """Two upstreams, one per side, that record each request target they receive."""

    legacy: RawUpstream
    new: RawUpstream
    seen: dict[str, list[str]] = field(default_factory=lambda: {"legacy": [], "new": []})

    def received(self) -> dict[str, list[str]]:
        return {side: list(targets) for side, targets in self.seen.items()}


@pytest.fixture
async def recording(raw_upstream: Any) -> Recording:
    seen: dict[str, list[str]] = {"legacy": [], "new": []}

    def recorder(side: str) -> Any:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                head, _ = await read_http_request(reader)
                if not head:
                    return
                seen[side].append(head.split(b" ")[1].decode())
                body = b'{"side": "%s"}' % side.encode()
                writer.write(http_response(body, b"Content-Type: application/json"))
                await writer.drain()

        return serve

    legacy = await raw_upstream(recorder("legacy"))
    new = await raw_upstream(recorder("new"))
    return Recording(legacy, new, seen)


async def start(
    recording: Recording, flag_file: Path, start_router: StartRouter, **overrides: Any
) -> RunningRouter:
    return await start_router(
        router_settings(recording.legacy.url, recording.new.url, flag_file, **overrides)
    )


async def get(
    client: aiohttp.ClientSession, url: str, tenant: str, headers: dict[str, str]
) -> tuple[int, str]:
    async with client.get(url, headers={"X-Tenant-Id": tenant, **headers}) as response:
        await response.read()
        return response.status, response.headers.get("X-Routed-To", "")


def rejections(router: RunningRouter) -> dict[str, int]:
    return dict(router.app.metrics.override_rejections)


# ---- the allow-list ----------------------------------------------------------------------


async def test_an_override_for_a_tenant_outside_the_allow_list_goes_where_the_flag_says(
    recording: Recording,
    flag_file: Path,
    start_router: StartRouter,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # acme's flag says legacy; only the test tenant `qa-tenant` may be overridden.
    router = await start(
        recording, flag_file, start_router,
        override_secret=SECRET, routing__override_tenants=["qa-tenant"],
    )  # fmt: skip
    caplog.set_level(logging.WARNING, logger="router.proxy.decide")
    status, routed = await get(
        client, f"{router.url}/acme-write", "acme", signed_headers(SECRET, "new", "acme")
    )
    assert (status, routed) == (200, "legacy; reason=flag")
    # Checked at the backends: the request reached legacy, and new saw nothing.
    assert recording.received() == {"legacy": ["/acme-write"], "new": []}
    assert rejections(router) == {"tenant_not_allowed": 1}
    # A valid signature for a tenant outside the list means the secret is being misused:
    # a warning names the tenant (never the signature).
    warnings = [r for r in caplog.records if "override" in r.getMessage()]
    assert warnings and getattr(warnings[0], "tenant", None) == "acme"

    # The listed tenant's override still works (its flag says legacy too).
    status, routed = await get(
        client, f"{router.url}/qa", "qa-tenant", signed_headers(SECRET, "new", "qa-tenant")
    )
    assert (status, routed) == (200, "new; reason=override")
    assert recording.received() == {"legacy": ["/acme-write"], "new": ["/qa"]}


async def test_with_an_allow_list_a_request_without_a_tenant_cannot_be_overridden(
    recording: Recording, flag_file: Path, start_router: StartRouter, client: aiohttp.ClientSession
) -> None:
    router = await start(
        recording, flag_file, start_router,
        override_secret=SECRET, routing__override_tenants=["qa-tenant"],
        tenant__default_side="legacy",
    )  # fmt: skip
    async with client.get(f"{router.url}/anon", headers=signed_headers(SECRET, "new", "")) as r:
        assert r.status == 200
        assert r.headers["X-Routed-To"] == "legacy; reason=no-tenant"
    assert recording.received() == {"legacy": ["/anon"], "new": []}
    assert rejections(router) == {"tenant_not_allowed": 1}


# ---- hold ----------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["new", "legacy"])
async def test_an_override_during_hold_waits_for_the_hold(
    recording: Recording,
    flag_file: Path,
    start_router: StartRouter,
    client: aiohttp.ClientSession,
    side: str,
) -> None:
    router = await start(recording, flag_file, start_router, override_secret=SECRET)
    set_tenants(flag_file, ["acme"], "hold")
    await wait_for(lambda: router.app.decider.evaluate("acme").side == "hold", what="hold")
    request = asyncio.ensure_future(
        get(client, f"{router.url}/during-hold", "acme", signed_headers(SECRET, side, "acme"))
    )
    await wait_for(lambda: router.app.decider.holds.held("acme") == 1, what="held")
    await asyncio.sleep(0.3)
    # Held like any other request: nothing reached either backend, no answer yet.
    assert not request.done()
    assert recording.received() == {"legacy": [], "new": []}

    set_tenants(flag_file, ["acme"], "new")
    status, routed = await asyncio.wait_for(request, 5)
    assert status == 200
    if side == "new":
        assert routed == "new; reason=override"
        assert recording.received() == {"legacy": [], "new": ["/during-hold"]}
    else:
        # Released: the override is decided again, after the hold. New has not served
        # acme yet (not ledgered), so the override to legacy is honoured; for a ledgered
        # tenant the ratchet would refuse it (test_hold_ratchet.py).
        assert routed == "legacy; reason=override"
        assert recording.received() == {"legacy": ["/during-hold"], "new": []}


# ---- rotating the secret ---------------------------------------------------------------


async def test_during_rotation_both_secrets_are_honoured_and_no_other(
    recording: Recording, flag_file: Path, start_router: StartRouter, client: aiohttp.ClientSession
) -> None:
    router = await start(
        recording, flag_file, start_router,
        override_secret=SECRET, override_secret_previous=PREVIOUS,
    )  # fmt: skip
    cases = [
        ("/current", signed_headers(SECRET, "new", "acme"), "new; reason=override"),
        ("/previous", signed_headers(PREVIOUS, "new", "acme"), "new; reason=override"),
        ("/unknown", signed_headers("some-other-secret", "new", "acme"), "legacy; reason=flag"),
    ]
    for path, headers, expected in cases:
        status, routed = await get(client, f"{router.url}{path}", "acme", headers)
        assert (status, routed) == (200, expected), path
    assert recording.received() == {"legacy": ["/unknown"], "new": ["/current", "/previous"]}
    assert rejections(router) == {"bad_mac": 1}


async def test_after_rotation_the_previous_secret_is_refused(
    recording: Recording, flag_file: Path, start_router: StartRouter, client: aiohttp.ClientSession
) -> None:
    # The last step of the procedure: ROUTER_OVERRIDE_SECRET_PREVIOUS removed.
    router = await start(recording, flag_file, start_router, override_secret=SECRET)
    status, routed = await get(
        client, f"{router.url}/old", "acme", signed_headers(PREVIOUS, "new", "acme")
    )
    assert (status, routed) == (200, "legacy; reason=flag")
    assert recording.received() == {"legacy": ["/old"], "new": []}
