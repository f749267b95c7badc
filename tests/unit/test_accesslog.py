"""The access line's formatter: valid JSON whatever the client sent, and a bounded cache."""

from __future__ import annotations

import asyncio
import io
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.proxy import accesslog
from router.settings import DEFAULT_REDACT_QUERY_PARAMS


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


# ---- query redaction (QueryRedactor) -----------------------------------------------------

REDACTOR = accesslog.QueryRedactor(DEFAULT_REDACT_QUERY_PARAMS)


@pytest.mark.parametrize(
    ("path", "logged"),
    [
        ("/a", "/a"),
        ("/a?", "/a?"),
        ("/a?page=2&sort=name", "/a?page=2&sort=name"),
        ("/a?jwt=eyJ.x.y", "/a?jwt=REDACTED"),
        ("/a?page=2&token=t0k&b=", "/a?page=2&token=REDACTED&b="),
        (
            "/a?access_token=1&id_token=2&refresh_token=3",
            "/a?access_token=REDACTED&id_token=REDACTED&refresh_token=REDACTED",
        ),
        ("/cb?code=abc&state=xyz", "/cb?code=REDACTED&state=xyz"),
        (
            "/s3?X-Amz-Signature=ff&X-Amz-Credential=c",
            "/s3?X-Amz-Signature=REDACTED&X-Amz-Credential=REDACTED",
        ),
        (
            "/a?api_key=k&apiKey=k&client_secret=s&password=p",
            "/a?api_key=REDACTED&apiKey=REDACTED&client_secret=REDACTED&password=REDACTED",
        ),
        ("/a?%6Awt=x&JWT=y&tok%65n=z", "/a?%6Awt=REDACTED&JWT=REDACTED&tok%65n=REDACTED"),
        ("/a?my+session=x", "/a?my+session=REDACTED"),
        ("/a?x=1;jwt=s;y=2", "/a?x=1;jwt=REDACTED;y=2"),
        ("/a?eyJhbGciOiJIUzI1NiJ9.e30.sig", "/a?REDACTED"),  # a bare value: the whole of it
        ("/a?=secret&&b=1", "/a?REDACTED&&b=1"),  # no name
        ("/a?" + "n" * 65 + "=v", "/a?REDACTED"),  # not a name
        ("/a?jwt=x=y", "/a?jwt=REDACTED"),
        ("/a?page=1?jwt=x", "/a?page=1?jwt=REDACTED"),  # a second `?` separates too
    ],
)  # fmt: skip
def test_sensitive_values_are_redacted_names_and_other_values_kept(path: str, logged: str) -> None:
    assert REDACTOR.redact(path) == logged


def test_a_star_redacts_every_value() -> None:
    every = accesslog.QueryRedactor(["*"])
    assert every.redact("/a?page=2&q=x") == "/a?page=REDACTED&q=REDACTED"
    assert every.redact("/a") == "/a"


@settings(max_examples=500, deadline=None)
@given(
    before=st.text(alphabet="abcxyz=&;%+", max_size=20),
    name=st.sampled_from(["jwt", "token", "Access_Token", "%6Awt", "signature"]),
    value=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=8, max_size=40),
    after=st.text(alphabet="abcxyz=&;", max_size=20),
)
def test_a_sensitive_value_never_survives(before: str, name: str, value: str, after: str) -> None:
    """Whatever surrounds it, `name=value` after a separator never keeps its value."""
    query = f"{before}&{name}={value}&{after}"
    assert value not in REDACTOR.redact("/p?" + query)


def test_the_access_log_redacts_only_when_there_is_a_query() -> None:
    stream = io.BytesIO()
    loop = asyncio.new_event_loop()
    try:
        log = accesslog.AccessLog(loop, stream=stream, redactor=REDACTOR)
        for path in ("/plain", "/q?jwt=secret-value&x=1"):
            log.record("rid", "acme", "legacy", "flag", "GET", path, 200, 0, 0, 1.0, None,
                       None, "10.0.0.1")  # fmt: skip
        log.flush()
        bare = accesslog.AccessLog(loop, stream=stream)  # no redactor: the query is dropped
        bare.record("rid", None, "none", "none", "GET", "/q?jwt=secret-value", 400, 0, 0, 1.0,
                    None, "bad_request", None)  # fmt: skip
        bare.flush()
    finally:
        loop.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["path"] for line in lines] == ["/plain", "/q?jwt=REDACTED&x=1", "/q"]
