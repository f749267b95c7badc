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
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any

from aiohttp import web

from router.proxy.accesslog import configure_logging
from router.service.admin import build_admin_app, build_internal_app
from router.service.app import RouterApp
from router.service.native import build_state
from router.service.workers import WORKER_COUNT_ENV, WORKER_DIR_ENV, WORKER_ID_ENV, WorkerInfo
from router.settings import Settings

log = logging.getLogger("router.service.server")

# Set in worker processes started by the supervisor.
_WORKER_ENV = WORKER_ID_ENV


def install_uvloop() -> None:
    """uvloop where available (it is a dependency), asyncio's loop otherwise."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a hard dependency on Linux
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(settings: Settings, *, reuse_port: bool = False) -> int:
    loop = asyncio.get_running_loop()
    worker = WorkerInfo.from_env()
    app = RouterApp(settings, loop, worker)
    server_settings = settings.server

    admin_runner = web.AppRunner(build_admin_app(app), access_log=None, handle_signals=False)
    await admin_runner.setup()
    internal_runner: web.AppRunner | None = None
    if worker is not None:
        # The private admin socket siblings ask for this worker's figures (workers.py).
        internal_runner = web.AppRunner(
            build_internal_app(app), access_log=None, handle_signals=False
        )
        await internal_runner.setup()
        await web.UnixSite(internal_runner, str(worker.own_socket)).start()
    admin_host, admin_port = server_settings.admin_addr
    admin_site = web.TCPSite(admin_runner, admin_host, admin_port, reuse_port=reuse_port)
    proxy = app.proxy_server()
    host, port = server_settings.listen_addr
    # A port in use (or a privileged one) is an operator's problem, not a bug: say which
    # listener in one log line and exit 1, rather than dying with a traceback.
    which = f"server.admin_listen {server_settings.admin_listen}"
    try:
        await admin_site.start()
        which = f"server.listen {server_settings.listen}"
        listener = await loop.create_server(proxy, host, port, reuse_port=reuse_port, backlog=4096)
    except OSError as exc:
        log.error(f"cannot listen on {which}: {exc.strerror or exc}")
        await admin_runner.cleanup()
        if internal_runner is not None:
            await internal_runner.cleanup()
        await app.close()
        return 1

    # Flags load in the background: until they do, /readyz says 503 and the proxy answers
    # 503 not_ready, so a load balancer never routes by default values.
    flags_started = asyncio.ensure_future(app.start())

    stop = asyncio.Event()
    hurry = asyncio.Event()  # SIGINT, or a second signal: skip the drain delay
    # A second signal: skip what is left of step 4 too (the module docstring's promise,
    # which the code did not keep: a second signal only ever cut the drain delay).
    now = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            now.set()
        if stop.is_set() or signum == signal.SIGINT:
            hurry.set()
        stop.set()
        app.state.draining = True  # step 1: readyz 503 from now on

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
            # Compiled or pure Python (router/service/native.py): a pure-Python image is slower.
            "build": build_state().describe,
            "pid": os.getpid(),
            # The ports actually bound: with port 0 in the config (tests, ad-hoc runs) the
            # configured strings above do not say where the router listens.
            "port": _bound_port(listener.sockets),
            "admin_port": _bound_port(getattr(admin_site._server, "sockets", ())),
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
    await proxy.shutdown(timeout, now)
    with contextlib.suppress(Exception):
        await listener.wait_closed()
    # Step 5: release resources.
    await admin_runner.cleanup()
    if internal_runner is not None:
        await internal_runner.cleanup()
    if not flags_started.done():
        flags_started.cancel()
    await app.close()
    log.info("stopped")
    return 0


def _bound_port(sockets: Any) -> int | None:
    for sock in sockets or ():
        port: int = sock.getsockname()[1]
        return port
    return None


def run(settings: Settings) -> int:
    """Entry point of `router serve`: one process, or a supervisor of N workers."""
    configure_logging(settings.log_level)
    workers = settings.server.workers
    if workers > 1 and _WORKER_ENV not in os.environ:
        # The workers' private admin sockets (workers.py) live here, owner-only.
        directory = tempfile.mkdtemp(prefix="router-workers-")
        try:
            return supervise(workers, directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    install_uvloop()
    return asyncio.run(serve(settings, reuse_port=_WORKER_ENV in os.environ))


def supervise(workers: int, directory: str) -> int:
    """Start N worker processes with the same command line; forward signals; reap them.

    Workers run in their own process group, so a Ctrl-C in a terminal reaches them once,
    through this forwarding, rather than twice (which would count as a second signal and
    skip the grace period of in-flight requests). If a worker dies on its own, the others
    are stopped and the supervisor exits with that worker's status: a task with half its
    workers gone must be replaced by the orchestrator, not linger half-capacity.
    """
    children: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False

    def forward(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for pid, child in children.items():
            # os.kill, not Popen.send_signal: that one polls first and could reap the child
            # behind the os.wait() below. Unreaped, the pid cannot have been reused.
            if child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)

    # Handlers before the first child: a SIGTERM during start-up must not kill the parent
    # with its default action and leave the workers running, orphaned.
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for index in range(workers):
        if stopping:
            break  # signalled while starting: start no more
        env = dict(
            os.environ,
            **{_WORKER_ENV: str(index), WORKER_COUNT_ENV: str(workers), WORKER_DIR_ENV: directory},
        )
        child = subprocess.Popen(
            [sys.executable, "-m", "router", *sys.argv[1:]], env=env, process_group=0
        )
        children[child.pid] = child
    log.info("supervising workers", extra={"workers": json.dumps(list(children))})
    worst = 0
    running = dict(children)
    while running:
        # Any worker, in the order they end (PEP 475: restarted after a signal handler).
        try:
            pid, status = os.wait()
        except ChildProcessError:  # none left (cannot happen while `running` is accurate)
            break
        if pid not in running:
            continue
        child = running.pop(pid)
        child.returncode = code = os.waitstatus_to_exitcode(status)
        worst = max(worst, abs(code))
        if not stopping and running:
            log.error(
                "worker exited; stopping the others",
                extra={"worker_pid": pid, "status": code},
            )
            worst = max(worst, 1)  # exiting unasked is a failure, even with status 0
            forward(signal.SIGTERM, None)
    return worst
