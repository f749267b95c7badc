"""The cutover orchestrator: move one tenant from legacy to new with no request answered by
both sides and none lost (docs/design.md, "Hold and cutover" and "Scale beyond one machine").

    result = await cutover("acme", writer, ["http://10.0.0.5:8081", ...], token)

Steps, each reported through `on_step` as it ends (name, ok, elapsed ms, detail):

  preflight    every router's admin port answers and accepts the token; the flag serves
               `legacy` (already `new`: nothing to do; `hold`: a cutover died midway, refused
               unless resume_hold); every router routes the tenant to legacy and has never
               served it from new (not ledgered); the replication check, if any, is caught
               up; with shadow_match, the shadow gate: enough shadow comparisons summed
               over every router, and a match rate at least shadow_match
  hold         flag -> hold: routers hold the tenant's new requests (up to their hold_timeout,
               20 s by default) while requests already on legacy finish
  drain        every router reports `hold` as the tenant's side AND zero legacy requests in
               flight, on `settle` consecutive polls of all routers at once (see _drain)
  replication  re-run the check: new must have every write legacy took before the drain
  new          flag -> new: the held requests and everything after go to new
  verify       every router reports `new`

A failure up to `replication` sets the flag back to `legacy` (step `rollback`): nothing has
been served by new, so going back loses nothing. A failure in `new` or `verify` does NOT go
back: new may already have served the tenant, and the routers' ratchet refuses to route it
back anyway; the result says what state it is in and what to check (outcome `stuck`).

The drain, the replication re-check and the write of `new` all happen while the tenant's
requests are held: keep drain_timeout + replication_timeout below the routers'
routing.hold_timeout, or held requests time out with 503 hold_timeout (they are retryable).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any, Final, Literal
from urllib.parse import quote

import httpx

from router.control.flagwriters import FlagWriter, FlagWriterError

Outcome = Literal["moved", "already-new", "refused", "rolled-back", "stuck"]
STEPS: Final = ("preflight", "hold", "drain", "replication", "new", "verify")

DEFAULT_DRAIN_TIMEOUT: Final = 60.0
DEFAULT_VERIFY_TIMEOUT: Final = 30.0
DEFAULT_REPLICATION_TIMEOUT: Final = 10.0
DEFAULT_MAX_LAG: Final = 5.0
ADMIN_TIMEOUT: Final = 5.0


@dataclass
class Step:
    name: str
    ok: bool
    elapsed_ms: float
    detail: str
    # Wall-clock (epoch seconds) when the step began and ended: to line the steps up with
    # the routers' access logs and the clients' view.
    started_at: float = 0.0
    ended_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "elapsed_ms": round(self.elapsed_ms, 1),
            "started_at": round(self.started_at, 6),
            "ended_at": round(self.ended_at, 6),
        }


@dataclass
class CutoverResult:
    tenant: str
    ok: bool
    outcome: Outcome
    reason: str  # why it failed (empty on success)
    steps: list[Step] = field(default_factory=list)
    total_ms: float = 0.0
    flag: str | None = None  # the flag's value for the tenant at the end, as last known
    flag_writes: list[str] = field(default_factory=list)  # values written, in order
    advice: str = ""  # what to check next (stuck or refused)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def to_json(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "steps": [s.to_json() for s in self.steps],
            "result": {
                "ok": self.ok,
                "outcome": self.outcome,
                "reason": self.reason,
                "flag": self.flag,
                "flag_writes": self.flag_writes,
                "advice": self.advice,
            },
            "total_ms": round(self.total_ms, 1),
        }


class _Failed(Exception):
    """A step failed; `stuck` when going back to legacy is not safe."""

    def __init__(self, reason: str, *, stuck: bool = False, advice: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.stuck = stuck
        self.advice = advice


# ---- one router's view ------------------------------------------------------------------


@dataclass
class RouterView:
    """What one router's `GET /admin/tenants/{id}` said (or why it said nothing)."""

    url: str
    state: dict[str, Any] | None = None
    error: str | None = None
    fatal: bool = False  # polling again will not help (wrong token, admin disabled)

    @property
    def ok(self) -> bool:
        return self.state is not None and self.error is None

    @property
    def side(self) -> str | None:
        """Where the router routes the tenant now: legacy, hold or new (the admin API calls
        the field "target")."""
        return None if self.state is None else str(self.state.get("target"))

    @property
    def legacy_inflight(self) -> int:
        if self.state is None:
            return 0
        inflight = self.state.get("inflight") or {}
        value = inflight.get("legacy", 0) if isinstance(inflight, dict) else 0
        return value if isinstance(value, int) else 0

    @property
    def held(self) -> int:
        value = (self.state or {}).get("held", 0)
        return value if isinstance(value, int) else 0

    @property
    def ledgered(self) -> bool:
        return bool((self.state or {}).get("ledgered"))

    def describe(self) -> str:
        if not self.ok:
            return f"{self.url}: {self.error}"
        assert self.state is not None
        reason = self.state.get("reason")
        text = f"{self.url}: {self.side} ({reason})"
        if self.legacy_inflight:
            text += f", {self.legacy_inflight} legacy in flight"
        if self.ledgered:
            text += ", ledgered"
        return text


