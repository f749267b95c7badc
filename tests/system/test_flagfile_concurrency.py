"""router.control.flagfile under concurrent writers: separate processes writing the same flag
file lose no update."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import router
from router.control.flagfile import (
    VARIATIONS,
    new_flag,
    read_flag_file,
)

REPO = Path(router.__file__).resolve().parent.parent


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


def wait_until(predicate: Callable[[], bool], timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.fixture
def flag_path(tmp_path: Path) -> Path:
    path = tmp_path / "flags.json"
    write_json(path, {"flags": {FLAG: new_flag()}})
    return path


WORKER = """
import sys, time
from pathlib import Path
from router.control.flagfile import set_tenant

path, ready, go, worker, value = sys.argv[1:]
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.001)
for i in range(25):
    set_tenant(Path(path), f"w{worker}-t{i:02d}", value)
"""


def test_concurrent_writers_lose_no_update(flag_path: Path, tmp_path: Path) -> None:
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = []
    for w in range(8):
        argv = [str(flag_path), str(tmp_path / f"ready{w}"), str(go), str(w), VARIATIONS[w % 3]]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER, *argv],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    try:
        # Start all 200 writes together, once every interpreter has imported the module.
        assert wait_until(lambda: all((tmp_path / f"ready{w}").exists() for w in range(8)), 30)
        go.touch()
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err.decode()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    data = read_flag_file(flag_path)
    assert routing_flag(data)["version"] == 1 + 200
    targets = targets_of(flag_path)
    for w in range(8):
        for i in range(25):
            assert f"w{w}-t{i:02d}" in targets[VARIATIONS[w % 3]]
    assert sum(len(tenants) for tenants in targets.values()) == 200
