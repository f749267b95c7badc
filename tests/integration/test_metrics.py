"""/metrics on a running router: the exported families are exactly the documented list,
and the figures move with real requests through real upstreams."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Backends, RunningRouter, sample
from tests.support.metric_names import EXPORTED_METRICS, METRIC_KINDS


async def scrape(client: aiohttp.ClientSession, router: RunningRouter) -> dict[str, dict]:
    async with client.get(f"{router.admin_url}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    samples: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        samples[family.name] = {"type": family.type, "samples": family.samples}
    return samples


def name_in_list(family: str, kind: str) -> str:
    # The parser strips `_total` from counter family names; the list spells them in full.
    return family + "_total" if kind == "counter" else family


async def test_exported_families_are_the_documented_list(
    router: RunningRouter, client: aiohttp.ClientSession
) -> None:
    families = await scrape(client, router)
    exported = {name_in_list(name, f["type"]) for name, f in families.items()}
    assert exported == EXPORTED_METRICS
    for name, family in families.items():
        assert METRIC_KINDS[name_in_list(name, family["type"])] == family["type"], name


async def test_figures_follow_requests(
    router: RunningRouter, backends: Backends, client: aiohttp.ClientSession
) -> None:
    before = sample(router, "router_requests_total", target="legacy", method="GET", code="200")
    for _ in range(5):
        async with client.get(f"{router.url}/echo", headers={"X-Tenant-Id": "acme"}) as r:
            assert r.status == 200
            await r.read()
    async with client.post(
        f"{router.url}/echo", headers={"X-Tenant-Id": "globex"}, data=b"x" * 1000
    ) as r:
        assert r.status == 200
        body = await r.read()
    after = sample(router, "router_requests_total", target="legacy", method="GET", code="200")
    assert after - before == 5
    assert sample(router, "router_requests_total", target="new", method="POST", code="200") == 1
    assert sample(router, "router_request_bytes_total", target="new") == 1000
    assert sample(router, "router_response_bytes_total", target="new") == len(body)
    assert sample(router, "router_route_decisions_total", target="legacy", reason="flag") >= 5
    assert sample(router, "router_request_duration_seconds_count", target="legacy") == after
    assert sample(router, "router_inflight_requests", target="legacy") == 0
    assert sample(router, "router_flag_source_ready") == 1
    # Connections stay pooled: at least one idle per side used, none active at rest.
    assert sample(router, "router_pool_connections", target="legacy", state="idle") >= 1
    assert sample(router, "router_pool_connections", target="legacy", state="active") == 0
    # The same figures through the HTTP exposition.
    families = await scrape(client, router)
    requests = {
        (s.labels["target"], s.labels["method"], s.labels["code"]): s.value
        for s in families["router_requests"]["samples"]
        if s.name == "router_requests_total"
    }
    assert requests[("legacy", "GET", "200")] == after