class Routers:
    """The admin ports of every router instance, polled concurrently."""

    def __init__(self, client: httpx.AsyncClient, admins: list[str], token: str | None) -> None:
        self.client = client
        self.admins = [a.rstrip("/") for a in admins]
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def view(self, admin: str, tenant: str) -> RouterView:
        url = f"{admin}/admin/tenants/{quote(tenant, safe='')}"
        try:
            response = await self.client.get(url, headers=self.headers, timeout=ADMIN_TIMEOUT)
        except httpx.HTTPError as exc:
            text = str(exc) or type(exc).__name__
            return RouterView(admin, error=f"unreachable ({type(exc).__name__}: {text})")
        body = _json(response)
        code = body.get("error") if isinstance(body, dict) else None
        refusal = _refusal(response, body, "/admin/tenants")
        if refusal is not None:
            return RouterView(admin, error=refusal, fatal=True)
        if response.status_code == 200 and isinstance(body, dict) and "target" in body:
            return RouterView(admin, state=body)
        if response.status_code == 503 and isinstance(body, dict) and "workers" in body:
            missing = (body.get("workers") or {}).get("missing")
            return RouterView(admin, error=f"{missing} worker process(es) did not answer")
        detail = (body.get("detail") or code) if isinstance(body, dict) else None
        return RouterView(
            admin, error=f"HTTP {response.status_code}: {detail or response.text[:200]!r}"
        )

    async def poll(self, tenant: str) -> list[RouterView]:
        return list(await asyncio.gather(*(self.view(a, tenant) for a in self.admins)))

    async def shadow(self, admin: str, tenant: str, limit: int) -> ShadowView:
        """One router's `GET /admin/shadow?tenant=T&limit=N`."""
        params = {"tenant": tenant, "limit": str(limit)}
        return await self._shadow_call("GET", f"{admin}/admin/shadow", admin, params)

    async def shadow_all(self, tenant: str, limit: int) -> list[ShadowView]:
        return list(await asyncio.gather(*(self.shadow(a, tenant, limit) for a in self.admins)))

    async def reset_shadow(self, admin: str, tenant: str) -> ShadowView:
        """One router's `DELETE /admin/shadow/{tenant}`: forget the tenant's shadow counts,
        mismatches and learned noise."""
        url = f"{admin}/admin/shadow/{quote(tenant, safe='')}"
        return await self._shadow_call("DELETE", url, admin, None)

    async def _shadow_call(
        self, method: str, url: str, admin: str, params: dict[str, str] | None
    ) -> ShadowView:
        try:
            response = await self.client.request(
                method, url, params=params, headers=self.headers, timeout=ADMIN_TIMEOUT
            )
        except httpx.HTTPError as exc:
            text = str(exc) or type(exc).__name__
            return ShadowView(admin, error=f"unreachable ({type(exc).__name__}: {text})")
        body = _json(response)
        refusal = _refusal(
            response, body, "/admin/shadow", "a router version without shadow traffic?"
        )
        if refusal is not None:
            return ShadowView(admin, error=refusal, fatal=True)
        status = response.status_code
        if status in (200, 503) and isinstance(body, dict):
            if method == "DELETE":
                shaped = "reset" in body or "workers" in body
            else:
                shaped = isinstance(body.get("tenants"), dict)
            if status == 200 and shaped and (method != "DELETE" or body.get("reset") is True):
                return ShadowView(admin, body=body)
            if status == 503 and shaped:
                workers = body.get("workers")
                missing = workers.get("missing") if isinstance(workers, dict) else None
                what = "figures are partial"
                if method == "DELETE":
                    what = "a worker that did not answer keeps its counts"
                return ShadowView(
                    admin,
                    body=body,
                    error=f"{missing if missing is not None else 'some'} worker process(es) "
                    f"did not answer (HTTP 503): {what}",
                )
        code = body.get("error") if isinstance(body, dict) else None
        detail = (body.get("detail") or code) if isinstance(body, dict) else None
        return ShadowView(
            admin,
            error=f"HTTP {status}: {detail or response.text[:200]!r}",
            bad_request=status == 400,
        )


