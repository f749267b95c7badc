"""Bulk moves: `router migrate` runs many single-tenant cutovers (cutover.py), in order,
bounded in concurrency and start rate, with a journal that makes a stopped run resumable.

Tenants file: one tenant per line, or `tenant,size` (CSV); blank lines and `#` comments are
skipped. With sizes, the smallest go first (a problem shows on a small tenant first).

Journal: JSON lines, appended and fsync'd one by one (default `<tenants file>.journal`):

    {"ts": ..., "event": "run", "pid": ..., "tenants": N, "flag": "...", "admins": [...]}
    {"ts": ..., "event": "started", "tenant": "acme", "resume": false}
    {"ts": ..., "event": "flag", "tenant": "acme", "value": "hold"}     # every flag write
    {"ts": ..., "event": "flag", "tenant": "acme", "value": "new"}
    {"ts": ..., "event": "done", "tenant": "acme", "outcome": "moved", "ms": 412.0}
    {"ts": ..., "event": "failed", "tenant": "x", "outcome": "rolled-back", "reason": "..."}
    {"ts": ..., "event": "end", "interrupted": false, "moved": ..., ...}

On a rerun, a tenant whose last event is `done` is skipped; every other tenant is cut over.
One that was `started` (or `failed`) is re-checked by the cutover itself with resume_hold:
the flag already says new and the routers agree -> done without a write; it says hold
(a crash mid-cutover) -> drain and finish, or roll back if a check fails; legacy -> redo.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final, TypeVar

import httpx

from router.control.cutover import CutoverResult, Routers, Step, cutover
from router.control.flagwriters import FlagWriter
from router.domain import DEFAULT_TENANT_ID_MAX_LENGTH, tenant_id_problem

DEFAULT_WAVE_SIZE: Final = 100
DEFAULT_CONCURRENCY: Final = 4


class MigrateError(Exception):
    """Bad input (tenants file, journal): the run does not start."""


# ---- the tenants file -------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    tenant: str
    size: float | None
    line: int


def read_tenants(
    path: Path, tenant_max_length: int = DEFAULT_TENANT_ID_MAX_LENGTH
) -> tuple[list[Entry], list[str]]:
    """(entries in cutover order, warnings). Sizes sort ascending (stable); a file must
    give a size on every line or on none. Every id must pass the router's rule with the
    routers' `tenant.max_length` (`tenant_max_length`)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise MigrateError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise MigrateError(f"{path}: not UTF-8 text") from None
    entries: list[Entry] = []
    warnings: list[str] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) > 2:
            raise MigrateError(f"{path}:{number}: expected `tenant` or `tenant,size`: {raw!r}")
        tenant = fields[0]
        problem = tenant_id_problem(tenant, tenant_max_length)
        if problem is not None:
            raise MigrateError(f"{path}:{number}: {problem}")
        size: float | None = None
        if len(fields) == 2:
            try:
                size = float(fields[1])
            except ValueError:
                size = math.nan
            if not math.isfinite(size) or size < 0:
                raise MigrateError(
                    f"{path}:{number}: size must be a non-negative number, got {fields[1]!r}"
                )
        if tenant in seen:
            warnings.append(f"{path}:{number}: {tenant} repeats line {seen[tenant]}; ignored")
            continue
        seen[tenant] = number
        entries.append(Entry(tenant, size, number))
    sized = [e for e in entries if e.size is not None]
    if sized and len(sized) != len(entries):
        unsized = next(e for e in entries if e.size is None)
        raise MigrateError(
            f"{path}:{unsized.line}: no size for {unsized.tenant}, but other lines have "
            "sizes (give every tenant a size, or none)"
        )
    if sized:
        entries.sort(key=lambda e: e.size or 0.0)
    return entries, warnings


# ---- the journal ------------------------------------------------------------------------


