"""Phase 2: decide where a tenant's request goes, and why.

`decide(tenant)` is pure and cheap on the hot path: a dict lookup in a per-tenant decision
cache. A miss evaluates the LaunchDarkly flag once (about 14 µs) and stores the interned
`Route`; every change event for the flag clears the cache (flags.py hands those events to
the loop), so a flip is seen by the next request after the SDK has the new data.

Reasons (DESIGN.md): `flag` (the flag said so), `no-tenant` (no tenant found: the
configured default target), `default` (the flag returned something that is not a known
variation: logged, treated as legacy). `hold`, `ratchet`, `override` and `pinned-path`
are decided here too once the cutover features land; the Route shape already carries
them.
"""

from __future__ import annotations

import logging
from typing import Final, Literal

from router.flags import FlagSource
from router.settings import Settings

log = logging.getLogger("router.routing")

Decision = Literal["legacy", "new", "hold"]
Reason = Literal["flag", "ratchet", "override", "no-tenant", "pinned-path", "default"]
VARIATIONS: Final = ("legacy", "hold", "new")


class Route:
    """An immutable (target, reason) pair; instances are interned, never built per request."""

    __slots__ = ("header_value", "reason", "target")

    def __init__(self, target: Decision, reason: Reason) -> None:
        self.target: Decision = target
        self.reason: Reason = reason
        self.header_value = f"{target}; reason={reason}"  # X-Routed-To, when enabled

    def __repr__(self) -> str:
        return f"Route({self.target!r}, {self.reason!r})"


ROUTES: Final[dict[tuple[Decision, Reason], Route]] = {
    (target, reason): Route(target, reason)
    for target in ("legacy", "new", "hold")
    for reason in ("flag", "ratchet", "override", "no-tenant", "pinned-path", "default")
}


class Decider:
    """Tenant -> Route, cached per tenant, invalidated on flag change."""

    __slots__ = ("_cache", "_cache_size", "_flags", "_no_tenant", "cache_clears")

    def __init__(self, settings: Settings, flags: FlagSource) -> None:
        self._flags = flags
        self._cache: dict[str, Route] = {}
        self._cache_size = settings.flags.decision_cache_size
        self._no_tenant = ROUTES[(settings.tenant.default_target, "no-tenant")]
        self.cache_clears = 0
        flags.add_change_callback(self.invalidate)

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

    def evaluate(self, tenant: str) -> Route:
        """Uncached decision (for `router explain` and admin views)."""
        return self._evaluate(tenant)

    def _evaluate(self, tenant: str) -> Route:
        value = self._flags.variation(tenant, "legacy")
        if value == "new":
            return ROUTES[("new", "flag")]
        if value == "legacy":
            return ROUTES[("legacy", "flag")]
        if value == "hold":
            # Until hold is implemented the safe reading of "hold" is "not moved yet":
            # nothing may have been written to new, so legacy keeps serving.
            return ROUTES[("legacy", "default")]
        log.warning(
            "unknown flag variation; routing to legacy",
            extra={"tenant": tenant, "flag_key": self._flags.flag_key, "value": repr(value)[:100]},
        )
        return ROUTES[("legacy", "default")]

    def invalidate(self) -> None:
        self._cache.clear()
        self.cache_clears += 1
