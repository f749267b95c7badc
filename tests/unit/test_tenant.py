"""Phase 1 (identify): each extractor, their order, and hostile input."""

from __future__ import annotations

import base64
import json
import random
from typing import Any

import pytest
from multidict import CIMultiDict

from router.errors import InvalidToken, TenantMismatch
from router.proxy.identify import TenantIdentifier
from router.settings import TRUST_RANK, TenantSettings


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_jwt(payload: Any, *, header: Any = None, signature: str = "c2ln") -> str:
    head = header if header is not None else {"alg": "HS256", "typ": "JWT"}
    return ".".join(
        [b64url(json.dumps(head).encode()), b64url(json.dumps(payload).encode()), signature]
    )


def identifier(*extractors: dict[str, Any], max_length: int = 128) -> TenantIdentifier:
    settings = TenantSettings.model_validate(
        {"extractors": list(extractors), "max_length": max_length}
    )
    return TenantIdentifier(settings)


def hdrs(**kwargs: str) -> CIMultiDict[str]:
    return CIMultiDict((k.replace("_", "-"), v) for k, v in kwargs.items())


HEADER = {"type": "header"}
JWT = {"type": "jwt"}
HOST = {"type": "host", "pattern": "{tenant}.example.com"}
PATH = {"type": "path", "pattern": "/t/{tenant}/"}
ALL = (HEADER, JWT, HOST, PATH)

NO_TENANT = (None, "none")


# --- header -----------------------------------------------------------------------------


def test_header_alone() -> None:
    ident = identifier(HEADER)
    assert ident.identify(hdrs(X_Tenant_Id="acme"), None, "/") == ("acme", "header")


def test_header_name_is_case_insensitive_and_value_stripped() -> None:
    ident = identifier(HEADER)
    headers = CIMultiDict({"x-TENANT-id": "  acme-1 \t"})
    assert ident.identify(headers, None, "/") == ("acme-1", "header")


def test_header_underscore_variant_is_a_different_header() -> None:
    ident = identifier(HEADER)
    headers = CIMultiDict({"X_Tenant_Id": "acme"})
    assert ident.identify(headers, None, "/") == NO_TENANT


def test_header_missing_or_blank() -> None:
    ident = identifier(HEADER)
    assert ident.identify(CIMultiDict(), None, "/") == NO_TENANT
    assert ident.identify(CIMultiDict({"X-Tenant-Id": "   "}), None, "/") == NO_TENANT


def test_custom_header_name() -> None:
    ident = identifier({"type": "header", "name": "X-Customer"})
    assert ident.identify(CIMultiDict({"x-customer": "globex"}), None, "/") == (
        "globex",
        "header",
    )
    # The default name no longer counts.
    assert ident.identify(hdrs(X_Tenant_Id="acme"), None, "/") == NO_TENANT


def test_plain_dict_headers_work_too() -> None:
    # The interface is a Mapping; a plain dict (exact-case keys) must not break it.
    ident = identifier(HEADER)
    assert ident.identify({"X-Tenant-Id": "acme"}, None, "/") == ("acme", "header")


# --- jwt --------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["JWT", "Bearer", "jwt", "bearer", "BEARER", "Jwt"])
def test_jwt_from_authorization_header(scheme: str) -> None:
    ident = identifier(JWT)
    token = make_jwt({"iss": "jira:1234-abcd", "sub": "user"})
    headers = CIMultiDict({"authorization": f"{scheme} {token}"})
    assert ident.identify(headers, None, "/rest/api") == ("jira:1234-abcd", "jwt")


def test_jwt_from_query_parameter() -> None:
    ident = identifier(JWT)
    token = make_jwt({"iss": "acme"})
    assert ident.identify(CIMultiDict(), None, f"/page?a=1&jwt={token}&b=2") == ("acme", "jwt")
    assert ident.identify(CIMultiDict(), None, f"/page?jwt={token}") == ("acme", "jwt")


def test_jwt_query_parameter_percent_encoded() -> None:
    ident = identifier(JWT)
    token = make_jwt({"iss": "acme"}).replace(".", "%2E")
    assert ident.identify(CIMultiDict(), None, f"/page?jwt={token}") == ("acme", "jwt")


