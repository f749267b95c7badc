"""The flag-file writer (router/control/flagwriters.py): a round trip, and its errors are
FlagWriterErrors."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.control.flagfile import read_flag_file, set_tenants, tenant_variation
from router.control.flagwriters import (
    FileFlagWriter,
    FlagWriterError,
)


async def test_file_writer_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "flags.json"
    set_tenants(path, ["globex"], "new", create=True)
    writer = FileFlagWriter(path)
    assert await writer.get("globex") == "new"
    assert await writer.get("acme") == "legacy"
    version = read_flag_file(path)["flags"]["tenant-routing"]["version"]
    await writer.set("acme", "hold")
    assert await writer.get("acme") == "hold"
    assert tenant_variation(read_flag_file(path), "acme") == "hold"
    await writer.set("acme", "hold")  # no-op: no write, no version bump
    assert read_flag_file(path)["flags"]["tenant-routing"]["version"] == version + 1
    assert str(path) in writer.describe()


async def test_file_writer_errors_are_flag_writer_errors(tmp_path: Path) -> None:
    writer = FileFlagWriter(tmp_path / "missing.json")
    with pytest.raises(FlagWriterError, match="does not exist"):
        await writer.get("acme")
    with pytest.raises(FlagWriterError, match="does not exist"):
        await writer.set("acme", "hold")
    other_key = FileFlagWriter(tmp_path / "flags.json", flag_key="other-flag")
    set_tenants(tmp_path / "flags.json", ["acme"], "new", create=True)
    assert await other_key.get("acme") == "legacy"  # that flag does not exist: default
