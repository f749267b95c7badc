"""Real subprocesses for tests: demo backends and `router serve`, stopped by pid, always.

`Procs` is a registry used as a context manager (each test module wraps it in a fixture):
every process started through it is stopped on exit, whatever the test did, worker
processes of a `--workers N` router included. Processes are stopped by their own pid
only (SIGTERM, then SIGKILL after a bound), never by name.

Output is drained by one reader thread per pipe into a list of lines, so a chatty process
(the router writes one access-log line per request to stdout) never blocks on a full pipe,
and a test can wait for a line with a deadline.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import yaml

from tests.support.paths import REPO
from tests.support.waiting import wait_until

# The interpreter running the tests is the venv's: `python -m router` is the same program
# as the `router` console script next to it.
ROUTER = [sys.executable, "-m", "router"]
ROUTER_SCRIPT = Path(sys.executable).parent / "router"


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test's environment minus any ROUTER_* override that would leak into a child."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ROUTER_") and k != "LAUNCHDARKLY_SDK_KEY"
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_router(
    *args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """`router ARGS...` to completion (a CLI command, not `serve`)."""
    return subprocess.run(
        [*ROUTER, *args],
        env=child_env(env),
        cwd=cwd or REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# ---- /proc --------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """Direct children of `pid` (from every thread's /proc children list)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for tid in tasks:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
            found.extend(int(p) for p in text.split())
    return sorted(set(found))


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` (VmRSS), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return fields[0] != "Z"


# ---- processes ----------------------------------------------------------------------


class Proc:
    """One subprocess with both pipes drained into line lists."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        name: str = "",
    ) -> None:
        self.name = name or Path(argv[0]).name
        self.argv = list(argv)
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(env),
            cwd=cwd or REPO,
            # Its own session: a Ctrl-C in the terminal running pytest does not reach it,
            # and every signal it gets is one a test sent to its pid.
            start_new_session=True,
        )
        self.pid = self.popen.pid
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(
                target=self._drain, args=(self.popen.stdout, self.stdout), daemon=True
            ),
            threading.Thread(
                target=self._drain, args=(self.popen.stderr, self.stderr), daemon=True
            ),
        ]
        for thread in self._threads:
            thread.start()

    def _drain(self, pipe: IO[bytes] | None, lines: list[str]) -> None:
        assert pipe is not None
        with pipe:
            for raw in pipe:
                with self._cond:
                    lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_line(
        self, predicate: Callable[[str], bool], *, stream: str = "stdout", timeout: float = 15
    ) -> str:
        """The first line of `stream` matching `predicate`, waiting up to `timeout` s."""
        lines = self.stdout if stream == "stdout" else self.stderr
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in lines[seen:]:
                    if predicate(line):
                        return line
                seen = len(lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.popen.poll() is not None and not self._reading()):
                    raise AssertionError(
                        f"{self.name} (pid {self.pid}) printed no matching {stream} line "
                        f"within {timeout} s; exit status {self.popen.poll()}\n{self.output()}"
                    )
                self._cond.wait(min(left, 0.1))

    def _reading(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def output(self, last: int = 40) -> str:
        with self._cond:
            out, err = self.stdout[-last:], self.stderr[-last:]
        return "--- stdout\n" + "\n".join(out) + "\n--- stderr\n" + "\n".join(err)

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signum)

    def wait(self, timeout: float) -> int:
        """Exit status, failing (not hanging) if the process outlives `timeout` s."""
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} (pid {self.pid}) still running after {timeout} s\n{self.output()}"
            ) from None
        for thread in self._threads:
            thread.join(timeout=5)
        return code

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout` s; the same for any child left behind."""
        if self.popen.poll() is None:
            kids = children(self.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)
            for kid in kids:
                # Orphaned workers of a supervisor that died first: by pid, never by name.
                if alive(kid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(kid, signal.SIGKILL)
        for thread in self._threads:
            thread.join(timeout=5)


class Procs:
    """Starts processes and stops every one of them on exit, in reverse order."""

    def __init__(self) -> None:
        self._procs: list[Proc] = []

    def __enter__(self) -> Procs:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()

    def stop_all(self) -> None:
        """Stop every process, even if stopping one of them fails (that error is raised
        once the others are stopped too)."""
        error: BaseException | None = None
        while self._procs:
            try:
                self._procs.pop().stop()
            except BaseException as exc:
                error = error or exc
        if error is not None:
            raise error

    def start(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        name: str = "",
    ) -> Proc:
        proc = Proc(argv, env=env, cwd=cwd, name=name)
        self._procs.append(proc)
        return proc

    def backend(self, side: str) -> Backend:
        """`python -m router.demo_backend --side SIDE --port 0`, once it listens."""
        proc = self.start(
            [sys.executable, "-m", "router.demo_backend", "--side", side, "--port", "0"],
            name=f"demo-{side}",
        )
        line = proc.wait_line(lambda s: '"listening"' in s)
        started = json.loads(line)
        assert started["pid"] == proc.pid
        return Backend(side, int(started["port"]), proc)

    def router(
        self,
        config: Path,
        *args: str,
        env: Mapping[str, str] | None = None,
        wait_ready: bool = True,
    ) -> RouterProc:
        """`router serve --config CONFIG ARGS...`, listening, and ready unless told not to.

        Port 0 in the config: the ports come from the router's "router listening" log line
        (race-free); otherwise from the config.
        """
        settings = yaml.safe_load(config.read_text())
        port = _port(settings["server"]["listen"])
        admin_port = _port(settings["server"]["admin_listen"])
        proc = self.start(
            [*ROUTER, "serve", "--config", str(config), *args], env=env, name="router"
        )
        if port == 0 or admin_port == 0:
            line = proc.wait_line(lambda s: '"router listening"' in s, stream="stderr")
            started = json.loads(line)
            port, admin_port = int(started["port"]), int(started["admin_port"])
        router = RouterProc(proc, port, admin_port)
        if wait_ready:
            wait_until(
                lambda: router.ready_status() == 200 or proc.popen.poll() is not None,
                timeout=15,
                what="router /readyz 200",
            )
            assert proc.popen.poll() is None, f"router exited early\n{proc.output()}"
        return router


@dataclass
class Backend:
    side: str
    port: int
    proc: Proc

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    port: int,
    path: str = "/",
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 10,
) -> Response:
    """One request on a fresh connection to 127.0.0.1:port."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        response = conn.getresponse()
        return Response(response.status, response.headers, response.read())
    finally:
        conn.close()


@dataclass
class RouterProc:
    proc: Proc
    port: int
    admin_port: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    def get(self, path: str = "/", tenant: str | None = None, **kwargs: Any) -> Response:
        headers = dict(kwargs.pop("headers", None) or {})
        if tenant is not None:
            headers["X-Tenant-Id"] = tenant
        return request(self.port, path, headers=headers, **kwargs)

    def admin(self, path: str) -> Response:
        return request(self.admin_port, path, timeout=5)

    def ready_status(self) -> int | None:
        try:
            return self.admin("/readyz").status
        except OSError:
            return None  # not listening (yet, or any more)


def _port(listen: str) -> int:
    return int(listen.rpartition(":")[2])


def write_config(
    path: Path,
    legacy: Backend | str,
    new: Backend | str,
    flags_file: Path | str,
    **sections: dict[str, Any],
) -> Path:
    """A router YAML on loopback port 0; `sections` are merged over the defaults."""
    tree: dict[str, Any] = {
        "server": {
            "listen": "127.0.0.1:0",
            "admin_listen": "127.0.0.1:0",
            "drain_delay": 0,
            "shutdown_timeout": 5,
            "debug_headers": True,
        },
        "flags": {"source": "file", "file": str(flags_file), "poll_interval": 0.1},
        "upstreams": {
            "legacy": {"url": legacy if isinstance(legacy, str) else legacy.url},
            "new": {"url": new if isinstance(new, str) else new.url},
        },
        # Relative to the working directory of the router; keep it in the test's tmp dir.
        "ledger": f"sqlite:///{path.parent / 'ledger.db'}",
    }
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def start_fleet(
    procs: Procs, home: Path, flags: Path, admin_token: str, names: Sequence[str] = ("a", "b")
) -> list[RouterProc]:
    """Two demo backends and a router per name, all reading the same flag file, each router
    with a home of its own under `home` (its config and ledger), as separate ECS tasks have."""
    legacy, new = procs.backend("legacy"), procs.backend("new")
    routers = []
    for name in names:
        router_home = home / name
        router_home.mkdir()
        config = write_config(router_home / "router.yaml", legacy, new, flags)
        routers.append(procs.router(config, env={"ROUTER_ADMIN_TOKEN": admin_token}))
    return routers
