"""Shadow traffic: prove the new side on a tenant's real requests before the tenant moves.

For a tenant being shadowed (settings.shadow: a list, or a LaunchDarkly flag), a sample of
the safe requests its flag sends to legacy (GET and HEAD without a body; never a method
that writes) is copied to new in the background, and new's answer is compared with the
one legacy gave the client: status, a configured set of header fields, and the body.

    handler:   offer() -> ShadowJob ──────────────┐ legacy's head, then its body through
               (sampled, bounded; None = not      │ relay()'s tap, then legacy_done()
               copied, or dropped and counted)    ▼
    Shadower:  a task per copy (max_concurrency; max_queue wait, then dropped):
               send the copy to new [and a replay to legacy: the noise filter], wait for the
               client's legacy answer, compare, count, keep the mismatch (ShadowStore)

Why this shape:
- The client's response is legacy's, relayed exactly as without shadowing: the copy runs
  in its own task on its own connection pool (`shadow-new`, sized max_concurrency), so
  neither new's slowness nor a full shadow queue can delay or fail a client request. A
  full queue drops the copy (router_shadow_dropped_total) rather than growing.
- legacy's answer is not fetched twice: the relay feeds the body it streams to the client
  through `BodyDigest`, a streaming hash that also keeps the first max_compare_bytes for a
  JSON diff. Larger bodies are compared by hash alone, never held whole in memory.
- Noise (Twitter's Diffy): two legacy answers to the same request may differ already
  (timestamps, request ids, ordering). With `noise_filter` each copy is also replayed to
  legacy; fields that differ between the two legacy answers are learned as the tenant's
  noise and ignored in every comparison from then on.
- The copy carries `X-Router-Shadow: new` (or `legacy-replay`) and the client's
  X-Request-Id, so backends can recognise it and logs line up.

The counts and recent mismatches are per worker; admin.py sums them over the workers of a
task (`merge_views`), and `router cutover --require-shadow-match` reads them from there.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from router.errors import RouterError, UpstreamReset
from router.proxy.accesslog import QueryRedactor
from router.proxy.connection import Request
from router.proxy.decide import compile_path_patterns
from router.proxy.relay import HeaderRules, build_request_head
from router.proxy.upstream import UpstreamConnection, UpstreamPool, UpstreamResponse
from router.settings import DEFAULT_REDACT_QUERY_PARAMS, ShadowSettings

if TYPE_CHECKING:
    from router.proxy.metrics import Metrics

log = logging.getLogger("router.proxy.shadow")

SAFE_METHODS: Final = frozenset({"GET", "HEAD"})
MISMATCH_KINDS: Final = ("status", "header", "body", "error")
# At most this many differences are described per comparison (the count is still exact
# up to the point the walk stops: see json_diff).
MAX_DIFF_LINES: Final = 10
# Learned noise is bounded per tenant: a backend that randomises everything must not grow
# memory; past the bound nothing new is learned (and mismatches stay visible).
MAX_NOISE_FIELDS: Final = 256
_SHADOW_NEW: Final = b"X-Router-Shadow: new\r\n\r\n"
_SHADOW_REPLAY: Final = b"X-Router-Shadow: legacy-replay\r\n\r\n"


class BodyDigest:
    """A response body seen once, as it streams: its size, a hash, and the first `limit`
    bytes (None once it grew past them)."""

    __slots__ = ("_hash", "captured", "limit", "size")

    def __init__(self, limit: int) -> None:
        self._hash = hashlib.blake2b(digest_size=16)
        self.size = 0
        self.limit = limit
        self.captured: bytearray | None = bytearray()

    def feed(self, data: bytes) -> None:
        self._hash.update(data)
        self.size += len(data)
        captured = self.captured
        if captured is not None:
            if self.size <= self.limit:
                captured += data
            else:
                self.captured = None

    @property
    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class Answer:
    """One side's answer to one copy (or the client's legacy answer)."""

    __slots__ = ("body", "error", "headers", "seconds", "status")

    def __init__(
        self,
        status: int,
        headers: dict[str, str],
        body: BodyDigest | None,
        seconds: float,
        error: str | None = None,
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.seconds = seconds
        self.error = error


def pick_headers(raw: list[tuple[bytes, bytes]], names: frozenset[str]) -> dict[str, str]:
    """The compared fields of a response head (repeated fields joined, as RFC 9110 allows)."""
    picked: dict[str, str] = {}
    for name, value in raw:
        lname = name.decode("latin-1").lower()
        if lname in names:
            text = value.decode("latin-1").strip()
            picked[lname] = f"{picked[lname]}, {text}" if lname in picked else text
    return picked


# ---- comparison -------------------------------------------------------------------------

_NOT_JSON: Final = object()


def _parse_json(data: bytearray) -> Any:
    stripped = data.lstrip()
    if not stripped or stripped[0] not in b"{[":
        return _NOT_JSON
    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: nested past the parser's depth
        return _NOT_JSON


def generic_path(path: str) -> str:
    """`$.items[3].id` -> `$.items[*].id`: how noise and ignore paths are matched."""
    out = []
    i = 0
    while i < len(path):
        char = path[i]
        if char == "[":
            end = path.index("]", i)
            out.append("[*]")
            i = end + 1
        else:
            out.append(char)
            i += 1
    return "".join(out)


_ABSENT: Final = object()  # a key or index one side lacks


def _ignored(path: str, ignore_paths: frozenset[str]) -> bool:
    return path in ignore_paths or generic_path(path) in ignore_paths


def _short(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def json_diff(
    legacy: Any, new: Any, ignore_keys: frozenset[str], ignore_paths: frozenset[str]
) -> list[str]:
    """Where two JSON documents differ, as `path: legacy != new` lines (at most
    MAX_DIFF_LINES), skipping object keys in `ignore_keys` at any depth and paths (exact,
    or with `[*]` for any index) in `ignore_paths`."""
    return [
        f"{path}: {_short(before)} != {_short(after)}"
        for path, before, after in json_differences(legacy, new, ignore_keys, ignore_paths)
    ]


def json_differences(
    legacy: Any,
    new: Any,
    ignore_keys: frozenset[str],
    ignore_paths: frozenset[str],
    path: str = "$",
    out: list[tuple[str, Any, Any]] | None = None,
) -> list[tuple[str, Any, Any]]:
    """json_diff's walk: (path, legacy value, new value) for each difference, _ABSENT for a
    key or index one side lacks; at most MAX_DIFF_LINES."""
    if out is None:
        out = []
    if len(out) >= MAX_DIFF_LINES or (path != "$" and _ignored(path, ignore_paths)):
        return out
    pairs: list[tuple[str, Any, Any]]
    if isinstance(legacy, dict) and isinstance(new, dict):
        pairs = [
            (f"{path}.{key}", legacy.get(key, _ABSENT), new.get(key, _ABSENT))
            for key in sorted(legacy.keys() | new.keys())
            if key not in ignore_keys
        ]
    elif isinstance(legacy, list) and isinstance(new, list):
        pairs = [
            (
                f"{path}[{index}]",
                legacy[index] if index < len(legacy) else _ABSENT,
                new[index] if index < len(new) else _ABSENT,
            )
            for index in range(max(len(legacy), len(new)))
        ]
    else:
        # Leaves (or an object against an array). 1 and 1.0 are the same JSON number;
        # True and 1 are not the same JSON value.
        if legacy != new or isinstance(legacy, bool) != isinstance(new, bool):
            out.append((path, legacy, new))
        return out
    for child, before, after in pairs:
        if before is _ABSENT or after is _ABSENT:
            if not _ignored(child, ignore_paths):
                out.append((child, before, after))
        else:
            json_differences(before, after, ignore_keys, ignore_paths, child, out)
        if len(out) >= MAX_DIFF_LINES:
            break
    return out


def split_ignores(entries: list[str]) -> tuple[frozenset[str], frozenset[str]]:
    """shadow.ignore_json_keys as (key names, paths). Paths stay as written: `$.a[*].b`
    matches every index (json_diff compares a path's generic form too), `$.a[0].b` only
    the first."""
    paths = frozenset(e for e in entries if e.startswith("$"))
    return frozenset(entries) - paths, paths


def _first_difference(a: bytes | bytearray, b: bytes | bytearray) -> int:
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return index
    return min(len(a), len(b))


def body_differences(
    legacy: BodyDigest, new: BodyDigest, ignore_keys: frozenset[str], ignore_paths: frozenset[str]
) -> list[str]:
    """[] when the bodies are the same (byte for byte, or as JSON after normalisation)."""
    if legacy.size == new.size and legacy.hexdigest == new.hexdigest:
        return []
    if legacy.captured is not None and new.captured is not None:
        legacy_doc = _parse_json(legacy.captured)
        new_doc = _parse_json(new.captured)
        if legacy_doc is not _NOT_JSON and new_doc is not _NOT_JSON:
            try:
                return json_diff(legacy_doc, new_doc, ignore_keys, ignore_paths)
            except RecursionError:  # nested deeper than the walk may go: compare as bytes
                pass
        offset = _first_difference(legacy.captured, new.captured)
        return [f"bytes differ from offset {offset} (legacy {legacy.size} B, new {new.size} B)"]
    return [
        f"bodies differ (too large to keep: compared by hash): legacy {legacy.size} B "
        f"{legacy.hexdigest[:12]}, new {new.size} B {new.hexdigest[:12]}"
    ]


class Noise:
    """Fields known to differ between two legacy answers to one request (per tenant)."""

    __slots__ = ("headers", "json_paths")

    def __init__(self) -> None:
        self.headers: set[str] = set()
        self.json_paths: set[str] = set()

    def learn(
        self,
        first: Answer,
        second: Answer,
        ignore_keys: frozenset[str],
        ignore_paths: frozenset[str],
    ) -> bool:
        """Learn from two legacy answers; False if they cannot be compared field by field
        (different statuses, or different bodies that are not JSON): the sample is noise."""
        if first.status != second.status:
            return False
        for name in first.headers.keys() | second.headers.keys():
            differs = first.headers.get(name) != second.headers.get(name)
            if differs and len(self.headers) < MAX_NOISE_FIELDS:
                self.headers.add(name)
        if first.body is None or second.body is None:
            return True
        if first.body.size == second.body.size and first.body.hexdigest == second.body.hexdigest:
            return True
        if first.body.captured is None or second.body.captured is None:
            return False
        a = _parse_json(first.body.captured)
        b = _parse_json(second.body.captured)
        if a is _NOT_JSON or b is _NOT_JSON:
            return False
        for path, _, _ in json_differences(a, b, ignore_keys, ignore_paths | self.json_paths):
            if len(self.json_paths) < MAX_NOISE_FIELDS:
                self.json_paths.add(generic_path(path))
        return True


# ---- per-tenant results -----------------------------------------------------------------


class TenantShadowStats:
    __slots__ = (
        "compared",
        "dropped",
        "first_at",
        "incomplete",
        "kinds",
        "last_at",
        "matched",
        "mismatched",
        "noise",
        "noisy",
        "recent",
        "shadowed",
    )

    def __init__(self, recent: int) -> None:
        self.shadowed = 0  # copies sent to new
        self.compared = 0  # matched + mismatched
        self.matched = 0
        self.mismatched = 0
        self.noisy = 0  # two legacy answers could not be compared: no verdict
        self.incomplete = 0  # the client's legacy answer did not complete: no verdict
        self.dropped = 0  # not copied: the queue was full
        self.kinds = dict.fromkeys(MISMATCH_KINDS, 0)
        self.noise = Noise()
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=recent)
        self.first_at: float | None = None
        self.last_at: float | None = None

    def view(self) -> dict[str, Any]:
        return {
            "shadowed": self.shadowed,
            "compared": self.compared,
            "matched": self.matched,
            "mismatched": self.mismatched,
            "noisy": self.noisy,
            "incomplete": self.incomplete,
            "dropped": self.dropped,
            "mismatch_kinds": dict(self.kinds),
            "match_rate": round(self.matched / self.compared, 6) if self.compared else None,
            "noise": {
                "headers": sorted(self.noise.headers),
                "json_paths": sorted(self.noise.json_paths),
            },
            "first_at": self.first_at,
            "last_at": self.last_at,
        }


class ShadowStore:
    """Per-tenant results of this worker, for the tenants most recently shadowed (bounded:
    the least recently shadowed tenant is forgotten first)."""

    def __init__(self, settings: ShadowSettings) -> None:
        self._recent = settings.recent_mismatches
        self._max_tenants = settings.max_tenants
        self._tenants: collections.OrderedDict[str, TenantShadowStats] = collections.OrderedDict()

    def tenant(self, tenant: str) -> TenantShadowStats:
        stats = self._tenants.get(tenant)
        if stats is None:
            stats = self._tenants[tenant] = TenantShadowStats(self._recent)
            while len(self._tenants) > self._max_tenants:
                self._tenants.popitem(last=False)
        else:
            self._tenants.move_to_end(tenant)
        return stats

    def reset(self, tenant: str) -> bool:
        return self._tenants.pop(tenant, None) is not None

    def view(self, tenant: str | None = None, limit: int = 50) -> dict[str, Any]:
        """This worker's figures (GET /admin/shadow's shape, before merge_views)."""
        if tenant is None:
            chosen = list(self._tenants.items())
        else:
            stats = self._tenants.get(tenant)
            chosen = [(tenant, stats)] if stats is not None else []
        recent = [entry for _, stats in chosen for entry in stats.recent]
        recent.sort(key=lambda e: e["at"], reverse=True)
        return {
            "tenants": {name: stats.view() for name, stats in chosen},
            "recent": recent[:limit],
        }


def merge_views(views: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    """Several workers' views as one: counts summed, rates recomputed, noise united,
    mismatches newest first."""
    tenants: dict[str, dict[str, Any]] = {}
    recent: list[dict[str, Any]] = []
    for view in views:
        recent.extend(view.get("recent", []))
        for name, stats in view.get("tenants", {}).items():
            total = tenants.get(name)
            if total is None:
                tenants[name] = {
                    **stats,
                    "mismatch_kinds": dict(stats["mismatch_kinds"]),
                    "noise": {k: list(v) for k, v in stats["noise"].items()},
                }
                continue
            for key in ("shadowed", "compared", "matched", "mismatched", "noisy",
                        "incomplete", "dropped"):  # fmt: skip
                total[key] += stats[key]
            for kind, count in stats["mismatch_kinds"].items():
                total["mismatch_kinds"][kind] = total["mismatch_kinds"].get(kind, 0) + count
            for key, fields in stats["noise"].items():
                total["noise"][key] = sorted(set(total["noise"][key]) | set(fields))
            for key, pick in (("first_at", min), ("last_at", max)):
                values = [v for v in (total[key], stats[key]) if v is not None]
                total[key] = pick(values) if values else None
    for total in tenants.values():
        compared = total["compared"]
        total["match_rate"] = round(total["matched"] / compared, 6) if compared else None
    recent.sort(key=lambda e: e["at"], reverse=True)
    return {"tenants": tenants, "recent": recent[:limit]}


# ---- the copies -------------------------------------------------------------------------


class ShadowJob:
    """One copied request: what to send, and the client's legacy answer as it arrives."""

    __slots__ = (
        "_legacy_headers",
        "_legacy_status",
        "_names",
        "digest",
        "legacy",
        "method",
        "new_head",
        "path",
        "queued_at",
        "replay_head",
        "request_id",
        "tenant",
    )

    def __init__(
        self,
        tenant: str,
        method: str,
        path: str,
        request_id: str,
        new_head: bytes,
        replay_head: bytes | None,
        compare_bytes: int,
        names: frozenset[str],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.tenant = tenant
        self._names = names  # the compared header fields
        self.method = method
        self.path = path
        self.request_id = request_id
        self.new_head = new_head
        self.replay_head = replay_head
        self.digest = BodyDigest(compare_bytes)  # fed by the relay (Exchange.relay's tap)
        self.legacy: asyncio.Future[Answer | None] = loop.create_future()
        self.queued_at = time.monotonic()
        self._legacy_status = 0
        self._legacy_headers: list[tuple[bytes, bytes]] = []

    def legacy_head(self, upstream: UpstreamResponse) -> None:
        self._legacy_status = upstream.status
        self._legacy_headers = upstream.headers

    def legacy_done(self, seconds: float) -> None:
        """The client got legacy's whole answer."""
        if not self.legacy.done():
            headers = pick_headers(self._legacy_headers, self._names)
            self.legacy.set_result(Answer(self._legacy_status, headers, self.digest, seconds))

    def abandon(self) -> None:
        """The client's request failed or went away: nothing to compare with."""
        if not self.legacy.done():
            self.legacy.set_result(None)


class Shadower:
    """Copies, sends and compares (module docstring). One per worker."""

    def __init__(
        self,
        settings: ShadowSettings,
        pools: dict[str, UpstreamPool],
        rules: HeaderRules,
        metrics: Metrics,
        loop: asyncio.AbstractEventLoop,
        redactor: QueryRedactor | None = None,
    ) -> None:
        self.settings = settings
        # Mismatches keep the path with its query redacted: they reach a log line,
        # /admin/shadow and `router shadow report` (accesslog.QueryRedactor).
        self._redactor = redactor or QueryRedactor(DEFAULT_REDACT_QUERY_PARAMS)
        self.pools = pools
        self.new_pool = pools["new"]
        self.legacy_pool = pools.get("legacy")  # only with the noise filter (shadow_pools)
        self._rules = rules
        self._metrics = metrics
        self._loop = loop
        self.store = ShadowStore(settings)
        self.compare_names = frozenset(settings.compare_headers)
        self._ignore_keys, self._ignore_paths = split_ignores(settings.ignore_json_keys)
        self._excluded = compile_path_patterns([(p, True) for p in settings.exclude_paths])
        self._queue: collections.deque[ShadowJob] = collections.deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._random = random.random
        self.active = 0
        self.closing = False

    @property
    def queued(self) -> int:
        return len(self._queue)

    # ---- hot path (sampled requests only) ----------------------------------------------

    def offer(
        self,
        rate: float,
        tenant: str,
        method: str,
        path: str,
        request: Request,
        request_target: bytes,
        host: str,
        request_id: str,
        peer: str,
    ) -> ShadowJob | None:
        """A copy of this request for new, or None: not sampled, excluded, or dropped."""
        if rate < 1.0 and self._random() >= rate:
            return None
        if self.closing or (self._excluded is not None and self._excluded(path)):
            return None
        settings = self.settings
        if self.active >= settings.max_concurrency and len(self._queue) >= settings.max_queue:
            self._drop(tenant, "queue_full")
            return None

        def copy_head(pool: UpstreamPool, marker: bytes) -> bytes:
            """The client's head as the router would send it to `pool` (no body), marked:
            the marker's field goes before the blank line that ends the head."""
            head, _ = build_request_head(
                request, request_target, host, request_id, peer, pool, self._rules,
                False, False,
            )  # fmt: skip
            return head[:-2] + marker

        replay = self.legacy_pool
        job = ShadowJob(
            tenant, method, path, request_id, copy_head(self.new_pool, _SHADOW_NEW),
            copy_head(replay, _SHADOW_REPLAY) if replay is not None else None,
            settings.max_compare_bytes, self.compare_names, self._loop,
        )  # fmt: skip
        if self.active < settings.max_concurrency:
            self._start(job)
        else:
            self._queue.append(job)
        return job

    def _drop(self, tenant: str, reason: str) -> None:
        self.store.tenant(tenant).dropped += 1
        self._metrics.shadow_dropped(reason)

    # ---- the copies' tasks -------------------------------------------------------------

    def _start(self, job: ShadowJob) -> None:
        self.active += 1
        task = self._loop.create_task(self._work(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _work(self, job: ShadowJob | None) -> None:
        """Run this copy, then queued ones, until the queue is empty (one slot each)."""
        try:
            while job is not None:
                try:
                    await self._run(job)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("shadow copy failed", extra={"tenant": job.tenant})
                job = self._next()
        finally:
            self.active -= 1

    def _next(self) -> ShadowJob | None:
        stale_before = time.monotonic() - self.settings.timeout
        while self._queue:
            job = self._queue.popleft()
            if job.queued_at >= stale_before and not self.closing:
                return job
            self._drop(job.tenant, "stale" if not self.closing else "closing")
        return None

    async def _run(self, job: ShadowJob) -> None:
        stats = self.store.tenant(job.tenant)
        stats.shadowed += 1
        self._metrics.shadow_requests += 1
        fetches = [self._fetch(self.new_pool, job.new_head, job.method)]
        if job.replay_head is not None and self.legacy_pool is not None:
            fetches.append(self._fetch(self.legacy_pool, job.replay_head, job.method))
        answers = await asyncio.gather(*fetches)
        new = answers[0]
        replay = answers[1] if len(answers) > 1 else None
        try:
            # The client's legacy answer: usually complete already (copies start after the
            # legacy request is sent, and new is rarely faster); bounded for slow clients.
            legacy = await asyncio.wait_for(asyncio.shield(job.legacy), self.settings.timeout)
        except TimeoutError:
            legacy = None
        now = time.time()
        if stats.first_at is None:
            stats.first_at = now
        stats.last_at = now
        if new.error is None:
            self._metrics.shadow_duration("new", new.seconds)
        if legacy is None:
            stats.incomplete += 1
            self._metrics.shadow_compared("incomplete")
            return
        self._metrics.shadow_duration("legacy", legacy.seconds)
        if (
            replay is not None
            and replay.error is None
            and not stats.noise.learn(legacy, replay, self._ignore_keys, self._ignore_paths)
        ):
            stats.noisy += 1
            self._metrics.shadow_compared("noisy")
            return
        self._compare(job, stats, legacy, new, now)

    def _compare(
        self, job: ShadowJob, stats: TenantShadowStats, legacy: Answer, new: Answer, now: float
    ) -> None:
        kinds: list[str] = []
        path = self._redactor.redact(job.path)
        entry: dict[str, Any] = {
            "at": now,
            "tenant": job.tenant,
            "method": job.method,
            "path": path,
            "request_id": job.request_id,
            "kinds": kinds,
            "status": {"legacy": legacy.status, "new": new.status},
            "headers": {},
            "body": None,
            "error": new.error,
        }
        if new.error is not None:
            kinds.append("error")
        else:
            if legacy.status != new.status:
                kinds.append("status")
            noise = stats.noise
            headers: dict[str, dict[str, str | None]] = {}
            for name in sorted(legacy.headers.keys() | new.headers.keys()):
                if name in noise.headers:
                    continue
                before, after = legacy.headers.get(name), new.headers.get(name)
                if before != after:
                    headers[name] = {"legacy": before, "new": after}
            if headers:
                kinds.append("header")
                entry["headers"] = headers
            if legacy.body is not None and new.body is not None:
                diff = body_differences(
                    legacy.body,
                    new.body,
                    self._ignore_keys,
                    self._ignore_paths | frozenset(noise.json_paths),
                )
                if diff:
                    kinds.append("body")
                    entry["body"] = {
                        "legacy_bytes": legacy.body.size,
                        "new_bytes": new.body.size,
                        "diff": diff,
                    }
        stats.compared += 1
        if not kinds:
            stats.matched += 1
            self._metrics.shadow_compared("matched")
            return
        stats.mismatched += 1
        self._metrics.shadow_compared("mismatched")
        for kind in kinds:
            stats.kinds[kind] += 1
            self._metrics.shadow_mismatch(kind)
        stats.recent.append(entry)
        log.info(
            "shadow mismatch",
            extra={"tenant": job.tenant, "path": path, "request_id": job.request_id,
                   "kinds": ",".join(kinds)},
        )  # fmt: skip

    async def _fetch(self, pool: UpstreamPool, head: bytes, method: str) -> Answer:
        """Send one copy and read its whole answer into a digest; failures become an
        Answer with `error` (never raised: a copy's failure is a finding, not a crash)."""
        started = time.perf_counter()
        try:
            conn = pool.acquire_idle() or await pool.acquire()
            reused = conn.requests > 0
            try:
                return await self._exchange(pool, conn, head, method, started)
            except UpstreamReset:
                # A kept-alive connection the upstream closed as we reused it (the stale-
                # connection race): once more on a fresh one, as the proxy itself does.
                if not reused or conn.received_any:
                    raise
            conn = await pool.connect()
            return await self._exchange(pool, conn, head, method, started)
        except RouterError as exc:
            return Answer(0, {}, None, time.perf_counter() - started, f"{exc.code}: {exc.detail}")

    async def _exchange(
        self, pool: UpstreamPool, conn: UpstreamConnection, head: bytes, method: str,
        started: float,
    ) -> Answer:  # fmt: skip
        try:
            conn.start_request(head, method == "HEAD")
            response = await conn.response_head(pool.response_header_timeout)
            digest = BodyDigest(self.settings.max_compare_bytes)
            buffered = conn.take_buffered()
            if buffered:
                digest.feed(buffered)
            while not conn.body_complete:
                chunk = await conn.read(pool.read_timeout)
                if not chunk:
                    break
                digest.feed(chunk)
            headers = pick_headers(response.headers, self.compare_names)
            return Answer(response.status, headers, digest, time.perf_counter() - started)
        except BaseException:
            conn.abort()
            raise
        finally:
            pool.release(conn)  # closes it unless it is clean and reusable

    # ---- lifecycle ---------------------------------------------------------------------

    async def close(self) -> None:
        """Stop copying; copies in flight are cancelled (they never affect a client)."""
        self.closing = True
        for job in self._queue:
            self._drop(job.tenant, "closing")
        self._queue.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for pool in self.pools.values():
            await pool.close()


def shadow_pools(
    settings: ShadowSettings, upstreams: Any, loop: asyncio.AbstractEventLoop
) -> dict[str, UpstreamPool]:
    """The copies' own pools, sized max_concurrency, with the copy timeout as their bound:
    copies never take a connection a client request could use."""
    pools: dict[str, UpstreamPool] = {}
    for side in ("new", "legacy") if settings.noise_filter else ("new",):
        base = getattr(upstreams, side)
        timeout = settings.timeout
        tuned = base.model_copy(
            update={
                "max_connections": settings.max_concurrency,
                "response_header_timeout": min(base.response_header_timeout, timeout),
                "read_timeout": min(base.read_timeout, timeout),
                "connect_timeout": min(base.connect_timeout, timeout),
            }
        )
        pools[side] = UpstreamPool(f"shadow-{side}", tuned, loop)
    return pools


class ShadowPolicy:
    """Tenant -> the fraction of its eligible requests copied (0: not shadowed). Read when
    the Decider evaluates a tenant (once per tenant and flag change), never per request."""

    def __init__(self, settings: ShadowSettings, variation: Callable[[str, str, Any], Any]):
        self.settings = settings
        self._variation = variation  # FlagSource.evaluate(flag_key, tenant, default)

    def rate(self, tenant: str) -> float:
        settings = self.settings
        listed = settings.rate_for_listed(tenant)
        if listed is not None:
            return listed
        if settings.flag_key is None:
            return 0.0
        value = self._variation(settings.flag_key, tenant, False)
        if value is True:
            return settings.sample_rate
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1:
            return float(value)
        return 0.0