def _refusal(
    response: httpx.Response,
    body: Any,
    endpoint: str,
    hint: str = "is this a router's admin port?",
) -> str | None:
    """Why a router's admin port refused us for good (asking again will not help), or
    None: a wrong token, admin routes disabled, no such endpoint."""
    code = body.get("error") if isinstance(body, dict) else None
    if response.status_code == 401:
        return "unauthorized: ROUTER_ADMIN_TOKEN is not this router's admin token"
    if response.status_code == 403 and code == "admin_disabled":
        return "admin routes are disabled on this router (it has no ROUTER_ADMIN_TOKEN)"
    if response.status_code == 404:
        return f"no {endpoint} endpoint here ({hint})"
    return None


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _summary(views: list[RouterView]) -> str:
    return "; ".join(v.describe() for v in views)


# ---- shadow traffic (GET /admin/shadow) ---------------------------------------------------

SHADOW_COUNTERS: Final = (
    "shadowed",
    "compared",
    "matched",
    "mismatched",
    "noisy",
    "incomplete",
    "dropped",
)
MISMATCH_KINDS: Final = ("status", "header", "body", "error")
DEFAULT_SHADOW_MIN_SAMPLES: Final = 100


@dataclass
class ShadowView:
    """What one router's /admin/shadow said (or why it said nothing). On a 503 (a worker
    process did not answer) both `body` (the other workers' figures) and `error` are set."""

    url: str
    body: dict[str, Any] | None = None
    error: str | None = None
    fatal: bool = False  # asking again will not help (wrong token, admin disabled, no endpoint)
    bad_request: bool = False  # 400: the router rejected the request (an invalid tenant id)

    @property
    def ok(self) -> bool:
        return self.body is not None and self.error is None

    @property
    def enabled(self) -> bool:
        return bool((self.body or {}).get("enabled"))

    def stats(self, tenant: str) -> dict[str, Any]:
        tenants = (self.body or {}).get("tenants")
        entry = tenants.get(tenant) if isinstance(tenants, dict) else None
        return entry if isinstance(entry, dict) else {}

    def recent(self, tenant: str) -> list[dict[str, Any]]:
        recent = (self.body or {}).get("recent")
        if not isinstance(recent, list):
            return []
        return [r for r in recent if isinstance(r, dict) and r.get("tenant", tenant) == tenant]

    def describe(self) -> str:
        return f"{self.url}: {self.error}" if self.error else f"{self.url}: ok"


