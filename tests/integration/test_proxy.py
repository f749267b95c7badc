"""Phases 1-4 end to end on real sockets: routing per tenant, framing, headers."""

from __future__ import annotations

import base64
import gzip
import json
from typing import Any

import aiohttp

from tests.conftest import (
    Backends,
    RunningRouter,
    StartRouter,
    echo_headers,
    parse_json_body,
    raw_exchange,
    router_settings,
)


def jwt(claims: dict[str, Any]) -> str:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


async def get_json(
    client: aiohttp.ClientSession, url: str, **kwargs: Any
) -> tuple[aiohttp.ClientResponse, dict[str, Any]]:
    async with client.get(url, **kwargs) as response:
        body = await response.json()
        return response, body


# ---- phase 1 + 2: each extractor routes to the flag's side ---------------------------


async def test_header_extractor_routes_per_tenant(
    router: RunningRouter, client: aiohttp.ClientSession
) -> None:
    response, body = await get_json(client, f"{router.url}/api", headers={"X-Tenant-Id": "globex"})
    assert body["side"] == "new"
    assert response.headers["X-Routed-To"] == "new; reason=flag"
    response, body = await get_json(client, f"{router.url}/api", headers={"X-Tenant-Id": "acme"})
    assert body["side"] == "legacy"
    assert response.headers["X-Routed-To"] == "legacy; reason=flag"


async def test_unknown_tenant_falls_through_to_legacy(
    router: RunningRouter, client: aiohttp.ClientSession
) -> None:
    _, body = await get_json(client, f"{router.url}/", headers={"X-Tenant-Id": "someone-else"})
    assert body["side"] == "legacy"


async def test_no_tenant_goes_to_default_target(
    backends: Backends, flag_file: Any, start_router: StartRouter, client: aiohttp.ClientSession
) -> None:
    settings = router_settings(
        backends.url("legacy"), backends.url("new"), flag_file, tenant__default_target="new"
    )
    router = await start_router(settings)
    response, body = await get_json(client, f"{router.url}/anonymous")
    assert body["side"] == "new"
    assert response.headers["X-Routed-To"] == "new; reason=no-tenant"


async def test_jwt_extractor_from_each_place(
    router: RunningRouter, client: aiohttp.ClientSession
) -> None:
    token = jwt({"iss": "globex", "sub": "u1"})
    for kwargs in (
        {"headers": {"Authorization": f"JWT {token}"}},
        {"headers": {"Authorization": f"Bearer {token}"}},
        {"params": {"jwt": token}},
    ):
        _, body = await get_json(client, f"{router.url}/x", **kwargs)
        assert body["side"] == "new", kwargs


async def test_malformed_jwt_is_not_a_crash(
    router: RunningRouter, client: aiohttp.ClientSession
) -> None:
    for auth in ("JWT a.b", "Bearer %%%.!!!.x", "JWT " + "A" * 7000, f"JWT {jwt({'iss': 42})}"):
        response, body = await get_json(client, f"{router.url}/x", headers={"Authorization": auth})
        assert response.status == 200
        assert body["side"] == "legacy"
        assert response.headers["X-Routed-To"] == "legacy; reason=no-tenant"


async def test_host_and_path_extractors(
    router: RunningRouter, client: aiohttp.ClientSession
) -> None:
    _, body = await get_json(client, f"{router.url}/x", headers={"Host": "globex.tenants.test"})
    assert body["side"] == "new"
    _, body = await get_json(client, f"{router.url}/t/globex/api?q=1")
    assert body["side"] == "new"
    assert body["target"] == "/t/globex/api?q=1"  # the path is forwarded untouched


# ---- phase 3 + 4: framing ------------------------------------------------------------


async def test_request_body_framing_preserved(
    router: RunningRouter, client: aiohttp.ClientSession
) -> None:
    payload = b"0123456789" * 10000
    async with client.post(
        f"{router.url}/up", data=payload, headers={"X-Tenant-Id": "globex"}
    ) as r:
        body = await r.json()
    assert body["body_bytes"] == len(payload) and not body["chunked"]
    assert echo_headers(body)["content-length"] == [str(len(payload))]

    async def gen() -> Any:
        for _ in range(10):
            yield b"abcdefghij" * 1000

    async with client.post(f"{router.url}/up", data=gen(), headers={"X-Tenant-Id": "globex"}) as r:
        body = await r.json()
    assert body["body_bytes"] == 100000 and body["chunked"]
    assert "content-length" not in echo_headers(body)


async def test_response_framing_preserved(
    router: RunningRouter, client: aiohttp.ClientSession
) -> None:
    async with client.get(f"{router.url}/__bytes/300000?framing=length") as r:
        assert r.headers["Content-Length"] == "300000"
        assert "Transfer-Encoding" not in r.headers
        assert len(await r.read()) == 300000
    async with client.get(f"{router.url}/__bytes/300000") as r:
        assert r.headers["Transfer-Encoding"] == "chunked"
        assert "Content-Length" not in r.headers
        assert len(await r.read()) == 300000


async def test_head_204_304(router: RunningRouter) -> None:
    raw = await raw_exchange(
        router.port,
        b"HEAD /__bytes/5000?framing=length HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /__status/204 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /__status/304 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        timeout=3,
    )
    # Three responses, in order, none with a body: pipelining stays in step only if the
    # router sent no body bytes for any of them.
    responses = raw.split(b"HTTP/1.1 ")[1:]
    assert [r[:3] for r in responses] == [b"200", b"204", b"304"]
    head_response, no_content, not_modified = responses
    assert b"Content-Length: 5000\r\n" in head_response and head_response.endswith(b"\r\n\r\n")
    assert b"Content-Length" not in no_content and b"Transfer-Encoding" not in no_content
    assert b"Transfer-Encoding" not in not_modified and not_modified.endswith(b"\r\n\r\n")
    assert b'ETag: "v1"' in not_modified


