"""Soak with faults: a router under steady load for a while, its legacy upstream killed and
restarted twice, its flag file replaced with invalid JSON once. `make soak`.

    .venv/bin/python loadtests/soak.py [--duration 600] [--rate 200] [--out DIR]

Everything runs on 127.0.0.1 (demo backends, one `router serve`, an open-loop generator),
is stopped by pid at the end, and the run stops by itself. The verdict (soak.json in the
output folder, and the exit status) passes only if:
- no request hung: every one got an answer within its timeout (10 s);
- during an outage, statuses were only 200 (new side, or before the kill landed),
  502, 503 or 504; outside outages, every request got 200;
- the legacy side served again within 2 s of its restart;
- while the flag file held invalid JSON, the router kept routing by the last good flags
  (every request 200, from the side its tenant had), and its log said so;
- open file descriptors and resident memory at the end are within 10% of the baseline
  taken after the warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from router.control.flagfile import set_tenants  # noqa: E402

TENANTS = {"soak-legacy": "legacy", "soak-new": "new"}
REQUEST_TIMEOUT = 10.0
RECOVERY_BOUND = 2.0
OUTAGE_STATUSES = {200, 502, 503, 504}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Sample:
    sent: float
    tenant: str
    status: int  # 0: no answer (timeout or connection error)
    side: str | None
    latency: float


@dataclass
class Timeline:
    outages: list[tuple[float, float]] = field(default_factory=list)  # kill .. restart
    restarts: list[float] = field(default_factory=list)
    bad_flags: tuple[float, float] | None = None


class Processes:
    """What the soak started, stopped by pid (SIGTERM, then SIGKILL)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 -- kept for the process
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        self.procs[name] = proc
        return proc

    def backend(self, side: str, port: int) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "router.demo_backend", "--side", side, "--port", str(port)]
        return self.start(side, argv)

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def resources(pid: int) -> tuple[int, int]:
    """(open file descriptors, resident bytes) of a process."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return fds, int(line.split()[1]) * 1024
    return fds, 0


async def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout} s")


async def generate(url: str, rate: float, stop_at: float, samples: list[Sample]) -> None:
    """Open loop: one request every 1/rate s whatever the answers, alternating tenants."""
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    tenants = list(TENANTS)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def one(index: int) -> None:
            tenant = tenants[index % len(tenants)]
            sent = time.time()
            status, side = 0, None
            try:
                async with session.get(
                    f"{url}/soak/{index}", headers={"X-Tenant-Id": tenant}
                ) as response:
                    body = await response.read()
                    status = response.status
                    if status == 200:
                        side = json.loads(body).get("side")
            except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError):
                status = 0
            samples.append(Sample(sent, tenant, status, side, time.time() - sent))

        tasks: set[asyncio.Task[None]] = set()
        interval = 1.0 / rate
        next_at = time.monotonic()
        index = 0
        while time.time() < stop_at:
            task = asyncio.ensure_future(one(index))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            index += 1
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        if tasks:
            await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT + 5)


def verdict(
    samples: list[Sample],
    timeline: Timeline,
    baseline: tuple[int, int],
    end: tuple[int, int],
    router_log: str,
) -> dict[str, Any]:
    problems: list[str] = []
    hung = [s for s in samples if s.status == 0]
    if hung:
        problems.append(f"{len(hung)} request(s) got no answer within {REQUEST_TIMEOUT:g} s")

    def in_outage(s: Sample) -> bool:
        # A request sent up to REQUEST_TIMEOUT before the kill may fail with it.
        return any(a - REQUEST_TIMEOUT <= s.sent <= b + RECOVERY_BOUND for a, b in timeline.outages)

    bad_outside = [s for s in samples if not in_outage(s) and s.status not in (0, 200)]
    if bad_outside:
        first = bad_outside[0]
        problems.append(
            f"{len(bad_outside)} non-200 answer(s) outside the outages (first: {first.status} "
            f"for {first.tenant} at {first.sent:.3f})"
        )
    bad_during = [s for s in samples if in_outage(s) and s.status not in OUTAGE_STATUSES | {0}]
    if bad_during:
        problems.append(
            f"statuses other than 200/502/503/504 during outages: "
            f"{sorted({s.status for s in bad_during})}"
        )
    recoveries = []
    for restart in timeline.restarts:
        after = [s for s in samples if s.tenant == "soak-legacy" and s.sent >= restart]
        first_ok = next((s.sent + s.latency for s in after if s.status == 200), None)
        recovery = None if first_ok is None else first_ok - restart
        recoveries.append(recovery)
        if recovery is None or recovery > RECOVERY_BOUND:
            problems.append(f"legacy did not serve within {RECOVERY_BOUND:g} s of its restart")
    wrong_side = [s for s in samples if s.status == 200 and s.side != TENANTS[s.tenant]]
    if wrong_side:
        problems.append(f"{len(wrong_side)} answer(s) from the wrong side (flags lost?)")
    if timeline.bad_flags is not None:
        start, stop = timeline.bad_flags
        during = [s for s in samples if start <= s.sent <= stop and not in_outage(s)]
        if not during or any(s.status != 200 for s in during):
            problems.append("requests failed while the flag file held invalid JSON")
        if "Unable to load flag data" not in router_log:  # the SDK's file data source
            problems.append("the router's log did not report the invalid flag file")
    fd_growth = (end[0] - baseline[0]) / max(1, baseline[0])
    rss_growth = (end[1] - baseline[1]) / max(1, baseline[1])
    if fd_growth > 0.10:
        problems.append(f"open fds {baseline[0]} -> {end[0]} (+{fd_growth:.0%}, bound 10%)")
    if rss_growth > 0.10:
        mib = (baseline[1] / 2**20, end[1] / 2**20)
        problems.append(f"RSS {mib[0]:.1f} -> {mib[1]:.1f} MiB (+{rss_growth:.0%}, bound 10%)")
    statuses: dict[str, int] = {}
    for s in samples:
        statuses[str(s.status)] = statuses.get(str(s.status), 0) + 1
    latencies = sorted(s.latency for s in samples if s.status == 200)
    return {
        "passed": not problems,
        "problems": problems,
        "requests": len(samples),
        "statuses": statuses,
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2) if latencies else None,
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2) if latencies else None,
        "recovery_s": [None if r is None else round(r, 3) for r in recoveries],
        "fds": {"baseline": baseline[0], "end": end[0]},
        "rss_mib": {"baseline": round(baseline[1] / 2**20, 1), "end": round(end[1] / 2**20, 1)},
    }


async def soak(duration: float, rate: float, out: Path) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="router-soak-"))
    procs = Processes(workdir)
    legacy_port, new_port, port, admin_port = (free_port() for _ in range(4))
    flags = workdir / "flags.json"
    set_tenants(flags, ["soak-legacy"], "legacy", create=True)
    set_tenants(flags, ["soak-new"], "new")
    good_flags = flags.read_bytes()
    config = {
        "server": {"listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin_port}",
                   "drain_delay": 0, "shutdown_timeout": 5},
        "flags": {"source": "file", "file": str(flags), "poll_interval": 0.2},
        "upstreams": {
            "legacy": {"url": f"http://127.0.0.1:{legacy_port}", "connect_timeout": 1.0,
                       "response_header_timeout": 5.0},
            "new": {"url": f"http://127.0.0.1:{new_port}"},
        },
        "access_log": {"enabled": False},
        "ledger": f"sqlite:///{workdir / 'ledger.db'}",
    }  # fmt: skip
    (workdir / "router.yaml").write_text(yaml.safe_dump(config))
    timeline = Timeline()
    samples: list[Sample] = []
    try:
        procs.backend("legacy", legacy_port)
        procs.backend("new", new_port)
        router = procs.start(
            "router", [sys.executable, "-m", "router", "serve", "--config", "router.yaml"]
        )
        await wait_http(f"http://127.0.0.1:{admin_port}/readyz")
        started = time.time()
        stop_at = started + duration
        load = asyncio.ensure_future(generate(f"http://127.0.0.1:{port}", rate, stop_at, samples))
        warmup = min(10.0, duration * 0.1)
        await asyncio.sleep(warmup)
        baseline = resources(router.pid)

        async def at(fraction: float) -> None:
            await asyncio.sleep(max(0.0, started + duration * fraction - time.time()))

        async def kill_and_restart_legacy() -> None:  # 3 s down
            killed = time.time()
            procs.kill("legacy")
            await asyncio.sleep(3.0)
            procs.backend("legacy", legacy_port)
            await wait_http(f"http://127.0.0.1:{legacy_port}/")
            restarted = time.time()
            timeline.outages.append((killed, restarted))
            timeline.restarts.append(restarted)
            print(f"legacy down from +{killed - started:.1f} s to +{restarted - started:.1f} s")

        async def invalid_flag_file() -> None:  # 5 s, then the good file back, newer
            bad_start = time.time()
            tmp = flags.with_suffix(".tmp")
            tmp.write_bytes(b'{"flags": {"tenant-routing": ')
            os.replace(tmp, flags)
            await asyncio.sleep(5.0)
            tmp.write_bytes(good_flags)
            os.replace(tmp, flags)
            set_tenants(flags, ["soak-legacy"], "legacy")  # bumps the version: reloaded
            timeline.bad_flags = (bad_start, time.time())
            print(f"flag file invalid from +{bad_start - started:.1f} s for 5 s")

        for fraction, fault in (
            (0.2, kill_and_restart_legacy),
            (0.4, invalid_flag_file),
            (0.6, kill_and_restart_legacy),
        ):
            await at(fraction)
            await fault()
        await load
        await asyncio.sleep(5.0)  # idle connections expire; the router settles
        end = resources(router.pid)
    finally:
        procs.stop_all()
    router_log = (workdir / "router.log").read_text(errors="replace")
    result = verdict(samples, timeline, baseline, end, router_log)
    result.update({"duration_s": duration, "rate": rate, "workdir": str(workdir)})
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--rate", type=float, default=200.0, help="requests/s (default 200)")
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "loadtests" / "results" / time.strftime("soak-%Y%m%d-%H%M%S"),
    )
    args = parser.parse_args()
    if args.duration < 30:
        parser.error("--duration must be at least 30 s (the faults need room)")
    result = uvloop.run(soak(args.duration, args.rate, args.out))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"verdict: {'PASS' if result['passed'] else 'FAIL'} ({args.out / 'soak.json'})")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
