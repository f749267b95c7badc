"""The ratchet ledger: tenants that `new` has served, so that they never go back to legacy.

Replication runs one way (legacy -> new). Once `new` has served a tenant, the tenant may
have written data that exists only on `new`; routing it back to legacy would hide those
writes (and split its data between two sides). Before `new` serves a tenant for the first
time, the router records it here and waits until the record is durable; a later `legacy`
flag value for a ledgered tenant is refused (router/proxy/decide.py, reason `ratchet`). Only
`router tenants rollback TENANT --accept-data-loss` (router/cli/tenants.py) removes an entry.

    open_ledger("sqlite:///router-ledger.db")         # one router (or its workers)
    open_ledger("sqlite:////var/lib/router/ledger.db")   # absolute path: four slashes
    open_ledger("redis://ledger.cache.internal:6379/0")  # a fleet; rediss:// for TLS

Backends
--------
SQLite (`sqlite:///PATH`): the stdlib `sqlite3`, driven from one dedicated worker thread
per ledger (a one-thread executor), so no file I/O, fsync or lock wait ever runs on the
event loop. PATH is what follows `sqlite:///`: `sqlite:///router-ledger.db` is relative and
resolved against the process's working directory when the ledger is opened
(`open_ledger`); `sqlite:////var/lib/x.db` (four slashes) is absolute. The parent
directory must exist. Journal WAL (readers never wait for a writer; several router
workers may share the file, writers wait for each other up to a busy timeout) and
`synchronous=FULL`. A write lock held longer than the busy timeout (5 s) is a LedgerError.

Redis (`redis://[:password@]host:port/db`, `rediss://` for TLS): `redis.asyncio`. A set
`router:ledger:tenants` (membership, the truth) and a hash `router:ledger:entries`
(tenant -> JSON {"recorded_at", "by"}), written together in one MULTI/EXEC transaction
(SADD + HSETNX: idempotent, the first entry is kept). `?prefix=P` replaces the
`router:ledger` prefix (a shared Redis, or tests). Connect and every command have a
timeout (3 s by default) and each call a hard deadline, so a dead or unreachable Redis
gives a `LedgerError`, never a hang. At most 16 connections per router process (callers
wait for a free one within their deadline). Cluster mode is not supported (the two keys
would sit in different slots); use a cluster-mode-disabled replication group.

Both: records that arrive while a write is in flight are written together in the next
transaction (group commit, up to 1000 per transaction: one fsync, one Redis round trip),
so a wave of thousands of tenants reaching new at once is not written one at a time.
`record()` still returns only once its own row is durable.

What "durable" means when `record()` returns
--------------------------------------------
- SQLite: the transaction is committed and, with WAL + `synchronous=FULL`, the WAL is
  fsynced: the entry survives a crash of the process and a power loss of the machine (as
  far as the disk honours fsync). It does not survive the loss of the disk or of the
  container's writable layer: on ECS a SQLite file dies with its task, hence Redis there.
- Redis: the primary has acknowledged the EXEC, i.e. the entry is in its memory. Whether it
  survives a Redis restart depends on the server's persistence settings, not on us. An SRE
  should run the ledger's Redis with `appendonly yes` and `appendfsync always` (an
  acknowledged write is on disk) or at least `appendfsync everysec` (up to one second of
  acknowledged writes can be lost on a crash of the Redis host); RDB snapshots alone
  (`save ...`) can lose minutes. Replication to replicas is asynchronous: a failover can
  lose the last acknowledged writes too. A lost entry means that a tenant that `new` has
  served could later be routed back to legacy: treat the ledger's Redis as a database,
  not as a cache (no eviction: `maxmemory-policy noeviction`).

Why routers keep an in-memory view instead of asking the store per request
--------------------------------------------------------------------------
A set lookup costs nanoseconds; a store round trip costs a thread hop or a network round
trip on every request, and would make every request fail when the store blips. The view
is exact where it matters: the router adds a tenant to it only after its own durable
write, and a decision can only depend on an entry written elsewhere (another router, or
a rollback) once the flag changes for that tenant; every flag change re-reads the whole
ledger (`tenants()`, which must therefore be fast for 100k tenants) before the decision
cache is cleared. That is also why a rollback must be followed by a flag change.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

__all__ = [
    "Ledger",
    "LedgerError",
    "RedisLedger",
    "SqliteLedger",
    "list_entries",
    "open_ledger",
    "sqlite_path",
]

T = TypeVar("T")


class LedgerError(Exception):
    """The ledger's store is unreachable, refused the operation, or is corrupt. The message
    names the store (its URL, without credentials) and the reason."""


class Ledger(Protocol):
    url: str  # for logs, without credentials

    async def start(self) -> None:
        """Connect or open, create the schema; LedgerError if the store is unreachable.
        Safe to call again after a failure (and a no-op once started)."""

    async def close(self) -> None:
        """Release the connection or file; safe to call when not started."""

    async def record(self, tenant: str, by: str) -> bool:
        """Ledger `tenant` (`by`: who, e.g. "router pid 123 on host h"); durable when it
        returns. Idempotent: True if newly added, False if it was there (first entry kept)."""

    async def contains(self, tenant: str) -> bool: ...

    async def tenants(self) -> set[str]:
        """Every ledgered tenant (routers resync their view with it on each flag change)."""

    async def entry(self, tenant: str) -> dict[str, Any] | None:
        """{"tenant", "recorded_at" (unix seconds, float), "by"}, or None if not ledgered."""

    async def remove(self, tenant: str) -> bool:
        """Rollback: delete the entry; True if it was there."""


def open_ledger(url: str) -> Ledger:
    """A ledger for `url` (no I/O yet: call `start()`). Relative SQLite paths are resolved
    against the current working directory now."""
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        return SqliteLedger(sqlite_path(url))
    if scheme in ("redis", "rediss"):
        return RedisLedger(url)
    raise LedgerError(f"unsupported ledger URL {_redact(url)!r}: expected sqlite:/// or redis://")


async def list_entries(ledger: Ledger) -> list[dict[str, Any]]:
    """Every entry, oldest first (the CLI's listing). Uses the backend's bulk read when
    it has one, else one `entry()` per tenant."""
    if isinstance(ledger, SqliteLedger | RedisLedger):
        entries = await ledger.entries()
    else:
        found = [await ledger.entry(t) for t in sorted(await ledger.tenants())]
        entries = [e for e in found if e is not None]
    return sorted(entries, key=lambda e: (e["recorded_at"] or 0.0, e["tenant"]))


def _redact(url: str) -> str:
    """`url` without user name and password."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=host))


# ---- group commit (both backends) ----------------------------------------------------


class _GroupCommit:
    """`record()` for both backends: records that arrive while a write is in flight wait
    and go together in the next one (one transaction: one fsync, one Redis round trip),
    so a wave of thousands of tenants reaching new at once is not written one by one."""

    url: str
    MAX_BATCH = 1000  # rows per transaction: a Redis MULTI blocks other clients meanwhile

    def __init__(self) -> None:
        self._queue: list[tuple[str, str, float, asyncio.Future[bool]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def record(self, tenant: str, by: str) -> bool:
        self._check_started()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()
        self._queue.append((tenant, by, time.time(), done))
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush())
        # A caller cancelled meanwhile cancels only its own future: the row is still written.
        return await done

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self.MAX_BATCH]
                del self._queue[: self.MAX_BATCH]
                rows = [(tenant, by, at) for tenant, by, at, _ in batch]
                try:
                    added = await self._write(rows)
                except BaseException as exc:
                    error = (
                        exc
                        if isinstance(exc, LedgerError)
                        else LedgerError(f"{self.url}: write failed: {exc!r}")
                    )
                    for *_, done in batch:
                        if not done.done():
                            done.set_exception(error)
                    if not isinstance(exc, Exception):
                        raise
                else:
                    for (*_, done), new in zip(batch, added, strict=True):
                        if not done.done():
                            done.set_result(new)
        finally:
            self._flusher = None

    async def _drain(self) -> None:
        """Let queued records finish (close() calls this first)."""
        while self._flusher is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._flusher)

    def _check_started(self) -> None:
        raise NotImplementedError

    async def _write(self, rows: list[tuple[str, str, float]]) -> list[bool]:
        """Insert (tenant, by, recorded_at) rows, keeping existing entries; per row: added?"""
        raise NotImplementedError


