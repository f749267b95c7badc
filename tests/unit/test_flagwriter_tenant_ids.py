"""Both flag writers check tenant ids against the routers' `tenant.max_length`
(`tenant_max_length`), so the cutover tools accept exactly the ids the routers route:
up to 1024 characters when the routers are configured for it, 128 by default."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from router.control.flagfile import set_tenants
from router.control.flagwriters import (
    FileFlagWriter,
    FlagWriter,
    FlagWriterError,
    LaunchDarklyFlagWriter,
)
from router.domain import FLAG_VALUES, TENANT_ID_MAX_LENGTH_LIMIT

LONG_TENANT = "t" * TENANT_ID_MAX_LENGTH_LIMIT  # routed by a router with max_length 1024
TOO_LONG = LONG_TENANT + "t"
ENV = "production"


class LaunchDarklyStub:
    """LaunchDarkly's REST API, answering every request with a flag that targets
    LONG_TENANT at new (no socket: an httpx mock transport); `requests` lists the calls."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.client = httpx.AsyncClient(transport=httpx.MockTransport(self.answer))

    def answer(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        config = {
            "on": True,
            "contextTargets": [{"contextKind": "tenant", "variation": 2, "values": [LONG_TENANT]}],
            "targets": [],
            "rules": [],
            "prerequisites": [],
            "fallthrough": {"variation": 0},
            "offVariation": 0,
        }
        flag = {
            "key": "tenant-routing",
            "variations": [{"_id": f"id-{v}", "value": v} for v in FLAG_VALUES],
            "environments": {ENV: config},
        }
        return httpx.Response(200, content=json.dumps(flag).encode())

    def writer(self, max_length: int | None = None) -> LaunchDarklyFlagWriter:
        """A writer with the routers' max_length, or without one (the default bound)."""
        if max_length is None:
            return LaunchDarklyFlagWriter("api-token", "saas", ENV, client=self.client)
        return LaunchDarklyFlagWriter(
            "api-token", "saas", ENV, client=self.client, tenant_max_length=max_length
        )


@pytest.fixture
async def ld() -> AsyncIterator[LaunchDarklyStub]:
    stub = LaunchDarklyStub()
    yield stub
    await stub.client.aclose()


@pytest.fixture
def flags(tmp_path: Path) -> Path:
    path = tmp_path / "flags.json"
    set_tenants(path, ["acme"], "legacy", create=True)
    return path


async def test_writers_take_ids_up_to_the_routers_max_length(
    flags: Path, ld: LaunchDarklyStub
) -> None:
    file_writer = FileFlagWriter(flags, tenant_max_length=TENANT_ID_MAX_LENGTH_LIMIT)
    await file_writer.set(LONG_TENANT, "hold")
    assert await file_writer.get(LONG_TENANT) == "hold"

    assert await ld.writer(TENANT_ID_MAX_LENGTH_LIMIT).get(LONG_TENANT) == "new"
    assert len(ld.requests) == 1


async def test_writers_refuse_ids_beyond_the_routers_max_length(
    flags: Path, ld: LaunchDarklyStub
) -> None:
    before = await asyncio.to_thread(flags.read_bytes)
    writers: list[FlagWriter] = [
        FileFlagWriter(flags, tenant_max_length=TENANT_ID_MAX_LENGTH_LIMIT),
        ld.writer(TENANT_ID_MAX_LENGTH_LIMIT),
    ]
    for writer in writers:
        with pytest.raises(FlagWriterError, match="invalid tenant id"):
            await writer.set(TOO_LONG, "new")
        with pytest.raises(FlagWriterError, match="invalid tenant id"):
            await writer.get(TOO_LONG)
    # Without the routers' bound, the default one (128).
    for writer in (FileFlagWriter(flags), ld.writer()):
        with pytest.raises(FlagWriterError, match="1 to 128 characters"):
            await writer.get("t" * 129)
    assert ld.requests == []
    assert await asyncio.to_thread(flags.read_bytes) == before
