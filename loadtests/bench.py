"""The router's benchmark: side-by-side ratios on one machine (method: docs/benchmarks.md).

    .venv/bin/python loadtests/bench.py [--quick] [--rounds N] [--duration S] [--out FILE]
                                        [--only SCENARIO ...]

Upstream: nginx answering a fixed body (pure-Python fallback when nginx is missing), on
core 0 with the load generator; every contender alone on core 1. Contenders, interleaved
A B C D ... for several rounds so drift hits them all alike; medians, then ratios:
  direct         the load generator straight to the upstream (no proxy)
  router         `router serve`, 1 worker, 1,000-tenant flag file, metrics and access
                 log on (to a file), debug headers off
  peer           loadtests/peers/naive_aiohttp_proxy.py (aiohttp server + ClientSession)
  bare_proxy     the router's forwarding core alone (its front, upstream pool and relay)
                 with none of its per-request features: what those features cost
  aiohttp_alone  aiohttp's low-level web.Server answering the same bodies itself: the
                 ceiling of an aiohttp front (the router has its own:
                 router/proxy/connection.py)
  nginx          nginx proxy_pass with an upstream keepalive pool, 1 worker
Scenarios: small, 64k, post1m (wrk, or loadgen.py closed where wrk is missing), jwt
(two routers side by side: tenant from X-Tenant-Id vs from a JWT the router verifies,
ES256, 1,000 tokens rotated, keys from a local HTTPS JWKS endpoint), rate1000
(open-loop generator, loadgen.py), stream (1 GiB each way through the router, RSS
sampled), idle10k (10,000 idle keep-alive connections, RSS), workers (--workers 1 vs 2).
Method, scenarios and the latest figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import os
import platform
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml
from common import (
    LARGE_BODY,
    LARGE_SIZE,
    PATH_LARGE,
    PATH_SMALL,
    PATH_UPLOAD,
    SMALL_BODY,
    TENANT_HEADER,
    UPLOAD_SIZE,
)

from router.service.native import check_fresh

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEER = HERE / "peers" / "naive_aiohttp_proxy.py"
PY = sys.executable
HOST = "127.0.0.1"

SCENARIOS = ("small", "64k", "post1m", "jwt", "rate1000", "stream", "idle10k", "workers")
THROUGHPUT_SCENARIOS = ("small", "64k", "post1m")
CONTENDERS = ("direct", "router", "peer", "bare_proxy", "aiohttp_alone", "nginx")
TENANT_COUNT = 1000
POST_TENANTS = 16  # wrk pre-builds one 1 MiB request per tenant: 16 of them, not 1,000
MIB = 1024 * 1024
STOP_GRACE = 5.0


# --- small utilities ---------------------------------------------------------------------


def log(message: str = "") -> None:
    print(message, flush=True)


def free_port(taken: set[int]) -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        if port not in taken:
            taken.add(port)
            return port


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def descendants(pid: int) -> list[int]:
    """pid and every process below it (nginx's worker, the router's worker processes)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found = [pid]
    for current in found:  # grows while iterating: breadth first
        found.extend(children.get(current, ()))
    return found