# ---- SQLite ---------------------------------------------------------------------------


def sqlite_path(url: str) -> str:
    """The absolute file path of a `sqlite:///PATH` URL (relative PATH: against the cwd)."""
    parts = urlsplit(url)
    if parts.scheme != "sqlite" or parts.netloc or not parts.path.startswith("/"):
        raise LedgerError(f"expected sqlite:///path (three slashes), got {url!r}")
    path = unquote(parts.path[1:])  # sqlite:///x.db -> x.db; sqlite:////abs -> /abs
    if not path.strip("/"):
        raise LedgerError(f"expected sqlite:///path, got {url!r}: no path")
    return os.path.abspath(path)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS ratchet_ledger (
    tenant      TEXT PRIMARY KEY NOT NULL,
    recorded_at REAL NOT NULL,
    "by"        TEXT NOT NULL
) WITHOUT ROWID
"""


class SqliteLedger(_GroupCommit):
    """The ledger in one SQLite file; every sqlite3 call runs on this ledger's own thread."""

    def __init__(self, path: str, *, busy_timeout: float = 5.0, create: bool = True) -> None:
        super().__init__()
        self.path = os.path.abspath(path)
        self.url = f"sqlite:///{self.path}"
        self.busy_timeout = busy_timeout
        # create=False (the CLI): a missing file is an error, not a new empty ledger that
        # would hide a path that differs from the routers' one.
        self.create = create
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # only touched on the executor's thread
        self._started = False
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"SqliteLedger({self.path!r})"

    # -- lifecycle (on the loop) --

    async def start(self) -> None:
        async with self._lock:
            if self._started:
                return
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="ledger-sqlite"
                )
            try:
                await self._run(self._open)
            except BaseException:
                await self._shutdown()
                raise
            self._started = True

    async def close(self) -> None:
        async with self._lock:
            await self._drain()
            self._started = False
            await self._shutdown()

    async def _shutdown(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._close_conn)
        finally:
            executor.shutdown(wait=False)

    # -- operations (on the loop) --

    async def contains(self, tenant: str) -> bool:
        return await self._call(self._contains, tenant)

    async def tenants(self) -> set[str]:
        return await self._call(self._tenants)

    async def entry(self, tenant: str) -> dict[str, Any] | None:
        return await self._call(self._entry, tenant)

    async def entries(self) -> list[dict[str, Any]]:
        return await self._call(self._entries)

    async def remove(self, tenant: str) -> bool:
        return await self._call(self._remove, tenant)

    async def _write(self, rows: list[tuple[str, str, float]]) -> list[bool]:
        return await self._run(self._insert, rows)

    def _check_started(self) -> None:
        if not self._started or self._executor is None:
            raise LedgerError(f"{self.url}: ledger not started (call start() first)")

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        self._check_started()
        return await self._run(fn, *args)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        executor = self._executor
        if executor is None:
            raise LedgerError(f"{self.url}: ledger not started (call start() first)")
        try:
            return await asyncio.get_running_loop().run_in_executor(
                executor, self._guarded, fn, *args
            )
        except RuntimeError as exc:  # executor shut down under us (close() raced a call)
            raise LedgerError(f"{self.url}: ledger closed ({exc})") from None

    def _guarded(self, fn: Callable[..., T], *args: Any) -> T:
        """On the ledger's thread: run `fn`, turning store errors into LedgerError."""
        try:
            return fn(*args)
        except sqlite3.DatabaseError as exc:
            text = str(exc)
            if "not a database" in text or "malformed" in text:
                raise LedgerError(f"{self.url}: corrupt ledger file: {text}") from None
            if "locked" in text or "busy" in text:
                raise LedgerError(
                    f"{self.url}: {text} (another process held a write lock for more than"
                    f" {self.busy_timeout:g} s)"
                ) from None
            raise LedgerError(f"{self.url}: {type(exc).__name__}: {text}") from None
        except (sqlite3.Error, OSError) as exc:
            raise LedgerError(f"{self.url}: {type(exc).__name__}: {exc}") from None

    # -- on the ledger's thread --

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise LedgerError(f"{self.url}: ledger not open")
        return self._conn

    def _open(self) -> None:
        if self._conn is not None:
            return
        parent = os.path.dirname(self.path)
        if not os.path.isdir(parent):
            raise LedgerError(
                f"{self.url}: directory {parent} does not exist (create it first; a relative"
                " sqlite:///path is resolved against the working directory, an absolute one"
                " needs four slashes: sqlite:////var/lib/...)"
            )
        if os.path.isdir(self.path):
            raise LedgerError(f"{self.url}: {self.path} is a directory")
        if not self.create and not os.path.exists(self.path):
            raise LedgerError(
                f"{self.url}: no such file: no router has opened this ledger"
                f" (a relative sqlite:///path is resolved against the working directory,"
                f" here {os.getcwd()})"
            )
        # isolation_level=None: no implicit transactions; every write says BEGIN itself.
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        try:
            deadline = time.monotonic() + self.busy_timeout
            while True:
                try:
                    self._setup(conn)
                    break
                except sqlite3.OperationalError as exc:
                    # Two workers opening a new file at once can find the WAL switch or
                    # the schema busy even past the busy handler: retry until the timeout.
                    if "locked" not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _setup(self, conn: sqlite3.Connection) -> None:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise LedgerError(
                f"{self.url}: the file system does not support WAL (journal_mode {mode})"
            )
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(_SCHEMA)
        conn.execute("SELECT count(*) FROM ratchet_ledger").fetchone()  # readable at all?

    def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _insert(self, rows: list[tuple[str, str, float]]) -> list[bool]:
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")
        try:
            added = [
                conn.execute(
                    'INSERT OR IGNORE INTO ratchet_ledger (tenant, recorded_at, "by")'
                    " VALUES (?, ?, ?)",
                    (tenant, at, by),
                ).rowcount
                == 1
                for tenant, by, at in rows
            ]
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        return added

    def _contains(self, tenant: str) -> bool:
        row = self._db().execute("SELECT 1 FROM ratchet_ledger WHERE tenant = ?", (tenant,))
        return row.fetchone() is not None

    def _tenants(self) -> set[str]:
        return {row[0] for row in self._db().execute("SELECT tenant FROM ratchet_ledger")}

    def _entry(self, tenant: str) -> dict[str, Any] | None:
        row = (
            self._db()
            .execute(
                'SELECT tenant, recorded_at, "by" FROM ratchet_ledger WHERE tenant = ?',
                (tenant,),
            )
            .fetchone()
        )
        return None if row is None else {"tenant": row[0], "recorded_at": row[1], "by": row[2]}

    def _entries(self) -> list[dict[str, Any]]:
        rows = self._db().execute('SELECT tenant, recorded_at, "by" FROM ratchet_ledger')
        return [{"tenant": t, "recorded_at": at, "by": by} for t, at, by in rows]

    def _remove(self, tenant: str) -> bool:
        cursor = self._db().execute("DELETE FROM ratchet_ledger WHERE tenant = ?", (tenant,))
        return cursor.rowcount == 1