def test_jwt_query_parameter_name_must_match_exactly() -> None:
    ident = identifier(JWT)
    token = make_jwt({"iss": "acme"})
    assert ident.identify(CIMultiDict(), None, f"/page?xjwt={token}") == NO_TENANT
    other = make_jwt({"iss": "other"})
    assert ident.identify(CIMultiDict(), None, f"/p?ajwt={other}&jwt={token}") == ("acme", "jwt")
    # In the path, not the query: not a parameter.
    assert ident.identify(CIMultiDict(), None, f"/jwt={token}") == NO_TENANT


def test_jwt_custom_query_param_and_claim() -> None:
    ident = identifier({"type": "jwt", "claim": "tenant", "query_param": "token"})
    token = make_jwt({"iss": "not-me", "tenant": "globex"})
    assert ident.identify(CIMultiDict(), None, f"/x?token={token}") == ("globex", "jwt")
    assert ident.identify(CIMultiDict(), None, f"/x?jwt={token}") == NO_TENANT
    headers = CIMultiDict({"Authorization": f"Bearer {token}"})
    assert ident.identify(headers, None, "/") == ("globex", "jwt")


def test_jwt_header_wins_over_query() -> None:
    ident = identifier(JWT)
    headers = CIMultiDict({"Authorization": f"JWT {make_jwt({'iss': 'from-header'})}"})
    raw_path = f"/x?jwt={make_jwt({'iss': 'from-query'})}"
    assert ident.identify(headers, None, raw_path) == ("from-header", "jwt")


def test_jwt_opaque_bearer_falls_back_to_query() -> None:
    ident = identifier(JWT)
    headers = CIMultiDict({"Authorization": "Bearer 2YotnFZFEjr1zCsicMWpAA"})
    assert ident.identify(headers, None, "/") == NO_TENANT
    raw_path = f"/x?jwt={make_jwt({'iss': 'acme'})}"
    assert ident.identify(headers, None, raw_path) == ("acme", "jwt")


def test_jwt_other_schemes_ignored() -> None:
    ident = identifier(JWT)
    token = make_jwt({"iss": "acme"})
    for auth in (f"Basic {token}", f"Token {token}", token, f"Bearer{token}"):
        assert ident.identify(CIMultiDict({"Authorization": auth}), None, "/") == NO_TENANT


def test_jwt_padding_optional_and_empty_signature() -> None:
    ident = identifier(JWT)
    payload = base64.urlsafe_b64encode(json.dumps({"iss": "acme1"}).encode()).decode()
    assert payload.endswith("=")  # make sure the padded case is really exercised
    head = b64url(b'{"alg":"HS256"}')
    bare = payload.rstrip("=")
    for token in (f"{head}.{bare}.sig", f"{head}.{bare}.", f"{head}.{payload}.sig"):
        headers = CIMultiDict({"Authorization": f"JWT {token}"})
        assert ident.identify(headers, None, "/") == ("acme1", "jwt")


@pytest.mark.parametrize(
    "header", [b'{"alg":"none"}', b'{"alg":"NoNe"}', b"{}", b'{"alg":1}', b"[]", b"not json"]
)
def test_an_unsigned_token_is_refused_even_decode_only(header: bytes) -> None:
    ident = identifier(JWT)
    token = f"{b64url(header)}.{b64url(json.dumps({'iss': 'acme'}).encode())}.sig"
    for headers, path in (
        (CIMultiDict({"Authorization": f"Bearer {token}"}), "/"),
        (CIMultiDict(), f"/?jwt={token}"),
    ):
        with pytest.raises(InvalidToken):
            ident.identify(headers, None, path)


RAW_HEAD = b64url(b'{"alg":"HS256"}')


def _raw(payload: bytes) -> str:
    """A token whose payload segment is exactly these bytes (not necessarily JSON)."""
    return f"{RAW_HEAD}.{b64url(payload)}.sig"


