"""Bodies stream through the router with bounded memory (a subprocess router, real sockets).

256 MiB go up (generated on the fly, hashed by the demo backend as it streams in) and
256 MiB come down, while a thread samples the ROUTER process's resident set size from
/proc/<pid>/status. A router that buffered a body, or ignored backpressure, would grow by
the size of the body (or of whatever the fast side managed to send meanwhile); a
streaming one grows by a few socket buffers.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
import time
from collections.abc import Iterator

import pytest

from router.control.flagfile import set_tenants
from tests.support.procs import Backend, Procs, RouterProc, rss_bytes, write_config

SIZE = 256 * 1024 * 1024
CHUNK = 1024 * 1024
MAX_GROWTH = 64 * 1024 * 1024


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterProc]:
    tmp = tmp_path_factory.mktemp("streaming")
    flag_file = tmp / "flags.json"
    set_tenants(flag_file, ["acme"], "legacy", create=True)
    set_tenants(flag_file, ["globex"], "new")
    with Procs() as procs:
        legacy: Backend = procs.backend("legacy")
        new: Backend = procs.backend("new")
        config = write_config(
            tmp / "router.yaml",
            legacy,
            new,
            flag_file,
            access_log={"enabled": False},
        )
        yield procs.router(config)


class RssSampler:
    """Samples a process's VmRSS every few milliseconds on a thread, keeping the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = rss_bytes(pid)
        self.peak = self.baseline
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            self.samples += 1
            self._stop.wait(0.005)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, rss_bytes(self.pid))

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


def warm_up(router: RouterProc) -> None:
    """A few small exchanges both ways, so pools, buffers and code paths exist before the
    baseline is taken: the growth measured is the transfer's, not the first request's."""
    for tenant in ("acme", "globex"):
        for _ in range(3):
            response = router.get("/__demo/bytes/1048576", tenant=tenant, timeout=30)
            assert response.status == 200 and len(response.body) == CHUNK
            up = router.get("/up", tenant=tenant, method="POST", body=b"y" * CHUNK, timeout=30)
            assert up.status == 200 and up.json()["body_bytes"] == CHUNK


def generated_body(digest: hashlib._Hash) -> Iterator[bytes]:
    """SIZE bytes, one 1 MiB chunk at a time, each different; never more than one held."""
    pattern = bytes(range(256)) * (CHUNK // 256)
    for index in range(SIZE // CHUNK):
        chunk = index.to_bytes(8, "big") + pattern[8:]
        digest.update(chunk)
        yield chunk


def test_upload_256_mib_streams_with_bounded_memory(router: RouterProc) -> None:
    warm_up(router)
    digest = hashlib.sha256()
    conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=60)
    started = time.monotonic()
    try:
        with RssSampler(router.pid) as rss:
            conn.request(
                "POST",
                "/upload?size=256m",
                body=generated_body(digest),
                headers={"X-Tenant-Id": "acme", "Content-Length": str(SIZE)},
            )
            response = conn.getresponse()
            body = response.read()
    finally:
        conn.close()
    elapsed = time.monotonic() - started
    print(
        f"upload: {SIZE / elapsed / 1e6:.0f} MB/s, router RSS {rss.baseline >> 20} MiB"
        f" -> peak {rss.peak >> 20} MiB (+{rss.growth / (1 << 20):.1f} MiB, {rss.samples} samples)"
    )
    assert response.status == 200, body[:300]
    echo = json.loads(body)
    assert echo["side"] == "legacy"
    assert echo["body_bytes"] == SIZE
    assert echo["body_sha256"] == digest.hexdigest()
    assert rss.samples >= 10
    assert rss.growth < MAX_GROWTH, f"router RSS grew by {rss.growth >> 20} MiB"


def test_download_256_mib_streams_with_backpressure(router: RouterProc) -> None:
    warm_up(router)
    conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=60)
    received = 0
    started = time.monotonic()
    try:
        with RssSampler(router.pid) as rss:
            conn.request("GET", f"/__demo/bytes/{SIZE}", headers={"X-Tenant-Id": "globex"})
            response = conn.getresponse()
            assert response.status == 200
            assert response.headers["X-Backend-Side"] == "new"
            paused = False
            while True:
                data = response.read1(CHUNK)
                if not data:
                    break
                assert data.count(b"x") == len(data)
                received += len(data)
                if not paused and received >= 32 * CHUNK:
                    # A slow client: the backend can send hundreds of MiB in this second;
                    # only backpressure through the router keeps them out of its memory.
                    paused = True
                    time.sleep(1.0)
    finally:
        conn.close()
    elapsed = time.monotonic() - started
    print(
        f"download: {SIZE / elapsed / 1e6:.0f} MB/s (with a 1 s pause), router RSS"
        f" {rss.baseline >> 20} MiB -> peak {rss.peak >> 20} MiB"
        f" (+{rss.growth / (1 << 20):.1f} MiB, {rss.samples} samples)"
    )
    assert received == SIZE
    assert rss.samples >= 10
    assert rss.growth < MAX_GROWTH, f"router RSS grew by {rss.growth >> 20} MiB"


def test_the_router_is_healthy_after_the_transfers(router: RouterProc) -> None:
    """Both transfers done, the same router still routes (nothing wedged its pools)."""
    assert router.admin("/readyz").status == 200
    assert router.get("/", tenant="globex").json()["side"] == "new"
