"""No secrets in logs (issue 16, point 6): a token in the query string (`?jwt=`, `?token=`)
never reaches the access log, the application logs (shadow mismatches, errors), the
/admin/shadow view or `router shadow report`, through a real router on real sockets.

Each sink is captured whole and searched for the token's value: not a field checked by
name, so a copy of the path in any field, message or nested entry is found."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from router.cli.main import main
from router.proxy.accesslog import JsonFormatter
from tests.conftest import (
    ADMIN_HEADERS,
    ADMIN_TOKEN,
    RunningRouter,
    StartRouter,
    refused_url,
    router_settings,
)
from tests.integration.test_shadow import (
    Seen,
    Sides,
    settled,
    shadow_backend,
    shadow_router_settings,
)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# A JWT whose claims name acme (the router may decode it to identify the tenant), with a
# signature part that is unmistakable in a log.
JWT = ".".join(
    (_b64(b'{"alg":"HS256","typ":"JWT"}'), _b64(b'{"iss":"acme"}'), "c2VjcmV0LXNpZ25hdHVyZQ")
)
# The same for globex: a request's header and token must name the same tenant, or it is
# refused (tenant_mismatch) before it could fail upstream.
GLOBEX_JWT = ".".join(
    (_b64(b'{"alg":"HS256","typ":"JWT"}'), _b64(b'{"iss":"globex"}'), "c2VjcmV0LXNpZ25hdHVyZQ")
)
TOKEN = "opaque-access-token-5f2b9c"
SECRETS = (JWT, GLOBEX_JWT, TOKEN, "c2VjcmV0LXNpZ25hdHVyZQ")
QUERY = f"?page=2&jwt={JWT}&token={TOKEN}"
GLOBEX_QUERY = f"?page=2&jwt={GLOBEX_JWT}&token={TOKEN}"


def assert_no_secret(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{where} carries a secret: {text[:2000]}"


def capture_access_log(router: RunningRouter) -> io.BytesIO:
    stream = io.BytesIO()
    router.app.access_log._stream = stream  # the log's sink: written by flush()
    return stream


def access_lines(router: RunningRouter, stream: io.BytesIO) -> list[dict[str, Any]]:
    router.app.access_log.flush()
    return [json.loads(line) for line in stream.getvalue().decode().splitlines()]


def application_logs(caplog: pytest.LogCaptureFixture) -> str:
    """Every log record of the router's as production writes it (JsonFormatter: the
    message and every `extra` field). The test backends' own access logs are not the
    router's (they are aiohttp test servers, logging to `aiohttp.access`)."""
    formatter = JsonFormatter()
    return "\n".join(
        formatter.format(record) for record in caplog.records if record.name.startswith("router")
    )


async def test_the_access_log_keeps_the_path_and_parameter_names_but_no_token(
    backends: Any,
    flag_file: Path,
    start_router: StartRouter,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    router = await start_router(
        router_settings(backends.url("legacy"), refused_url(), flag_file, access_log__enabled=True)
    )
    stream = capture_access_log(router)
    # Served by legacy (acme), an upstream failure (globex: new is down), the token by
    # header and by query parameter alone (the JWT extractor reads ?jwt=).
    async with client.get(f"{router.url}/orders{QUERY}", headers={"X-Tenant-Id": "acme"}) as r:
        assert r.status == 200
    globex = f"{router.url}/orders{GLOBEX_QUERY}"
    async with client.get(globex, headers={"X-Tenant-Id": "globex"}) as r:
        assert r.status == 502
    async with client.get(f"{router.url}/by-token{QUERY}") as r:
        assert r.status == 200
    # Percent-encoded names and `;` separators name the same parameters to most backends.
    encoded = URL(f"{router.url}/enc?%6Awt={JWT};Token={TOKEN}", encoded=True)  # sent as is
    async with client.get(encoded, headers={"X-Tenant-Id": "acme"}) as r:
        assert r.status == 200

    lines = access_lines(router, stream)
    assert len(lines) == 4
    assert_no_secret(json.dumps(lines), "the access log")
    # What stays is useful: the path, the parameter names, the harmless values.
    assert lines[0]["path"] == "/orders?page=2&jwt=REDACTED&token=REDACTED"
    assert (lines[1]["status"], lines[1]["error"]) == (502, "upstream_connect_failed")
    assert lines[1]["path"] == lines[0]["path"]
    assert lines[2]["tenant"] == "acme"  # identified by the token, which is not logged
    assert lines[3]["path"] == "/enc?%6Awt=REDACTED;Token=REDACTED"
    assert_no_secret(application_logs(caplog), "an application log")


@pytest.fixture
async def sides(aiohttp_server: Any) -> Sides:
    """test_shadow.py's backends: each records what it receives; /status differs."""
    legacy, new = Seen(), Seen()
    legacy_server = await aiohttp_server(shadow_backend("legacy", legacy))
    new_server = await aiohttp_server(shadow_backend("new", new))
    return Sides(
        legacy,
        new,
        str(legacy_server.make_url("")).rstrip("/"),
        str(new_server.make_url("")).rstrip("/"),
    )


async def test_shadow_mismatches_never_carry_the_token(
    sides: Sides,
    flag_file: Path,
    start_router: StartRouter,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    router = await start_router(shadow_router_settings(sides, flag_file))
    async with client.get(f"{router.url}/status{QUERY}", headers={"X-Tenant-Id": "acme"}) as r:
        assert r.status == 200
    stats = await settled(router, "acme", 1)
    assert stats["mismatched"] == 1
    # The copy itself reached new with the client's query: only what is logged is redacted.
    assert sides.new.shadow_copies()[0][1] == f"/status{QUERY}"

    # The shadow mismatch log line.
    logs = application_logs(caplog)
    assert "shadow mismatch" in logs
    assert_no_secret(logs, "the shadow mismatch log")
    # GET /admin/shadow.
    async with client.get(
        f"{router.admin_url}/admin/shadow?tenant=acme", headers=ADMIN_HEADERS
    ) as response:
        assert response.status == 200
        view = await response.text()
    assert_no_secret(view, "/admin/shadow")
    assert json.loads(view)["recent"][0]["path"] == "/status?page=2&jwt=REDACTED&token=REDACTED"

    # `router shadow report`, in a thread: it is synchronous, and the router under test
    # serves its admin API on this loop.
    monkeypatch.setenv("ROUTER_ADMIN_TOKEN", ADMIN_TOKEN)
    monkeypatch.delenv("ROUTER_CONFIG", raising=False)
    for output in ([], ["--json"]):
        code = await asyncio.to_thread(
            main, ["shadow", "report", "acme", "--admin", router.admin_url, *output]
        )
        out, err = capsys.readouterr()
        assert code == 0, err
        assert "/status?page=2&jwt=REDACTED" in out
        assert_no_secret(out + err, "router shadow report")
