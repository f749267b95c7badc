"""Flags files in the LaunchDarkly file data source's format, read and written the way the
flag-file tests check them (router/control/flagfile.py is what they test)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from router.control.flagfile import read_flag_file

FLAG = "tenant-routing"


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def routing_flag(data: dict[str, Any]) -> dict[str, Any]:
    flag: dict[str, Any] = data["flags"][FLAG]
    return flag


def targets_of(path: Path) -> dict[str, list[str]]:
    """{variation value: tenant list} for the `tenant` target entries of the file."""
    flag = routing_flag(read_flag_file(path))
    result: dict[str, list[str]] = {}
    for entry in flag["contextTargets"]:
        assert entry["contextKind"] == "tenant"
        result.setdefault(flag["variations"][entry["variation"]], []).extend(entry["values"])
    return result
