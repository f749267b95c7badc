"""Process lifecycle: event loop, listeners, signals, graceful drain, worker processes.

Shutdown on SIGTERM (what ECS sends before SIGKILL after `stopTimeout`):
  1. /readyz turns 503 at once, so the ALB starts deregistering this task;
  2. keep serving for `drain_delay` (requests the ALB still sends must not fail);
  3. stop accepting new connections;
  4. let in-flight requests finish, up to `shutdown_timeout`;
  5. close upstream pools and the flag client; exit 0.
SIGINT (an operator's Ctrl-C) skips step 2. A second signal skips what is left of step 4.

Workers: `--workers N` starts N processes that each bind the same ports with
SO_REUSEPORT (the kernel spreads connections), each with its own pools and flag client.
The parent only supervises: it forwards signals and exits with the worst child status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from typing import Any

from aiohttp import web

from router.accesslog import configure_logging
from router.admin import build_admin_app
from router.app import RouterApp
from router.settings import Settings

log = logging.getLogger("router.server")

# Set in worker processes started by the supervisor.
_WORKER_ENV = "ROUTER_WORKER_ID"


def install_uvloop() -> None:
    """uvloop where available (it is a dependency), asyncio's loop otherwise."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a hard dependency on Linux
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(settings: Settings, *, reuse_port: bool = False) -> int:
    loop = asyncio.get_running_loop()
    app = RouterApp(settings, loop)
    server_settings = settings.server

    admin_runner = web.AppRunner(build_admin_app(app), access_log=None, handle_signals=False)
    await admin_runner.setup()
    admin_host, admin_port = server_settings.admin_addr
    await web.TCPSite(admin_runner, admin_host, admin_port, reuse_port=reuse_port).start()

    proxy = app.proxy_server()
    host, port = server_settings.listen_addr
    listener = await loop.create_server(proxy, host, port, reuse_port=reuse_port, backlog=4096)

    # Flags load in the background: until they do, /readyz says 503 and the proxy answers
    # 503 not_ready, so a load balancer never routes by default values.
    flags_started = asyncio.ensure_future(app.start())

    stop = asyncio.Event()
    hurry = asyncio.Event()  # SIGINT, or a second signal: skip the drain delay

    def on_signal(signum: int) -> None:
        if stop.is_set() or signum == signal.SIGINT:
            hurry.set()
        stop.set()
        app.draining = True  # step 1: readyz 503 from now on

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    log.info(
        "router listening",
        extra={
            "listen": server_settings.listen,
            "admin_listen": server_settings.admin_listen,
            "legacy": settings.upstreams.legacy.url,
            "new": settings.upstreams.new.url,
            "flag_source": settings.flags.source,
            "pid": os.getpid(),
        },
    )
    await stop.wait()
    fast = hurry.is_set()
    log.info("draining", extra={"drain_delay": 0 if fast else server_settings.drain_delay})

    # Step 2: keep serving while the load balancer deregisters us.
    if not fast and server_settings.drain_delay > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(hurry.wait(), server_settings.drain_delay)
        fast = hurry.is_set()
    # Step 3: stop accepting. Idle keep-alive connections are closed; busy ones close after
    # their current response.
    listener.close()
    proxy.pre_shutdown()
    # Step 4: in-flight requests finish, within the bound.
    # An operator's Ctrl-C still lets requests in flight finish, but only briefly.
    timeout = (
        min(server_settings.shutdown_timeout, 2.0) if fast else server_settings.shutdown_timeout
    )
    await proxy.shutdown(timeout)
    with contextlib.suppress(Exception):
        await listener.wait_closed()
    # Step 5: release resources.
    await admin_runner.cleanup()
    if not flags_started.done():
        flags_started.cancel()
    await app.close()
    log.info("stopped")
    return 0


def run(settings: Settings) -> int:
    """Entry point of `router serve`: one process, or a supervisor of N workers."""
    configure_logging(settings.log_level)
    workers = settings.server.workers
    if workers > 1 and _WORKER_ENV not in os.environ:
        return supervise(workers)
    install_uvloop()
    return asyncio.run(serve(settings, reuse_port=_WORKER_ENV in os.environ))


def supervise(workers: int) -> int:
    """Start N worker processes with the same command line; forward signals; reap them."""
    children: list[subprocess.Popen[bytes]] = []
    for index in range(workers):
        env = dict(os.environ, **{_WORKER_ENV: str(index)})
        children.append(subprocess.Popen([sys.executable, "-m", "router", *sys.argv[1:]], env=env))

    def forward(signum: int, _frame: Any) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    log.info("supervising workers", extra={"workers": json.dumps([c.pid for c in children])})
    codes = [child.wait() for child in children]
    return max((abs(code) for code in codes), default=0)
