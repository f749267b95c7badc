"""The access line's formatter: valid JSON whatever the client sent, and a bounded cache."""

from __future__ import annotations

import json

from router import accesslog


def entry(tenant: str | None, path: str, client: str | None) -> accesslog._Entry:
    return (1796140000.123456, "rid-1", tenant, "legacy", "flag", "GET", path, 200, 5, 103,
            0.53219, None, None, client)  # fmt: skip


def test_lines_are_json_whatever_the_client_sent() -> None:
    tricky = ['a"b', "back\\slash", "tab\tnew\nline", "\u00e9\u2603\U0001f600", "\x00\x1f"]
    for value in tricky:
        line = accesslog._format(entry(value, "/p/" + value, value))
        assert line.endswith("\n") and line.count("\n") == 1
        data = json.loads(line)
        assert (data["tenant"], data["path"], data["client"]) == (value, "/p/" + value, value)
        assert data["ts"] == 1796140000.123 and data["duration_ms"] == 0.532
        assert data["upstream_ms"] is None and data["error"] is None
    data = json.loads(accesslog._format(entry(None, "/", None)))
    assert data["tenant"] is None and data["client"] is None


def test_escape_cache_stays_bounded() -> None:
    for index in range(10_000):
        tenant = f"made-up-{index}"
        assert json.loads(accesslog._format(entry(tenant, "/", "10.0.0.1")))["tenant"] == tenant
    assert len(accesslog._ESCAPED) <= 4096
    assert accesslog._ESCAPED[None] == "null"