def _malformed_tokens() -> list[str]:
    good = _raw(b'{"iss": "acme"}')
    head, payload, _ = good.split(".")
    return [
        "",
        ".",
        "..",
        "a.b",
        "a.b.c.d",
        good + ".extra",
        f"{head}.!!!!.sig",
        f"{head}.{payload}x.sig",  # length 4n+1: not decodable base64
        f"{head}.{payload}===.sig",  # more padding than base64 ever has
        f"{head}.=={payload}.sig",  # padding in front
        f"{head}..sig",  # empty payload
        f".{payload}.sig",  # empty header
        f"{head}.{payload}.s+g",  # not base64url
        f"{head} .{payload}.sig",
        _raw(b"not json"),
        _raw(b'{"iss": "acme"'),  # truncated JSON
        _raw(b"\xff\xfe\x00garbage"),  # not UTF-8
        _raw(b"[" * 6000),  # deep nesting
        _raw(b'{"iss": 1' + b"0" * 5000 + b"}"),  # integer beyond int max str digits
        _raw(b'{"iss": "\\ud800"}'),  # lone surrogate: a str, but not a valid tenant
        make_jwt(["iss", "acme"]),  # not an object
        make_jwt("acme"),
        make_jwt(None),
        make_jwt(42),
        make_jwt({}),  # claim missing
        make_jwt({"sub": "acme"}),
        make_jwt({"iss": 42}),  # claim not a string
        make_jwt({"iss": None}),
        make_jwt({"iss": ["acme"]}),
        make_jwt({"iss": {"id": "acme"}}),
        make_jwt({"iss": True}),
        make_jwt({"iss": ""}),  # empty: invalid tenant
        make_jwt({"iss": "a b"}),
        make_jwt({"iss": "acme/../../etc"}),
        make_jwt({"iss": "acme\r\nX-Injected: 1"}),
        make_jwt({"iss": "\u00e1cme"}),
        make_jwt({"iss": "acme", "pad": "x" * 9000}),  # token over 8 KiB
        "\x00\x01\x02",
        "\U0001f600.\U0001f600.\U0001f600",
    ]


@pytest.mark.parametrize("token", _malformed_tokens())
def test_jwt_malformed_tokens_yield_no_tenant(token: str) -> None:
    ident = identifier(JWT)
    for scheme in ("JWT", "Bearer"):
        headers = CIMultiDict({"Authorization": f"{scheme} {token}"})
        assert ident.identify(headers, None, "/") == NO_TENANT
    assert ident.identify(CIMultiDict(), None, f"/x?jwt={token}") == NO_TENANT


def test_jwt_just_under_size_limit_is_accepted() -> None:
    # Guards the size test above: it must fail because of the size, not something else.
    ident = identifier(JWT)
    token = make_jwt({"iss": "acme", "pad": "x" * 5000})
    assert len(token) <= 8 * 1024
    headers = CIMultiDict({"Authorization": f"JWT {token}"})
    assert ident.identify(headers, None, "/") == ("acme", "jwt")


def test_random_bytes_never_raise() -> None:
    ident = identifier(*ALL)
    rng = random.Random(20240601)
    good_head = b64url(b'{"alg":"HS256"}')
    for i in range(400):
        blob = rng.randbytes(rng.randrange(0, 300))
        text = blob.decode("latin-1")
        # Alternate: raw garbage everywhere, and garbage inside a JWT-shaped token so the
        # base64/JSON decoding stages get exercised too.
        token = text if i % 2 else f"{good_head}.{b64url(blob)}.sig"
        headers = CIMultiDict({"Authorization": f"Bearer {token}", "X-Tenant-Id": text})
        tenant, source = ident.identify(headers, text, f"/{text}?jwt={token}")
        # Whatever came out must be a valid tenant from a real extractor, or nothing.
        if tenant is None:
            assert source == "none"
        else:
            assert source in ("header", "jwt", "host", "path")
            assert 0 < len(tenant) <= 128
            assert all(c.isascii() and (c.isalnum() or c in "._:@-") for c in tenant)


def test_random_json_payloads_never_raise() -> None:
    ident = identifier(JWT)
    rng = random.Random(7)
    alphabet = '{}[]":,0123456789.eE+-truefalsnl iss\\u'
    hits = 0
    for _ in range(300):
        body = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 60)))
        for payload in (body, '{"iss": "acme", "x": ' + body + "}"):
            token = f"{RAW_HEAD}.{b64url(payload.encode())}.sig"
            result = ident.identify(CIMultiDict({"Authorization": f"JWT {token}"}), None, "/")
            assert result in (NO_TENANT, ("acme", "jwt"))
            hits += result != NO_TENANT
    assert hits < 600  # most of these are broken JSON: the test really hit the error paths


