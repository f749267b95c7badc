"""Locust load test: a production-like tenant population through the router.

Plain, for a running stack (docker-compose's locust services run it this way):

    .venv/bin/locust -f loadtests/locustfile.py --host http://127.0.0.1:8080 \
        --headless -u 200 -r 50 -t 2m

As the harness runs it (`loadtests/harness.py`, `make loadtest`): the same file with env
LOADTEST_DAY_SECONDS=600 (and LOADTEST_SCALE, LOADTEST_CLIENT_LOG): a `LoadTestShape`
replays a diurnal day (shape.py) in that many seconds and a pacer hands out send times at
the shape's target rate, so what is sent is the target, whatever the latencies (users only
cover the requests in flight). Each request is also written to the client log (JSON lines)
for the verdict.

Tenants: LOCUST_TENANTS (default 10,000) ids `tenant-0000` ..., picked per request with
Zipf-distributed activity (LOCUST_ZIPF_S, default 1.0): `tenant-0000` is the busiest
(~10 % of all requests at 10,000 tenants), the first 100 carry about half the traffic, and
thousands are seen only now and then. Identity goes in `X-Tenant-Id` (the router's default
header extractor); every request also carries `X-Load-Seq`, a sequence number unique
within the run, which the recording backends store.

Mix: 84 % small GETs, 7 % POST and 6 % PUT with 1-64 KiB bodies, 2.5 % 1 MiB downloads
(`/__demo/bytes/1048576`), 0.5 % slow streaming answers (`/__demo/slow/{1-3}`: the demo
and recording backends both answer these paths).

A response fails unless it is 2xx/3xx and, when the router says where it sent the request
(`X-Routed-To`, with `debug_headers` on) and the backend says which side answered
(`X-Backend-Side`), the two agree. An injected fault (a recording backend's 500 with
`X-Injected-Fault: 1`) fails with the message "injected fault", which the verdict allows.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import random
import sys
import time
from typing import Any

from locust import FastHttpUser, LoadTestShape, between, events, task

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shape import target_rate, users_for

TENANT_COUNT = max(1, int(os.environ.get("LOCUST_TENANTS", "10000")))
_WIDTH = max(4, len(str(TENANT_COUNT - 1)))
TENANTS = [f"tenant-{i:0{_WIDTH}d}" for i in range(TENANT_COUNT)]
ZIPF_S = float(os.environ.get("LOCUST_ZIPF_S", "1.0"))
_CUM = list(itertools.accumulate(1.0 / (rank + 1) ** ZIPF_S for rank in range(TENANT_COUNT)))
SIDES = ("legacy", "new")

DAY_SECONDS = float(os.environ.get("LOADTEST_DAY_SECONDS", "0") or 0)
SCALE = float(os.environ.get("LOADTEST_SCALE", "1") or 1)
CLIENT_LOG = os.environ.get("LOADTEST_CLIENT_LOG", "")

_BODY = os.urandom(64 * 1024)
_seq = itertools.count(1)
_RUN = f"{os.getpid():x}"

# (cumulative weight, kind): one task picks the kind of each request.
MIX = (("get", 84.0), ("post", 7.0), ("put", 6.0), ("download", 2.5), ("stream", 0.5))
_MIX_CUM = list(itertools.accumulate(w for _, w in MIX))


def pick_tenant() -> str:
    """A tenant drawn from the Zipf distribution (rank 0 = tenant-0000 = the busiest)."""
    return TENANTS[bisect.bisect_left(_CUM, random.random() * _CUM[-1])]


# Kept for callers of the earlier, rotating version of this file.
next_tenant = pick_tenant


class ClientLog:
    """One JSON line per request, buffered (the harness's verdict reads it)."""

    def __init__(self, path: str) -> None:
        self.file = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115
        self.lines: list[str] = []

    def write(self, record: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.lines.append(json.dumps(record, separators=(",", ":")))
        if len(self.lines) >= 500:
            self.flush()

    def flush(self) -> None:
        if self.file is not None and self.lines:
            self.file.write("\n".join(self.lines) + "\n")
            self.file.flush()
            self.lines.clear()


LOG = ClientLog(CLIENT_LOG)


class Pacer:
    """Send times at the shape's target rate, shared by all users of this process (gevent
    is cooperative: no lock). Slots missed by more than 2 s are dropped, not burst: a
    generator that cannot keep up shows as a rate shortfall in the verdict."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.next = 0.0

    def wait(self) -> float:
        now = time.time()
        if self.start is None:
            self.start = self.next = now
        self.next = max(self.next, now - 2.0)
        slot = self.next
        self.next += 1.0 / max(target_rate(slot - self.start, DAY_SECONDS, SCALE), 0.1)
        return max(0.0, slot - now)


PACER = Pacer()


@events.test_start.add_listener
def _on_start(**_: Any) -> None:
    if DAY_SECONDS > 0:
        PACER.start = PACER.next = time.time()
        LOG.write({"event": "start", "t": PACER.start, "duration": DAY_SECONDS, "scale": SCALE})
        LOG.flush()


@events.test_stop.add_listener
def _on_stop(**_: Any) -> None:
    LOG.flush()


@events.quitting.add_listener
def _on_quit(**_: Any) -> None:
    LOG.flush()


def check(response: Any) -> tuple[bool, str]:
    """Mark the response failed unless it is 2xx/3xx and went to the side it says;
    (ok, error message)."""
    status = response.status_code
    if response.headers.get("X-Injected-Fault"):
        message = f"injected fault (status {status})"
        response.failure(message)
        return False, message
    if not 200 <= status < 400:
        message = f"status {status}: {(response.text or '')[:200]!r}"
        response.failure(message)
        return False, message
    routed = response.headers.get("X-Routed-To")
    if routed is not None:
        target = routed.split(";", 1)[0].strip()
        if target not in SIDES:
            message = f"X-Routed-To names no side: {routed!r}"
            response.failure(message)
            return False, message
        answered = response.headers.get("X-Backend-Side")
        if answered is not None and answered != target:
            message = f"routed to {target} but answered by {answered}"
            response.failure(message)
            return False, message
    response.success()
    return True, ""


class TenantUser(FastHttpUser):
    """A client of some tenant: every request is for a tenant drawn from the Zipf law."""

    # With the day's shape: the pacer; plain: 0.05-0.5 s between requests per user.
    if DAY_SECONDS > 0:

        def wait_time(self) -> float:
            return PACER.wait()

    else:
        wait_time = between(0.05, 0.5)

    network_timeout = 60.0
    connection_timeout = 10.0

    @task
    def request(self) -> None:
        kind = MIX[bisect.bisect_left(_MIX_CUM, random.random() * _MIX_CUM[-1])][0]
        tenant = pick_tenant()
        seq = f"{_RUN}-{next(_seq)}"
        headers = {"X-Tenant-Id": tenant, "X-Load-Seq": seq}
        item = random.randrange(10_000)
        body: bytes | None = None
        if kind == "get":
            method, path, name = "GET", f"/api/items/{item}", "GET /api/items/[id]"
        elif kind == "post":
            body = _BODY[: random.randint(1024, 65536)]
            method, path, name = "POST", "/api/items", "POST /api/items"
        elif kind == "put":
            body = _BODY[: random.randint(1024, 65536)]
            method, path, name = "PUT", f"/api/items/{item}", "PUT /api/items/[id]"
        elif kind == "download":
            method, path, name = "GET", "/__demo/bytes/1048576", "GET 1 MiB download"
        else:
            seconds = random.choice((1, 2, 3))
            method, path, name = "GET", f"/__demo/slow/{seconds}", "GET slow stream"
        if body is not None:
            headers["Content-Type"] = "application/octet-stream"
        started = time.time()
        clock = time.perf_counter()
        with self.client.request(
            method, path, data=body, headers=headers, name=name, catch_response=True
        ) as response:
            ok, error = check(response)
            LOG.write(
                {
                    "t": round(started, 6),
                    "seq": seq,
                    "tenant": tenant,
                    "kind": kind,
                    "side": response.headers.get("X-Backend-Side") or "",
                    "status": response.status_code,
                    "ms": round((time.perf_counter() - clock) * 1000, 3),
                    "ok": ok,
                    "fault": error.startswith("injected fault"),
                    "error": error,
                }
            )


if DAY_SECONDS > 0:

    class DayShape(LoadTestShape):
        """The diurnal day of shape.py compressed into LOADTEST_DAY_SECONDS."""

        def tick(self) -> tuple[int, float] | None:
            run_time = self.get_run_time()
            if run_time >= DAY_SECONDS:
                return None
            return users_for(target_rate(run_time, DAY_SECONDS, SCALE)), 100.0
