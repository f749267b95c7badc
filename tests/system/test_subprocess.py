"""`router serve` as an operator runs it: a real process, real sockets, real signals.

Two demo backends (`python -m router.demo_backend`) and the router are subprocesses on
loopback; flags come from a flag file that `router flags set` (also a subprocess) rewrites
while the router runs. Every process is stopped by pid when the test ends (tests/support/procs.py).
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.control.flagfile import read_flag_file, set_tenants, tenant_variation
from tests.support.net import free_port
from tests.support.procs import (
    Backend,
    Procs,
    Response,
    RouterProc,
    alive,
    children,
    request,
    run_router,
    write_config,
)
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until


@pytest.fixture(scope="module")
def backends() -> Iterator[tuple[Backend, Backend]]:
    """One legacy and one new demo backend, shared by the module (they hold no state)."""
    with Procs() as procs:
        yield procs.backend("legacy"), procs.backend("new")


@pytest.fixture
def procs() -> Iterator[Procs]:
    with Procs() as procs:
        yield procs


def start(
    procs: Procs,
    backends: tuple[Backend, Backend],
    tmp_path: Path,
    flag_file: Path,
    *args: str,
    wait_ready: bool = True,
    ledger_url: str | None = None,
    **sections: dict[str, Any],
) -> RouterProc:
    legacy, new = backends
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = write_config(tmp_path / "router.yaml", legacy, new, flag_file, **sections)
    if ledger_url is not None:
        tree = yaml.safe_load(config.read_text())
        tree["ledger"] = ledger_url
        config.write_text(yaml.safe_dump(tree, sort_keys=False))
    return procs.router(config, *args, wait_ready=wait_ready)


def side(response: Response) -> str:
    assert response.status == 200, (response.status, response.body[:300])
    answered: str = response.json()["side"]
    assert response.headers["X-Backend-Side"] == answered
    return answered


def inflight(router: RouterProc, target: str) -> float:
    text = router.admin("/metrics").body.decode()
    match = re.search(rf'^router_inflight_requests\{{target="{target}"\}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


class Background:
    """A request on a thread, so the test can signal the router while it is in flight."""

    def __init__(self, router: RouterProc, path: str, tenant: str) -> None:
        self.result: Response | BaseException | None = None
        self.finished_at = 0.0
        self._thread = threading.Thread(target=self._run, args=(router, path, tenant))
        self._thread.start()

    def _run(self, router: RouterProc, path: str, tenant: str) -> None:
        try:
            self.result = router.get(path, tenant=tenant, timeout=20)
        except BaseException as exc:
            self.result = exc
        self.finished_at = time.monotonic()

    def join(self, timeout: float) -> Response | BaseException | None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the background request never finished"
        return self.result


# ---- (a) routing --------------------------------------------------------------------


def test_each_tenant_goes_to_its_side(
    procs: Procs, backends: tuple[Backend, Backend], tmp_path: Path, flag_file: Path
) -> None:
    router = start(procs, backends, tmp_path, flag_file)
    acme = router.get("/orders/1?x=%20y", tenant="acme")
    assert side(acme) == "legacy"
    assert acme.headers["X-Routed-To"] == "legacy; reason=flag"
    assert (acme.json()["path"], acme.json()["query"]) == ("/orders/1", "x=%20y")
    globex = router.get("/orders/1", tenant="globex")
    assert side(globex) == "new"
    assert globex.headers["X-Routed-To"] == "new; reason=flag"
    # Untargeted tenants get the fallthrough; no tenant at all the default target.
    assert side(router.get("/", tenant="initech")) == "legacy"
    anonymous = router.get("/")
    assert side(anonymous) == "legacy"
    assert anonymous.headers["X-Routed-To"] == "legacy; reason=no-tenant"


# ---- (b) a flip lands in the running router -----------------------------------------


def test_flags_set_moves_a_tenant_in_the_running_router(
    procs: Procs, backends: tuple[Backend, Backend], tmp_path: Path, flag_file: Path
) -> None:
    router = start(procs, backends, tmp_path, flag_file)
    for _ in range(5):  # routed (and cached) on legacy before the flip
        assert side(router.get("/", tenant="acme")) == "legacy"

    started = time.monotonic()
    flip = run_router("flags", "set", "acme", "new", "--file", str(flag_file))
    written = time.monotonic()
    assert flip.returncode == 0, flip.stderr
    assert flip.stdout.strip() == f"acme: legacy -> new ({flag_file})"
    assert tenant_variation(read_flag_file(flag_file), "acme") == "new"

    while side(router.get("/", tenant="acme")) != "new":
        assert time.monotonic() - written < 2.0, "the flip did not reach the router within 2 s"
        time.sleep(0.01)
    landed = time.monotonic()
    latency = landed - written
    print(f"flip latency: {latency * 1000:.0f} ms after the write, {landed - started:.2f} s")
    assert latency < 2.0
    # ...and stays there, in the same process (no restart), for everyone else too.
    for _ in range(10):
        assert side(router.get("/", tenant="acme")) == "new"
    assert side(router.get("/", tenant="globex")) == "new"
    assert side(router.get("/", tenant="initech")) == "legacy"
    assert router.proc.popen.poll() is None
    # acme has been served by new: flipping it back is refused by the ratchet.
    flips = run_router("flags", "set", "acme", "legacy", "--file", str(flag_file))
    assert flips.returncode == 0 and "new -> legacy" in flips.stdout
    wait_until(
        lambda: router.get("/", tenant="acme").headers["X-Routed-To"] == "new; reason=ratchet",
        2.0,
        what="the ratchet to refuse the flip back",
    )
    assert side(router.get("/", tenant="acme")) == "new"


# ---- (c) readiness before flag data ------------------------------------------------


def test_not_ready_until_the_flag_file_exists(
    procs: Procs, backends: tuple[Backend, Backend], tmp_path: Path
) -> None:
    flag_file = tmp_path / "later" / "flags.json"
    flag_file.parent.mkdir()
    router = start(procs, backends, tmp_path, flag_file, wait_ready=False)
    wait_until(lambda: router.ready_status() is not None, 15, what="admin port", proc=router.proc)

    ready = router.admin("/readyz")
    assert ready.status == 503
    body = ready.json()
    assert body["ready"] is False
    assert body["checks"]["flags_loaded"] is False
    proxied = router.get("/", tenant="acme")
    assert proxied.status == 503
    assert proxied.json()["error"] == "not_ready"
    assert proxied.headers["Retry-After"]
    assert proxied.headers["X-Request-Id"] == proxied.json()["request_id"]

    set_tenants(flag_file, ["acme"], "new", create=True)
    created = time.monotonic()
    wait_until(
        lambda: router.ready_status() == 200,
        2.0,
        what="/readyz 200 after the file",
        proc=router.proc,
    )
    print(f"ready {(time.monotonic() - created) * 1000:.0f} ms after the flag file appeared")
    assert router.admin("/readyz").json()["checks"]["flags_loaded"] is True
    assert side(router.get("/", tenant="acme")) == "new"


# ---- (d) signals ------------------------------------------------------------------


def test_sigterm_drains_in_flight_requests_then_exits_0(
    procs: Procs, backends: tuple[Backend, Backend], tmp_path: Path, flag_file: Path
) -> None:
    drain, shutdown = 0.5, 5.0
    server = {"drain_delay": drain, "shutdown_timeout": shutdown}
    router = start(procs, backends, tmp_path, flag_file, server=server)
    slow = Background(router, "/__demo/slow/1.5", "acme")
    wait_until(lambda: inflight(router, "legacy") >= 1, 5, what="the slow request in flight")

    router.proc.signal(signal.SIGTERM)
    signalled = time.monotonic()
    # Step 1: not ready at once, so the load balancer deregisters us (still serving
    # meanwhile: test_a_second_sigterm_skips_the_drain_and_the_wait has time to check).
    wait_until(lambda: router.ready_status() == 503, 1.0, interval=0.01, what="readyz 503")
    assert router.admin("/readyz").json()["checks"]["not_draining"] is False
    # Step 3: after the drain delay, new connections are refused, while the slow request
    # is still being served.
    time.sleep(max(0.0, signalled + drain + 0.25 - time.monotonic()))
    assert router.proc.popen.poll() is None
    assert slow.result is None, "the slow request ended before the listener closed"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", router.port), timeout=1).close()

    result = slow.join(timeout=10)
    assert isinstance(result, Response), result
    assert side(result) == "legacy"
    assert result.json()["path"] == "/__demo/slow/1.5"
    code = router.proc.wait(timeout=drain + shutdown + 2)
    stopped = time.monotonic()
    print(f"SIGTERM with a 1.5 s request in flight: exit {code} after {stopped - signalled:.2f} s")
    assert code == 0, router.proc.output()
    assert stopped - signalled < drain + shutdown + 1
    assert stopped >= slow.finished_at - 0.05  # it waited for the request
    assert router.ready_status() is None  # admin port closed with the process


def test_sigint_exits_fast_with_status_0(
    procs: Procs, backends: tuple[Backend, Backend], tmp_path: Path, flag_file: Path
) -> None:
    # A long drain delay that SIGINT (an operator's Ctrl-C) must skip, and a request that
    # would outlast any patience.
    router = start(
        procs, backends, tmp_path, flag_file, server={"drain_delay": 30, "shutdown_timeout": 30}
    )
    slow = Background(router, "/__demo/slow/30", "acme")
    wait_until(lambda: inflight(router, "legacy") >= 1, 5, what="the slow request in flight")
    router.proc.signal(signal.SIGINT)
    signalled = time.monotonic()
    code = router.proc.wait(timeout=10)
    elapsed = time.monotonic() - signalled
    print(f"SIGINT with a request in flight: exit {code} after {elapsed:.2f} s")
    assert code == 0, router.proc.output()
    assert elapsed < 3.0, f"SIGINT took {elapsed:.2f} s"
    result = slow.join(timeout=5)
    assert not isinstance(result, Response) or result.status != 200


def test_a_second_sigterm_skips_the_drain_and_the_wait(
    procs: Procs, backends: tuple[Backend, Backend], tmp_path: Path, flag_file: Path
) -> None:
    router = start(
        procs, backends, tmp_path, flag_file, server={"drain_delay": 30, "shutdown_timeout": 30}
    )
    slow = Background(router, "/__demo/slow/30", "acme")
    wait_until(lambda: inflight(router, "legacy") >= 1, 5, what="the slow request in flight")
    router.proc.signal(signal.SIGTERM)
    wait_until(lambda: router.ready_status() == 503, 2, what="readyz 503")
    # Draining: not ready, but still serving what the load balancer sends meanwhile.
    assert side(router.get("/", tenant="globex")) == "new"
    assert router.proc.popen.poll() is None, "the first SIGTERM must drain, not exit"
    signalled = time.monotonic()
    router.proc.signal(signal.SIGTERM)
    assert router.proc.wait(timeout=10) == 0, router.proc.output()
    elapsed = time.monotonic() - signalled
    assert elapsed < 1.5, f"the second SIGTERM took {elapsed:.2f} s"
    result = slow.join(timeout=5)
    assert not isinstance(result, Response) or result.status != 200


# ---- (e) worker processes ---------------------------------------------------------


def test_workers_share_the_port_and_stop_with_the_parent(
    procs: Procs, backends: tuple[Backend, Backend], tmp_path: Path, flag_file: Path
) -> None:
    # SO_REUSEPORT workers cannot share port 0 (each would get its own): fixed free ports.
    server = {
        "listen": f"127.0.0.1:{free_port()}",
        "admin_listen": f"127.0.0.1:{free_port()}",
        "drain_delay": 0.2,
    }
    router = start(procs, backends, tmp_path, flag_file, "--workers", "2", server=server)
    workers = wait_until(lambda: len(children(router.pid)) == 2 and children(router.pid), 10)
    for pid in workers:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert any(e.startswith(b"ROUTER_WORKER_ID=") for e in environ)
    # Each worker bound the configured port itself (the parent binds nothing).
    for pid in workers:
        line = router.proc.wait_line(
            lambda s, pid=pid: '"router listening"' in s and f'"pid":{pid},' in s, stream="stderr"
        )
        assert json.loads(line)["port"] == router.port
    # Two listening sockets on the one port (SO_REUSEPORT), one in each worker.
    assert sorted(_listening_pids(router.port, [router.pid, *workers])) == sorted(workers)

    # Request ids start with a per-process prefix: collect them until both workers have
    # answered. A fresh connection each: the kernel spreads them by their 4-tuple's hash
    # (the second worker may still be loading its flags for the first few).
    prefixes: set[str] = set()
    deadline = time.monotonic() + 10
    requests = 0
    while len(prefixes) < 2 and time.monotonic() < deadline:
        response = router.get("/", tenant="globex" if requests % 2 else "acme")
        requests += 1
        if response.status == 503:  # that worker is not ready yet
            continue
        assert side(response) == ("new" if requests % 2 == 0 else "legacy")
        prefixes.add(response.headers["X-Request-Id"].rsplit("-", 1)[0])
    assert len(prefixes) == 2, f"expected answers from 2 workers, got {prefixes}"

    router.proc.signal(signal.SIGTERM)
    assert router.proc.wait(timeout=15) == 0, router.proc.output()
    for pid in workers:
        assert not alive(pid), f"worker {pid} outlived its parent"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", router.port), timeout=1).close()


def _metric(text: str, name: str, labels: str = "") -> float:
    """A sample's value in a Prometheus text exposition (0 when absent)."""
    pattern = rf"^{re.escape(name)}{re.escape(labels)} (\S+)$" if labels else rf"^{name} (\S+)$"
    match = re.search(pattern, text, re.M)
    return float(match.group(1)) if match else 0.0