# ---- Redis ----------------------------------------------------------------------------

DEFAULT_PREFIX = "router:ledger"


class RedisLedger(_GroupCommit):
    """The ledger in Redis: a set (membership) plus a hash (when, by), written atomically."""

    def __init__(self, url: str, *, timeout: float = 3.0, bulk_timeout: float = 30.0) -> None:
        super().__init__()
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise LedgerError(f"expected redis://host:port/db, got {_redact(url)!r}")
        query = parse_qsl(parts.query, keep_blank_values=True)
        prefix = [v for k, v in query if k == "prefix"]
        self.prefix = prefix[-1] if prefix and prefix[-1] else DEFAULT_PREFIX
        # The client URL keeps every other query argument (redis-py understands them) but
        # not ours, which redis-py would pass on to the connection as an unknown keyword.
        rest = urlencode([(k, v) for k, v in query if k != "prefix"])
        self._client_url = urlunsplit(parts._replace(query=rest))
        self.url = _redact(urlunsplit(parts._replace(query=urlencode(query))))
        self.tenants_key = f"{self.prefix}:tenants"
        self.entries_key = f"{self.prefix}:entries"
        self.timeout = timeout
        self.bulk_timeout = bulk_timeout
        self._client: Any = None  # redis.asyncio.Redis
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"RedisLedger({self.url!r})"

    async def start(self) -> None:
        async with self._lock:
            if self._client is not None:
                return
            import redis.asyncio
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            # A bounded pool that makes callers wait for a free connection (within each
            # call's deadline) rather than failing with "Too many connections".
            pool = redis.asyncio.BlockingConnectionPool.from_url(
                self._client_url,
                max_connections=16,
                timeout=None,
                decode_responses=True,
                socket_connect_timeout=self.timeout,
                socket_timeout=self.timeout,
                # One immediate retry: a pooled connection that died (Redis restarted,
                # failover) is replaced once; the deadline in _guard bounds the rest.
                retry=Retry(NoBackoff(), 1),
            )
            client = redis.asyncio.Redis.from_pool(pool)
            try:
                async with self._guard("unreachable"):
                    await client.ping()
                    kinds = await asyncio.gather(
                        client.type(self.tenants_key), client.type(self.entries_key)
                    )
                for key, raw_kind, want in zip(
                    (self.tenants_key, self.entries_key), kinds, ("set", "hash"), strict=True
                ):
                    kind = raw_kind if isinstance(raw_kind, str) else raw_kind.decode()
                    if kind not in ("none", want):
                        raise LedgerError(f"{self.url}: key {key} is a {kind}, not a {want}")
            except BaseException:
                with contextlib.suppress(Exception):
                    await client.aclose()
                raise
            self._client = client

    async def close(self) -> None:
        async with self._lock:
            await self._drain()
            client, self._client = self._client, None
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()

    async def _write(self, rows: list[tuple[str, str, float]]) -> list[bool]:
        client = self._started()
        async with self._guard("write failed"), client.pipeline(transaction=True) as pipe:
            for tenant, by, at in rows:
                pipe.sadd(self.tenants_key, tenant)
                pipe.hsetnx(self.entries_key, tenant, json.dumps({"recorded_at": at, "by": by}))
            replies = await pipe.execute()
        return [bool(added) for added in replies[0::2]]

    async def contains(self, tenant: str) -> bool:
        client = self._started()
        async with self._guard("read failed"):
            return bool(await client.sismember(self.tenants_key, tenant))

    async def tenants(self) -> set[str]:
        client = self._started()
        # SSCAN, not SMEMBERS: a 100k-member set is read in slices of 10k, so neither Redis
        # (for its other clients) nor the router's event loop (parsing the reply) stalls for
        # the whole set at once (~15 ms per slice with hiredis). A member present during the
        # whole scan is returned; one added meanwhile may or may not be.
        async with self._guard("read failed", self.bulk_timeout):
            return {m async for m in client.sscan_iter(self.tenants_key, count=10_000)}

    async def entry(self, tenant: str) -> dict[str, Any] | None:
        client = self._started()
        async with self._guard("read failed"), client.pipeline(transaction=False) as pipe:
            pipe.sismember(self.tenants_key, tenant)
            pipe.hget(self.entries_key, tenant)
            member, raw = await pipe.execute()
        return self._entry(tenant, raw) if member else None

    async def entries(self) -> list[dict[str, Any]]:
        client = self._started()
        tenants = await self.tenants()
        async with self._guard("read failed", self.bulk_timeout):
            raw: dict[str, str] = {
                field: value
                async for field, value in client.hscan_iter(self.entries_key, count=10_000)
            }
        return [self._entry(tenant, raw.get(tenant)) for tenant in tenants]

    async def remove(self, tenant: str) -> bool:
        client = self._started()
        async with self._guard("write failed"), client.pipeline(transaction=True) as pipe:
            pipe.srem(self.tenants_key, tenant)
            pipe.hdel(self.entries_key, tenant)
            removed, _ = await pipe.execute()
        return bool(removed)

    @staticmethod
    def _entry(tenant: str, raw: str | None) -> dict[str, Any]:
        """A member of the set whose hash entry is missing or unreadable still counts as
        ledgered (the set is the truth); its details are then None."""
        recorded_at: float | None = None
        by: str | None = None
        if raw is not None:
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                data = json.loads(raw)
                recorded_at = float(data["recorded_at"]) if "recorded_at" in data else None
                by = str(data["by"]) if "by" in data else None
        return {"tenant": tenant, "recorded_at": recorded_at, "by": by}

    def _started(self) -> Any:
        self._check_started()
        return self._client

    def _check_started(self) -> None:
        if self._client is None:
            raise LedgerError(f"{self.url}: ledger not started (call start() first)")

    @contextlib.asynccontextmanager
    async def _guard(self, what: str, deadline: float | None = None) -> AsyncIterator[None]:
        """Redis errors and timeouts -> LedgerError naming the store; a hard deadline on
        top of the socket timeouts (a retry included), so no call can hang."""
        from redis.exceptions import RedisError

        limit = deadline if deadline is not None else 2 * self.timeout + 1
        try:
            async with asyncio.timeout(limit):
                yield
        except TimeoutError:
            raise LedgerError(f"{self.url}: {what}: no answer within {limit:g} s") from None
        except RedisError as exc:
            raise LedgerError(f"{self.url}: {what}: {type(exc).__name__}: {exc}") from None
        except OSError as exc:
            raise LedgerError(f"{self.url}: {what}: {type(exc).__name__}: {exc}") from None
