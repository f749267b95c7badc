"""The access line's formatter: valid JSON whatever the client sent, and a bounded cache."""

from __future__ import annotations

import json
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from router.proxy import accesslog


def line(tenant: str | None, path: str, client: str | None) -> str:
    return accesslog._format(1796140000.123456, "rid-1", tenant, "legacy", "flag", "GET", path,
                             200, 5, 103, 0.53219, None, None, client)  # fmt: skip


def test_lines_are_json_whatever_the_client_sent() -> None:
    tricky = ['a"b', "back\\slash", "tab\tnew\nline", "\u00e9\u2603\U0001f600", "\x00\x1f"]
    for value in tricky:
        text = line(value, "/p/" + value, value)
        assert text.endswith("\n") and text.count("\n") == 1
        data = json.loads(text)
        assert (data["tenant"], data["path"], data["client"]) == (value, "/p/" + value, value)
        assert data["ts"] == 1796140000.123 and data["duration_ms"] == 0.532
        assert data["upstream_ms"] is None and data["error"] is None
    data = json.loads(line(None, "/", None))
    assert data["tenant"] is None and data["client"] is None


def test_escape_cache_stays_bounded() -> None:
    for index in range(10_000):
        tenant = f"made-up-{index}"
        assert json.loads(line(tenant, "/", "10.0.0.1"))["tenant"] == tenant
    assert len(accesslog._ESCAPED) <= 4096
    assert accesslog._ESCAPED[None] == "null"


@settings(max_examples=2000, deadline=None)
@given(st.floats(min_value=0.0, max_value=4e9, allow_nan=False, allow_infinity=False))
def test_three_decimals_match_the_float_formatter(value: float) -> None:
    ours = accesslog._decimal3(value)
    reference = format(value, ".3f")
    assert re.fullmatch(r"\d+\.\d{3}", ours), ours
    # The same digits but where a tie rounds the other way: a thousandth at most.
    assert ours == reference or abs(float(ours) - float(reference)) <= 0.0011, (ours, reference)


def test_three_decimals_of_common_values() -> None:
    cases = {
        0.0: "0.000", 0.0004: "0.000", 0.0006: "0.001", 0.53219: "0.532", 5.04: "5.040",
        12.3456: "12.346", 1796140000.123456: "1796140000.123", 999.9996: "1000.000",
    }  # fmt: skip
    for value, text in cases.items():
        assert accesslog._decimal3(value) == text, value
