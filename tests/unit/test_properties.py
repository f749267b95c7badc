"""Property tests (hypothesis): the pieces that read client- or peer-controlled bytes never
crash on arbitrary input, and the header rules strip what they must, idempotently."""

from __future__ import annotations

import asyncio
import base64
import json
import string
import time
from typing import Any

import httptools
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.control.override import OverrideVerifier, signed_headers
from router.errors import InvalidToken, TenantMismatch
from router.proxy.connection import FrontConnection, FrontServer, Headers, HttpVersion, Request
from router.proxy.identify import TenantIdentifier
from router.proxy.relay import HeaderRules, build_request_head, encode_response_head
from router.proxy.upstream import UpstreamPool, UpstreamResponse
from router.settings import TenantSettings, UpstreamSettings

PROPERTY_SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

TOKEN_CHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
field_names = st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=24)
# Field values as a parser hands them over: visible ASCII, spaces and tabs inside, never
# CR or LF (llhttp refuses those), and some latin-1 bytes (obs-text).
field_values = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=60,
).map(str.strip)
# Names the router treats specially, so the generated headers hit them often.
special_names = st.sampled_from(
    ["Connection", "Keep-Alive", "Proxy-Connection", "TE", "Trailer", "Transfer-Encoding",
     "Upgrade", "Host", "Content-Length", "X-Forwarded-For", "X-Forwarded-Proto",
     "X-Forwarded-Host", "X-Request-Id", "X-Router-Target", "X-Router-Signature",
     "X_Tenant_Id", "x-tenant_id", "X-Tenant-Id", "Expect", "connection", "KEEP-ALIVE"]
)  # fmt: skip
headers_lists = st.lists(
    st.tuples(st.one_of(field_names, special_names), field_values), max_size=12
)

IDENTIFIER = TenantIdentifier(
    TenantSettings.model_validate(
        {
            "extractors": [
                {"type": "header", "name": "X-Tenant-Id"},
                {"type": "jwt", "claim": "iss"},
                {"type": "host", "pattern": "{tenant}.example.com"},
                {"type": "path", "pattern": "/t/{tenant}/"},
            ]
        }
    )
)
RULES = HeaderRules(("X-Tenant-Id",))

# RFC 9110 7.6.1 (and the de-facto Proxy-Connection), written out here rather than
# imported, so that a field dropped from the router's own set is caught.
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
              b"transfer-encoding", b"upgrade"}  # fmt: skip
# What the router sets itself on the way up, whatever the client sent.
ROUTER_SET = {b"host", b"content-length", b"transfer-encoding", b"x-forwarded-for",
              b"x-forwarded-proto", b"x-forwarded-host", b"x-request-id"}  # fmt: skip


HS256_HEADER = b'{"alg":"HS256"}'  # decode-only routing refuses alg none


def jwt_like(payload: bytes) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    return f"{b64(HS256_HEADER)}.{b64(payload)}.sig"


class _Collect:
    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_message_complete(self) -> None:
        self.done = True


def parse_head(head: bytes, response: bool = False) -> list[tuple[bytes, bytes]]:
    """The head as llhttp reads it: it must be one valid HTTP/1.1 message head."""
    collect = _Collect()
    parser: Any = (
        httptools.HttpResponseParser(collect) if response else httptools.HttpRequestParser(collect)
    )
    parser.feed_data(head)
    return collect.headers


# Real objects where the head builder takes them: compiled (setup.py), it checks its
# arguments' types at run time. The loop is never run: closed at once.
_LOOP = asyncio.new_event_loop()
_LOOP.close()
POOL = UpstreamPool("legacy", UpstreamSettings(url="http://upstream.internal"), _LOOP)


def _client_connection() -> FrontConnection:
    """A never-connected client connection: the head builder reads only its peer."""
    loop = _LOOP
    server = FrontServer(
        None,  # type: ignore[arg-type]  # no request is handled
        loop, max_target=8190, max_field_size=8190, max_headers=100, keepalive_timeout=5.0,
        header_timeout=5.0, max_connections=10,
    )  # fmt: skip
    connection = FrontConnection(server)
    connection.peer = "192.0.2.7"
    return connection


CLIENT_CONNECTION = _client_connection()


def request_head(headers: list[tuple[str, str]]) -> bytes:
    # Field values as UTF-8 bytes (what the parser hands over for such a client).
    raw = [(n.encode(), v.encode()) for n, v in headers]
    request = Request(
        CLIENT_CONNECTION, "GET", b"/p?q=1", Headers(raw), HttpVersion(1, 1), True, None, False,
    )  # fmt: skip
    head, _client = build_request_head(
        request, b"/p?q=1", "client.example", "req-1", "192.0.2.7", POOL, RULES, False, False
    )
    return head