# --- host -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("acme.example.com", "acme"),
        ("acme.example.com:8443", "acme"),
        ("ACME.Example.COM", "acme"),
        ("Acme-1.EXAMPLE.com:80", "acme-1"),
        ("acme.example.com.", "acme"),  # fully qualified, trailing root dot
    ],
)
def test_host_matches(host: str, expected: str) -> None:
    ident = identifier(HOST)
    assert ident.identify(CIMultiDict(), host, "/") == (expected, "host")


@pytest.mark.parametrize(
    "host",
    [
        None,
        "",
        "example.com",
        "a.b.example.com",  # one label only
        "acme.example.com.evil.net",  # anchored at the end
        "acme.example.company",
        "acme-example.com",  # the dot is literal, not "any character"
        "acme.example.com:port",
        ".example.com",
        "[::1]:8080",
    ],
)
def test_host_does_not_match(host: str | None) -> None:
    ident = identifier(HOST)
    assert ident.identify(CIMultiDict(), host, "/") == NO_TENANT


def test_host_pattern_with_tenant_last_keeps_port_out() -> None:
    ident = identifier({"type": "host", "pattern": "api.{tenant}"})
    assert ident.identify(CIMultiDict(), "api.acme:8080", "/") == ("acme", "host")


# --- path -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw_path", "expected"),
    [
        ("/t/acme", ("acme", "path")),
        ("/t/acme/", ("acme", "path")),
        ("/t/acme/api/x", ("acme", "path")),
        ("/t/acme?x=1", ("acme", "path")),
        ("/t/Acme.Corp/x", ("Acme.Corp", "path")),  # case kept: paths are case-sensitive
        ("/tx/acme", NO_TENANT),
        ("/t//x", NO_TENANT),
        ("/t/", NO_TENANT),
        ("/t", NO_TENANT),
        ("/", NO_TENANT),
        ("", NO_TENANT),
        ("/api/t/acme", NO_TENANT),  # anchored at the start
        ("/t/ac%2Fme/x", NO_TENANT),  # encoded slash: invalid characters
        ("/t/acme\n", NO_TENANT),
        ("/T/acme", NO_TENANT),
    ],
)
def test_path(raw_path: str, expected: tuple[str | None, str]) -> None:
    ident = identifier(PATH)
    assert ident.identify(CIMultiDict(), None, raw_path) == expected


def test_path_pattern_without_trailing_slash() -> None:
    ident = identifier({"type": "path", "pattern": "/t/{tenant}"})
    assert ident.identify(CIMultiDict(), None, "/t/acme") == ("acme", "path")
    assert ident.identify(CIMultiDict(), None, "/t/acme/x") == ("acme", "path")
    assert ident.identify(CIMultiDict(), None, "/tx/acme") == NO_TENANT


def test_path_pattern_with_literal_after_tenant() -> None:
    ident = identifier({"type": "path", "pattern": "/org/{tenant}/v1/"})
    assert ident.identify(CIMultiDict(), None, "/org/acme/v1/items") == ("acme", "path")
    assert ident.identify(CIMultiDict(), None, "/org/acme/v1") == ("acme", "path")
    assert ident.identify(CIMultiDict(), None, "/org/acme/v10/items") == NO_TENANT
    assert ident.identify(CIMultiDict(), None, "/org/acme/v2/items") == NO_TENANT


def test_path_pattern_regex_characters_are_literal() -> None:
    ident = identifier({"type": "path", "pattern": "/a.b+/{tenant}/"})
    assert ident.identify(CIMultiDict(), None, "/a.b+/acme/x") == ("acme", "path")
    assert ident.identify(CIMultiDict(), None, "/axbb/acme/x") == NO_TENANT


# --- ordering ---------------------------------------------------------------------------


def test_sources_that_agree_name_the_most_trusted_one() -> None:
    for order in ((HEADER, JWT), (JWT, HEADER)):
        ident = identifier(*order)
        headers = CIMultiDict(
            {"X-Tenant-Id": "acme", "Authorization": f"JWT {make_jwt({'iss': 'acme'})}"}
        )
        assert ident.identify(headers, None, "/") == ("acme", "jwt")