def _unix_get(socket_path: Path, path: str) -> Any:
    """GET a JSON body from one worker's private admin socket."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(socket_path))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n".encode())
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    return json.loads(raw.partition(b"\r\n\r\n")[2])


def _worker_requests(socket_path: Path) -> float:
    """Requests one worker counted itself, asked on its private admin socket."""
    snapshot = _unix_get(socket_path, "/internal/snapshot")
    return float(sum(v for _labels, v in snapshot["counters"]["router_requests_total"]))


def test_workers_metrics_and_readiness_describe_the_whole_task(
    procs: Procs, backends: tuple[Backend, Backend], tmp_path: Path, flag_file: Path
) -> None:
    """One scrape of the shared admin port sums every worker's figures, whichever worker
    the kernel hands it to; /readyz answers for all of them."""
    server = {
        "listen": f"127.0.0.1:{free_port()}",
        "admin_listen": f"127.0.0.1:{free_port()}",
        "drain_delay": 0.2,
    }
    router = start(procs, backends, tmp_path, flag_file, "--workers", "2", server=server)
    workers = wait_until(lambda: len(children(router.pid)) == 2 and children(router.pid), 10)
    # Both workers ready: readiness is the conjunction, with one entry per worker.
    ready = wait_until(lambda: (r := router.admin("/readyz")).status == 200 and r, 15)
    assert sorted(ready.json()["workers"]) == ["0", "1"]
    assert all(w["ready"] for w in ready.json()["workers"].values())

    sent = 120
    for i in range(sent):  # fresh connections: the kernel spreads them over both workers
        side(router.get("/", tenant="globex" if i % 3 == 0 else "acme"))
    environ = dict(
        e.split("=", 1)
        for e in Path(f"/proc/{workers[0]}/environ").read_text().split("\0")
        if "=" in e
    )
    directory = Path(environ["ROUTER_WORKER_DIR"])
    per_worker = [_worker_requests(directory / f"worker-{i}.sock") for i in (0, 1)]
    # Both served some: otherwise this test would not show that the sum is a sum.
    assert all(n > 0 for n in per_worker), per_worker
    assert sum(per_worker) == sent
    # Every scrape, whichever worker answers it, has the whole task's figures.
    for _ in range(6):
        text = router.admin("/metrics").body.decode()
        assert _metric(text, "router_workers", '{state="answered"}') == 2
        legacy = _metric(text, "router_requests_total", '{code="200",method="GET",target="legacy"}')
        new = _metric(text, "router_requests_total", '{code="200",method="GET",target="new"}')
        assert (legacy, new) == (sent - sent // 3, sent // 3)
        assert _metric(text, "router_request_duration_seconds_count", '{target="legacy"}') == legacy
        assert _metric(text, "router_flag_source_ready") == 1

    # A stopped worker: the survivor's scrape says so rather than pretending to be whole,
    # and the task is not ready. A connection the kernel hands to the stopped worker hangs
    # (it times out here); the others reach the survivor, which waits SIBLING_TIMEOUT (2 s)
    # for its sibling, then answers. Each path is tried up to 10 times on its own: all of
    # one path's tries landing on the stopped worker has a chance of 1 in 1024 (asking for
    # both in one try, as this test did, failed one time in 18: (3/4)**10).
    os.kill(workers[1], signal.SIGSTOP)

    def from_the_survivor(path: str) -> Response | None:
        for _ in range(10):
            try:
                return request(router.admin_port, path, timeout=8)
            except OSError:
                continue
        return None

    try:
        scrape = from_the_survivor("/metrics")
        assert scrape is not None, "no scrape reached the running worker"
        readyz = from_the_survivor("/readyz")
        assert readyz is not None, "no readiness check reached the running worker"
        text = scrape.body.decode()
        assert _metric(text, "router_workers", '{state="missing"}') == 1
        assert _metric(text, "router_workers", '{state="answered"}') == 1
        assert readyz.status == 503
        assert not readyz.json()["ready"]
    finally:
        os.kill(workers[1], signal.SIGCONT)


def test_a_dead_worker_stops_the_task_with_a_failure_status(
    procs: Procs, backends: tuple[Backend, Backend], tmp_path: Path, flag_file: Path
) -> None:
    server = {"listen": f"127.0.0.1:{free_port()}", "admin_listen": f"127.0.0.1:{free_port()}"}
    router = start(procs, backends, tmp_path, flag_file, "--workers", "2", server=server)
    workers = wait_until(lambda: len(children(router.pid)) == 2 and children(router.pid), 10)
    for pid in workers:
        router.proc.wait_line(lambda s, pid=pid: f'"pid":{pid},' in s, stream="stderr")
    # A worker killed by the OOM killer, say: the supervisor must not carry on at half
    # capacity (the orchestrator should replace the task), so it stops the other one.
    os.kill(workers[0], signal.SIGKILL)
    code = router.proc.wait(timeout=10)
    assert code == signal.SIGKILL, router.proc.output()
    assert not alive(workers[1])
    assert "worker exited; stopping the others" in "\n".join(router.proc.stderr)


def _listening_pids(port: int, pids: list[int]) -> list[int]:
    """Which of `pids` own a socket listening on 127.0.0.1:`port` (one entry per socket)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
            inodes.add(f"socket:[{inode}]")
    owners = []
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) in inodes:
                    owners.append(pid)
            except FileNotFoundError:
                continue
    return owners


