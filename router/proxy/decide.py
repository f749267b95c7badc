"""Phase 2: decide where a tenant's request goes, and why.

`decide(tenant)` is cheap on the hot path: a dict lookup in a per-tenant decision cache.
A miss evaluates the LaunchDarkly flag once (about 14 us) and stores the interned `Route`.
Every change event for the flag re-reads the ratchet ledger, then clears the cache and
wakes the held requests (flags.py hands the SDK's events to the loop), so a flip is seen
by the next request, and by every held one, within milliseconds of the SDK having it.

Reasons (docs/design.md, "Routing semantics"), in the order they are tried by `decide_request`:
- `pinned-path`: the path matches a configured pattern that always goes to one side;
- `override`:   a validly signed X-Router-Target (override.py), for test traffic;
- `no-tenant`:  no tenant found: the configured default side (tenant.default_side);
- `ratchet`:    the flag says legacy (or hold) but the tenant is in the ledger: it has been
                served by new, and replication only runs legacy -> new, so going back would
                lose its writes. It goes to new, and the refusal is logged and counted;
- `flag`:       the flag said so (`hold` included: the request waits, see HoldQueue);
- `default`:    the flag returned something that is not a known variation: logged,
                treated as legacy.

A signed override to `new` does not enter the ledger (test traffic for test tenants must
be able to go back and forth); an override to `legacy` for a ledgered tenant is refused
like a flag would be. An override never skips hold: while the tenant's flag says hold,
the request gets the flag's hold route and waits like any other; once released it is
decided again, override included (a cutover's hold exists so that no write lands on
either side mid-move, test traffic included).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final, Literal, TypeVar

from router.control.flags import FlagSource
from router.domain import DEFAULT_FLAG_VALUE, FLAG_VALUES, FlagValue
from router.errors import HoldOverflow, HoldTimeout, LedgerUnavailable
from router.settings import PinnedPath, Settings

if TYPE_CHECKING:
    from router.control.ledger import Ledger
    from router.control.override import OverrideVerifier

log = logging.getLogger("router.proxy.decide")
T = TypeVar("T")

Reason = Literal["flag", "ratchet", "override", "no-tenant", "pinned-path", "default"]


class Route:
    """An immutable (side, reason) pair; instances are interned, never built per request.

    `side` is the flag value the request gets: a side (legacy, new), or `hold` (it waits).

    `shadow_rate`: the fraction of this tenant's safe requests copied to new (shadow.py);
    non-zero only on a legacy route chosen by the flag (`shadowed_route`)."""

    __slots__ = ("header_bytes", "header_value", "reason", "shadow_rate", "side")

    def __init__(self, side: FlagValue, reason: Reason, shadow_rate: float = 0.0) -> None:
        self.side: FlagValue = side
        self.reason: Reason = reason
        self.shadow_rate = shadow_rate
        self.header_value = f"{side}; reason={reason}"  # X-Routed-To, when enabled
        self.header_bytes = self.header_value.encode("ascii")

    def __repr__(self) -> str:
        return f"Route({self.side!r}, {self.reason!r})"


ROUTES: Final[dict[tuple[FlagValue, Reason], Route]] = {
    (side, reason): Route(side, reason)
    for side in FLAG_VALUES
    for reason in ("flag", "ratchet", "override", "no-tenant", "pinned-path", "default")
}


_SHADOWED: dict[float, Route] = {}


def shadowed_route(rate: float) -> Route:
    """The flag's legacy route, with requests copied to new at `rate` (interned per rate)."""
    route = _SHADOWED.get(rate)
    if route is None:
        route = Route("legacy", "flag", rate)
        if len(_SHADOWED) < 1000:  # rates come from flag values: bounded all the same
            _SHADOWED[rate] = route
    return route


