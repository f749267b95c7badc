"""The header lookup the handler reads (router/proxy/connection.py's Headers): case-insensitive,
first value wins."""

from __future__ import annotations

import pytest

from router.proxy.connection import Headers

pytestmark = pytest.mark.usefixtures("no_error_logs")


def test_headers_lookup_is_case_insensitive_first_value_wins() -> None:
    raw = [
        (b"Host", b"a.test"),
        (b"X-Tenant-Id", b"acme"),
        (b"x-tenant-id", b"globex"),
        (b"X-Note", b"cr\xc3\xa8me \xff"),
    ]
    headers = Headers(raw)
    assert headers.get("x-TENANT-id") == "acme"
    assert headers["HOST"] == "a.test"
    assert headers.getall("X-Tenant-Id") == ["acme", "globex"]
    assert "host" in headers and "X-Missing" not in headers
    assert headers.get("X-Missing") is None and headers.get("X-Missing", "d") == "d"
    # Values decode as UTF-8, undecodable bytes kept as surrogates (as aiohttp did).
    assert headers.get("x-note") == "crème \udcff"
    assert list(headers) == ["Host", "X-Tenant-Id", "x-tenant-id", "X-Note"]
    assert len(headers) == 4
    with pytest.raises(KeyError):
        headers["X-Missing"]
