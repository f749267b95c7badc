"""What packaging builds and runs: the demo backend on a real socket (a subprocess), and the
wheel carrying the compiled hot path."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.paths import REPO


@pytest.fixture(scope="module")
def demo_port() -> Iterator[int]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "router.demo_backend", "--side", "legacy", "--port", "0"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        assert ready, "the demo backend printed no start-up line within 15 s"
        started = json.loads(proc.stdout.readline())
        assert started["event"] == "listening" and started["pid"] == proc.pid
        yield int(started["port"])
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
    assert proc.returncode == 0, "SIGTERM should stop the demo backend cleanly"


def _request(
    port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[http.client.HTTPResponse, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        chunked = body is not None and not isinstance(body, bytes)
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_demo_backend_hashes_a_streamed_body(demo_port: int, framing: str) -> None:
    body = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(98_304))
    assert len(body) == 3 * 1024 * 1024
    sent: Any = body
    if framing == "chunked":
        sent = (body[i : i + 100_000] for i in range(0, len(body), 100_000))
    response, raw = _request(demo_port, "POST", "/up/load?a=1&b=%20", sent, {"X-Tenant-Id": "acme"})
    assert response.status == 200
    assert response.headers["X-Backend-Side"] == "legacy"
    echo = json.loads(raw)
    assert echo["side"] == "legacy"
    assert (echo["method"], echo["path"], echo["query"]) == ("POST", "/up/load", "a=1&b=%20")
    assert echo["headers"]["x-tenant-id"] == "acme"
    assert echo["body_bytes"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_demo_backend_streams_n_bytes(demo_port: int) -> None:
    response, raw = _request(demo_port, "GET", "/__demo/bytes/1000000")
    assert response.status == 200
    assert response.headers["Transfer-Encoding"] == "chunked"
    assert len(raw) == 1_000_000 and raw.count(b"x") == 1_000_000


def test_demo_backend_helper_endpoints(demo_port: int) -> None:
    response, raw = _request(demo_port, "GET", "/__demo/status/418")
    assert response.status == 418 and json.loads(raw)["status"] == 418
    response, _ = _request(demo_port, "GET", "/__demo/redirect")
    assert response.status == 302 and response.headers["Location"] == "/elsewhere"
    started = time.monotonic()
    response, raw = _request(demo_port, "GET", "/__demo/slow/0.3")
    assert response.status == 200 and time.monotonic() - started >= 0.3
    assert json.loads(raw)["path"] == "/__demo/slow/0.3"


@pytest.mark.timeout(900)
def test_the_wheel_carries_the_compiled_hot_path(tmp_path: Path) -> None:
    """The Dockerfile builder's wheel and install steps, here (no Docker engine): a clean
    copy of what the image copies, built without isolation by this venv (which has the
    dependencies and mypy), then installed into an empty venv, where it runs compiled."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        (source / name).write_bytes((REPO / name).read_bytes())
    shutil.copytree(
        REPO / "router",
        source / "router",
        ignore=shutil.ignore_patterns("*.so", "_compiled.py", "__pycache__"),
    )
    wheels = tmp_path / "wheels"
    env = {**os.environ, "ROUTER_COMPILE": "1"}
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps"]
    done = subprocess.run(
        [*build, "--wheel-dir", str(wheels), str(source)],
        cwd=source, env=env, capture_output=True, text=True, timeout=840, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = wheels.glob("router-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "router/_compiled.py" in names
    for module in ("_hotpath__mypyc", "proxy/connection", "proxy/handler", "proxy/relay"):
        assert any(re.fullmatch(rf"router/{module}\.[^/]+\.so", n) for n in names), module
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    with zipfile.ZipFile(wheel) as archive:  # what `pip install` does with a wheel's files
        archive.extractall(site)
    # The dependencies from this venv (PYTHONPATH: its .pth files, so its editable router,
    # are not read); the router from the new one. Run outside any checkout.
    deps = next(p for p in sys.path if p.endswith("site-packages"))
    check = (
        "import router.proxy.connection, router.service.native, router.proxy.handler;"
        "print(router.proxy.connection.__file__);"
        "print(router.service.native.check_fresh().describe)"
    )
    done = subprocess.run(
        [str(python), "-c", check],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": deps}, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    front_file, describe = done.stdout.split("\n")[:2]
    assert front_file.startswith(site) and front_file.endswith(".so"), front_file
    assert describe == "compiled with mypyc (8 modules)"