def compile_path_patterns(pairs: Sequence[tuple[str, T]]) -> Callable[[str], T | None] | None:
    """One regex for all (pattern, value) pairs, compiled once; None when there are none.

    The returned function maps a path (query included or not) to the value of the first
    pattern that matches the whole path. `*` matches within one segment, `**` across
    segments, anything else literally.
    """
    if not pairs:
        return None
    alternatives = []
    for index, (pattern, _value) in enumerate(pairs):
        regex = ""
        for part in re.split(r"(\*\*|\*)", pattern):
            if part == "**":
                regex += ".*"
            elif part == "*":
                regex += "[^/]*"
            else:
                regex += re.escape(part)
        alternatives.append(f"(?P<p{index}>{regex})")
    matcher = re.compile("(?:" + "|".join(alternatives) + r")(?:\?.*)?\Z", re.DOTALL)
    values = [value for _pattern, value in pairs]

    def lookup(path: str) -> T | None:
        match = matcher.match(path)
        if match is None or match.lastgroup is None:
            return None
        return values[int(match.lastgroup[1:])]

    return lookup


def compile_pinned(pinned: list[PinnedPath]) -> Callable[[str], str | None] | None:
    """Path -> the side it is pinned to (routing.pinned_paths), or None."""
    return compile_path_patterns([(spec.pattern, str(spec.side)) for spec in pinned])


class LedgerView:
    """This process's copy of the ratchet ledger: a set, so the hot path never waits on it.

    - `tenants`: every tenant known to be ledgered (read at start, re-read on every flag
      change, so entries written by other routers of a fleet and rollbacks are seen before
      any decision that depends on them is made);
    - `ensure(tenant)`: the first request that new is about to serve for a tenant not in the
      set waits for the durable write (all concurrent ones share it); later ones see the
      set. A tenant is never served by new before its entry is durable.
    """

    def __init__(self, ledger: Ledger | None, loop: asyncio.AbstractEventLoop) -> None:
        self.ledger = ledger
        self.tenants: set[str] = set()
        self._loop = loop
        self._pending: dict[str, asyncio.Future[None]] = {}
        self._who = f"router pid {os.getpid()} on {socket.gethostname()}"
        self.loaded = ledger is None

    async def start(self) -> None:
        if self.ledger is not None:
            await self.ledger.start()
            await self._read()

    async def close(self) -> None:
        if self.ledger is not None:
            await self.ledger.close()

    async def refresh(self) -> None:
        if self.ledger is None or not self.loaded:
            # Not started yet (a flag event can arrive while start() opens the ledger):
            # start() reads the whole ledger itself.
            return
        await self._read()

    async def _read(self) -> None:
        assert self.ledger is not None
        stored = await self.ledger.tenants()
        # Entries being written now stay: the store may not show them yet.
        self.tenants = stored | {t for t, f in self._pending.items() if f.done()}
        self.loaded = True

    def ensure(self, tenant: str) -> asyncio.Future[None] | None:
        """None if the tenant is ledgered already; else a future that completes once it is
        (or fails with LedgerUnavailable)."""
        if tenant in self.tenants or self.ledger is None:
            return None
        pending = self._pending.get(tenant)
        if pending is None:
            pending = self._pending[tenant] = asyncio.ensure_future(self._record(tenant))
        return pending

    async def _record(self, tenant: str) -> None:
        assert self.ledger is not None
        try:
            await self.ledger.record(tenant, self._who)
        except Exception as exc:
            log.error(
                "ratchet ledger write failed; new will not serve the tenant until it succeeds",
                extra={"tenant": tenant, "ledger": self.ledger.url, "error": str(exc)[:300]},
            )
            raise LedgerUnavailable(f"cannot record {tenant} in the ratchet ledger") from None
        finally:
            self._pending.pop(tenant, None)
        self.tenants.add(tenant)
        log.info("tenant entered the ratchet ledger", extra={"tenant": tenant})


