"""The ratchet ledger's SQLite backend in one process (router/control/ledger.py): files in
the test's tmp dir, WAL, locks, the event loop never blocked; and open_ledger's URL rules.
The conformance tests over both backends, Redis, other processes and the CLI are in
tests/system/test_ledger.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from pathlib import Path

import pytest

from router.control.ledger import (
    LedgerError,
    SqliteLedger,
    open_ledger,
)

# ---- SQLite --------------------------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


def _sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


async def test_sqlite_survives_close_and_reopen(db: Path) -> None:
    led = open_ledger(_sqlite_url(db))
    await led.start()
    await led.record("acme", "router pid 1")
    first = await led.entry("acme")
    await led.close()
    again = open_ledger(_sqlite_url(db))
    await again.start()
    try:
        assert await again.entry("acme") == first
        assert await again.tenants() == {"acme"}
    finally:
        await again.close()


async def test_sqlite_file_is_wal_with_synchronous_full(db: Path) -> None:
    led = SqliteLedger(str(db))
    await led.start()
    try:
        synchronous = await led._run(lambda: led._db().execute("PRAGMA synchronous").fetchone())
        assert synchronous == (2,)  # FULL
    finally:
        await led.close()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        columns = [row[1] for row in conn.execute("PRAGMA table_info(ratchet_ledger)")]
        assert columns == ["tenant", "recorded_at", "by"]


async def test_sqlite_record_never_blocks_the_event_loop(db: Path) -> None:
    """record() waits for a write lock another connection holds (an fsync, a checkpoint, a
    second worker) on the ledger's own thread: the loop keeps ticking meanwhile."""
    led = open_ledger(_sqlite_url(db))
    await led.start()
    loop = asyncio.get_running_loop()
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            expected = loop.time() + 0.005
            await asyncio.sleep(0.005)
            lags.append(loop.time() - expected)

    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")  # the write lock, until COMMIT
        loop.call_later(0.8, other.execute, "COMMIT")
        tick = asyncio.ensure_future(ticker())
        started = time.perf_counter()
        assert await led.record("acme", "x") is True
        waited = time.perf_counter() - started
        # Reads do not wait for a writer in WAL mode.
        stop.set()
        await tick
    finally:
        other.close()
        await led.close()
    assert waited >= 0.7, f"record() returned after {waited:.2f} s: the lock did not hold it"
    assert len(lags) > 50
    assert max(lags) < 0.1, f"event loop stalled {max(lags) * 1000:.0f} ms during record()"


async def test_sqlite_reads_do_not_wait_for_a_writer(db: Path) -> None:
    led = open_ledger(_sqlite_url(db))
    await led.start()
    await led.record("acme", "x")
    other = sqlite3.connect(db, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO ratchet_ledger VALUES ('uncommitted', 0, 'x')")
        started = time.perf_counter()
        assert await led.tenants() == {"acme"}
        assert await led.contains("acme")
        assert time.perf_counter() - started < 0.5
        other.execute("ROLLBACK")
    finally:
        other.close()
        await led.close()


async def test_sqlite_lock_held_past_busy_timeout_is_a_ledger_error(db: Path) -> None:
    led = SqliteLedger(str(db), busy_timeout=0.3)
    await led.start()
    other = sqlite3.connect(db, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        started = time.perf_counter()
        with pytest.raises(LedgerError, match=r"locked.*0\.3 s"):
            await led.record("acme", "x")
        assert time.perf_counter() - started < 2.0
        other.execute("COMMIT")
        assert await led.record("acme", "x") is True  # the ledger is usable again
    finally:
        other.close()
        await led.close()


async def test_sqlite_relative_path_is_resolved_against_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    led = open_ledger("sqlite:///rel.db")
    monkeypatch.chdir("/")  # resolved when opened: a later chdir changes nothing
    assert led.url == f"sqlite:///{tmp_path / 'rel.db'}"
    await led.start()
    try:
        assert await led.record("acme", "x")
    finally:
        await led.close()
    assert (tmp_path / "rel.db").is_file()


async def test_sqlite_missing_directory_is_a_clear_ledger_error(tmp_path: Path) -> None:
    led = open_ledger(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'ledger.db'}")
    with pytest.raises(LedgerError, match=r"directory .*/no/such/dir does not exist"):
        await led.start()
    await led.close()
    # What a forgotten fourth slash looks like: a relative path under the cwd.
    led = open_ledger("sqlite:///var/lib/router-test-nowhere/ledger.db")
    with pytest.raises(LedgerError, match="four slashes"):
        await led.start()


async def test_sqlite_corrupt_or_unusable_file_is_a_ledger_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database, " * 200)
    with pytest.raises(LedgerError, match=r"garbage\.db: corrupt"):
        await open_ledger(_sqlite_url(garbage)).start()
    with pytest.raises(LedgerError, match="is a directory"):
        await open_ledger(_sqlite_url(tmp_path)).start()


async def test_sqlite_create_false_refuses_a_missing_file(db: Path) -> None:
    led = SqliteLedger(str(db), create=False)
    with pytest.raises(LedgerError, match="no such file"):
        await led.start()
    assert not await asyncio.to_thread(db.exists)


def test_open_ledger_rejects_other_urls() -> None:
    for url in ("postgres://x/y", "sqlite://relative.db", "sqlite:///"):
        with pytest.raises(LedgerError):
            open_ledger(url)


# ---- Redis ---------------------------------------------------------------------------------


def test_redis_url_never_shows_credentials() -> None:
    led = open_ledger("redis://admin:s3cret@127.0.0.1:6390/2?prefix=x")
    assert led.url == "redis://127.0.0.1:6390/2?prefix=x"
    assert "s3cret" not in repr(led)
    assert open_ledger("rediss://:s3cret@cache.internal:6380/0").url == (
        "rediss://cache.internal:6380/0"
    )