# ---- tenant extractors ---------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(
    tenant_header=st.one_of(st.none(), field_values),
    authorization=st.one_of(st.none(), field_values),
    jwt_payload=st.one_of(st.none(), st.binary(max_size=80)),
    host=st.one_of(st.none(), st.text(max_size=80)),
    path=st.text(max_size=120),
)
def test_extractors_never_crash_and_only_return_valid_tenants(
    tenant_header: str | None,
    authorization: str | None,
    jwt_payload: bytes | None,
    host: str | None,
    path: str,
) -> None:
    headers: dict[str, str] = {}
    if tenant_header is not None:
        headers["X-Tenant-Id"] = tenant_header
    if authorization is not None:
        headers["Authorization"] = authorization
    if jwt_payload is not None:
        headers["Authorization"] = f"Bearer {jwt_like(jwt_payload)}"
    try:
        tenant, source = IDENTIFIER.identify(headers, host, "/" + path)
    except (TenantMismatch, InvalidToken):
        return  # refused (400 / 401): never routed, which is the point
    if tenant is None:
        assert source == "none"
    else:
        assert IDENTIFIER.is_valid(tenant)
        assert source in ("header", "jwt", "host", "path")


@PROPERTY_SETTINGS
@given(claim=st.one_of(st.text(max_size=40), st.integers(), st.none(), st.lists(st.text())))
def test_jwt_claims_of_any_type_never_crash(claim: Any) -> None:
    token = jwt_like(json.dumps({"iss": claim}).encode())
    for headers, path in (({"Authorization": f"JWT {token}"}, "/"), ({}, f"/x?jwt={token}")):
        tenant, _ = IDENTIFIER.identify(headers, None, path)
        assert tenant is None or (tenant == claim and IDENTIFIER.is_valid(tenant))


# ---- header rules --------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(headers=headers_lists)
def test_request_head_strips_hop_by_hop_and_routing_fields(headers: list[tuple[str, str]]) -> None:
    head = request_head(headers)
    out = parse_head(head)
    names = [name.lower() for name, _ in out]
    named_by_connection = {
        token.strip().lower().encode("latin-1")
        for name, value in headers
        if name.lower() == "connection"
        for token in value.split(",")
        if token.strip()
    }
    for name in names:
        assert name not in HOP_BY_HOP
        assert name not in (b"x-router-target", b"x-router-signature")
        assert name not in named_by_connection or name in ROUTER_SET
        assert b"_" not in name or name.replace(b"_", b"-") not in (
            b"x-tenant-id", b"x-forwarded-for", b"x-request-id", b"host"
        )  # fmt: skip
    # The router's own fields, once each.
    for own in (b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-request-id"):
        assert names.count(own) == 1


@PROPERTY_SETTINGS
@given(headers=headers_lists)
def test_request_header_stripping_is_idempotent(headers: list[tuple[str, str]]) -> None:
    def client_fields(head: bytes) -> list[tuple[bytes, bytes]]:
        return [(n, v) for n, v in parse_head(head) if n.lower() not in ROUTER_SET]

    once = client_fields(request_head(headers))
    # request_head() encodes str values as UTF-8 into the raw fields: decode the same way.
    again = client_fields(request_head([(n.decode(), v.decode()) for n, v in once]))
    assert again == once


@PROPERTY_SETTINGS
@given(headers=headers_lists, status=st.sampled_from([200, 204, 206, 301, 304, 404, 500, 599]))
def test_response_head_strips_hop_by_hop_and_keeps_one_framing(
    headers: list[tuple[str, str]], status: int
) -> None:
    raw = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers]
    upstream = UpstreamResponse(
        status, raw, 10, False, True, any(n.lower() == b"connection" for n, _ in raw)
    )
    head, _framing, _keep_alive = encode_response_head(upstream, "req-1", None, False, 1, True)
    out = parse_head(head + (b"x" * 10 if status not in (204, 304) else b""), response=True)
    names = [name.lower() for name, _ in out]
    for name in names:
        assert name not in HOP_BY_HOP or name == b"connection"
    assert names.count(b"x-request-id") == 1
    assert names.count(b"content-length") <= 1


# ---- signatures ----------------------------------------------------------------------------

SECRET = "property-secret"
VERIFIER = OverrideVerifier(SECRET, 300.0)


@PROPERTY_SETTINGS
@given(target=st.one_of(st.none(), st.text(max_size=20)), signature=st.one_of(st.none(),
       st.text(max_size=200)), tenant=st.one_of(st.none(), st.text(max_size=60)))  # fmt: skip
def test_signature_check_never_raises(
    target: str | None, signature: str | None, tenant: str | None
) -> None:
    result = VERIFIER.verify(target, signature, tenant)
    assert result in (None, "legacy", "new")


@PROPERTY_SETTINGS
@given(
    tenant=st.text(alphabet=string.ascii_lowercase + string.digits + "-", min_size=1, max_size=30),
    target=st.sampled_from(["legacy", "new"]),
    position=st.integers(min_value=0),
    replacement=st.characters(min_codepoint=0x21, max_codepoint=0x7E),
)
def test_any_change_to_a_valid_signature_is_refused(
    tenant: str, target: str, position: int, replacement: str
) -> None:
    headers = signed_headers(SECRET, target, tenant, now=time.time())
    signature = headers["X-Router-Signature"]
    assert VERIFIER.verify(target, signature, tenant) == target
    index = position % len(signature)
    if signature[index] == replacement:
        return
    tampered = signature[:index] + replacement + signature[index + 1 :]
    assert VERIFIER.verify(target, tampered, tenant) is None
