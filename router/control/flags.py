"""Flag source: the LaunchDarkly server SDK, and the bridge from its threads to our loop.

The SDK is thread-based: its data source (a file poller, or the streaming connection to
LaunchDarkly or a Relay Proxy) runs on its own threads and calls listeners there. Nothing
from those threads touches router state directly; every event is handed to the event loop
with `call_soon_threadsafe`, so the loop owns the decision cache and readiness alone.

Evaluation (`variation`) reads the SDK's in-memory store: no I/O, about 14 µs, safe to
call on the loop, but too dear to call per request; decide.py caches its result per
tenant and clears the cache on every change event for our flag.

File source: the SDK's own file data source, with auto-update by polling the file's
mtime. Polling, not watchdog: the SDK's watchdog handler only matches `src_path`, so the
atomic rename `router flags set` uses (a *moved* event whose target is `dest_path`) would
go unseen. The SDK fires a change event only when a flag's `version` increases, which is
why the flag writer (flagfile.py) bumps it on every write. A file that fails to parse is
logged by the SDK and ignored: the last good flags stay in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ldclient
from ldclient import Context
from ldclient.config import Config
from ldclient.impl.integrations.files import file_data_source
from ldclient.integrations import Files
from ldclient.interfaces import DataSourceStatus

from router.settings import FlagSettings

log = logging.getLogger("router.control.flags")

# With PyYAML importable (it is: config/router.yaml) the SDK parses flag files with pure
# Python `yaml.safe_load`, holding the GIL about 0.36 s per 10,000 targeted tenants on
# every reload: a stall of the whole router on each flip. Our flag files are JSON (the
# writer guarantees it), so make the SDK use the json module.
file_data_source.have_yaml = False

ChangeCallback = Callable[[], None]


class FlagSource:
    """Owns one LDClient; reports readiness and flag changes on the event loop."""

    def __init__(self, settings: FlagSettings, loop: asyncio.AbstractEventLoop) -> None:
        self.settings = settings
        self.flag_key = settings.flag_key
        # Flags whose change events reach the callbacks: the routing flag, and any other
        # flag a decision depends on (shadow.flag_key: `watch`).
        self._watched = {settings.flag_key}
        self._loop = loop
        self._client: Any = None  # ldclient.LDClient once started
        self._ready = False
        self._on_change: list[ChangeCallback] = []
        self.updates = 0  # change events seen for our flag
        self.state = "initializing"
        self._constructing: asyncio.Future[Any] | None = None  # LDClient() in its thread
        self._closing = asyncio.Event()

    # ---- lifecycle ---------------------------------------------------------------------

    def _config(self) -> Config:
        s = self.settings
        if s.source == "file":
            assert s.file is not None
            return Config(
                sdk_key="file-data-source",  # not used: no connection to LaunchDarkly
                update_processor_class=Files.new_data_source(
                    paths=[str(s.file)],
                    auto_update=True,
                    poll_interval=s.poll_interval,
                    force_polling=True,
                ),
                send_events=False,
                diagnostic_opt_out=True,
            )
        kwargs: dict[str, Any] = {"sdk_key": s.sdk_key, "send_events": s.send_events}
        if s.base_uri:
            kwargs["base_uri"] = s.base_uri
        if s.stream_uri:
            kwargs["stream_uri"] = s.stream_uri
        if s.events_uri:
            kwargs["events_uri"] = s.events_uri
        return Config(**kwargs)

    async def start(self, wait: float | None = None) -> None:
        """Start the SDK off the loop (its constructor may block), wait up to `wait` s for data.

        Not having data is not an error: the router serves nothing useful without it, so
        /readyz stays 503 (the load balancer sends no traffic) until it arrives.
        """
        wait = self.settings.start_wait if wait is None else wait
        await self._start_client()
        deadline = self._loop.time() + wait
        while not self._ready and self._loop.time() < deadline and not self._closing.is_set():
            await asyncio.sleep(0.05)
            self._refresh_ready()

    async def _start_client(self) -> None:
        config = self._config()
        file = self.settings.file if self.settings.source == "file" else None
        while True:
            before = await self._file_identity(file)
            constructing = self._loop.run_in_executor(
                None, lambda: ldclient.LDClient(config, start_wait=0)
            )
            self._constructing = constructing
            # shield: if the caller is cancelled (shutdown before flag data), the constructor
            # still runs to its end in its thread; close() collects that client and closes
            # it, instead of leaking its threads.
            client = await asyncio.shield(constructing)
            if self._closing.is_set():
                return  # close() owns it
            self._constructing = None
            # Fix: the SDK's file source loads the file once, THEN takes the poller's first
            # mtime reading as its baseline. A write between the two (a flip, or the file
            # being created, while the router starts) was never loaded: the router routed
            # by stale data, or stayed not ready, until the file's next write. If the file
            # changed while the SDK started, start it again: the new one reads it afresh.
            if await self._file_identity(file) == before:
                break
            log.info("flags file changed while the SDK started; restarting it to reload")
            await self._loop.run_in_executor(None, client.close)
        self._client = client
        # Listeners first, then the initial check, so no transition is missed.
        client.flag_tracker.add_listener(self._flag_changed_threadsafe)
        client.data_source_status_provider.add_listener(self._status_changed_threadsafe)
        self._refresh_ready()

    async def _file_identity(self, file: Path | None) -> tuple[int, int, int] | None:
        """(inode, mtime ns, size) of the flags file; None if there is none (yet)."""
        if file is None:
            return None
        try:
            st = await self._loop.run_in_executor(None, os.stat, file)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    async def close(self) -> None:
        self._closing.set()
        client, self._client = self._client, None
        constructing, self._constructing = self._constructing, None
        if client is None and constructing is not None:
            with contextlib.suppress(Exception):
                client = await constructing
        self._ready = False
        if client is not None:
            client.flag_tracker.remove_listener(self._flag_changed_threadsafe)
            client.data_source_status_provider.remove_listener(self._status_changed_threadsafe)
            # close() joins SDK threads (and flushes events): keep it off the loop.
            await self._loop.run_in_executor(None, client.close)

    # ---- state -------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready

    def add_change_callback(self, callback: ChangeCallback) -> None:
        self._on_change.append(callback)

    def watch(self, flag_key: str) -> None:
        """Also call the change callbacks when `flag_key` changes (decisions read it)."""
        self._watched.add(flag_key)

    def variation(self, tenant: str, default: str) -> Any:
        """Evaluate the routing flag for a tenant context (in-memory, on the loop)."""
        return self.evaluate(self.flag_key, tenant, default)

    def evaluate(self, flag_key: str, tenant: str, default: Any) -> Any:
        """Evaluate any flag for a tenant context (in-memory, on the loop)."""
        client = self._client
        if client is None:
            return default
        context = Context.builder(tenant).kind("tenant").build()
        return client.variation(flag_key, context, default)

    # ---- SDK threads -> loop -----------------------------------------------------------

    def _flag_changed_threadsafe(self, change: Any) -> None:
        if change.key in self._watched:
            self._call_soon(self._flag_changed)

    def _status_changed_threadsafe(self, status: DataSourceStatus) -> None:
        self._call_soon(self._status_changed, status.state.value)

    def _call_soon(self, callback: Callable[..., None], *args: Any) -> None:
        # An SDK thread may still deliver an event while (or after) the loop closes, e.g.
        # the poller's last reload racing close(): nothing is left to tell, and raising
        # here would only make the SDK log a traceback from its thread.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback, *args)

    # ---- on the loop -------------------------------------------------------------------

    def _flag_changed(self) -> None:
        self.updates += 1
        for callback in self._on_change:
            callback()

    def _status_changed(self, state: str) -> None:
        self.state = state
        if state == "interrupted":
            # The last known flags stay in memory and in force; say so once per transition.
            log.warning("flag source interrupted; serving the last known flag values")
        self._refresh_ready()

    def _refresh_ready(self) -> None:
        client = self._client
        ready = bool(client is not None and client.is_initialized())
        if ready and not self._ready:
            self._ready = True
            self.state = "valid" if self.state == "initializing" else self.state
            log.info("flag data loaded", extra={"flag_key": self.flag_key})
            # Anything evaluated before data arrived used defaults: forget it.
            for callback in self._on_change:
                callback()
