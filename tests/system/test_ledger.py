"""The ratchet ledger (router/control/ledger.py) and `router tenants ...` (router/cli/tenants.py).

Both backends run against the real thing: SQLite files in the test's tmp dir, and a real
`redis-server` (Debian package redis-server) started once per session on a free loopback
port, without persistence, and stopped by its pid. Without redis-server the Redis tests
skip locally and FAIL with CI=true: CI must not go green by skipping them.

The conformance tests are parametrized over both backends; then what only one of them
has (SQLite: files, processes, locks; Redis: a shared server that dies or never answers);
then the command line, as an operator runs it, in subprocesses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.control.flagfile import set_tenants
from router.control.ledger import (
    Ledger,
    LedgerError,
    RedisLedger,
    list_entries,
    open_ledger,
)
from tests.support.net import free_port
from tests.support.procs import child_env, run_router, write_config
from tests.support.redis_server import RedisServer, start_redis


@pytest.fixture
def spare_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A second redis-server of this test's own, to be stopped by the test."""
    server = start_redis(tmp_path / "spare-redis")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty ledger store of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url()


@pytest.fixture
async def ledger(store_url: str) -> AsyncIterator[Ledger]:
    led = open_ledger(store_url)
    await led.start()
    try:
        yield led
    finally:
        await led.close()


async def test_record_contains_entry_remove(ledger: Ledger) -> None:
    assert await ledger.tenants() == set()
    assert not await ledger.contains("acme")
    assert await ledger.entry("acme") is None

    before = time.time()
    assert await ledger.record("acme", "router pid 1 on host-a") is True
    after = time.time()
    assert await ledger.contains("acme")
    assert not await ledger.contains("globex")
    assert await ledger.tenants() == {"acme"}
    entry = await ledger.entry("acme")
    assert entry is not None
    assert entry["tenant"] == "acme"
    assert entry["by"] == "router pid 1 on host-a"
    assert isinstance(entry["recorded_at"], float)
    assert before - 0.01 <= entry["recorded_at"] <= after + 0.01

    assert await ledger.remove("acme") is True
    assert await ledger.remove("acme") is False
    assert not await ledger.contains("acme")
    assert await ledger.entry("acme") is None
    assert await ledger.tenants() == set()


async def test_record_is_idempotent_and_keeps_the_first_entry(ledger: Ledger) -> None:
    assert await ledger.record("acme", "first") is True
    first = await ledger.entry("acme")
    await asyncio.sleep(0.01)
    assert await ledger.record("acme", "second") is False
    assert await ledger.entry("acme") == first
    assert first is not None and first["by"] == "first"
    # Concurrent duplicates: exactly one of them adds the tenant.
    added = await asyncio.gather(*(ledger.record("globex", f"r{i}") for i in range(20)))
    assert added.count(True) == 1
    assert await ledger.tenants() == {"acme", "globex"}


async def test_any_tenant_spelling_round_trips(ledger: Ledger) -> None:
    tenants = {"a", "acme.example:prod@eu-1_x", "x" * 128, "ümlaut", "with space", "a:b:c"}
    for tenant in tenants:
        assert await ledger.record(tenant, "by 'quotes' \"and\" ümlauts") is True
    assert await ledger.tenants() == tenants
    for tenant in tenants:
        entry = await ledger.entry(tenant)
        assert entry is not None and entry["tenant"] == tenant
        assert entry["by"] == "by 'quotes' \"and\" ümlauts"


async def test_ten_thousand_tenants_round_trip(ledger: Ledger) -> None:
    tenants = {f"tenant-{i:05d}" for i in range(10_000)}
    added = await asyncio.gather(*(ledger.record(t, "wave 1") for t in sorted(tenants)))
    assert all(added)
    started = time.perf_counter()
    assert await ledger.tenants() == tenants
    elapsed = time.perf_counter() - started
    # Every flag change re-reads the whole ledger: it has to be quick.
    assert elapsed < 1.0, f"tenants() took {elapsed:.2f} s for 10k tenants"
    entries = await list_entries(ledger)
    assert len(entries) == 10_000
    assert {e["tenant"] for e in entries} == tenants
    assert all(e["by"] == "wave 1" and isinstance(e["recorded_at"], float) for e in entries)