class Journal:
    """Append-only JSON lines, each fsync'd before the call returns; one writer at a time
    (an exclusive flock on the journal itself)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file: IO[str] | None = None

    @staticmethod
    def load(path: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """({tenant: its last started/done/failed record}, warnings)."""
        states: dict[str, dict[str, Any]] = {}
        warnings: list[str] = []
        try:
            text = Path(path).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return states, warnings
        except OSError as exc:
            raise MigrateError(f"{path}: cannot read journal: {exc.strerror or exc}") from None
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                # A crash mid-write leaves at most one torn line; its event never counted.
                warnings.append(f"{path}:{number}: unreadable journal line skipped")
                continue
            if not isinstance(record, dict):
                continue
            tenant = record.get("tenant")
            if isinstance(tenant, str) and record.get("event") in ("started", "done", "failed"):
                states[tenant] = record
        return states, warnings

    def open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MigrateError(
                f"{self.path}: another `router migrate` is using this journal"
            ) from None
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        size = os.fstat(fd).st_size
        if size:
            with open(self.path, "rb") as existing:
                existing.seek(size - 1)
                if existing.read(1) != b"\n":  # a torn last line: start on a fresh one
                    self._file.write("\n")

    def write(self, event: str, **fields: Any) -> None:
        assert self._file is not None, "journal not open"
        record = {"ts": round(time.time(), 3), "event": event, **fields}
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class JournalingWriter:
    """A FlagWriter that journals every flag write it makes (after it succeeded)."""

    def __init__(self, writer: FlagWriter, journal: Journal) -> None:
        self.writer = writer
        self.journal = journal

    def describe(self) -> str:
        return self.writer.describe()

    async def get(self, tenant: str) -> str:
        return await self.writer.get(tenant)

    async def set(self, tenant: str, value: str) -> None:
        await self.writer.set(tenant, value)
        self.journal.write("flag", tenant=tenant, value=value)


# ---- progress ---------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """done/total, failures, running, rate (cutovers/min) and an ETA from a sliding window
    of the last `window` completion times: a bar redrawn in place on a terminal, a plain
    line every `interval` seconds otherwise.

    A 40-line renderer rather than tqdm or rich: neither is installed, the line needs
    fields of its own (failures, running, a windowed rate rather than tqdm's smoothed
    one), and it must share stderr with the per-tenant lines, which a redraw-in-place
    renderer does by clearing its line first.
    """

    def __init__(
        self, total: int, stream: IO[str], tty: bool, window: int = 20, interval: float = 10.0
    ) -> None:
        self.total = total
        self.stream = stream
        self.tty = tty
        self.interval = interval
        self.done = 0
        self.failed = 0
        self.running = 0
        self.started = time.monotonic()
        self.times: deque[float] = deque(maxlen=max(2, window))
        self._last_plain = self.started
        self._shown = False

    def complete(self, ok: bool) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        self.times.append(time.monotonic())

    def rate(self) -> float | None:
        """Cutovers per second over the window (from the run's start while it is short)."""
        if not self.times:
            return None
        first = self.times[0] if len(self.times) >= 2 else self.started
        span = self.times[-1] - first
        count = len(self.times) - 1 if len(self.times) >= 2 else 1
        return count / span if span > 0 else None

    def line(self) -> str:
        rate = self.rate()
        left = self.total - self.done
        eta = _duration(left / rate) if rate and left else ("0s" if not left else "?")
        per_min = f"{rate * 60:.1f}/min" if rate else "-/min"
        width = 24
        filled = int(width * self.done / self.total) if self.total else width
        bar = "#" * filled + "." * (width - filled)
        return (
            f"[{bar}] {self.done}/{self.total} done, {self.failed} failed, "
            f"{self.running} running, {per_min}, ETA {eta}"
        )

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r\x1b[2K" + self.line())
            self.stream.flush()
            self._shown = True
        elif force or now - self._last_plain >= self.interval:
            self._last_plain = now
            self.stream.write(f"progress: {self.line()}\n")
            self.stream.flush()

    def clear(self) -> None:
        """Before printing anything else on the stream."""
        if self.tty and self._shown:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self._shown = False


# ---- the run ----------------------------------------------------------------------------


@dataclass
class Summary:
    total: int = 0
    moved: list[str] = field(default_factory=list)
    already_new: list[str] = field(default_factory=list)
    done_before: list[str] = field(default_factory=list)  # done in an earlier run (journal)
    failed: dict[str, str] = field(default_factory=dict)  # tenant -> outcome: reason
    not_started: list[str] = field(default_factory=list)
    cutover_ms: list[float] = field(default_factory=list)  # of the moved ones
    elapsed_s: float = 0.0
    stopped: str = ""  # why it stopped starting cutovers early ("" if it did not)
    interrupted: bool = False

    @property
    def mean_ms(self) -> float | None:
        return sum(self.cutover_ms) / len(self.cutover_ms) if self.cutover_ms else None

    def to_json(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "moved": len(self.moved),
            "already_new": len(self.already_new),
            "done_before": len(self.done_before),
            "failed": self.failed,
            "not_started": len(self.not_started),
            "elapsed_s": round(self.elapsed_s, 3),
            "mean_cutover_ms": None if self.mean_ms is None else round(self.mean_ms, 1),
            "stopped": self.stopped,
            "interrupted": self.interrupted,
        }


class RateLimiter:
    """At most `per_minute` starts a minute, spaced evenly (0: no limit)."""

    def __init__(self, per_minute: float) -> None:
        self.gap = 60.0 / per_minute if per_minute > 0 else 0.0
        self.next = 0.0

    def delay(self) -> float:
        return max(0.0, self.next - time.monotonic())

    def take(self) -> None:
        self.next = max(time.monotonic(), self.next) + self.gap


_T = TypeVar("_T")


def waves(entries: list[_T], size: int) -> Iterator[list[_T]]:
    for i in range(0, len(entries), max(1, size)):
        yield entries[i : i + max(1, size)]


ResultCallback = Callable[[Entry, CutoverResult], None]


class Migration:
    """One run over the tenants file. `stop(why)` (SIGINT) stops starting cutovers; the
    running ones finish."""

    def __init__(
        self,
        entries: list[Entry],
        writer: FlagWriter,
        admins: list[str],
        token: str | None,
        journal: Journal,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        rate: float = 0.0,
        wave_size: int = DEFAULT_WAVE_SIZE,
        max_failures: int = 0,
        cutover_options: dict[str, Any] | None = None,
        progress: Progress | None = None,
        on_result: ResultCallback | None = None,
    ) -> None:
        self.entries = entries
        self.writer = JournalingWriter(writer, journal)
        self.admins = admins
        self.token = token
        self.journal = journal
        self.concurrency = max(1, concurrency)
        self.limiter = RateLimiter(rate)
        self.wave_size = max(1, wave_size)
        self.max_failures = max_failures
        self.cutover_options = cutover_options or {}
        self.progress = progress
        self.on_result = on_result
        self.summary = Summary(total=len(entries))
        self._stop = asyncio.Event()
        self._start_lock = asyncio.Lock()

    def stop(self, why: str, interrupted: bool = False) -> None:
        if not self._stop.is_set():
            self.summary.stopped = why
        self.summary.interrupted = self.summary.interrupted or interrupted
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self, states: dict[str, dict[str, Any]]) -> Summary:
        started = time.monotonic()
        pending: list[Entry] = []
        for entry in self.entries:
            if states.get(entry.tenant, {}).get("event") == "done":
                self.summary.done_before.append(entry.tenant)
            else:
                pending.append(entry)
        if self.progress is not None:
            self.progress.total = len(pending)
        ticker = asyncio.ensure_future(self._tick()) if self.progress is not None else None
        try:
            async with httpx.AsyncClient() as client:
                for wave in waves(pending, self.wave_size):
                    if self.stopping:
                        self.summary.not_started.extend(e.tenant for e in wave)
                        continue
                    queue = deque(wave)
                    workers = [
                        self._worker(queue, states, client)
                        for _ in range(min(self.concurrency, len(wave)))
                    ]
                    await asyncio.gather(*workers)
                    self.summary.not_started.extend(e.tenant for e in queue)
        finally:
            if ticker is not None:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
            if self.progress is not None:
                self.progress.tick(force=True)
                self.progress.clear()
        self.summary.elapsed_s = time.monotonic() - started
        return self.summary

    async def _tick(self) -> None:
        assert self.progress is not None
        while True:
            self.progress.tick()
            await asyncio.sleep(0.2 if self.progress.tty else 1.0)

    async def _next(self, queue: deque[Entry]) -> Entry | None:
        """The next tenant to start, in order, once the rate allows it (None: stop)."""
        async with self._start_lock:
            if self.stopping or not queue:
                return None
            delay = self.limiter.delay()
            if delay:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stop.wait()  # woken early only by stop()
                if self.stopping:
                    return None
            self.limiter.take()
            return queue.popleft()

    async def _worker(
        self, queue: deque[Entry], states: dict[str, dict[str, Any]], client: httpx.AsyncClient
    ) -> None:
        while (entry := await self._next(queue)) is not None:
            previous = states.get(entry.tenant, {}).get("event")
            resume = previous in ("started", "failed")
            self.journal.write("started", tenant=entry.tenant, resume=resume)
            if self.progress is not None:
                self.progress.running += 1
            try:
                result = await cutover(
                    entry.tenant,
                    self.writer,
                    self.admins,
                    self.token,
                    resume_hold=resume,
                    client=client,
                    **self.cutover_options,
                )
            finally:
                if self.progress is not None:
                    self.progress.running -= 1
            self._record(entry, result)

    def _record(self, entry: Entry, result: CutoverResult) -> None:
        tenant = entry.tenant
        if result.ok:
            self.journal.write(
                "done", tenant=tenant, outcome=result.outcome, ms=round(result.total_ms, 1)
            )
            if result.outcome == "moved":
                self.summary.moved.append(tenant)
                self.summary.cutover_ms.append(result.total_ms)
            else:
                self.summary.already_new.append(tenant)
        else:
            self.journal.write(
                "failed",
                tenant=tenant,
                outcome=result.outcome,
                reason=result.reason,
                ms=round(result.total_ms, 1),
            )
            self.summary.failed[tenant] = f"{result.outcome}: {result.reason}"
            if result.outcome == "stuck":
                self.stop(f"{tenant} is stuck ({result.reason}); fix it before going on")
            elif self.max_failures and len(self.summary.failed) >= self.max_failures:
                self.stop(f"{len(self.summary.failed)} failures (--max-failures)")
        if self.progress is not None:
            self.progress.complete(result.ok)
            self.progress.clear()
        if self.on_result is not None:
            self.on_result(entry, result)


async def dry_run(
    entries: list[Entry],
    writer: FlagWriter,
    admins: list[str],
    token: str | None,
    states: dict[str, dict[str, Any]],
    wave_size: int,
    out: IO[str],
) -> int:
    """Print the plan: waves, each tenant's flag now and what a run would do. No writes."""
    ok = True
    async with httpx.AsyncClient() as client:
        if entries:
            views = await Routers(client, admins, token).poll(entries[0].tenant)
            for view in views:
                mark = "ok" if view.ok else "NOT USABLE"
                ok = ok and view.ok
                print(f"router {view.url}: {mark}: {view.describe()}", file=out)
    semaphore = asyncio.Semaphore(8)

    async def flag_of(tenant: str) -> str:
        async with semaphore:
            try:
                return await writer.get(tenant)
            except Exception as exc:
                return f"error: {exc}"

    flags = await asyncio.gather(*(flag_of(e.tenant) for e in entries))
    plan: dict[str, int] = {}
    for number, wave in enumerate(waves(list(zip(entries, flags, strict=True)), wave_size), 1):
        print(f"wave {number} ({len(wave)} tenant(s)):", file=out)
        for entry, flag in wave:
            journaled = states.get(entry.tenant, {}).get("event")
            if journaled == "done":
                action = "skip (done in the journal)"
            elif flag == "new":
                action = "verify only (already on new)"
            elif flag == "legacy":
                action = "cut over"
            elif flag == "hold" and journaled in ("started", "failed"):
                action = "resume (hold left by an earlier run)"
            elif flag == "hold":
                action = "REFUSE (hold, not from this journal)"
            else:
                action = "REFUSE"
            plan[action] = plan.get(action, 0) + 1
            size = "" if entry.size is None else f" size {entry.size:g}"
            print(f"  {entry.tenant}{size}: flag {flag}: {action}", file=out)
    totals = ", ".join(f"{n} {action}" for action, n in plan.items())
    print(f"dry run: {len(entries)} tenant(s): {totals or 'nothing'}; nothing changed", file=out)
    return 0 if ok else 1


def step_line(step: Step, check: str, cross: str) -> str:
    mark = check if step.ok else cross
    return f"  {mark} {step.name:<11} {step.elapsed_ms:>9.1f} ms  {step.detail}"