def _count_of(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _time_of(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


@dataclass
class ShadowTotals:
    """One tenant's shadow figures summed over routers (the ones with a body: a 503's
    partial figures count). `match_rate` is recomputed from the sums."""

    tenant: str
    counts: dict[str, int]
    mismatch_kinds: dict[str, int]
    noise_headers: list[str]
    noise_json_paths: list[str]
    first_at: float | None
    last_at: float | None
    recent: list[dict[str, Any]]  # newest first, each with "router": its admin URL
    routers: list[ShadowView]

    @classmethod
    def merge(cls, tenant: str, views: list[ShadowView], limit: int) -> ShadowTotals:
        counts = dict.fromkeys(SHADOW_COUNTERS, 0)
        kinds = dict.fromkeys(MISMATCH_KINDS, 0)
        headers: set[str] = set()
        paths: set[str] = set()
        firsts: list[float] = []
        lasts: list[float] = []
        recent: list[dict[str, Any]] = []
        for view in views:
            if view.body is None:
                continue
            stats = view.stats(tenant)
            for name in SHADOW_COUNTERS:
                counts[name] += _count_of(stats.get(name))
            by_kind = stats.get("mismatch_kinds")
            if isinstance(by_kind, dict):
                for kind, n in by_kind.items():
                    kinds[str(kind)] = kinds.get(str(kind), 0) + _count_of(n)
            noise = stats.get("noise")
            if isinstance(noise, dict):
                for names, into in (
                    (noise.get("headers"), headers),
                    (noise.get("json_paths"), paths),
                ):
                    if isinstance(names, list):
                        into.update(str(n) for n in names)
            if (first := _time_of(stats.get("first_at"))) is not None:
                firsts.append(first)
            if (last := _time_of(stats.get("last_at"))) is not None:
                lasts.append(last)
            recent.extend({**entry, "router": view.url} for entry in view.recent(tenant))
        recent.sort(key=lambda e: _time_of(e.get("at")) or 0.0, reverse=True)
        return cls(
            tenant=tenant,
            counts=counts,
            mismatch_kinds=kinds,
            noise_headers=sorted(headers),
            noise_json_paths=sorted(paths),
            first_at=min(firsts, default=None),
            last_at=max(lasts, default=None),
            recent=recent[: max(0, limit)],
            routers=views,
        )

    @property
    def compared(self) -> int:
        return self.counts["compared"]

    @property
    def matched(self) -> int:
        return self.counts["matched"]

    @property
    def match_rate(self) -> float | None:
        return self.matched / self.compared if self.compared else None

    @property
    def complete(self) -> bool:
        """Every router answered in full."""
        return all(v.ok for v in self.routers)

    def kinds_text(self) -> str:
        """'status 3, body 16': the kinds with mismatches, or 'none by kind'."""
        parts = [f"{kind} {n}" for kind, n in self.mismatch_kinds.items() if n]
        return ", ".join(parts) or "none by kind"

    def to_json(self) -> dict[str, Any]:
        rate = self.match_rate
        return {
            "tenant": self.tenant,
            "complete": self.complete,
            "enabled": any(v.enabled for v in self.routers),
            **self.counts,
            "mismatch_kinds": self.mismatch_kinds,
            "match_rate": None if rate is None else round(rate, 6),
            "noise": {"headers": self.noise_headers, "json_paths": self.noise_json_paths},
            "first_at": self.first_at,
            "last_at": self.last_at,
            "recent": self.recent,
            "routers": [
                {
                    "admin": v.url,
                    "ok": v.ok,
                    "enabled": v.enabled,
                    "error": v.error,
                    "workers": (v.body or {}).get("workers"),
                }
                for v in self.routers
            ],
        }


def format_rate(part: int, whole: int, decimals: int = 2) -> str:
    """part/whole as a percentage, rounded DOWN: 99999 of 100000 is 99.99, never 100.00."""
    scaled = part * 100 * 10**decimals // whole
    whole_part, fraction = divmod(scaled, 10**decimals)
    return f"{whole_part}.{fraction:0{decimals}d}" if decimals else str(whole_part)


def _below(matched: int, compared: int, required: float) -> tuple[str, str]:
    """(rate, required) as percentages: required exactly as given (0.99995 is 99.995, not
    a rounded 100.00), the rate rounded down to as many decimals, so the two differ."""
    wanted = Decimal(repr(required)) * 100
    exponent = wanted.normalize().as_tuple().exponent
    decimals = min(6, max(2, -exponent if isinstance(exponent, int) else 2))
    return format_rate(matched, compared, decimals), f"{wanted:.{decimals}f}"


# ---- replication check ------------------------------------------------------------------


async def check_replication(
    check: str,
    tenant: str,
    max_lag: float,
    timeout: float,
    client: httpx.AsyncClient,
) -> tuple[bool, str]:
    """One run of the replication check: (caught up?, detail).

    `check` starting with http:// or https://: GET it (`{tenant}` in it is replaced by the
    tenant id); caught up if 2xx with JSON {"caught_up": true} or {"lag_seconds": x} with
    x <= max_lag. Otherwise a shell command, with TENANT in its environment: caught up if
    it exits 0. Either is bounded by `timeout` seconds.
    """
    if check.startswith(("http://", "https://")):
        url = check.replace("{tenant}", quote(tenant, safe=""))
        try:
            response = await client.get(url, timeout=timeout)
        except httpx.HTTPError as exc:
            return False, f"replication check {url} unreachable ({type(exc).__name__})"
        if not 200 <= response.status_code < 300:
            return False, f"replication check answered HTTP {response.status_code}"
        body = _json(response)
        if isinstance(body, dict) and isinstance(body.get("caught_up"), bool):
            return body["caught_up"], "caught up" if body["caught_up"] else "not caught up"
        lag = body.get("lag_seconds") if isinstance(body, dict) else None
        if isinstance(lag, int | float) and not isinstance(lag, bool):
            ok = lag <= max_lag
            return ok, f"lag {lag:g} s ({'<=' if ok else '>'} {max_lag:g} s)"
        return False, 'replication check answered neither "caught_up" nor "lag_seconds"'
    return await _run_check_command(check, tenant, timeout)


async def _run_check_command(command: str, tenant: str, timeout: float) -> tuple[bool, str]:
    proc = await asyncio.create_subprocess_shell(
        command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "TENANT": tenant},
        start_new_session=True,  # its own process group: a timeout stops its children too
    )
    try:
        async with asyncio.timeout(timeout):
            output, _ = await proc.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group of the shell we started
        await proc.wait()
        return False, f"replication check command timed out after {timeout:g} s"
    lines = output.decode("utf-8", "replace").strip().splitlines()
    last = f": {lines[-1][:200]}" if lines else ""
    if proc.returncode == 0:
        return True, f"caught up (command exit 0){last}"
    return False, f"not caught up (command exit {proc.returncode}){last}"


# ---- the orchestrator -------------------------------------------------------------------


StepCallback = Callable[[Step], None]


class _Run:
    def __init__(self, tenant: str, on_step: StepCallback | None) -> None:
        self.tenant = tenant
        self.on_step = on_step
        self.steps: list[Step] = []
        self.flag_writes: list[str] = []
        self.flag: str | None = None
        self.start = time.monotonic()

    def report(self, name: str, ok: bool, started: float, detail: str) -> Step:
        elapsed = time.monotonic() - started
        now = time.time()
        step = Step(name, ok, elapsed * 1000.0, detail, now - elapsed, now)
        self.steps.append(step)
        if self.on_step is not None:
            self.on_step(step)
        return step

    def result(self, outcome: Outcome, reason: str = "", advice: str = "") -> CutoverResult:
        return CutoverResult(
            tenant=self.tenant,
            ok=outcome in ("moved", "already-new"),
            outcome=outcome,
            reason=reason,
            steps=self.steps,
            total_ms=(time.monotonic() - self.start) * 1000.0,
            flag=self.flag,
            flag_writes=self.flag_writes,
            advice=advice,
        )


async def cutover(
    tenant: str,
    writer: FlagWriter,
    admins: list[str],
    token: str | None,
    *,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    poll: float = 0.05,
    settle: int = 2,
    settle_time: float = 0.1,
    replication_check: str | None = None,
    replication_timeout: float = DEFAULT_REPLICATION_TIMEOUT,
    max_lag: float = DEFAULT_MAX_LAG,
    verify_timeout: float = DEFAULT_VERIFY_TIMEOUT,
    resume_hold: bool = False,
    shadow_match: float | None = None,
    shadow_min_samples: int = DEFAULT_SHADOW_MIN_SAMPLES,
    on_step: StepCallback | None = None,
    client: httpx.AsyncClient | None = None,
    abort: asyncio.Event | None = None,
) -> CutoverResult:
    """Move `tenant` to new (module docstring); never raises for an operational failure:
    the result says what happened (`ok`, `outcome`, `reason`, `advice`).

    `shadow_match` (0 < R <= 1): the shadow gate. The preflight refuses unless the routers'
    shadow traffic compared at least `shadow_min_samples` of the tenant's requests, summed
    over routers, and matched/compared >= R (see _shadow_gate).

    `abort` (the CLI sets it on SIGINT): before the flag says new, stop and roll back;
    from then on it is ignored (going back is no longer safe), so the cutover finishes.
    """
    if not admins:
        raise ValueError("at least one router admin URL is needed")
    if shadow_match is not None and not 0 < shadow_match <= 1:
        raise ValueError(f"shadow_match must be in (0, 1], got {shadow_match!r}")
    if shadow_min_samples < 1:
        raise ValueError(f"shadow_min_samples must be >= 1, got {shadow_min_samples!r}")
    async with contextlib.AsyncExitStack() as stack:
        if client is None:
            client = await stack.enter_async_context(httpx.AsyncClient())
        run = _Run(tenant, on_step)
        plan = _Plan(
            run,
            writer,
            Routers(client, admins, token),
            client,
            drain_timeout=drain_timeout,
            poll=poll,
            settle=max(1, settle),
            settle_time=settle_time,
            abort=abort,
            replication_check=replication_check,
            replication_timeout=replication_timeout,
            max_lag=max_lag,
            verify_timeout=verify_timeout,
            resume_hold=resume_hold,
            shadow_match=shadow_match,
            shadow_min_samples=shadow_min_samples,
        )
        return await plan.execute()
    raise AssertionError("unreachable")  # pragma: no cover (mypy: the with may swallow)


class _Plan:
    def __init__(
        self,
        run: _Run,
        writer: FlagWriter,
        routers: Routers,
        client: httpx.AsyncClient,
        *,
        drain_timeout: float,
        poll: float,
        settle: int,
        settle_time: float,
        abort: asyncio.Event | None,
        replication_check: str | None,
        replication_timeout: float,
        max_lag: float,
        verify_timeout: float,
        resume_hold: bool,
        shadow_match: float | None = None,
        shadow_min_samples: int = DEFAULT_SHADOW_MIN_SAMPLES,
    ) -> None:
        self.run = run
        self.tenant = run.tenant
        self.writer = writer
        self.routers = routers
        self.client = client
        self.drain_timeout = drain_timeout
        self.poll = poll
        self.settle = settle
        self.settle_time = settle_time
        self.abort = abort
        self.replication_check = replication_check
        self.replication_timeout = replication_timeout
        self.max_lag = max_lag
        self.verify_timeout = verify_timeout
        self.resume_hold = resume_hold
        self.shadow_match = shadow_match
        self.shadow_min_samples = shadow_min_samples
        self.drained_at = 0.0

    async def execute(self) -> CutoverResult:
        run = self.run
        # a. preflight: refusals change nothing.
        started = time.monotonic()
        try:
            flag, detail = await self._preflight()
        except _Failed as exc:
            run.report("preflight", False, started, exc.reason)
            return run.result("refused", exc.reason, exc.advice)
        run.report("preflight", True, started, detail)
        if flag == "new":
            return run.result("already-new")
        if self.abort is not None and self.abort.is_set():
            return run.result("refused", "interrupted before the first flag write")

        # b-d: any failure goes back to legacy (new has served nothing yet).
        step = "hold"
        try:
            started = time.monotonic()
            if flag == "hold":
                run.report("hold", True, started, "already hold (resuming a stopped cutover)")
            else:
                await self._write("hold")
                run.report("hold", True, started, f"flag {self.tenant}: legacy -> hold")
            step = "drain"
            started = time.monotonic()
            run.report("drain", True, started, await self._drain())
            if self.replication_check:
                step = "replication"
                started = time.monotonic()
                run.report("replication", True, started, await self._replication_after_drain())
        except _Failed as exc:
            run.report(step, False, started, exc.reason)
            if exc.stuck:
                return run.result("stuck", exc.reason, exc.advice)
            return await self._rollback(f"{step}: {exc.reason}", exc.advice)
        except Exception as exc:  # a bug or an unforeseen error must not leave it in hold
            reason = f"unexpected error: {type(exc).__name__}: {exc}"
            run.report(step, False, started, reason)
            return await self._rollback(f"{step}: {reason}")

        # e-f: never back. From here the tenant may have been served by new.
        started = time.monotonic()
        try:
            await self._write("new")
        except _Failed as exc:
            run.report("new", False, started, exc.reason)
            return run.result(
                "stuck",
                f"new: {exc.reason}",
                f"{self.tenant} is probably still in hold (its requests wait, then get 503 "
                "hold_timeout). Do not set it back to legacy unless `router flags set` shows "
                f"the write did not land; retry with `router cutover {self.tenant} "
                "--resume-hold` or set it to new by hand.",
            )
        run.report("new", True, started, f"flag {self.tenant}: hold -> new")
        started = time.monotonic()
        try:
            detail = await self._wait_for_side("new", self.verify_timeout)
        except _Failed as exc:
            run.report("verify", False, started, exc.reason)
            return run.result(
                "stuck",
                f"verify: {exc.reason}",
                "The flag says new but not every router reports it. Check those routers' "
                "flag source (/readyz, the flag file or the LaunchDarkly connection) and "
                "their logs; do NOT set the flag back to legacy (new may have served the "
                "tenant; the ratchet refuses it anyway).",
            )
        run.report("verify", True, started, detail)
        return run.result("moved")

    # -- steps --

    async def _preflight(self) -> tuple[str, str]:
        views = await self.routers.poll(self.tenant)
        bad = [v for v in views if not v.ok]
        if bad:
            raise _Failed(
                f"router admin not usable: {_summary(bad)}",
                advice="Nothing was changed. Check the --admin URLs and ROUTER_ADMIN_TOKEN.",
            )
        try:
            flag = await self.writer.get(self.tenant)
        except FlagWriterError as exc:
            raise _Failed(f"cannot read the flag: {exc}") from None
        self.run.flag = flag
        n = len(views)
        if flag == "new":
            detail = await self._wait_for_side("new", self.verify_timeout)
            return flag, f"already on new: nothing to do ({detail})"
        if flag == "hold" and not self.resume_hold:
            raise _Failed(
                f"the flag serves hold to {self.tenant}: a previous cutover stopped midway "
                "(its requests are being held)",
                advice=(
                    f"Run `router cutover {self.tenant} --resume-hold ...` to finish it "
                    "(drain, then new; it rolls back to legacy if a check fails), or set it "
                    f"back by hand with `router flags set {self.tenant} legacy`."
                ),
            )
        if flag not in ("legacy", "hold"):
            raise _Failed(f"the flag serves {flag!r} to {self.tenant}")
        ledgered = [v.url for v in views if v.ledgered]
        if ledgered:
            raise _Failed(
                f"{self.tenant} is in the ratchet ledger of {', '.join(ledgered)}: it has been "
                f"served by new before, while the flag says {flag}",
                advice=(
                    "Those routers already send it to new (reason ratchet). Make the flag "
                    f"agree with `router flags set {self.tenant} new`, or, if new's data for "
                    "it may be thrown away, clear the ledger with the rollback command first."
                ),
            )
        shadow = None
        if self.shadow_match is not None:
            if flag == "legacy":
                shadow = await self._shadow_gate(self.shadow_match)
            else:  # resuming from hold: the tenant's requests are held; refusing would
                # leave them so (the gate was for starting the cutover)
                shadow = "shadow gate not applied (resuming from hold)"
        # The routers may not have seen the latest flag yet (propagation): wait for them.
        agreed = await self._wait_for_side(flag, self.verify_timeout, abortable=True)
        parts = [f"{n} router(s) reachable and authorised", f"flag {flag}", agreed]
        if shadow is not None:
            parts.append(shadow)
        if self.replication_check:
            ok, detail = await check_replication(
                self.replication_check,
                self.tenant,
                self.max_lag,
                self.replication_timeout,
                self.client,
            )
            if not ok:
                raise _Failed(f"replication not caught up: {detail}")
            parts.append(f"replication {detail}")
        return flag, "; ".join(parts)

    async def _shadow_gate(self, required: float) -> str:
        """Refuse (nothing changed) unless new has matched legacy often enough: the
        tenant's shadow comparisons summed over every router are at least
        shadow_min_samples, and matched/compared >= `required`. Every router must answer
        in full: a missing one could hold the mismatches."""
        tenant = self.tenant
        report = f"`router shadow report {tenant} --admin URL ...`"
        views = await self.routers.shadow_all(tenant, 5)
        bad = [v for v in views if not v.ok]
        if bad:
            raise _Failed(
                "shadow gate: no full shadow report from every router: "
                + "; ".join(v.describe() for v in bad),
                advice=f"Nothing was changed. {report} shows what each router answers; "
                "retry once every router (and every worker process) answers.",
            )
        totals = ShadowTotals.merge(tenant, views, 0)
        need = self.shadow_min_samples
        if totals.compared < need:
            noun = "comparison" if totals.compared == 1 else "comparisons"
            reason = f"only {totals.compared} shadow {noun} for {tenant} (need {need})"
            off = [v.url for v in views if not v.enabled]
            if off:
                reason += f"; shadow traffic is not enabled on {', '.join(off)}"
            raise _Failed(
                reason,
                advice=f"Nothing was changed. Let shadow traffic run longer for {tenant} "
                f"(or lower --min-samples); {report} shows the counts.",
            )
        if totals.matched / totals.compared < required:
            rate, wanted = _below(totals.matched, totals.compared, required)
            raise _Failed(
                f"shadow match rate {rate} % is below the required {wanted} % "
                f"({totals.matched} of {totals.compared} matched); mismatches: "
                f"{totals.kinds_text()}",
                advice=f"Nothing was changed. See the mismatches with {report}; once new is "
                f"fixed, `router shadow reset {tenant}` starts counting afresh.",
            )
        return f"shadow {format_rate(totals.matched, totals.compared)} % of {totals.compared}"

    async def _write(self, value: str) -> None:
        try:
            await self.writer.set(self.tenant, value)
        except FlagWriterError as exc:
            raise _Failed(f"flag write {value!r} failed: {exc}") from None
        self.run.flag_writes.append(value)
        self.run.flag = value

    def _check_abort(self) -> None:
        if self.abort is not None and self.abort.is_set():
            raise _Failed("interrupted")

    async def _drain(self) -> str:
        """Until every router reports `hold` and no legacy request in flight on `settle`
        polls in a row spanning at least `settle_time` seconds.

        Why not one poll: a router answers the admin view from its flag store, and applies
        a flag change to its request path's decision cache a moment later (the change
        listener runs on its event loop, after a ratchet-ledger refresh). A request decided
        in that gap still goes to legacy. It is counted in flight the moment it is decided,
        so a later poll, answered once the router has applied the change, either sees it in
        flight or it has finished (before new is ever set).
        """
        deadline = time.monotonic() + self.drain_timeout
        settled = 0
        settled_since = 0.0
        peak = 0
        held = 0
        polls = 0
        while True:
            self._check_abort()
            views = await self.routers.poll(self.tenant)
            polls += 1
            fatal = [v for v in views if v.fatal]
            if fatal:
                raise _Failed(f"router admin refused: {_summary(fatal)}")
            ledgered = [v for v in views if v.ledgered]
            if ledgered:
                raise _Failed(
                    f"{self.tenant} entered the ratchet ledger during the drain "
                    f"({', '.join(v.url for v in ledgered)}): something routed it to new",
                    stuck=True,
                    advice=(
                        "Not rolling back: new has served the tenant. Find what sent it there "
                        "(a signed override, a manual flag change, another cutover), then "
                        f"finish with `router flags set {self.tenant} new`."
                    ),
                )
            legacy = sum(v.legacy_inflight for v in views if v.ok)
            peak = max(peak, legacy)
            held = max(held, sum(v.held for v in views if v.ok))
            if all(v.ok and v.side == "hold" and v.legacy_inflight == 0 for v in views):
                settled += 1
                if settled == 1:
                    settled_since = time.monotonic()
                stable = time.monotonic() - settled_since >= self.settle_time
                if settled >= self.settle and stable:
                    self.drained_at = time.monotonic()
                    return (
                        f"{len(views)}/{len(views)} router(s) hold, 0 legacy in flight "
                        f"(peak {peak}), {held} request(s) held at most; {polls} polls"
                    )
            else:
                settled = 0
            if time.monotonic() >= deadline:
                waiting = [
                    v for v in views if not (v.ok and v.side == "hold" and not v.legacy_inflight)
                ]
                raise _Failed(
                    f"not drained after {self.drain_timeout:g} s: {_summary(waiting)}",
                    advice="Long requests on legacy? Raise --drain-timeout (below the routers' "
                    "hold_timeout) or retry later.",
                )
            await asyncio.sleep(self.poll)

    async def _replication_after_drain(self) -> str:
        """Re-check until caught up. With a lag figure, caught up means "no older than the
        end of the drain": every legacy write happened before it."""
        assert self.replication_check is not None
        deadline = time.monotonic() + self.replication_timeout
        tries = 0
        while True:
            self._check_abort()
            since_drain = time.monotonic() - self.drained_at
            left = max(0.1, deadline - time.monotonic())
            ok, detail = await check_replication(
                self.replication_check,
                self.tenant,
                min(self.max_lag, since_drain),
                min(left, self.replication_timeout),
                self.client,
            )
            tries += 1
            if ok:
                return f"{detail} ({tries} check(s))"
            if time.monotonic() >= deadline:
                raise _Failed(
                    f"replication not caught up within {self.replication_timeout:g} s: {detail}"
                )
            await asyncio.sleep(min(0.5, max(self.poll, 0.05)))

    async def _wait_for_side(self, side: str, timeout: float, abortable: bool = False) -> str:
        """Until every router reports `side`; bounded."""
        deadline = time.monotonic() + timeout
        while True:
            if abortable:
                self._check_abort()
            views = await self.routers.poll(self.tenant)
            fatal = [v for v in views if v.fatal]
            if fatal:
                raise _Failed(f"router admin refused: {_summary(fatal)}")
            if all(v.ok and v.side == side for v in views):
                return f"{len(views)}/{len(views)} router(s) route to {side}"
            if time.monotonic() >= deadline:
                others = [v for v in views if not (v.ok and v.side == side)]
                raise _Failed(
                    f"after {timeout:g} s not every router routes to {side}: {_summary(others)}"
                )
            await asyncio.sleep(self.poll)

    async def _rollback(self, reason: str, advice: str = "") -> CutoverResult:
        run = self.run
        started = time.monotonic()
        try:
            await self._write("legacy")
        except _Failed as exc:
            run.report("rollback", False, started, exc.reason)
            return run.result(
                "stuck",
                f"{reason}; ROLLBACK FAILED: {exc.reason}",
                f"{self.tenant} is in hold: its requests wait, then get 503. Set it back now "
                f"with `router flags set {self.tenant} legacy` (safe: new has served nothing).",
            )
        agreed = True
        try:
            detail = await self._wait_for_side("legacy", self.verify_timeout)
        except _Failed as exc:
            agreed, detail = False, exc.reason
        run.report("rollback", agreed, started, f"flag {self.tenant}: hold -> legacy; {detail}")
        if not agreed:
            advice = f"The flag is legacy again; check the routers that disagree. {advice}"
        return run.result("rolled-back", reason, advice.strip())
