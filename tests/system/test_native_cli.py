"""The CLI refuses a stale compiled build (router/service/native.py), as a process: a
compiled module older than its sources would run old code silently."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from router.service.native import build_state
from tests.support.paths import REPO

compiled_only = pytest.mark.skipif(
    not build_state().compiled, reason="pure-Python checkout (make compile builds the hot path)"
)


CONFIG = str(REPO / "config" / "router.yaml")


CHECK_CONFIG = [sys.executable, "-m", "router", "check-config", "--config", CONFIG]


@compiled_only
def test_the_cli_refuses_a_stale_build(tmp_path: Path) -> None:
    # A copy of the compiled package whose settings.py (a dependency) changed since.
    shutil.copytree(REPO / "router", tmp_path / "router", ignore=shutil.ignore_patterns("*.pyc"))
    settings = tmp_path / "router" / "settings.py"
    settings.write_text(settings.read_text() + "\n# edited after the build\n")
    done = subprocess.run(
        CHECK_CONFIG, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1, done.stderr
    assert "router/settings.py changed since" in done.stderr
    assert "make compile" in done.stderr
    # The same copy, unedited, runs.
    settings.write_text((REPO / "router" / "settings.py").read_text())
    done = subprocess.run(
        CHECK_CONFIG, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
