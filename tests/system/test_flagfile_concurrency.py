"""router.control.flagfile under concurrent writers: separate processes writing the same flag
file lose no update."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from router.control.flagfile import read_flag_file
from router.domain import FLAG_VALUES
from tests.support.flag_files import routing_flag, targets_of
from tests.support.paths import REPO
from tests.support.waiting import wait_until

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
        argv = [str(flag_path), str(tmp_path / f"ready{w}"), str(go), str(w), FLAG_VALUES[w % 3]]
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
            assert f"w{w}-t{i:02d}" in targets[FLAG_VALUES[w % 3]]
    assert sum(len(tenants) for tenants in targets.values()) == 200
