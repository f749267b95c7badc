"""Locust load test: many tenants through the router, checking every answer.

    docker compose --profile load up --scale locust-worker=4       # web UI on :8089
    .venv/bin/pip install -e '.[load]'
    .venv/bin/locust -f loadtests/locustfile.py --host http://127.0.0.1:8080 \
        --headless -u 200 -r 50 -t 2m

Each request carries `X-Tenant-Id`, rotating over LOCUST_TENANTS tenants (default 1000:
`tenant-0000` ... `tenant-0999`), so the router's decision cache and both sides see a
realistic spread of tenants rather than one hot key. Mostly GETs, some POSTs with a small
JSON body. A response fails the check if its status is not 2xx/3xx or, when the router
says where it sent the request (`X-Routed-To`, with `debug_headers` on) and the demo
backend says which side answered (`X-Backend-Side`), if the two disagree: a request that
landed on the wrong side is the one failure a migration cannot afford.
"""

from __future__ import annotations

import itertools
import json
import os
import random

from locust import HttpUser, between, task
from locust.clients import ResponseContextManager

TENANT_COUNT = max(1, int(os.environ.get("LOCUST_TENANTS", "1000")))
_WIDTH = max(4, len(str(TENANT_COUNT - 1)))
TENANTS = [f"tenant-{i:0{_WIDTH}d}" for i in range(TENANT_COUNT)]
SIDES = ("legacy", "new")

# One rotation per process (users share it), starting at a random tenant so that several
# locust workers do not march through the tenants in step.
_start = random.randrange(TENANT_COUNT)
_rotation = itertools.cycle(TENANTS[_start:] + TENANTS[:_start])


def next_tenant() -> str:
    return next(_rotation)


def check(response: ResponseContextManager) -> None:
    """Mark the response failed unless it is 2xx/3xx and went to the side it says."""
    status = response.status_code
    if not 200 <= status < 400:
        response.failure(f"status {status}: {response.text[:200]!r}")
        return
    routed = response.headers.get("X-Routed-To")
    if routed is not None:
        target = routed.split(";", 1)[0].strip()
        if target not in SIDES:
            response.failure(f"X-Routed-To names no side: {routed!r}")
            return
        answered = response.headers.get("X-Backend-Side")
        if answered is not None and answered != target:
            response.failure(f"routed to {target} but answered by {answered}")
            return
    response.success()


class TenantUser(HttpUser):
    """A client of some tenant: every request is for the next tenant in the rotation."""

    wait_time = between(0.05, 0.5)

    @task(9)
    def get(self) -> None:
        item = random.randrange(10_000)
        with self.client.get(
            f"/api/items/{item}",
            headers={"X-Tenant-Id": next_tenant()},
            name="GET /api/items/[id]",
            catch_response=True,
        ) as response:
            check(response)

    @task(1)
    def post(self) -> None:
        body = json.dumps({"item": random.randrange(10_000), "note": "x" * 512})
        with self.client.post(
            "/api/items",
            data=body,
            headers={"X-Tenant-Id": next_tenant(), "Content-Type": "application/json"},
            name="POST /api/items",
            catch_response=True,
        ) as response:
            check(response)