def cpu_times(pids: Sequence[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of these processes so far."""
    user = system = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11])  # utime
            system += int(fields[12])  # stime
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 2.0) -> int:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


# --- processes -----------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


class Processes:
    """Every process the bench starts, each in its own session; stopped by pid."""

    def __init__(self, workdir: Path, pin: bool) -> None:
        self.workdir = workdir
        self.pin = pin
        self.procs: list[Proc] = []
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("ROUTER_") and k != "LAUNCHDARKLY_SDK_KEY"
        }
        self.env["PYTHONUNBUFFERED"] = "1"

    def argv(self, cores: str | None, argv: Sequence[str]) -> list[str]:
        if cores is None or not self.pin:
            return list(argv)
        return ["taskset", "-c", cores, *argv]

    def start(
        self,
        name: str,
        argv: Sequence[str],
        cores: str | None,
        *,
        stdout: Path | None = None,
        stderr: Path | None = None,
        pipes: bool = False,
    ) -> Proc:
        log_path = stderr or stdout
        with contextlib.ExitStack() as files:
            out: IO[bytes] | int = subprocess.DEVNULL
            err: IO[bytes] | int = subprocess.DEVNULL
            if stdout is not None:
                out = files.enter_context(open(stdout, "ab"))  # the child keeps its own copy
            if stderr is not None:
                err = (
                    subprocess.STDOUT
                    if stderr == stdout
                    else files.enter_context(open(stderr, "ab"))
                )
            popen = subprocess.Popen(
                self.argv(cores, argv),
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipes else out,
                stderr=err,
                cwd=self.workdir,
                env=self.env,
                start_new_session=True,
            )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        """SIGTERM, then SIGKILL to its process group after STOP_GRACE seconds."""
        if proc in self.procs:
            self.procs.remove(proc)
        pid = proc.pid
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            try:
                proc.popen.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                proc.popen.wait(STOP_GRACE)
        # Anything the process started and left behind (its session is its pid).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        for stream in (proc.popen.stdin, proc.popen.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def wait_http(
    url: str, proc: Proc, timeout: float = 30.0, headers: dict[str, str] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(
                f"{proc.name} exited with status {proc.popen.returncode}:\n{proc.log_tail()}"
            )
        try:
            status = http_get(url, headers, timeout=1.0)
            if status == 200:
                return
            last = f"HTTP {status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise RuntimeError(
        f"{proc.name} not ready at {url} after {timeout:.0f} s ({last}):\n{proc.log_tail()}"
    )


def read_json_line(proc: Proc, timeout: float) -> dict[str, Any]:
    """The next JSON line a helper prints on its stdout pipe."""
    stdout = proc.popen.stdout
    assert stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError(f"{proc.name}: no result within {timeout:.0f} s")
    line = stdout.readline()
    if not line:
        raise RuntimeError(f"{proc.name} exited (status {proc.popen.poll()}) without a result")
    result: dict[str, Any] = json.loads(line)
    return result


class RssSampler:
    """VmRSS of one pid every `interval` seconds, in a thread, between start() and stop()."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            value = rss_kib(self.pid)
            if value is not None:
                self.samples.append(value)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_kib(self) -> int:
        return max(self.samples, default=0)


def steady_rss_kib(pid: int, seconds: float = 1.0) -> int:
    """Median VmRSS over `seconds`."""
    samples: list[int] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        value = rss_kib(pid)
        if value is not None:
            samples.append(value)
        time.sleep(0.05)
    return int(statistics.median(samples)) if samples else 0


# --- configuration files -----------------------------------------------------------------


def tenant_ids() -> list[str]:
    return [f"bench-tenant-{i:04d}" for i in range(TENANT_COUNT)]


def write_flag_file(path: Path, tenants: list[str]) -> dict[str, int]:
    from router.control.flagfile import set_tenants

    legacy = tenants[0::2]
    new = tenants[1::2]
    set_tenants(path, legacy, "legacy", create=True)
    set_tenants(path, new, "new", create=True)
    return {"legacy": len(legacy), "new": len(new)}


def write_router_config(
    path: Path,
    port: int,
    admin_port: int,
    upstream_url: str,
    flags_file: Path,
    workdir: Path,
    workers: int = 1,
    tenant: dict[str, Any] | None = None,
) -> None:
    """Production settings (metrics, access log, header + jwt extractors, debug headers
    off), both targets on the same upstream, and drain_delay 0 so SIGTERM is quick.
    `tenant` replaces the tenant section (the jwt scenario's verifying router)."""
    upstream = {
        "url": upstream_url,
        "host_header": "preserve",
        "idle_timeout": 4.0,
        "connect_timeout": 3.0,
        "response_header_timeout": 30.0,
        "read_timeout": 60.0,
        "max_connections": 1024,
    }
    config = {
        "server": {
            "listen": f"{HOST}:{port}",
            "admin_listen": f"{HOST}:{admin_port}",
            "workers": workers,
            "keepalive_timeout": 75.0,
            "drain_delay": 0,
            "shutdown_timeout": 2.0,
            "debug_headers": False,
        },
        "tenant": {
            "extractors": [
                {"type": "header", "name": TENANT_HEADER},
                {"type": "jwt", "claim": "iss", "query_param": "jwt"},
            ],
            "default_side": "legacy",
        }
        if tenant is None
        else tenant,
        "flags": {
            "source": "file",
            "file": str(flags_file),
            "flag_key": "tenant-routing",
            "poll_interval": 0.5,
            "start_wait": 5.0,
        },
        "upstreams": {"legacy": upstream, "new": dict(upstream)},
        "access_log": {"enabled": True, "sample_rate": 1.0},
        "log_level": "info",
        "ledger": f"sqlite:///{workdir / 'router-ledger.db'}",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def _nginx_common(workdir: Path, name: str) -> str:
    user = "user root root;\n" if os.geteuid() == 0 else ""
    temp = workdir / f"{name}-temp"
    temp.mkdir(exist_ok=True)
    return f"""{user}worker_processes 1;
daemon off;
pid {workdir / name}.pid;
error_log {workdir / name}-error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 16000; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_max_body_size 0;
"""


def nginx_upstream_config(workdir: Path, port: int, sink_port: int) -> Path:
    """Fixed answers: /64k a static 64 KiB file; /upload reads the whole body (request
    buffering of proxy_pass) and then answers small from a second server block (nginx's
    `return` would answer before the body is read); anything else the small body."""
    www = workdir / "www"
    www.mkdir(exist_ok=True)
    (www / PATH_LARGE.lstrip("/")).write_bytes(LARGE_BODY)
    small = SMALL_BODY.decode()
    assert "'" not in small and "$" not in small
    text = (
        _nginx_common(workdir, "nginx-upstream")
        + f"""
    client_body_buffer_size 2m;
    upstream sink {{ server {HOST}:{sink_port}; keepalive 64; keepalive_requests 1000000; }}
    server {{
        listen {HOST}:{port} backlog=4096;
        location = {PATH_LARGE} {{ root {www}; default_type application/octet-stream; }}
        location = {PATH_UPLOAD} {{
            proxy_pass http://sink;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering on;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_method GET;
        }}
        location / {{ default_type text/plain; return 200 '{small}'; }}
    }}
    server {{
        listen {HOST}:{sink_port} backlog=4096;
        location / {{ default_type text/plain; return 200 '{small}'; }}
    }}
}}
"""
    )
    path = workdir / "nginx-upstream.conf"
    path.write_text(text)
    return path


def nginx_proxy_config(workdir: Path, port: int, upstream_port: int) -> Path:
    """proxy_pass with a keep-alive upstream pool, streaming both bodies like the router."""
    text = (
        _nginx_common(workdir, "nginx-proxy")
        + f"""
    upstream backend {{
        server {HOST}:{upstream_port};
        keepalive 128;
        keepalive_requests 1000000;
        keepalive_timeout 60s;
    }}
    server {{
        listen {HOST}:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_buffer_size 64k;
            proxy_buffers 4 64k;
            proxy_busy_buffers_size 128k;
        }}
    }}
}}
"""
    )
    path = workdir / "nginx-proxy.conf"
    path.write_text(text)
    return path


LUA_TEMPLATE = """-- generated by loadtests/bench.py
local tenants = {{ {tenants} }}
local method, path = "{method}", "{path}"
local body_size = {body_size}
local reqs = {{}}
local n = 0
local i = 0

init = function(args)
    local body = nil
    if body_size > 0 then body = string.rep("z", body_size) end
    for k, t in ipairs(tenants) do
        reqs[k] = wrk.format(method, path, {{["{header}"] = t}}, body)
    end
    n = #reqs
end

request = function()
    i = i % n + 1
    return reqs[i]
end

done = function(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        'BENCH_JSON {{"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,' ..
        '"connect_errors":%.0f,"read_errors":%.0f,"write_errors":%.0f,' ..
        '"status_errors":%.0f,"timeouts":%.0f,"p50_us":%.0f,"p90_us":%.0f,' ..
        '"p99_us":%.0f,"p999_us":%.0f,"max_us":%.0f,"mean_us":%.1f}}\\n',
        summary.requests, summary.duration, summary.bytes,
        e.connect, e.read, e.write, e.status, e.timeout,
        latency:percentile(50), latency:percentile(90), latency:percentile(99),
        latency:percentile(99.9), latency.max, latency.mean))
end
"""


def write_wrk_script(
    path: Path,
    tenants: list[str],
    method: str,
    url_path: str,
    body: int,
    header: str = TENANT_HEADER,
) -> None:
    """`tenants` are the header's values, rotated per request (for the jwt scenario:
    `Bearer <token>` values of the Authorization header)."""
    listed = tenants[:POST_TENANTS] if body else tenants
    path.write_text(
        LUA_TEMPLATE.format(
            tenants=", ".join(f'"{t}"' for t in listed),
            method=method,
            path=url_path,
            body_size=body,
            header=header,
        )
    )


JWT_ISSUER = "https://bench-idp.test"
JWT_AUDIENCE = "tenant-router"


@contextlib.contextmanager
def jwks_server(workdir: Path, jwk: dict[str, Any]) -> Iterator[tuple[str, Path]]:
    """A local HTTPS JWKS endpoint (trustme certificate) in a thread of this process; it
    is fetched once at the router's start (and every refresh_interval), never per request.
    Yields (jwks_url, ca_file)."""
    import http.server
    import ssl

    import trustme

    ca = trustme.CA()
    ca_file = workdir / "jwks-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    document = json.dumps({"keys": [jwk]}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(document)))
            self.end_headers()
            self.wfile.write(document)

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://localhost:{server.server_address[1]}/jwks.json", ca_file
    finally:
        server.shutdown()
        server.server_close()


def signed_tokens(tenants: list[str]) -> tuple[dict[str, Any], list[str]]:
    """An ES256 key's public JWK and one token per tenant (claim `tenant`), valid 2 h."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    key = ec.generate_private_key(ec.SECP256R1())
    jwk = {**ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "bench", "use": "sig"}
    now = int(time.time())
    claims = {"iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "iat": now, "exp": now + 7200}
    tokens = [
        jwt.encode({**claims, "tenant": t}, key, "ES256", headers={"kid": "bench"}) for t in tenants
    ]
    return jwk, tokens


# --- load generators ---------------------------------------------------------------------


@dataclass
class Target:
    name: str
    port: int
    procs: list[Proc] = field(default_factory=list)  # whose CPU time is reported

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


@dataclass
class Bench:
    args: argparse.Namespace
    workdir: Path
    processes: Processes
    ports: set[int] = field(default_factory=set)
    tenants: list[str] = field(default_factory=tenant_ids)
    upstream_kind: str = ""
    upstream_port: int = 0
    upstream_proc: Proc | None = None
    flags_file: Path = Path()
    tenants_file: Path = Path()
    results: dict[str, Any] = field(default_factory=dict)
    generator: str = "wrk"  # or "python": loadgen.py's closed loop, where wrk is missing

    # -- helpers --

    def pin(self, cores: str) -> str | None:
        return cores if self.args.pin else None

    def run_wrk(
        self,
        target: Target,
        script: Path,
        duration: float,
        cores: str | None = "0",
        body: int = 0,
        method: str = "GET",
        url_path: str = PATH_SMALL,
    ) -> dict[str, Any]:
        """One closed-loop run of 64 connections (wrk, or loadgen.py's `closed` mode where
        wrk is missing); MB/s counts the bytes received plus the request bodies sent."""
        if self.generator == "wrk":
            argv = [
                "wrk", "-t1", "-c64", f"-d{duration:g}s", "--latency", "--timeout", "5s",
                "-s", str(script), target.url + "/",
            ]  # fmt: skip
        else:
            # The same requests as the wrk script: tenants rotated, POST_TENANTS for bodies.
            argv = [
                PY, str(HERE / "loadgen.py"), "closed", "--port", str(target.port),
                "--connections", "64", "--duration", f"{duration:g}", "--method", method,
                "--path", url_path, "--body", str(body), "--tenants-file",
                str(self.tenants_file), "--tenants-limit", str(POST_TENANTS if body else 0),
            ]  # fmt: skip
        watched = [p for proc in target.procs for p in descendants(proc.pid)]
        user_before, system_before = cpu_times(watched)
        started = time.monotonic()
        done = subprocess.run(
            self.processes.argv(cores, argv),
            capture_output=True,
            text=True,
            timeout=duration + 30,
            check=False,
            env=self.processes.env,
        )
        wall = time.monotonic() - started
        user_after, system_after = cpu_times(watched)
        user, system = user_after - user_before, system_after - system_before
        cpu = user + system
        if self.generator == "wrk":
            line = next((x for x in done.stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
        else:
            line = "BENCH_JSON " + done.stdout.strip().splitlines()[-1] if done.stdout else None
        if line is None or done.returncode != 0:
            raise RuntimeError(
                f"{self.generator} failed (status {done.returncode}): {done.stderr.strip()[-800:]}"
            )
        raw = json.loads(line.removeprefix("BENCH_JSON "))
        seconds = raw["duration_us"] / 1e6
        errors = sum(raw[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts"))
        return {
            "rps": round(raw["requests"] / seconds, 1) if seconds else 0.0,
            "requests": raw["requests"],
            "p50_ms": raw["p50_us"] / 1000,
            "p90_ms": raw["p90_us"] / 1000,
            "p99_ms": raw["p99_us"] / 1000,
            "p999_ms": raw["p999_us"] / 1000,
            "max_ms": raw["max_us"] / 1000,
            "mean_ms": round(raw["mean_us"] / 1000, 3),
            "mb_per_s": (
                round((raw["bytes"] + raw["requests"] * body) / seconds / 1e6, 1)
                if seconds
                else 0.0
            ),
            "socket_errors": errors,
            "non_2xx": raw["status_errors"],
            "cpu_percent": round(100 * cpu / wall, 1) if target.procs else None,
            # CPU per request, user and kernel: where a proxy's time goes (its syscalls
            # are twice an origin's: a read and a write on each side).
            "user_us_per_request": (
                round(user / raw["requests"] * 1e6, 1) if target.procs and raw["requests"] else None
            ),
            "sys_us_per_request": (
                round(system / raw["requests"] * 1e6, 1)
                if target.procs and raw["requests"]
                else None
            ),
            "raw": raw,
        }

    def run_helper(self, argv: Sequence[str], cores: str | None, timeout: float) -> dict[str, Any]:
        done = subprocess.run(
            self.processes.argv(cores, [PY, str(HERE / "loadgen.py"), *argv]),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=self.processes.env,
        )
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            raise RuntimeError(
                f"loadgen {argv[0]} failed ({done.returncode}): {done.stderr[-800:]}"
            )
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    # -- processes --

    def start_upstream(self) -> None:
        choice = self.args.upstream
        if choice == "auto":
            choice = "nginx" if shutil.which("nginx") else "python"
        port = free_port(self.ports)
        if choice == "nginx":
            conf = nginx_upstream_config(self.workdir, port, free_port(self.ports))
            argv = [
                nginx_bin(), "-p", str(self.workdir),
                "-e", str(self.workdir / "nginx-upstream-error.log"), "-c", str(conf),
            ]  # fmt: skip
            proc = self.processes.start(
                "upstream (nginx)", argv, self.pin("0"), stderr=self.workdir / "nginx-upstream.out"
            )
            self.upstream_kind = f"nginx {nginx_version()} (fixed answers, 1 worker)"
        else:
            argv = [PY, str(HERE / "fixed_upstream.py"), str(port)]
            proc = self.processes.start(
                "upstream (python)", argv, self.pin("0"), stderr=self.workdir / "fixed-upstream.log"
            )
            self.upstream_kind = "python fixed_upstream.py (uvloop + httptools; nginx not found)"
        self.upstream_port = port
        self.upstream_proc = proc
        wait_http(f"http://{HOST}:{port}{PATH_SMALL}", proc)

    @property
    def upstream_url(self) -> str:
        return f"http://{HOST}:{self.upstream_port}"

    def start_router(
        self,
        name: str,
        upstream_url: str,
        cores: str | None,
        workers: int = 1,
        tenant: dict[str, Any] | None = None,
        probe: dict[str, str] | None = None,
    ) -> tuple[Target, int]:
        port, admin = free_port(self.ports), free_port(self.ports)
        config = self.workdir / f"{name}.yaml"
        write_router_config(
            config, port, admin, upstream_url, self.flags_file, self.workdir, workers, tenant
        )
        router_bin = Path(PY).parent / "router"
        argv = [str(router_bin)] if router_bin.exists() else [PY, "-m", "router"]
        argv += ["serve", "--config", str(config), "--workers", str(workers)]
        proc = self.processes.start(
            name,
            argv,
            cores,
            stdout=self.workdir / f"{name}-access.log",
            stderr=self.workdir / f"{name}-app.log",
        )
        wait_http(f"http://{HOST}:{admin}/readyz", proc, timeout=30)
        # A request through it: the upstream answers, the tenant resolves.
        status = http_get(
            f"http://{HOST}:{port}{PATH_SMALL}", probe or {TENANT_HEADER: self.tenants[1]}
        )
        if status != 200:
            raise RuntimeError(f"{name}: a request through it answered {status}")
        return Target(name, port, [proc]), admin

    def start_throughput_contenders(self) -> dict[str, Target]:
        assert self.upstream_proc is not None
        targets: dict[str, Target] = {
            "direct": Target("direct", self.upstream_port, [self.upstream_proc])
        }
        router, _ = self.start_router("router", self.upstream_url, self.pin("1"))
        targets["router"] = router

        port = free_port(self.ports)
        proc = self.processes.start(
            "peer", [PY, str(PEER), str(port), self.upstream_url], self.pin("1")
        )  # stderr to /dev/null: it logs a traceback whenever wrk disconnects
        wait_http(f"http://{HOST}:{port}{PATH_SMALL}", proc)
        targets["peer"] = Target("peer", port, [proc])

        port = free_port(self.ports)
        proc = self.processes.start(
            "bare_proxy",
            [PY, str(HERE / "bare_proxy.py"), str(port), self.upstream_url],
            self.pin("1"),
            stderr=self.workdir / "bare-proxy.log",
        )
        wait_http(f"http://{HOST}:{port}{PATH_SMALL}", proc)
        targets["bare_proxy"] = Target("bare_proxy", port, [proc])

        port = free_port(self.ports)
        proc = self.processes.start(
            "aiohttp_alone",
            [PY, str(HERE / "aiohttp_alone.py"), str(port)],
            self.pin("1"),
            stderr=self.workdir / "aiohttp-alone.log",
        )
        wait_http(f"http://{HOST}:{port}{PATH_SMALL}", proc)
        targets["aiohttp_alone"] = Target("aiohttp_alone", port, [proc])

        if shutil.which("nginx") or Path("/usr/sbin/nginx").exists():
            port = free_port(self.ports)
            conf = nginx_proxy_config(self.workdir, port, self.upstream_port)
            argv = [
                nginx_bin(), "-p", str(self.workdir),
                "-e", str(self.workdir / "nginx-proxy-error.log"), "-c", str(conf),
            ]  # fmt: skip
            proc = self.processes.start(
                "nginx", argv, self.pin("1"), stderr=self.workdir / "nginx-proxy.out"
            )
            wait_http(f"http://{HOST}:{port}{PATH_SMALL}", proc)
            targets["nginx"] = Target("nginx", port, [proc])
        return targets

    # -- scenarios --

    def throughput(self, scenario: str, targets: dict[str, Target]) -> dict[str, Any]:
        method, url_path, body, what = {
            "small": ("GET", PATH_SMALL, 0, f"GET {PATH_SMALL}: {len(SMALL_BODY)} B answers"),
            "64k": ("GET", PATH_LARGE, 0, f"GET {PATH_LARGE}: {LARGE_SIZE // 1024} KiB answers"),
            "post1m": ("POST", PATH_UPLOAD, UPLOAD_SIZE, "POST 1 MiB bodies, small answers"),
        }[scenario]
        script = self.workdir / f"wrk-{scenario}.lua"
        write_wrk_script(script, self.tenants, method, url_path, body)
        rounds, duration = self.args.rounds, self.args.duration
        log(f"\n[{scenario}] {what}; {' '.join(targets)} x {rounds} rounds of {duration:g} s")
        for target in targets.values():  # warm-up, not recorded
            self.run_wrk(target, script, self.args.warmup, body=body, method=method,
                         url_path=url_path)  # fmt: skip
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
        for r in range(rounds):
            for name, target in targets.items():
                check_alive(target)
                result = self.run_wrk(
                    target, script, duration, body=body, method=method, url_path=url_path
                )
                runs[name].append(result)
                log(
                    f"  round {r + 1}/{rounds} {name:<14} {result['rps']:>9,.0f} req/s"
                    f"  p99 {result['p99_ms']:7.2f} ms  cpu {fmt_pct(result['cpu_percent'])}"
                    + errors_note(result)
                )
        summary = {name: summarize_wrk(rs) for name, rs in runs.items()}
        return {
            "description": what,
            "tenants_rotated": POST_TENANTS if body else TENANT_COUNT,
            "rounds": rounds,
            "duration_s": duration,
            "runs": runs,
            "median": summary,
            "ratios": throughput_ratios(runs, summary, "router"),
        }

    def jwt(self) -> dict[str, Any]:
        """The cost of verifying a JWT per request once tokens are cached: two routers on
        core 1 in turn, same settings but the tenant section: `router_header` takes the
        tenant from X-Tenant-Id (the small scenario's requests), `router_jwt` from an
        ES256 JWT it verifies (jwt extractor with `verify`, min_trust credential), 1,000
        tokens rotated per request (each token verified once, then cached)."""
        log("\n[jwt] GET /small, tenant from X-Tenant-Id vs from a verified ES256 JWT "
            f"(1,000 tokens); {self.args.rounds} rounds of {self.args.duration:g} s")  # fmt: skip
        jwk, tokens = signed_tokens(self.tenants)
        header_script = self.workdir / "wrk-jwt-header.lua"
        write_wrk_script(header_script, self.tenants, "GET", PATH_SMALL, 0)
        token_script = self.workdir / "wrk-jwt-token.lua"
        write_wrk_script(
            token_script, [f"Bearer {t}" for t in tokens], "GET", PATH_SMALL, 0, "Authorization"
        )
        with jwks_server(self.workdir, jwk) as (jwks_url, ca_file):
            verifying = {
                "extractors": [
                    {"type": "header", "name": TENANT_HEADER},
                    {
                        "type": "jwt",
                        "claim": "tenant",
                        "verify": {
                            "jwks_url": jwks_url,
                            "ca_file": str(ca_file),
                            "algorithms": ["ES256"],
                            "issuer": JWT_ISSUER,
                            "audience": JWT_AUDIENCE,
                        },
                    },
                ],
                "min_trust": "credential",
                "default_side": "legacy",
            }
            header_router, _ = self.start_router("router_header", self.upstream_url, self.pin("1"))
            jwt_router, _ = self.start_router(
                "router_jwt", self.upstream_url, self.pin("1"), tenant=verifying,
                probe={"Authorization": f"Bearer {tokens[1]}"},
            )  # fmt: skip
            targets = {"router_header": (header_router, header_script),
                       "router_jwt": (jwt_router, token_script)}  # fmt: skip
            for target, script in targets.values():  # warm-up (fills the token cache)
                self.run_wrk(target, script, max(self.args.warmup, 2.0))
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
            for r in range(self.args.rounds):
                for name, (target, script) in targets.items():
                    check_alive(target)
                    result = self.run_wrk(target, script, self.args.duration)
                    runs[name].append(result)
                    log(
                        f"  round {r + 1}/{self.args.rounds} {name:<14} {result['rps']:>9,.0f}"
                        f" req/s  p99 {result['p99_ms']:7.2f} ms"
                        f"  cpu {fmt_pct(result['cpu_percent'])}" + errors_note(result)
                    )
            for target, _ in targets.values():
                for proc in target.procs:
                    self.processes.stop(proc)
        summary = {name: summarize_wrk(rs) for name, rs in runs.items()}
        return {
            "description": "GET /small: tenant from X-Tenant-Id (router_header) vs from a "
            "verified ES256 JWT, 1,000 tokens rotated (router_jwt)",
            "rounds": self.args.rounds,
            "duration_s": self.args.duration,
            "runs": runs,
            "median": summary,
            "ratios": throughput_ratios(runs, summary, "router_jwt"),
        }

    def rate1000(self, targets: dict[str, Target]) -> dict[str, Any]:
        rate, duration, rounds = self.args.rate, self.args.rate_duration, self.args.rounds
        # nginx and aiohttp_alone are controls: the same two hops through core 1, so the part
        # of p99 that this VM's scheduling adds to any proxy shows up in them as well.
        chosen: dict[str, Target] = {
            k: targets[k] for k in ("direct", "router", "nginx", "aiohttp_alone") if k in targets
        }
        log(f"\n[rate1000] open loop at {rate:g} req/s, {duration:g} s, {rounds} rounds, "
            f"{', '.join(chosen)}; latency from the intended send time")  # fmt: skip
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in chosen}
        for r in range(rounds):
            for name, target in chosen.items():
                check_alive(target)
                argv = [
                    "rate", "--port", str(target.port), "--rate", str(rate),
                    "--duration", str(duration), "--tenants-file", str(self.tenants_file),
                ]  # fmt: skip
                result = self.run_helper(argv, self.pin("0"), timeout=duration + 60)
                runs[name].append(result)
                lat = result["latency_ms"]
                log(
                    f"  round {r + 1}/{rounds} {name:<14} p50 {lat['p50']:.3f}"
                    f"  p90 {lat['p90']:.3f}"
                    f"  p99 {lat['p99']:.3f}  max {lat['max']:.3f} ms  ({result['completed']} ok,"
                    f" errors {result['errors'] or 0}, send lateness p99"
                    f" {result['send_lateness_ms']['p99']:.3f} ms)"
                )
        median_of: dict[str, dict[str, float | None]] = {}
        for name, rs in runs.items():
            median_of[name] = {
                key: median([x["latency_ms"][key] for x in rs])
                for key in ("p50", "p90", "p99", "p999", "max")
            }
            median_of[name]["send_lateness_p99"] = median(
                [x["send_lateness_ms"]["p99"] for x in rs]
            )
            median_of[name]["achieved_rate"] = median([x["achieved_rate"] for x in rs])
        direct_p99 = median_of["direct"]["p99"]
        deltas: dict[str, float | None] = {}
        per_round: dict[str, list[float]] = {}
        for name in chosen:
            if name == "direct":
                continue
            p99 = median_of[name]["p99"]
            deltas[name] = (
                round(p99 - direct_p99, 3) if p99 is not None and direct_p99 is not None else None
            )
            per_round[name] = [
                round(a["latency_ms"]["p99"] - b["latency_ms"]["p99"], 3)
                for a, b in zip(runs[name], runs["direct"], strict=True)
            ]
        return {
            "rate": rate,
            "duration_s": duration,
            "rounds": rounds,
            "connections": runs["direct"][0]["connections"],
            "timer": runs["direct"][0]["timer"],
            "runs": runs,
            "median_ms": median_of,
            "p99_delta_ms": deltas.get("router"),
            "p99_delta_per_round_ms": per_round.get("router", []),
            "p99_minus_direct_ms": deltas,
            "p99_minus_direct_per_round_ms": per_round,
        }

    def stream(self) -> dict[str, Any]:
        size, rounds = self.args.stream_bytes, self.args.stream_rounds
        log(f"\n[stream] {size / MIB:,.0f} MiB each way, router vs direct, {rounds} round(s), "
            "VmRSS sampled every 50 ms")  # fmt: skip
        port = free_port(self.ports)
        backend = self.processes.start(
            "demo_backend",
            [
                PY,
                "-m",
                "router.demo_backend",
                "--side",
                "legacy",
                "--host",
                HOST,
                "--port",
                str(port),
            ],
            self.pin("0"),
            stderr=self.workdir / "demo-backend.log",
        )
        try:
            wait_http(f"http://{HOST}:{port}/__demo/status/200", backend)
            router, _ = self.start_router("router-stream", f"http://{HOST}:{port}", self.pin("1"))
            try:
                return self._stream_runs(router, Target("direct", port, [backend]), size, rounds)
            finally:
                self.processes.stop(router.procs[0])
        finally:
            self.processes.stop(backend)

    def _stream_runs(
        self, router: Target, direct: Target, size: int, rounds: int
    ) -> dict[str, Any]:
        router_pid = router.procs[0].pid
        http_get(f"{router.url}/__demo/bytes/65536", {TENANT_HEADER: self.tenants[0]})
        baseline = steady_rss_kib(router_pid)
        log(f"  router baseline VmRSS {baseline / 1024:.1f} MiB")
        runs: list[dict[str, Any]] = []
        for r in range(rounds):
            for direction in ("up", "down"):
                for target in (router, direct):
                    check_alive(target)
                    pid = target.procs[0].pid
                    before = rss_kib(pid) or 0
                    argv = [
                        "stream", "--port", str(target.port), "--direction", direction,
                        "--bytes", str(size), "--tenant", self.tenants[0],
                    ]  # fmt: skip
                    with RssSampler(pid) as sampler:
                        result = self.run_helper(argv, self.pin("0"), timeout=300)
                    result.update(
                        target=target.name,
                        round=r + 1,
                        rss_before_kib=before,
                        rss_peak_kib=sampler.peak_kib,
                        rss_samples=len(sampler.samples),
                        rss_growth_mib=round((sampler.peak_kib - before) / 1024, 1),
                    )
                    if target is router:
                        result["rss_growth_over_baseline_mib"] = round(
                            (sampler.peak_kib - baseline) / 1024, 1
                        )
                    runs.append(result)
                    log(
                        f"  round {r + 1} {direction:<4} {target.name:<14}"
                        f" {result['mb_per_s']:>8,.1f} MB/s"
                        f"  {'ok' if result['ok'] else 'NOT OK'}  VmRSS peak"
                        f" {sampler.peak_kib / 1024:.1f} MiB (+{result['rss_growth_mib']} MiB over"
                        f" the value before this transfer)"
                    )
        summary: dict[str, Any] = {}
        for direction in ("up", "down"):
            mine = [x for x in runs if x["direction"] == direction and x["target"] == router.name]
            theirs = [x for x in runs if x["direction"] == direction and x["target"] == "direct"]
            router_mbps = median([x["mb_per_s"] for x in mine])
            direct_mbps = median([x["mb_per_s"] for x in theirs])
            summary[direction] = {
                "router_mb_per_s": router_mbps,
                "direct_mb_per_s": direct_mbps,
                "router_over_direct": ratio(router_mbps, direct_mbps),
                "router_rss_growth_mib": max(x["rss_growth_over_baseline_mib"] for x in mine),
                "router_rss_peak_mib": round(max(x["rss_peak_kib"] for x in mine) / 1024, 1),
                "all_ok": all(x["ok"] for x in mine + theirs),
            }
        return {
            "bytes": size,
            "rounds": rounds,
            "router_baseline_rss_mib": round(baseline / 1024, 1),
            "upstream": "python -m router.demo_backend (aiohttp; hashes uploads)",
            "runs": runs,
            "summary": summary,
        }

    def idle10k(self) -> dict[str, Any]:
        count = self.args.idle_count
        log(f"\n[idle10k] {count:,} idle keep-alive connections to a fresh router")
        router, _ = self.start_router("router-idle", self.upstream_url, self.pin("1"))
        pid = router.procs[0].pid
        try:
            baseline = steady_rss_kib(pid)
            log(f"  router baseline VmRSS {baseline / 1024:.1f} MiB")
            argv = [
                PY, str(HERE / "loadgen.py"), "idle", "--port", str(router.port),
                "--count", str(count), "--tenants-file", str(self.tenants_file),
            ]  # fmt: skip
            client = self.processes.start("idle-client", argv, self.pin("0"), pipes=True)
            try:
                with RssSampler(pid) as during_open:
                    opened = read_json_line(client, timeout=180)
                time.sleep(1.0)
                held = steady_rss_kib(pid, 2.0)
                check_alive(router)
                assert client.popen.stdin is not None
                client.popen.stdin.write(b"close\n")
                client.popen.stdin.flush()
                closing = read_json_line(client, timeout=30)
            finally:
                self.processes.stop(client)
        finally:
            self.processes.stop(router.procs[0])
        log(
            f"  opened {opened['opened']:,}/{count:,} in {opened['seconds']} s"
            f" (errors {opened['errors'] or 0});"
            f" still open after the hold: {closing['still_open']:,}"
        )
        log(f"  router VmRSS with them open {held / 1024:.1f} MiB"
            f" (peak while opening {during_open.peak_kib / 1024:.1f} MiB)")  # fmt: skip
        per_conn = (held - baseline) / opened["opened"] if opened["opened"] else None
        return {
            "requested": count,
            "opened": opened["opened"],
            "open_errors": opened["errors"],
            "open_seconds": opened["seconds"],
            "still_open_after_hold": closing["still_open"],
            "baseline_rss_mib": round(baseline / 1024, 1),
            "rss_mib": round(held / 1024, 1),
            "peak_rss_while_opening_mib": round(during_open.peak_kib / 1024, 1),
            "kib_per_connection": round(per_conn, 1) if per_conn is not None else None,
            "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        }

    def workers(self) -> dict[str, Any]:
        rounds, duration = self.args.rounds, self.args.duration
        cores = self.pin("0,1")
        placement = (
            "routers pinned to cores 0-1, wrk unpinned, upstream on core 0"
            if cores
            else "routers and wrk unpinned"
        )
        log(f"\n[workers] small GET, router --workers 1 vs 2; {placement}")
        script = self.workdir / "wrk-small.lua"
        write_wrk_script(script, self.tenants, "GET", PATH_SMALL, 0)
        targets: dict[str, Target] = {}
        try:
            for workers in (1, 2):
                target, _ = self.start_router(
                    f"router-w{workers}", self.upstream_url, cores, workers=workers
                )
                targets[f"workers{workers}"] = target
            if not wait_workers(targets["workers2"], 2):
                log("  (warning: fewer than 2 worker processes seen under the supervisor)")
            for target in targets.values():
                self.run_wrk(target, script, self.args.warmup, cores=None)
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
            for r in range(rounds):
                for name, target in targets.items():
                    check_alive(target)
                    result = self.run_wrk(target, script, duration, cores=None)
                    runs[name].append(result)
                    log(
                        f"  round {r + 1}/{rounds} {name:<9} {result['rps']:>9,.0f} req/s"
                        f"  p99 {result['p99_ms']:7.2f} ms  cpu {fmt_pct(result['cpu_percent'])}"
                        + errors_note(result)
                    )
        finally:
            for target in targets.values():
                self.processes.stop(target.procs[0])
        summary = {name: summarize_wrk(rs) for name, rs in runs.items()}
        return {
            "placement": placement,
            "rounds": rounds,
            "duration_s": duration,
            "runs": runs,
            "median": summary,
            "ratios": {
                "workers2/workers1": ratio(summary["workers2"]["rps"], summary["workers1"]["rps"])
            },
        }


def wait_workers(target: Target, expected: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(descendants(target.procs[0].pid)) - 1 >= expected:
            return True
        time.sleep(0.1)
    return False


def check_alive(target: Target) -> None:
    for proc in target.procs:
        if not proc.alive():
            raise RuntimeError(
                f"{proc.name} died (status {proc.popen.returncode}):\n{proc.log_tail()}"
            )


def summarize_wrk(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "rps": median([x["rps"] for x in runs]),
        "p50_ms": median([x["p50_ms"] for x in runs]),
        "p99_ms": median([x["p99_ms"] for x in runs]),
        "max_ms": median([x["max_ms"] for x in runs]),
        "mb_per_s": median([x["mb_per_s"] for x in runs]),
        "cpu_percent": median([x["cpu_percent"] for x in runs]),
        "user_us_per_request": median([x.get("user_us_per_request") for x in runs]),
        "sys_us_per_request": median([x.get("sys_us_per_request") for x in runs]),
        "socket_errors": sum(x["socket_errors"] for x in runs),
        "non_2xx": sum(x["non_2xx"] for x in runs),
        "rps_per_round": [x["rps"] for x in runs],
    }


def throughput_ratios(
    runs: dict[str, list[dict[str, Any]]], summary: dict[str, dict[str, Any]], subject: str
) -> dict[str, Any]:
    """subject/other for each other contender: of the medians, and the median of the
    per-round ratios (each measured minutes apart at most)."""
    out: dict[str, Any] = {}
    if subject not in summary:
        return out
    for other in summary:
        if other == subject:
            continue
        per_round = [
            ratio(a["rps"], b["rps"]) for a, b in zip(runs[subject], runs[other], strict=True)
        ]
        out[f"{subject}/{other}"] = {
            "of_medians": ratio(summary[subject]["rps"], summary[other]["rps"]),
            "median_per_round": median(per_round),
            "per_round": per_round,
        }
    return out


def fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def errors_note(result: dict[str, Any]) -> str:
    notes = []
    if result["socket_errors"]:
        notes.append(f"{result['socket_errors']} socket errors")
    if result["non_2xx"]:
        notes.append(f"{result['non_2xx']} non-2xx")
    return f"  !! {', '.join(notes)}" if notes else ""


def nginx_bin() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def nginx_version() -> str:
    try:
        done = subprocess.run([nginx_bin(), "-v"], capture_output=True, text=True, check=False)
        return done.stderr.strip().rsplit("/", 1)[-1]
    except OSError:
        return "?"


# --- machine, targets, report ------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def version_of(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        return (
            (done.stdout + done.stderr).strip().splitlines()[0]
            if done.stdout + done.stderr
            else "?"
        )

    def git(*argv: str) -> str:
        # Read-only: --no-optional-locks keeps `status` from refreshing the index.
        try:
            done = subprocess.run(
                ["git", "--no-optional-locks", "-C", str(REPO), *argv],
                capture_output=True,
                text=True,
                check=False,
                timeout=10,
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.strip()

    from importlib.metadata import PackageNotFoundError, version

    packages: dict[str, str | None] = {}
    for name in ("aiohttp", "uvloop", "httptools", "launchdarkly-server-sdk"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    dirty = git("status", "--porcelain", "--", "router")
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "wrk": version_of(["wrk", "-v"]),
        "nginx": nginx_version() if shutil.which("nginx") else None,
        "packages": packages,
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "router_tree_dirty": bool(dirty),
        "hostname": platform.node(),
    }


@dataclass
class Check:
    name: str
    value: float | None
    threshold: str
    ok: bool | None  # None: not measured

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.name,
            "value": self.value,
            "threshold": self.threshold,
            "result": "PASS" if self.ok else ("FAIL" if self.ok is False else "not run"),
        }


def checks(results: dict[str, Any]) -> list[Check]:
    out: list[Check] = []
    small = results.get("small", {}).get("ratios", {})

    def of(key: str) -> float | None:
        r = small.get(key)
        return r["of_medians"] if r else None

    peer, alone = of("router/peer"), of("router/aiohttp_alone")
    out.append(
        Check("small: router >= 3.0x peer", peer, ">= 3.0", None if peer is None else peer >= 3.0)
    )
    out.append(
        Check(
            "small: router >= 0.8x aiohttp_alone",
            alone,
            ">= 0.8",
            None if alone is None else alone >= 0.8,
        )
    )
    jwt_ratio = results.get("jwt", {}).get("ratios", {}).get("router_jwt/router_header")
    verified = jwt_ratio["of_medians"] if jwt_ratio else None
    out.append(
        Check(
            "jwt: verified-JWT router >= 0.9x header router",
            verified,
            ">= 0.9",
            None if verified is None else verified >= 0.9,
        )
    )
    delta = results.get("rate1000", {}).get("p99_delta_ms")
    out.append(
        Check(
            "rate1000: p99(router) - p99(direct) <= 1 ms",
            delta,
            "<= 1.0 ms",
            None if delta is None else delta <= 1.0,
        )
    )
    stream = results.get("stream", {}).get("summary", {})
    for direction, label in (("up", "upload"), ("down", "download")):
        s = stream.get(direction)
        growth = s["router_rss_growth_mib"] if s else None
        out.append(
            Check(
                f"stream {label}: router RSS growth < 64 MiB",
                growth,
                "< 64 MiB",
                None if growth is None else growth < 64 and s["all_ok"],
            )
        )
        rel = s["router_over_direct"] if s else None
        out.append(
            Check(
                f"stream {label}: router MB/s >= 0.5x direct",
                rel,
                ">= 0.5",
                None if rel is None else rel >= 0.5,
            )
        )
    idle = results.get("idle10k")
    rss = idle.get("rss_mib") if idle else None
    full = (
        rss is not None
        and idle is not None
        and idle["opened"] >= idle["requested"]
        and idle["still_open_after_hold"] >= idle["opened"]
    )
    out.append(
        Check(
            "idle10k: router RSS < 300 MiB (all connections open)",
            rss,
            "< 300 MiB",
            None if rss is None else rss < 300 and full,
        )
    )
    return out


def fmt_num(value: float | None, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def report(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        "",
        "=" * 100,
        f"router bench, {meta['date']}  (git {meta['git_commit']}"
        f"{', router/ has uncommitted changes' if meta['router_tree_dirty'] else ''})",
        f"machine: nproc {meta['nproc']}, {meta['cpu_model']}, kernel {meta['kernel']},"
        f" python {meta['python']}",
        f"load generator: {meta['load_generator']}",
        f"upstream: {meta['upstream']}; placement: {meta['placement']}",
        f"router: {meta['router_build']}; {meta['router_setup']}",
        "=" * 100,
    ]
    for scenario in (*THROUGHPUT_SCENARIOS, "jwt"):
        data = results.get(scenario)
        if not data:
            continue
        lines.append("")
        if "error" in data:
            lines.append(f"{scenario}: ERROR {data['error']}")
            continue
        lines.append(
            f"{scenario}: {data['description']};"
            f" medians of {data['rounds']} x {data['duration_s']:g} s"
        )
        lines.append(
            f"  {'contender':<14} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"
            f" {'MB/s':>8} {'cpu':>5} {'usr us':>6} {'sys us':>6}  {'errors':<8} req/s per round"
        )
        for name, s in data["median"].items():
            errors = s["socket_errors"] + s["non_2xx"]
            lines.append(
                f"  {name:<14} {fmt_num(s['rps']):>9} {fmt_num(s['p50_ms'], '.2f'):>8}"
                f" {fmt_num(s['p99_ms'], '.2f'):>8} {fmt_num(s['max_ms'], '.1f'):>8}"
                f" {fmt_num(s['mb_per_s'], ',.1f'):>8} {fmt_pct(s['cpu_percent']):>5}"
                f" {fmt_num(s.get('user_us_per_request'), '.1f'):>6}"
                f" {fmt_num(s.get('sys_us_per_request'), '.1f'):>6}  {errors:<8}"
                f" {' '.join(fmt_num(v) for v in s['rps_per_round'])}"
            )
        ratios = "  ".join(
            f"{k} {v['of_medians']:.2f}x" for k, v in data["ratios"].items() if v["of_medians"]
        )
        lines.append(f"  ratios: {ratios}")
    rate = results.get("rate1000")
    if rate:
        lines.append("")
        if "error" in rate:
            lines.append(f"rate1000: ERROR {rate['error']}")
        else:
            lines.append(
                f"rate1000: open loop {rate['rate']:g} req/s x {rate['duration_s']:g} s, medians of"
                f" {rate['rounds']} rounds over {rate['connections']} connections; ms from the"
                f" intended send time ({rate['timer']} schedule)"
            )
            lines.append(
                f"  {'contender':<14} {'p50':>7} {'p90':>7} {'p99':>7} {'p99.9':>7} {'max':>7}"
                f" {'req/s':>7} {'p99-direct':>10}  generator send lateness p99"
            )
            deltas = rate["p99_minus_direct_ms"]
            for name, m in rate["median_ms"].items():
                lines.append(
                    f"  {name:<14} {fmt_num(m['p50'], '.3f'):>7} {fmt_num(m['p90'], '.3f'):>7}"
                    f" {fmt_num(m['p99'], '.3f'):>7} {fmt_num(m['p999'], '.3f'):>7}"
                    f" {fmt_num(m['max'], '.2f'):>7} {fmt_num(m['achieved_rate']):>7}"
                    f" {fmt_num(deltas.get(name), '+.3f'):>10}"
                    f"  {fmt_num(m['send_lateness_p99'], '.3f')} ms"
                )
            lines.append(
                f"  p99(router) - p99(direct) = {fmt_num(rate['p99_delta_ms'], '.3f')} ms"
                f" (per round: {', '.join(f'{d:.3f}' for d in rate['p99_delta_per_round_ms'])});"
                " nginx and aiohttp_alone: controls through the same two hops"
            )
    stream = results.get("stream")
    if stream:
        lines.append("")
        if "error" in stream:
            lines.append(f"stream: ERROR {stream['error']}")
        else:
            lines.append(
                f"stream: {stream['bytes'] / MIB:,.0f} MiB per transfer,"
                f" {stream['rounds']} round(s);"
                f" router baseline VmRSS {stream['router_baseline_rss_mib']} MiB;"
                " upstream: router.demo_backend"
            )
            lines.append(
                f"  {'direction':<10} {'router MB/s':>11} {'direct MB/s':>11} {'ratio':>6}"
                f" {'router RSS growth':>18} {'router RSS peak':>16}  verified"
            )
            for direction, s in stream["summary"].items():
                lines.append(
                    f"  {direction:<10} {fmt_num(s['router_mb_per_s'], ',.1f'):>11}"
                    f" {fmt_num(s['direct_mb_per_s'], ',.1f'):>11}"
                    f" {fmt_num(s['router_over_direct'], '.2f'):>6}"
                    f" {s['router_rss_growth_mib']:>14.1f} MiB"
                    f" {s['router_rss_peak_mib']:>12.1f} MiB"
                    f"  {'yes' if s['all_ok'] else 'NO'}"
                )
    idle = results.get("idle10k")
    if idle:
        lines.append("")
        if "error" in idle:
            lines.append(f"idle10k: ERROR {idle['error']}")
        else:
            lines.append(
                f"idle10k: {idle['opened']:,}/{idle['requested']:,} connections opened"
                f" ({idle['still_open_after_hold']:,} still open after the hold);"
                f" router VmRSS {idle['baseline_rss_mib']} MiB idle -> {idle['rss_mib']} MiB"
                f" ({fmt_num(idle['kib_per_connection'], '.1f')} KiB per connection)"
            )
    workers = results.get("workers")
    if workers:
        lines.append("")
        if "error" in workers:
            lines.append(f"workers: ERROR {workers['error']}")
        else:
            lines.append(
                f"workers: small GET, {workers['placement']}; medians of {workers['rounds']} rounds"
            )
            for name, s in workers["median"].items():
                lines.append(
                    f"  {name:<10} {fmt_num(s['rps']):>9} req/s"
                    f"  p99 {fmt_num(s['p99_ms'], '.2f')} ms"
                    f"  cpu {fmt_pct(s['cpu_percent'])}"
                    f"  errors {s['socket_errors'] + s['non_2xx']}"
                )
            lines.append(
                f"  workers2/workers1 = {fmt_num(workers['ratios']['workers2/workers1'], '.2f')}x"
            )
    lines.append("")
    lines.append("targets:")
    for check in results["targets"]:
        value = "-" if check["value"] is None else f"{check['value']:g}"
        lines.append(
            f"  {check['result']:<8} {check['target']:<52} {value:>10}  ({check['threshold']})"
        )
    lines.append("")
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------


def raise_nofile() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 round, short runs (~3 min)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 1)")
    parser.add_argument("--duration", type=float, help="seconds per wrk run (default 8; quick 3)")
    parser.add_argument("--out", type=Path, help="JSON results file")
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, metavar="SCENARIO",
                        help=f"run only these: {', '.join(SCENARIOS)}")  # fmt: skip
    parser.add_argument("--rate", type=float, default=1000.0, help="rate1000's req/s")
    parser.add_argument("--rate-duration", type=float, help="seconds per rate run (10; quick 5)")
    parser.add_argument("--stream-bytes", type=int, default=1 << 30, help="bytes per transfer")
    parser.add_argument(
        "--stream-rounds", type=int, help="rounds of the stream scenario (2; quick 1)"
    )
    parser.add_argument("--idle-count", type=int, default=10_000)
    parser.add_argument("--upstream", choices=("auto", "nginx", "python"), default="auto")
    parser.add_argument(
        "--generator",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="closed-loop load generator: wrk when installed, else loadgen.py (auto)",
    )
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="no taskset pinning")
    parser.add_argument(
        "--keep-temp", action="store_true", help="keep the temp dir (logs, configs)"
    )
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.duration = args.duration or (3.0 if args.quick else 8.0)
    args.rate_duration = args.rate_duration or (5.0 if args.quick else 10.0)
    args.stream_rounds = args.stream_rounds or (1 if args.quick else 2)
    args.warmup = 1.0
    args.only = args.only or list(SCENARIOS)
    if args.pin and not shutil.which("taskset"):
        log("taskset not found: running unpinned")
        args.pin = False
    if args.generator == "auto":
        args.generator = "wrk" if shutil.which("wrk") else "python"
    elif args.generator == "wrk" and not shutil.which("wrk"):
        parser.error("--generator wrk: wrk is not installed (apt-get install wrk)")
    if args.generator == "python" and set(args.only) & {*THROUGHPUT_SCENARIOS, "workers"}:
        log(
            "load generator: loadgen.py's closed loop (wrk not used): one Python process that "
            "saturates near 80k req/s here, so contenders faster than that (direct, nginx) "
            "are measured at the generator's speed and their ratios understated"
        )
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    nofile = raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="router-bench-"))
    processes = Processes(workdir, args.pin)
    bench = Bench(args, workdir, processes, generator=args.generator)
    placement = (
        "contenders pinned to core 1 (taskset -c 1); load generator and upstream on core 0"
        if args.pin
        else "unpinned"
    )
    bench.results["meta"] = {
        **machine_info(),
        "argv": sys.argv[1:],
        "rounds": args.rounds,
        "duration_s": args.duration,
        "placement": placement,
        "nofile_limit": nofile[0],
        "workdir": str(workdir),
        "load_generator": (
            (
                f"wrk -t1 -c64 -d{args.duration:g}s --latency, Lua script"
                if args.generator == "wrk"
                else f"loadgen.py closed, 64 connections, {args.duration:g} s (wrk not found)"
            )
            + f" rotating {TENANT_COUNT} tenant ids in {TENANT_HEADER} ({POST_TENANTS} for"
            " post1m); rate1000: loadgen.py (open loop, uvloop, timerfd schedule)"
        ),
        # Compiled (mypyc, setup.py) or pure Python: `make bench` compiles first.
        "router_build": check_fresh().describe,
        "router_setup": (
            f"1 worker, {TENANT_COUNT}-tenant flag file (half legacy, half new), both upstreams"
            " -> the fixed upstream, metrics on, access log on (stdout to a file in the temp"
            " dir), debug_headers off, drain_delay 0"
        ),
    }
    log(f"temp dir {workdir}; pinning {'on' if args.pin else 'off'}; RLIMIT_NOFILE {nofile[0]}")
    started = time.monotonic()
    try:
        bench.flags_file = workdir / "flags.json"
        split = write_flag_file(bench.flags_file, bench.tenants)
        bench.results["meta"]["flag_file"] = split
        bench.tenants_file = workdir / "tenants.txt"
        bench.tenants_file.write_text("\n".join(bench.tenants) + "\n")
        if "jwt" in args.only and args.generator != "wrk":
            log("  !! jwt needs wrk (its Lua script rotates the tokens): skipped")
            args.only = [s for s in args.only if s != "jwt"]
        need_upstream = set(args.only) - {"stream"}
        if need_upstream:
            bench.start_upstream()
        bench.results["meta"]["upstream"] = (
            bench.upstream_kind or "router.demo_backend (stream only)"
        )
        wanted_targets = [s for s in args.only if s in (*THROUGHPUT_SCENARIOS, "rate1000")]
        targets: dict[str, Target] = {}
        if wanted_targets:
            targets = bench.start_throughput_contenders()
            log("contenders: " + ", ".join(f"{n} (:{t.port})" for n, t in targets.items()))
        steps: list[tuple[str, Callable[[], dict[str, Any]]]] = []
        for scenario in args.only:
            if scenario in THROUGHPUT_SCENARIOS:
                steps.append((scenario, functools.partial(bench.throughput, scenario, targets)))
            elif scenario == "jwt":
                steps.append((scenario, bench.jwt))
            elif scenario == "rate1000":
                steps.append((scenario, functools.partial(bench.rate1000, targets)))
            elif scenario == "stream":
                steps.append((scenario, bench.stream))
            elif scenario == "idle10k":
                steps.append((scenario, bench.idle10k))
            elif scenario == "workers":
                steps.append((scenario, bench.workers))
        for name, step in steps:
            try:
                bench.results[name] = step()
            except (
                RuntimeError,
                OSError,
                TimeoutError,
                subprocess.SubprocessError,
                KeyError,
            ) as exc:
                log(f"  !! {name} failed: {exc}")
                bench.results[name] = {"error": str(exc)}
    finally:
        processes.stop_all()
        if not args.keep_temp:
            shutil.rmtree(workdir, ignore_errors=True)
    bench.results["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
    bench.results["targets"] = [c.as_dict() for c in checks(bench.results)]
    return bench.results


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    def handler(signum: int, _frame: object) -> None:
        log("terminated: stopping every process the bench started")
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with sigterm_as_exit():
            results = run(args)
    except KeyboardInterrupt:
        log("interrupted: every process the bench started was stopped")
        return 130
    text = report(results)
    log(text)
    out: Path = args.out or (
        HERE / "results" / f"bench-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    log(f"results: {out}  (elapsed {results['meta']['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