# ---- (f) the access log -----------------------------------------------------------


def _jwt(claims: dict[str, str]) -> str:
    def part(value: dict[str, str]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJlLXNlY3JldA"


def test_access_log_line_has_the_route_and_no_secrets(
    procs: Procs, backends: tuple[Backend, Backend], tmp_path: Path, flag_file: Path
) -> None:
    router = start(procs, backends, tmp_path, flag_file)
    token = _jwt({"iss": "globex", "sub": "user-secret-subject"})
    query_token = _jwt({"iss": "acme", "nonce": "query-secret-nonce"})
    cookie = "session=cookie-secret-value; csrftoken=csrf-secret-value"
    secrets = [token, query_token, "cookie-secret-value", "csrf-secret-value", "opaque-secret"]

    by_header = router.get(
        f"/items/9?jwt={query_token}&page=2",
        headers={"Authorization": f"JWT {token}", "Cookie": cookie},
    )
    assert side(by_header) == "new"  # the Authorization header's iss wins over the query
    # The backend did receive them: the router forwards credentials, it only must not log them.
    assert by_header.json()["headers"]["cookie"] == cookie
    by_query = router.get(
        f"/items/9?jwt={query_token}", headers={"Authorization": "Bearer opaque-secret"}
    )
    assert side(by_query) == "legacy"

    expected = {
        by_header.headers["X-Request-Id"]: ("globex", "new", "/items/9?jwt=REDACTED&page=2"),
        by_query.headers["X-Request-Id"]: ("acme", "legacy", "/items/9?jwt=REDACTED"),
    }
    for request_id, (tenant, target, path) in expected.items():
        line = router.proc.wait_line(lambda s, rid=request_id: f'"request_id":"{rid}"' in s)
        entry = json.loads(line)
        assert entry["type"] == "access"
        assert (entry["tenant"], entry["target"], entry["reason"]) == (tenant, target, "flag")
        assert entry["status"] == 200
        # The query's names stay, the token's value does not (docs/contracts.md).
        assert entry["path"] == path
        for secret in secrets:
            assert secret not in line
    # Nor anywhere else the router wrote.
    output = "\n".join(router.proc.stdout + router.proc.stderr)
    for secret in secrets:
        assert secret not in output


# ---- (f) the ratchet across processes ----------------------------------------------------


def _routed(router: RouterProc, tenant: str) -> str:
    response = router.get("/", tenant=tenant)
    assert response.status == 200, (response.status, response.body[:300])
    return response.headers["X-Routed-To"]


def test_two_router_processes_sharing_redis_both_refuse_a_flip_back(
    procs: Procs,
    backends: tuple[Backend, Backend],
    tmp_path: Path,
    flag_file: Path,
    redis_server: RedisServer,
) -> None:
    ledger = redis_server.url()
    one = start(procs, backends, tmp_path / "one", flag_file, ledger_url=ledger)
    two = start(procs, backends, tmp_path / "two", flag_file, ledger_url=ledger)
    assert _routed(one, "globex") == "new; reason=flag"  # served by new through router one
    run_router("flags", "set", "globex", "legacy", "--file", str(flag_file))
    for router in (one, two):  # two never served globex; it learns from the shared ledger
        wait_until(
            lambda r=router: _routed(r, "globex") == "new; reason=ratchet",
            3.0,
            what="the ratchet",
            proc=router.proc,
        )
        assert side(router.get("/", tenant="globex")) == "new"
    assert _routed(two, "acme") == "legacy; reason=flag"


def test_a_restarted_router_keeps_refusing_with_its_sqlite_ledger(
    procs: Procs, backends: tuple[Backend, Backend], tmp_path: Path, flag_file: Path
) -> None:
    router = start(procs, backends, tmp_path, flag_file)
    assert _routed(router, "globex") == "new; reason=flag"
    router.proc.signal(signal.SIGTERM)
    assert router.proc.wait(timeout=15) == 0
    run_router("flags", "set", "globex", "legacy", "--file", str(flag_file))
    restarted = start(procs, backends, tmp_path, flag_file)  # same config, same ledger file
    assert _routed(restarted, "globex") == "new; reason=ratchet"
    assert side(restarted.get("/", tenant="globex")) == "new"
    assert _routed(restarted, "acme") == "legacy; reason=flag"


def test_workers_sum_their_shadow_comparisons(
    procs: Procs, backends: tuple[Backend, Backend], tmp_path: Path, flag_file: Path
) -> None:
    """`GET /admin/shadow` on the shared admin port is the whole task's: each worker
    compares the copies of the requests it served, the answering worker adds its
    siblings' counts, and a reset reaches every worker. The demo backends answer with
    their side's name, so every copy of acme's requests is a body mismatch."""
    server = {
        "listen": f"127.0.0.1:{free_port()}",
        "admin_listen": f"127.0.0.1:{free_port()}",
        "drain_delay": 0.2,
    }
    legacy, new = backends
    config = write_config(
        tmp_path / "router.yaml",
        legacy,
        new,
        flag_file,
        server=server,
        shadow={"tenants": ["acme"], "sample_rate": 1.0},
    )
    tree = yaml.safe_load(config.read_text())
    tree["admin_token"] = "shadow-token"
    config.write_text(yaml.safe_dump(tree, sort_keys=False))
    router = procs.router(config, "--workers", "2")
    workers = wait_until(lambda: len(children(router.pid)) == 2 and children(router.pid), 10)
    wait_until(lambda: router.admin("/readyz").status == 200, 15)
    token = {"Authorization": "Bearer shadow-token"}
    sent = 40
    for _ in range(sent):  # fresh connections: the kernel spreads them over both workers
        assert side(router.get("/orders", tenant="acme")) == "legacy"
    side(router.get("/orders", tenant="globex"))  # on new: never copied

    def view() -> Any:
        response = request(router.admin_port, "/admin/shadow?tenant=acme", headers=token)
        assert response.status == 200, response.body[:300]
        return response.json()

    body = wait_until(lambda: (v := view())["tenants"]["acme"]["compared"] == sent and v, 10)
    acme = body["tenants"]["acme"]
    assert body["workers"] == {"answered": 2, "missing": 0}
    assert (acme["shadowed"], acme["mismatched"], acme["mismatch_kinds"]["body"]) == (
        sent,
        sent,
        sent,
    )
    assert acme["match_rate"] == 0.0
    # Both workers compared some: otherwise the sum above would not show a sum.
    environ = dict(
        e.split("=", 1)
        for e in Path(f"/proc/{workers[0]}/environ").read_text().split("\0")
        if "=" in e
    )
    directory = Path(environ["ROUTER_WORKER_DIR"])
    per_worker = [
        _unix_get(directory / f"worker-{i}.sock", "/internal/shadow?tenant=acme")["tenants"]
        for i in (0, 1)
    ]
    assert all(t["acme"]["compared"] > 0 for t in per_worker), per_worker
    assert any('$.side: "legacy" != "new"' in line for line in body["recent"][0]["body"]["diff"])
    assert list(body["tenants"]) == ["acme"]
    # What an SRE types: the same figures, as a report.
    admin = f"http://127.0.0.1:{router.admin_port}"
    env = {"ROUTER_ADMIN_TOKEN": "shadow-token"}
    report = run_router("shadow", "report", "acme", "--admin", admin, env=env)
    assert report.returncode == 0, report.stderr
    assert f"0.00 % (0 of {sent} compared)" in report.stdout, report.stdout
    assert '$.side: "legacy" != "new"' in report.stdout
    text = router.admin("/metrics").body.decode()
    assert _metric(text, "router_shadow_requests_total") == sent
    assert _metric(text, "router_shadow_mismatches_total", '{kind="body"}') == sent
    reset = request(router.admin_port, "/admin/shadow/acme", method="DELETE", headers=token)
    assert reset.status == 200 and reset.json()["reset"] is True
    for _ in range(4):  # whichever worker answers, none remembers acme
        assert view()["tenants"] == {}
    reset = run_router("shadow", "reset", "acme", "--admin", admin, env=env)
    assert reset.returncode == 0, reset.stderr