@pytest.mark.parametrize("order", [(HEADER, JWT), (JWT, HEADER)])
def test_header_and_jwt_that_disagree_are_a_mismatch_whatever_the_order(
    order: tuple[dict[str, Any], ...],
) -> None:
    ident = identifier(*order)
    headers = CIMultiDict(
        {"X-Tenant-Id": "from-header", "Authorization": f"JWT {make_jwt({'iss': 'from-jwt'})}"}
    )
    with pytest.raises(TenantMismatch) as caught:
        ident.identify(headers, None, "/")
    assert caught.value.sources == "header+jwt"
    assert caught.value.code == "tenant_mismatch" and caught.value.status == 400


def test_every_pair_of_disagreeing_sources_is_a_mismatch() -> None:
    ident = identifier(*ALL)
    jwt_auth = {"Authorization": f"Bearer {make_jwt({'iss': 'j'})}"}
    cases = [
        ({"X-Tenant-Id": "x", **jwt_auth}, None, "/", "header+jwt"),
        ({"X-Tenant-Id": "x"}, "h.example.com", "/", "header+host"),
        ({"X-Tenant-Id": "x"}, None, "/t/p/", "header+path"),
        (jwt_auth, "h.example.com", "/", "host+jwt"),
        (jwt_auth, None, "/t/p/", "jwt+path"),
        ({}, "h.example.com", "/t/p/", "host+path"),
    ]
    for headers, host, path, sources in cases:
        with pytest.raises(TenantMismatch) as caught:
            ident.identify(CIMultiDict(headers), host, path)
        assert caught.value.sources == sources


def test_each_extractor_used_when_the_others_find_nothing() -> None:
    ident = identifier(*ALL)
    jwt_headers = CIMultiDict({"Authorization": f"Bearer {make_jwt({'iss': 'j'})}"})
    assert ident.identify(hdrs(X_Tenant_Id="x"), "other.org", "/x") == ("x", "header")
    assert ident.identify(jwt_headers, "other.org", "/x") == ("j", "jwt")
    assert ident.identify(CIMultiDict(), "h.example.com", "/x") == ("h", "host")
    assert ident.identify(CIMultiDict(), "other.org", "/t/p/x") == ("p", "path")
    assert ident.identify(CIMultiDict(), "other.org", "/x") == NO_TENANT


def test_min_trust_credential_ignores_client_sources_but_still_checks_them() -> None:
    settings = TenantSettings.model_validate(
        {"extractors": [HEADER, JWT, HOST, PATH], "min_trust": "credential"}
    )
    ident = TenantIdentifier(settings)
    token = f"Bearer {make_jwt({'iss': 'acme'})}"
    assert ident.identify(hdrs(X_Tenant_Id="acme"), "acme.example.com", "/t/acme/") == NO_TENANT
    assert ident.identify(CIMultiDict({"Authorization": token}), None, "/") == ("acme", "jwt")
    headers = CIMultiDict({"Authorization": token, "X-Tenant-Id": "acme"})
    assert ident.identify(headers, None, "/t/acme/") == ("acme", "jwt")
    with pytest.raises(TenantMismatch):
        ident.identify(CIMultiDict({"Authorization": token}), None, "/t/globex/")


def test_an_edge_header_decides_under_min_trust_edge() -> None:
    settings = TenantSettings.model_validate(
        {"extractors": [{"type": "header", "trust": "edge"}, PATH], "min_trust": "edge"}
    )
    ident = TenantIdentifier(settings)
    assert ident.identify(hdrs(X_Tenant_Id="acme"), None, "/") == ("acme", "header")
    assert ident.identify(CIMultiDict(), None, "/t/acme/") == NO_TENANT


def test_a_min_trust_no_extractor_reaches_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="min_trust"):
        TenantSettings.model_validate({"extractors": [HEADER, PATH], "min_trust": "edge"})


def test_routing_fields_name_the_tenant_headers_and_authorization() -> None:
    ident = identifier(HEADER, {"type": "header", "name": "X-Edge-Tenant"}, PATH)
    assert ident.routing_fields == frozenset({b"x-tenant-id", b"x-edge-tenant"})
    assert identifier(JWT).routing_fields == frozenset({b"authorization"})