async def test_two_instances_on_one_store_see_every_record(store_url: str) -> None:
    a, b = open_ledger(store_url), open_ledger(store_url)
    await asyncio.gather(a.start(), b.start())
    try:
        evens = [f"t{i}" for i in range(0, 400, 2)]
        odds = [f"t{i}" for i in range(1, 400, 2)]
        both = [f"shared{i}" for i in range(50)]
        results = await asyncio.gather(
            *(a.record(t, "a") for t in evens + both),
            *(b.record(t, "b") for t in odds + both),
        )
        # Each shared tenant was added exactly once, by one of the two.
        assert results.count(True) == 400 + 50
        everything = set(evens) | set(odds) | set(both)
        assert await a.tenants() == everything
        assert await b.tenants() == everything
        assert await b.contains("t0") and await a.contains("t1")
        assert await a.remove("t1") is True
        assert not await b.contains("t1")
    finally:
        await asyncio.gather(a.close(), b.close())


async def test_lifecycle_is_forgiving(store_url: str) -> None:
    led = open_ledger(store_url)
    await led.close()  # never started: nothing to do
    with pytest.raises(LedgerError, match="not started"):
        await led.record("acme", "x")
    with pytest.raises(LedgerError, match="not started"):
        await led.tenants()
    await led.start()
    await led.start()  # twice: a no-op
    assert await led.record("acme", "x")
    await led.close()
    await led.close()
    with pytest.raises(LedgerError, match="not started"):
        await led.contains("acme")
    await led.start()  # reopened after close: the data is still there
    try:
        assert await led.contains("acme")
    finally:
        await led.close()


async def test_close_waits_for_queued_records(store_url: str) -> None:
    led = open_ledger(store_url)
    await led.start()
    pending = [asyncio.ensure_future(led.record(f"t{i}", "x")) for i in range(200)]
    await asyncio.sleep(0)  # queued, the first batch in flight
    await led.close()
    assert all(await asyncio.gather(*pending))
    again = open_ledger(store_url)
    await again.start()
    try:
        assert len(await again.tenants()) == 200
    finally:
        await again.close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


def _sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


CHILD = """
import asyncio, json, os, signal, sys
from router.control.ledger import open_ledger

async def main(url, action, tenant):
    ledger = open_ledger(url)
    await ledger.start()
    if action == "entry":
        print(json.dumps(await ledger.entry(tenant)), flush=True)
    elif action == "record-and-die":
        print(json.dumps(await ledger.record(tenant, f"child pid {os.getpid()}")), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no close(), no clean exit
    elif action == "record-many":
        tenants = [f"{tenant}{i}" for i in range(300)] + [f"shared{i}" for i in range(100)]
        added = await asyncio.gather(*(ledger.record(t, "child") for t in tenants))
        print(json.dumps(sum(added)), flush=True)
    await ledger.close()

asyncio.run(main(*sys.argv[1:]))
"""


def _child(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, *args],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # our own child, by its pid
        out, err = proc.communicate()
        raise AssertionError(
            f"child pid {proc.pid} still running after {timeout} s\n{err}"
        ) from None
    return proc.returncode, out, err


async def test_sqlite_another_process_sees_entries_both_ways(db: Path) -> None:
    led = open_ledger(_sqlite_url(db))
    await led.start()
    try:
        await led.record("acme", "parent")
        ours = await led.entry("acme")
        code, out, err = await asyncio.to_thread(_finish, _child(_sqlite_url(db), "entry", "acme"))
        assert code == 0, err
        assert json.loads(out) == ours

        # A process killed right after record() returned: the entry is on disk, and this
        # still-open ledger reads it without reopening.
        code, out, err = await asyncio.to_thread(
            _finish, _child(_sqlite_url(db), "record-and-die", "globex")
        )
        assert code == -9, err
        assert json.loads(out) is True
        entry = await led.entry("globex")
        assert entry is not None and entry["by"].startswith("child pid ")
    finally:
        await led.close()


def test_sqlite_two_processes_open_and_write_a_new_file_at_once(db: Path) -> None:
    # Router workers: several processes open the same (new) file at the same moment.
    children = [_child(_sqlite_url(db), "record-many", name) for name in ("a", "b", "c")]
    results = [_finish(child) for child in children]
    for code, _, err in results:
        assert code == 0, err
    added = sum(json.loads(out) for _, out, _ in results)
    assert added == 3 * 300 + 100  # every shared tenant added exactly once
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT count(*) FROM ratchet_ledger").fetchone() == (1000,)


async def test_redis_layout_is_a_set_and_a_hash(redis_server: RedisServer) -> None:
    client = redis_server.client(db=3)  # the default prefix, in a database of its own
    client.flushdb()
    led = open_ledger(redis_server.url(db=3, prefix=""))
    await led.start()
    try:
        await led.record("acme", "router pid 7")
        assert client.type("router:ledger:tenants") == "set"
        assert client.type("router:ledger:entries") == "hash"
        assert client.smembers("router:ledger:tenants") == {"acme"}
        stored = json.loads(str(client.hget("router:ledger:entries", "acme")))
        assert stored["by"] == "router pid 7" and isinstance(stored["recorded_at"], float)
        # The set is the truth: a member whose details are missing is still ledgered.
        client.sadd("router:ledger:tenants", "bare")
        assert await led.contains("bare")
        assert await led.entry("bare") == {"tenant": "bare", "recorded_at": None, "by": None}
        assert {e["tenant"] for e in await list_entries(led)} == {"acme", "bare"}
    finally:
        await led.close()
        client.flushdb()
        client.close()


