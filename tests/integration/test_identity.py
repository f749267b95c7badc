"""Issue 16: a client cannot choose its tenant. Attack tests against the in-process router
with two recording upstreams (raw sockets): "never forwarded" is checked at the backends,
which must see no connection at all, not inferred from the status.

- sources that disagree (a valid token for acme plus `X-Tenant-Id: globex`, host vs path)
  -> 400 tenant_mismatch, counted, nothing at either backend, no in-flight count;
- a tenant header named in `Connection` (hop-by-hop, so never an identity) -> 400;
- `alg: none` tokens never route, not even in decode-only mode -> 401 invalid_token;
- with `tenant.min_trust: credential` (production) a client-written header alone decides
  nothing: the request goes to the default side.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    RawHandler,
    RawResponse,
    RawUpstream,
    RunningRouter,
    StartRouter,
    raw_request,
    recording_upstream,
    router_settings,
    sample,
)

pytestmark = pytest.mark.usefixtures("no_error_logs")

UpstreamFactory = Callable[[RawHandler], Awaitable[RawUpstream]]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unsigned_jwt(payload: dict[str, Any], alg: str = "HS256", signature: str = "c2ln") -> str:
    """A token as a decode-only router sees it: the signature is the backend's business."""
    header = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    return f"{header}.{b64url(json.dumps(payload).encode())}.{signature}"


class Sides:
    def __init__(self, legacy: RawUpstream, new: RawUpstream) -> None:
        self.legacy = legacy
        self.new = new

    def untouched(self) -> bool:
        """No connection, so not a byte, reached either backend."""
        return (self.legacy.connections, self.new.connections) == (0, 0) and not (
            self.legacy.requests or self.new.requests
        )


@pytest.fixture
async def sides(raw_upstream: UpstreamFactory) -> Sides:
    return Sides(await recording_upstream(raw_upstream), await recording_upstream(raw_upstream))


async def start(
    start_router: StartRouter, flag_file: Path, sides: Sides, **overrides: Any
) -> RunningRouter:
    # flag_file: acme -> legacy, globex -> new, everyone else legacy.
    return await start_router(
        router_settings(sides.legacy.url, sides.new.url, flag_file, **overrides)
    )


def request(path: str = "/x", host: str = "a", **headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def assert_refused(response: RawResponse, status: int, code: str) -> None:
    assert response.status == status, response
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"] == code, response


ACME_TOKEN = unsigned_jwt({"iss": "acme"})


async def test_a_valid_token_plus_another_tenants_header_is_refused(
    start_router: StartRouter, flag_file: Path, sides: Sides
) -> None:
    router = await start(start_router, flag_file, sides)
    response = await raw_request(
        router.port,
        request(Authorization=f"Bearer {ACME_TOKEN}", X_Tenant_Id="globex"),
    )
    assert_refused(response, 400, "tenant_mismatch")
    assert sides.untouched()
    # Never counted as globex's (nor acme's) in flight: a cutover's drain wait must not
    # be steered by a client either.
    assert router.app.tenant_inflight == {}
    assert sample(router, "router_tenant_mismatch_total", sources="header+jwt") == 1
    # The same token alone, and with its own tenant in the header, routes (acme: legacy).
    for extra in ({}, {"X_Tenant_Id": "acme"}):
        ok = await raw_request(router.port, request(Authorization=f"Bearer {ACME_TOKEN}", **extra))
        assert ok.status == 200, ok
    assert len(sides.legacy.requests) == 2 and not sides.new.requests


async def test_host_and_path_that_disagree_are_refused(
    start_router: StartRouter, flag_file: Path, sides: Sides
) -> None:
    router = await start(start_router, flag_file, sides)
    response = await raw_request(router.port, request(path="/t/globex/x", host="acme.tenants.test"))
    assert_refused(response, 400, "tenant_mismatch")
    assert sides.untouched()
    assert sample(router, "router_tenant_mismatch_total", sources="host+path") == 1


async def test_a_tenant_header_named_in_connection_is_refused(
    start_router: StartRouter, flag_file: Path, sides: Sides
) -> None:
    router = await start(start_router, flag_file, sides)
    raw = (
        b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close, X-Tenant-Id\r\n"
        b"X-Tenant-Id: globex\r\n\r\n"
    )
    assert_refused(await raw_request(router.port, raw), 400, "bad_request")
    # Named in Connection, even without the field itself: the hop before us was told
    # to drop it, so whatever identity it carried is not one we may use.
    raw = b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: x-tenant-id\r\n\r\n"
    assert_refused(await raw_request(router.port, raw), 400, "bad_request")
    assert sides.untouched()


@pytest.mark.parametrize("where", ["header", "query"])
async def test_an_alg_none_token_never_routes(
    start_router: StartRouter, flag_file: Path, sides: Sides, where: str
) -> None:
    router = await start(start_router, flag_file, sides)
    for alg in ("none", "None", "NONE"):
        token = unsigned_jwt({"iss": "globex"}, alg=alg, signature="")
        raw = (
            request(Authorization=f"Bearer {token}")
            if where == "header"
            else request(path=f"/x?jwt={token}")
        )
        assert_refused(await raw_request(router.port, raw), 401, "invalid_token")
    assert sides.untouched()


async def test_with_min_trust_credential_a_client_header_alone_decides_nothing(
    start_router: StartRouter, flag_file: Path, sides: Sides
) -> None:
    router = await start(start_router, flag_file, sides, tenant__min_trust="credential")
    # globex's flag says new; a client-written header cannot send the request there.
    response = await raw_request(router.port, request(X_Tenant_Id="globex"))
    assert response.status == 200, response
    assert len(sides.legacy.requests) == 1 and not sides.new.requests
    # The credential does decide: globex's token goes to new.
    token = unsigned_jwt({"iss": "globex"})
    response = await raw_request(router.port, request(Authorization=f"Bearer {token}"))
    assert response.status == 200, response
    assert len(sides.new.requests) == 1