def test_production_config_lets_no_client_value_decide() -> None:
    """config/ecs/router.yaml: a client's X-Tenant-Id alone is no tenant; the JWT is."""
    import yaml

    from tests.support.paths import REPO

    tree = yaml.safe_load((REPO / "config/ecs/router.yaml").read_text())
    settings = TenantSettings.model_validate(tree["tenant"])
    ident = TenantIdentifier(settings)
    assert settings.min_trust in ("edge", "credential")
    for spec in settings.extractors:
        if spec.type in ("host", "path") or (spec.type == "header" and spec.trust == "client"):
            assert TRUST_RANK[spec.trust] < TRUST_RANK[settings.min_trust]
    assert ident.identify(hdrs(X_Tenant_Id="globex"), None, "/") == NO_TENANT
    token = f"JWT {make_jwt({'iss': 'acme'})}"
    assert ident.identify(CIMultiDict({"Authorization": token}), None, "/") == ("acme", "jwt")
    with pytest.raises(TenantMismatch):
        ident.identify(CIMultiDict({"Authorization": token, "X-Tenant-Id": "globex"}), None, "/")


def test_default_settings_are_header_then_jwt() -> None:
    ident = TenantIdentifier(TenantSettings())
    assert ident.identify(hdrs(X_Tenant_Id="acme"), "b.example.com", "/t/c") == (
        "acme",
        "header",
    )
    token = make_jwt({"iss": "jira-key"})
    assert ident.identify(CIMultiDict(), None, f"/?jwt={token}") == ("jira-key", "jwt")
    assert ident.identify(CIMultiDict(), "b.example.com", "/t/c") == NO_TENANT


def test_no_extractors_means_no_tenant() -> None:
    ident = identifier()
    assert ident.identify(hdrs(X_Tenant_Id="acme"), "a.example.com", "/t/a") == NO_TENANT


# --- validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        "a b",
        "acme/x",
        "acme%2F",
        "acme;drop",
        "ácme",
        "acme\x00",
        "<script>",
        "x" * 129,
    ],
)
def test_invalid_header_tenant_counts_as_not_found(bad: str) -> None:
    ident = identifier(HEADER, JWT, PATH)
    headers = CIMultiDict({"X-Tenant-Id": bad})
    assert ident.identify(headers, None, "/t/fallback") == ("fallback", "path")
    headers["Authorization"] = f"JWT {make_jwt({'iss': 'fallback'})}"
    assert ident.identify(headers, None, "/t/fallback") == ("fallback", "jwt")


@pytest.mark.parametrize(
    "good",
    [
        "acme",
        "ACME_corp-1.eu",
        "3fa85f64-5717-4562-b3fc-2c963f66afa6",
        "jira:3fa85f64-5717-4562-b3fc-2c963f66afa6",
        "user@example.com",
        "x" * 128,
        "a",
    ],
)
def test_valid_tenant_characters(good: str) -> None:
    ident = identifier(HEADER)
    assert ident.identify(CIMultiDict({"X-Tenant-Id": good}), None, "/") == (good, "header")


def test_max_length_setting() -> None:
    ident = identifier(HEADER, PATH, max_length=4)
    assert ident.identify(hdrs(X_Tenant_Id="abcd"), None, "/") == ("abcd", "header")
    assert ident.identify(hdrs(X_Tenant_Id="abcde"), None, "/t/ok") == ("ok", "path")
    assert ident.identify(hdrs(X_Tenant_Id="abcde"), None, "/t/abcde") == NO_TENANT


def test_invalid_jwt_claim_falls_through_to_host() -> None:
    ident = identifier(JWT, HOST)
    headers = CIMultiDict({"Authorization": f"JWT {make_jwt({'iss': 'bad tenant'})}"})
    assert ident.identify(headers, "good.example.com", "/") == ("good", "host")


def test_invalid_host_label_falls_through_to_path() -> None:
    ident = identifier(HOST, PATH)
    assert ident.identify(CIMultiDict(), "ac%me.example.com", "/t/acme") == ("acme", "path")
