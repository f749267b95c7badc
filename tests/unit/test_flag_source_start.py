"""The flag source starting while the flag file is written, in-process: the race that
tests/system/test_subprocess.py::test_not_ready_until_the_flag_file_exists can hit by
chance, forced with a hook in the LaunchDarkly SDK."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from ldclient.impl.integrations.files import file_data_source

from router.control.flagfile import set_tenants
from router.control.flags import FlagSource
from router.settings import FlagSettings


@pytest.mark.parametrize("exists", [False, True], ids=["created", "flipped"])
async def test_a_flag_write_while_the_sdk_starts_is_not_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exists: bool
) -> None:
    """In-process, with a hook in the SDK: the file is written at the worst moment of the
    SDK's start-up, after its first load and before its poller's first mtime reading (the
    window the subprocess test can hit by chance, and did, under load)."""
    flag_file = tmp_path / "flags.json"
    if exists:
        set_tenants(flag_file, ["acme"], "legacy", create=True)
    original = file_data_source._FileDataSource._start_auto_updater
    writes: list[str] = []

    def start_auto_updater(self: Any) -> Any:
        if not writes:
            writes.append("written")
            set_tenants(flag_file, ["acme"], "new", create=True)
        return original(self)

    monkeypatch.setattr(file_data_source._FileDataSource, "_start_auto_updater", start_auto_updater)
    flags = FlagSource(FlagSettings(file=flag_file, poll_interval=0.1), asyncio.get_running_loop())
    try:
        await flags.start(wait=2.0)
        await asyncio.sleep(0.3)  # a few polls: the poller alone would never see it
        assert writes == ["written"]
        assert flags.ready
        assert flags.variation("acme", "unset") == "new"
    finally:
        await flags.close()
