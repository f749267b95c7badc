"""X-Forwarded-* trust: only the X-Forwarded-For entries appended by trusted hops are
believed, and X-Forwarded-Proto / -Host only when the settings say the hop sets them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Backends, StartRouter, echo_headers, router_settings


async def forwarded(
    backends: Backends,
    flag_file: Path,
    start_router: StartRouter,
    client: aiohttp.ClientSession,
    capfd: pytest.CaptureFixture[str],
    hops: int,
    headers: dict[str, str],
    **settings: Any,
) -> tuple[dict[str, list[str]], dict[str, Any]]:
    router = await start_router(
        router_settings(
            backends.url("legacy"),
            backends.url("new"),
            flag_file,
            server__trusted_hops=hops,
            access_log__enabled=True,
            **settings,
        )
    )
    capfd.readouterr()
    async with client.get(f"{router.url}/echo", headers={"X-Tenant-Id": "acme", **headers}) as r:
        assert r.status == 200
        seen = echo_headers(await r.json())
    router.app.access_log.flush()
    lines = [json.loads(x) for x in capfd.readouterr().out.splitlines() if '"access"' in x]
    assert len(lines) == 1
    return seen, lines[0]


@pytest.mark.parametrize(
    ("hops", "sent", "upstream_sees", "logged"),
    [
        # The ALB appended 203.0.113.9; 6.6.6.6 was written by the client.
        (1, "6.6.6.6, 203.0.113.9", "203.0.113.9, 127.0.0.1", "203.0.113.9"),
        (1, "203.0.113.9", "203.0.113.9, 127.0.0.1", "203.0.113.9"),
        (1, None, "127.0.0.1", "127.0.0.1"),
        (2, "6.6.6.6, 198.51.100.1, 203.0.113.9", "198.51.100.1, 203.0.113.9, 127.0.0.1",
         "198.51.100.1"),
        # Nothing trusted in front: everything the client wrote is dropped.
        (0, "6.6.6.6", "127.0.0.1", "127.0.0.1"),
        (1, " , ,", "127.0.0.1", "127.0.0.1"),
    ],
)  # fmt: skip
async def test_only_trusted_hops_are_believed(
    backends: Backends,
    flag_file: Path,
    start_router: StartRouter,
    client: aiohttp.ClientSession,
    capfd: pytest.CaptureFixture[str],
    hops: int,
    sent: str | None,
    upstream_sees: str,
    logged: str,
) -> None:
    headers = {"X-Forwarded-For": sent} if sent is not None else {}
    seen, line = await forwarded(backends, flag_file, start_router, client, capfd, hops, headers)
    assert seen["x-forwarded-for"] == [upstream_sees]
    assert line["client"] == logged


async def test_forwarded_proto_and_host_are_the_routers_unless_trusted(
    backends: Backends,
    flag_file: Path,
    start_router: StartRouter,
    client: aiohttp.ClientSession,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A trusted hop (trusted_hops) is believed for X-Forwarded-For only: X-Forwarded-Proto
    and -Host are the client's only with server.trust_forwarded_proto / _host (an ALB sets
    the proto, never the host). Attack tests with a recording upstream: test_edge.py."""
    spoof = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "bank.example"}
    for hops in (0, 1):
        seen, _ = await forwarded(backends, flag_file, start_router, client, capfd, hops, spoof)
        assert seen["x-forwarded-proto"] == ["http"]
        assert seen["x-forwarded-host"] != ["bank.example"]
    seen, _ = await forwarded(
        backends, flag_file, start_router, client, capfd, 1, spoof,
        server__trust_forwarded_proto=True,
    )  # fmt: skip
    assert seen["x-forwarded-proto"] == ["https"]  # the ALB sets it; we believe the ALB
    assert seen["x-forwarded-host"] != ["bank.example"]  # the ALB never sets this one