class HoldQueue:
    """Requests waiting for a tenant in `hold` to move on, released in arrival order on
    every flag change. Bounded per tenant and in total: past a bound, 503 at once."""

    def __init__(self, max_per_tenant: int, max_total: int) -> None:
        self.max_per_tenant = max_per_tenant
        self.max_total = max_total
        self.total = 0
        self._waiters: dict[str, collections.deque[asyncio.Future[None]]] = {}

    def held(self, tenant: str) -> int:
        waiters = self._waiters.get(tenant)
        return len(waiters) if waiters else 0

    def held_by_tenant(self) -> dict[str, int]:
        return {t: len(w) for t, w in self._waiters.items() if w}

    async def wait(self, tenant: str, timeout: float, loop: asyncio.AbstractEventLoop) -> None:
        """Wait for the next flag change, at most `timeout` s (then HoldTimeout)."""
        waiters = self._waiters.get(tenant)
        if waiters is None:
            waiters = self._waiters[tenant] = collections.deque()
        if len(waiters) >= self.max_per_tenant or self.total >= self.max_total:
            raise HoldOverflow(f"too many requests held for cutovers ({self.total} held)")
        waiter: asyncio.Future[None] = loop.create_future()
        waiters.append(waiter)
        self.total += 1
        timer = loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self.total -= 1
            with contextlib.suppress(ValueError):  # not there once release_all took it
                waiters.remove(waiter)
            if not waiters and self._waiters.get(tenant) is waiters:
                del self._waiters[tenant]

    def release_all(self) -> None:
        """Wake every held request, oldest first (they re-decide with the new flag data)."""
        for waiters in list(self._waiters.values()):
            while waiters:
                waiter = waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(HoldTimeout("the tenant's cutover did not move on in time"))