async def test_redis_prefix_keeps_ledgers_apart(redis_server: RedisServer) -> None:
    a = open_ledger(redis_server.url(prefix="fleet-a"))
    b = open_ledger(redis_server.url(prefix="fleet-b"))
    await asyncio.gather(a.start(), b.start())
    try:
        await a.record("acme", "x")
        assert not await b.contains("acme")
        assert "prefix=fleet-a" in a.url
    finally:
        await a.remove("acme")
        await asyncio.gather(a.close(), b.close())


async def test_redis_wrong_key_type_is_a_ledger_error(redis_server: RedisServer) -> None:
    url = redis_server.url()
    prefix = url.rpartition("prefix=")[2]
    client = redis_server.client()
    client.set(f"{prefix}:tenants", "oops")
    try:
        with pytest.raises(LedgerError, match=r"tenants is a string, not a set"):
            await open_ledger(url).start()
    finally:
        client.delete(f"{prefix}:tenants")
        client.close()


async def test_redis_unreachable_is_a_ledger_error_at_once() -> None:
    led = open_ledger(f"redis://u:s3cret@127.0.0.1:{free_port()}/0")
    started = time.perf_counter()
    with pytest.raises(LedgerError, match="unreachable") as caught:
        await led.start()
    assert time.perf_counter() - started < 5
    assert "s3cret" not in str(caught.value)
    assert "127.0.0.1" in str(caught.value)
    await led.close()


async def test_redis_that_stops_gives_ledger_errors_not_hangs(spare_redis: RedisServer) -> None:
    led = open_ledger(spare_redis.url())
    await led.start()
    try:
        assert await led.record("acme", "x") is True
        spare_redis.stop()
        for call in (
            lambda: led.record("globex", "x"),
            lambda: led.contains("acme"),
            led.tenants,
            lambda: led.entry("acme"),
            lambda: led.remove("acme"),
        ):
            started = time.perf_counter()
            with pytest.raises(LedgerError, match=r"127\.0\.0\.1"):
                await call()
            elapsed = time.perf_counter() - started
            assert elapsed < 8, f"{elapsed:.1f} s to notice a stopped Redis"
    finally:
        await led.close()
    with pytest.raises(LedgerError, match="unreachable"):
        await open_ledger(spare_redis.url()).start()


