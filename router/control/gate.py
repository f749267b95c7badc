"""The scheduled-job gate: background work asks which account owns a tenant, and gets the
router's own answer, so a nightly job runs in exactly one of them.

    from router.control.gate import Gate
    from router.settings import load_settings

    async with Gate(load_settings("config/router.yaml")) as gate:
        if await gate.owner("acme") == "new":
            ...  # run the job against the new account (and only there)

`owner(tenant)` is decided by the same pieces as a request (routing.Decider over the same
flag, ledger and settings), so it honours them the same way:
- the flag says `new`: "new", after the tenant's ratchet entry is durable (a job that
  writes on new makes going back just as lossy as a request would);
- the tenant is in the ratchet ledger: "new", whatever the flag says;
- the flag says `hold` (a cutover is under way): wait, like a held request, until it moves
  on, for at most `hold_timeout` (the gate's argument, or routing.hold_timeout); past it,
  HoldTimeout. Pass `wait=False` to get TenantHeld at once instead;
- otherwise "legacy".

Pinned paths and signed overrides are per request; they do not apply to jobs.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Literal

from router.control.flags import FlagSource
from router.control.ledger import open_ledger
from router.errors import HoldTimeout
from router.proxy.decide import Decider, LedgerView
from router.settings import Settings

Owner = Literal["legacy", "new"]


class TenantHeld(Exception):
    """The tenant is being cut over right now (returned at once by owner(wait=False))."""


class Gate:
    def __init__(self, settings: Settings, hold_timeout: float | None = None) -> None:
        self._settings = settings
        self._hold_timeout = settings.routing.hold_timeout if hold_timeout is None else hold_timeout
        self._flags: FlagSource | None = None
        self._ledger: LedgerView | None = None
        self._decider: Decider | None = None

    async def start(self, wait: float | None = None) -> None:
        """Load flag data and the ledger; raises TimeoutError if flags do not load."""
        loop = asyncio.get_running_loop()
        self._flags = FlagSource(self._settings.flags, loop)
        self._ledger = LedgerView(open_ledger(self._settings.ledger), loop)
        self._decider = Decider(self._settings, self._flags, self._ledger)
        await self._ledger.start()
        await self._flags.start(wait=self._settings.flags.start_wait if wait is None else wait)
        if not self._flags.ready:
            raise TimeoutError("no flag data: the gate cannot say who owns a tenant")

    async def close(self) -> None:
        if self._flags is not None:
            await self._flags.close()
        if self._ledger is not None:
            await self._ledger.close()

    async def __aenter__(self) -> Gate:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def owner(self, tenant: str, *, wait: bool = True) -> Owner:
        decider, ledger = self._decider, self._ledger
        if decider is None or ledger is None:
            raise RuntimeError("Gate.start() first (or use `async with Gate(...)`)")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._hold_timeout
        route = decider.decide(tenant)
        while route.side == "hold":
            if not wait:
                raise TenantHeld(f"{tenant} is being cut over")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise HoldTimeout(f"{tenant} stayed in hold for {self._hold_timeout:g} s")
            await decider.holds.wait(tenant, remaining, loop)
            route = decider.decide(tenant)
        if route.side == "new":
            pending = ledger.ensure(tenant)
            if pending is not None:
                await pending
            return "new"
        return "legacy"