class Decider:
    """Request -> Route: pinned paths, signed overrides, then the per-tenant cache of the
    flag's decision with the ratchet applied. Flag changes refresh the ledger view, clear
    the cache and release held requests, in that order."""

    __slots__ = (
        "_cache",
        "_cache_size",
        "_changes",
        "_dirty",
        "_flags",
        "_no_tenant",
        "_pinned",
        "_shadow_rate",
        "_verifier",
        "cache_clears",
        "holds",
        "ledger",
        "on_override_rejected",
        "on_ratchet",
    )

    def __init__(
        self,
        settings: Settings,
        flags: FlagSource,
        ledger: LedgerView | None = None,
        verifier: OverrideVerifier | None = None,
        shadow_rate: Callable[[str], float] | None = None,
    ) -> None:
        self._flags = flags
        # Tenant -> fraction of its legacy requests copied to new (shadow.ShadowPolicy).
        self._shadow_rate = shadow_rate
        self._cache: dict[str, Route] = {}
        self._cache_size = settings.flags.decision_cache_size
        self._no_tenant = ROUTES[(settings.tenant.default_side, "no-tenant")]
        self._pinned = compile_pinned(settings.routing.pinned_paths)
        self._verifier = verifier if verifier is not None and verifier.enabled else None
        self.ledger = ledger
        routing = settings.routing
        self.holds = HoldQueue(routing.max_held_per_tenant, routing.max_held_total)
        self.cache_clears = 0
        self._changes: asyncio.Task[None] | None = None
        self._dirty = False
        # Hooks for metrics (set by RouterApp): a refused override (by reason), a refusal
        # by the ratchet (logged here once per tenant and flag change).
        self.on_override_rejected: Callable[[str], None] = lambda reason: None
        self.on_ratchet: Callable[[], None] = lambda: None
        flags.add_change_callback(self.flag_changed)

    # ---- hot path ----------------------------------------------------------------------

    def decide_request(
        self, tenant: str | None, path: str, forced: str | None, signature: str | None
    ) -> Route:
        """The route of one request. `forced`/`signature`: X-Router-Target/-Signature."""
        if self._pinned is not None:
            pinned = self._pinned(path)
            if pinned is not None:
                return ROUTES[(pinned, "pinned-path")]  # type: ignore[index]
        if forced is not None:
            route = self._override(tenant, forced, signature)
            if route is not None:
                return route
        return self.decide(tenant)

    def decide(self, tenant: str | None) -> Route:
        if tenant is None:
            return self._no_tenant
        route = self._cache.get(tenant)
        if route is None:
            route = self._evaluate(tenant)
            if len(self._cache) >= self._cache_size:
                # A full cache is cleared rather than evicted entry by entry: O(1) amortised,
                # and a client inventing tenant ids cannot grow memory without bound.
                self._cache.clear()
            self._cache[tenant] = route
        return route

    def _override(self, tenant: str | None, forced: str, signature: str | None) -> Route | None:
        verifier = self._verifier
        if verifier is None:
            self.on_override_rejected("disabled")
            return None
        side = verifier.verify(forced, signature, tenant)
        if side is None:
            reason = verifier.rejection_reason(forced, signature, tenant)
            self.on_override_rejected(reason)
            if reason == "tenant_not_allowed":
                # A valid signature for a tenant outside routing.override_tenants: the
                # secret is in use on a real tenant. Only secret holders get here, so
                # this cannot be used to flood the log.
                log.warning(
                    "signed override for a tenant outside routing.override_tenants ignored",
                    extra={"tenant": tenant, "override_target": forced},
                )
            return None
        if tenant is not None:
            # The flag's decision first (cached: a dict lookup): hold wins over any
            # override, and the ratchet refuses an override back to legacy.
            flagged = self.decide(tenant)
            if flagged.side == "hold":
                return flagged
            if side == "legacy" and self._ledgered(tenant):
                return ROUTES[("new", "ratchet")]
        return ROUTES[(side, "override")]  # type: ignore[index]

    def _ledgered(self, tenant: str) -> bool:
        return self.ledger is not None and tenant in self.ledger.tenants

    # ---- evaluation --------------------------------------------------------------------

    def evaluate(self, tenant: str) -> Route:
        """Uncached decision (for `router explain` and admin views)."""
        return self._evaluate(tenant)

    def _evaluate(self, tenant: str) -> Route:
        value = self._flags.variation(tenant, DEFAULT_FLAG_VALUE)
        if value == "new":
            return ROUTES[("new", "flag")]
        if value in ("legacy", "hold"):
            if self._ledgered(tenant):
                log.warning(
                    "ratchet: the flag sends a tenant already served by new back to "
                    f"{value}; it stays on new (router tenants rollback clears it)",
                    extra={"tenant": tenant, "flag_value": value},
                )
                return ROUTES[("new", "ratchet")]
            if value == "legacy" and self._shadow_rate is not None:
                rate = self._shadow_rate(tenant)
                if rate > 0:
                    return shadowed_route(rate)
            return ROUTES[(value, "flag")]
        log.warning(
            "unknown flag variation; routing to legacy",
            extra={"tenant": tenant, "flag_key": self._flags.flag_key, "value": repr(value)[:100]},
        )
        return ROUTES[(DEFAULT_FLAG_VALUE, "default")]

    # ---- flag changes ------------------------------------------------------------------

    def flag_changed(self) -> None:
        """On the loop, for every change event: refresh the ledger view (another router
        may have ledgered tenants, or an operator rolled one back), then clear the cache
        and release held requests. Changes during a refresh are coalesced into one more."""
        if self.ledger is None or self.ledger.ledger is None:
            self.invalidate()
            return
        self._dirty = True
        if self._changes is None or self._changes.done():
            self._changes = asyncio.ensure_future(self._apply_changes())

    async def _apply_changes(self) -> None:
        assert self.ledger is not None
        while self._dirty:
            self._dirty = False
            try:
                await self.ledger.refresh()
            except Exception as exc:
                # The view keeps what it had (it only ever loses tenants by rollback): still
                # apply the flag change, which is what the operator is waiting for.
                log.error("ratchet ledger refresh failed", extra={"error": str(exc)[:300]})
            self.invalidate()

    def invalidate(self) -> None:
        self._cache.clear()
        self.cache_clears += 1
        self.holds.release_all()