async def test_redis_that_never_answers_times_out() -> None:
    """A peer that accepts TCP connections but never says a word (a hung Redis, a black
    hole behind a security group): every call ends in a LedgerError within its bound."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # never accept()ed: the kernel completes the handshakes
        port = silent.getsockname()[1]
        led = RedisLedger(f"redis://127.0.0.1:{port}/0", timeout=0.5)
        started = time.perf_counter()
        with pytest.raises(LedgerError, match="unreachable"):
            await led.start()
        elapsed = time.perf_counter() - started
        assert 0.4 < elapsed < 3, f"{elapsed:.2f} s"
        await led.close()


def router_config(tmp_path: Path) -> Path:
    """A valid config (write_config puts its ledger at tmp_path/ledger.db)."""
    flags = tmp_path / "flags.json"
    set_tenants(flags, ["acme"], "new", create=True)
    unused = "http://127.0.0.1:9"  # the tenants commands never call an upstream
    return write_config(tmp_path / "router.yaml", unused, unused, flags)


@pytest.fixture
def cli(store_url: str, tmp_path: Path) -> CliEnv:
    return CliEnv(store_url, router_config(tmp_path))


@dataclass
class CliEnv:
    url: str
    config: Path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_router("tenants", *args, "--config", str(self.config), env=self.env())

    def env(self) -> dict[str, str]:
        return {"ROUTER_LEDGER": self.url}

    def seed(self, *tenants: str, by: str = "router pid 42 on host-a") -> None:
        async def seed() -> None:
            led = open_ledger(self.url)
            await led.start()
            try:
                for tenant in tenants:
                    await led.record(tenant, by)
            finally:
                await led.close()

        asyncio.run(seed())

    def read(self, action: Callable[[Ledger], Any]) -> Any:
        async def read() -> Any:
            led = open_ledger(self.url)
            await led.start()
            try:
                return await action(led)
            finally:
                await led.close()

        return asyncio.run(read())


def test_cli_rollback_refuses_without_accept_data_loss(cli: CliEnv) -> None:
    cli.seed("acme")
    result = cli.run("rollback", "acme")
    assert result.returncode == 2, result.stderr
    assert "--accept-data-loss" in result.stderr
    assert "NOT" in result.stderr and "on legacy" in result.stderr
    assert "acme stays in" in result.stderr
    assert cli.read(lambda led: led.contains("acme")) is True


def test_cli_rollback_removes_the_tenant_and_says_what_next(cli: CliEnv) -> None:
    cli.seed("acme", "globex")
    entry = cli.read(lambda led: led.entry("acme"))
    result = cli.run("rollback", "acme", "--accept-data-loss")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "removed acme from the ratchet ledger" in out
    assert "by router pid 42 on host-a" in out
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(entry["recorded_at"]))
    assert f"recorded {when} UTC" in out
    assert "router flags set acme legacy" in out
    assert "re-read the ledger on every flag change" in out
    assert cli.read(lambda led: led.tenants()) == {"globex"}

    again = cli.run("rollback", "acme", "--accept-data-loss")
    assert again.returncode == 1
    assert "acme is not in the ratchet ledger" in again.stderr


def test_cli_invalid_tenant_is_a_usage_error(cli: CliEnv) -> None:
    cli.seed("acme")
    for args in (("rollback", "bad tenant!", "--accept-data-loss"), ("show", "x" * 200)):
        result = cli.run(*args)
        assert result.returncode == 2, result
        assert "not a valid tenant id" in result.stderr
    assert cli.read(lambda led: led.tenants()) == {"acme"}


def test_cli_ledger_and_show(cli: CliEnv) -> None:
    cli.seed()  # a router opened it (for SQLite: created the file), nobody ledgered yet
    empty = cli.run("ledger")
    assert empty.returncode == 0, empty.stderr
    assert "no tenants in the ratchet ledger" in empty.stdout

    cli.seed("acme", "globex", by="router pid 42 on host-a")
    listing = cli.run("ledger")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split() == ["TENANT", "RECORDED", "(UTC)", "BY"]
    assert [line.split()[0] for line in lines[1:3]] == ["acme", "globex"]
    assert all(line.endswith("router pid 42 on host-a") for line in lines[1:3])
    assert lines[3].startswith("2 tenants in the ratchet ledger")

    as_json = json.loads(cli.run("ledger", "--json").stdout)
    assert [e["tenant"] for e in as_json["tenants"]] == ["acme", "globex"]
    assert as_json["tenants"] == cli.read(list_entries)

    shown = cli.run("show", "acme")
    assert shown.returncode == 0, shown.stderr
    assert "ledgered  yes" in shown.stdout and "router pid 42 on host-a" in shown.stdout
    shown_json = json.loads(cli.run("show", "acme", "--json").stdout)
    assert shown_json["ledgered"] is True and shown_json["by"] == "router pid 42 on host-a"

    missing = cli.run("show", "initech", "--json")
    assert missing.returncode == 1
    assert json.loads(missing.stdout)["ledgered"] is False


def test_cli_unreachable_ledger_exits_1(tmp_path: Path) -> None:
    flags = tmp_path / "flags.json"
    set_tenants(flags, ["acme"], "new", create=True)
    config = write_config(
        tmp_path / "router.yaml", "http://127.0.0.1:9", "http://127.0.0.1:9", flags
    )
    for url, message in (
        (f"redis://127.0.0.1:{free_port()}/0", "unreachable"),
        (f"sqlite:///{tmp_path / 'missing.db'}", "no such file"),
    ):
        env = {"ROUTER_LEDGER": url}
        result = run_router("tenants", "ledger", "--config", str(config), env=env)
        assert result.returncode == 1, result
        assert "ledger error" in result.stderr and message in result.stderr
    assert not (tmp_path / "missing.db").exists()  # the CLI never creates a ledger file


def test_cli_takes_the_ledger_from_the_config_file(tmp_path: Path) -> None:
    flags = tmp_path / "flags.json"
    set_tenants(flags, ["acme"], "new", create=True)
    config = write_config(
        tmp_path / "router.yaml", "http://127.0.0.1:9", "http://127.0.0.1:9", flags
    )
    tree = yaml.safe_load(config.read_text())
    assert tree["ledger"] == f"sqlite:///{tmp_path / 'ledger.db'}"
    CliEnv(tree["ledger"], config).seed("acme")
    result = run_router("tenants", "show", "acme", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert str(tmp_path / "ledger.db") in result.stdout