async def test_no_decompression_and_no_added_accept_encoding(
    router: RunningRouter, client: aiohttp.ClientSession
) -> None:
    async with client.get(f"{router.url}/__gzip", skip_auto_headers=["Accept-Encoding"]) as r:
        raw = await r.read()
        assert r.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(raw) == b"hello compressed world" * 100
    async with client.get(f"{router.url}/echo", skip_auto_headers=["Accept-Encoding"]) as r:
        body = await r.json()
    assert "accept-encoding" not in echo_headers(body)


async def test_gzip_request_body_is_relayed_as_sent(
    router: RunningRouter, client: aiohttp.ClientSession
) -> None:
    compressed = gzip.compress(b"payload" * 1000)
    headers = {"Content-Encoding": "gzip", "X-Tenant-Id": "globex"}
    async with client.post(f"{router.url}/up", data=compressed, headers=headers) as r:
        body = await r.json()
    assert body["body_bytes"] == len(compressed)


async def test_redirects_passed_through(
    router: RunningRouter, client: aiohttp.ClientSession
) -> None:
    async with client.get(f"{router.url}/__redirect", allow_redirects=False) as r:
        assert r.status == 302
        assert r.headers["Location"] == "/elsewhere"


# ---- headers, both directions --------------------------------------------------------


async def test_request_hop_by_hop_and_forwarding_headers(router: RunningRouter) -> None:
    raw = await raw_exchange(
        router.port,
        b"GET /h HTTP/1.1\r\nHost: shop.example\r\nX-Tenant-Id: globex\r\n"
        b"Connection: close, X-Drop-Me\r\nX-Drop-Me: secret\r\nKeep-Alive: timeout=1\r\n"
        b"Proxy-Connection: keep-alive\r\nTE: trailers\r\nUpgrade: h2c\r\n"
        b"X-Forwarded-For: 203.0.113.9\r\nX-Router-Target: new\r\nX_Tenant_Id: evil\r\n"
        b"X-Request-Id: abc-123\r\nX-Keep: yes\r\n\r\n",
    )
    body = parse_json_body(raw)
    seen = echo_headers(body)
    for dropped in ("connection", "x-drop-me", "keep-alive", "proxy-connection", "te", "upgrade",
                    "x-router-target", "x_tenant_id"):  # fmt: skip
        assert dropped not in seen, dropped
    assert seen["x-keep"] == ["yes"]
    assert seen["host"] == ["shop.example"]
    assert seen["x-forwarded-for"] == ["203.0.113.9, 127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["http"]
    assert seen["x-forwarded-host"] == ["shop.example"]
    assert seen["x-request-id"] == ["abc-123"]
    assert b"X-Request-Id: abc-123\r\n" in raw


async def test_request_id_generated_when_absent_or_invalid(
    router: RunningRouter, client: aiohttp.ClientSession
) -> None:
    ids = set()
    for headers in ({}, {"X-Request-Id": "bad id with spaces"}, {"X-Request-Id": "x" * 500}):
        async with client.get(f"{router.url}/", headers=headers) as r:
            body = await r.json()
            rid = r.headers["X-Request-Id"]
        assert echo_headers(body)["x-request-id"] == [rid]
        assert rid not in ("bad id with spaces", "x" * 500)
        ids.add(rid)
    assert len(ids) == 3


async def test_response_hop_by_hop_stripped(
    router: RunningRouter, client: aiohttp.ClientSession
) -> None:
    async with client.get(f"{router.url}/__hop") as r:
        assert await r.text() == "hop"
        for dropped in ("X-Secret-Hop", "Keep-Alive", "Proxy-Connection", "Upgrade"):
            assert dropped not in r.headers, dropped
        assert r.headers["X-End-To-End"] == "kept"
        assert r.headers.get("Connection", "keep-alive").lower() == "keep-alive"


async def test_host_header_upstream_mode(
    backends: Backends, flag_file: Any, start_router: StartRouter, client: aiohttp.ClientSession
) -> None:
    settings = router_settings(
        backends.url("legacy"), backends.url("new"), flag_file,
        upstreams__new={"url": backends.url("new"), "host_header": "upstream"},
    )  # fmt: skip
    router = await start_router(settings)
    async with client.get(
        f"{router.url}/", headers={"X-Tenant-Id": "globex", "Host": "app.example"}
    ) as r:
        body = await r.json()
    seen = echo_headers(body)
    assert seen["host"] == [f"127.0.0.1:{backends.new.port}"]
    assert seen["x-forwarded-host"] == ["app.example"]


# ---- not an open proxy ---------------------------------------------------------------


async def test_absolute_form_never_reaches_upstream_as_such(router: RunningRouter) -> None:
    raw = await raw_exchange(
        router.port,
        b"GET http://globex.tenants.test/abs?x=1 HTTP/1.1\r\nHost: elsewhere.test\r\n"
        b"Connection: close\r\n\r\n",
    )
    body = parse_json_body(raw)
    assert body["target"] == "/abs?x=1"
    # The authority replaced Host (RFC 9112 3.2.2) for identification, not the upstream.
    assert body["side"] == "new"


async def test_connect_refused(router: RunningRouter, backends: Backends) -> None:
    raw = await raw_exchange(
        router.port, f"CONNECT 127.0.0.1:{backends.new.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    assert raw.startswith(b"HTTP/1.1 405 ")
    assert parse_json_body(raw)["error"] == "method_not_allowed"
