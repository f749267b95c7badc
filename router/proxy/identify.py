"""Phase 1, identify: which tenant is this request for?

Extractors run in the configured order and the first one that yields a *valid* tenant id
wins. Everything is compiled in `TenantIdentifier.__init__`; `identify` runs on every
request, so it does no regex compilation and builds no tables.

A value that fails router.domain's tenant-id rule (1 to `tenant.max_length` characters of
`A-Za-z0-9._:@-`) counts as "not found here" and the next extractor is tried: a hostile id
never reaches the flag evaluator, the decision cache or the logs.

JWTs are decoded for routing only; their signatures are NOT verified here (the backend
does that). A forged token can therefore pick a backend, but not get past it.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Mapping
from typing import Final
from urllib.parse import unquote

from router.domain import is_tenant_id
from router.settings import (
    HeaderExtractor,
    HostExtractor,
    JwtExtractor,
    PathExtractor,
    TenantSettings,
)

__all__ = ["TenantIdentifier"]

# (headers, host, raw_path) -> raw tenant candidate, or None. Validation happens once, in
# `identify`, so each extractor only has to find a candidate.
_Extract = Callable[[Mapping[str, str], str | None, str], str | None]

# Larger than any real Connect/OIDC token; caps the work a client can make us do.
_MAX_TOKEN = 8 * 1024

# header.payload.signature, base64url (RFC 7515 compact form: no padding, but some
# encoders add it, so up to two `=` are tolerated and the capture leaves them out).
# Checking the alphabet here matters: base64's decoder silently skips characters outside
# it. The signature may be empty (alg "none"): we never verify it anyway.
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.([A-Za-z0-9_-]+)={0,2}\.[A-Za-z0-9_-]*")
_JWT_SCHEMES = frozenset({"jwt", "bearer"})


def _header(spec: HeaderExtractor) -> _Extract:
    name = spec.name

    def extract(headers: Mapping[str, str], host: str | None, raw_path: str) -> str | None:
        # A CIMultiDict lookup: case-insensitive, but X_Tenant_Id stays a different header
        # (underscore aliases are a classic header-smuggling vector behind other proxies).
        value = headers.get(name)
        return value.strip() if value is not None else None

    return extract


def _claim_from_token(token: str, claim: str) -> str | None:
    if len(token) > _MAX_TOKEN:
        return None
    shape = _JWT_SHAPE.fullmatch(token)
    if shape is None:
        return None  # opaque bearer token, or garbage
    payload = shape.group(1)
    try:
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, RecursionError):
        # ValueError covers binascii.Error, UnicodeDecodeError and JSONDecodeError;
        # RecursionError a payload of thousands of nested brackets.
        return None
    if not isinstance(data, dict):
        return None
    value = data.get(claim)
    return value if isinstance(value, str) else None


def _query_value(raw_path: str, param: str) -> str | None:
    """First value of `param` in raw_path's query string, percent-decoded."""
    _, sep, query = raw_path.partition("?")
    if not sep:
        return None
    prefix = param + "="
    for pair in query.split("&"):
        if pair.startswith(prefix):
            # JWTs are base64url plus dots, so they need no decoding; a client that encodes
            # them anyway is still understood.
            value = pair[len(prefix) :]
            return unquote(value) if "%" in value else value
    return None


def _jwt(spec: JwtExtractor) -> _Extract:
    claim = spec.claim
    param = spec.query_param
    # Cheap substring test before splitting the query: most requests carry no jwt param.
    needle = param + "="

    def extract(headers: Mapping[str, str], host: str | None, raw_path: str) -> str | None:
        auth = headers.get("Authorization")
        if auth is not None:
            scheme, _, token = auth.strip().partition(" ")
            if scheme.lower() in _JWT_SCHEMES:
                found = _claim_from_token(token.strip(), claim)
                if found is not None:
                    return found
        # Connect iframe and redirect requests carry the token in the query instead; also
        # the fallback when the Authorization header holds an opaque token.
        if needle in raw_path:
            token_q = _query_value(raw_path, param)
            if token_q is not None:
                return _claim_from_token(token_q, claim)
        return None

    return extract


def _host(spec: HostExtractor) -> _Extract:
    before, _, after = spec.pattern.partition("{tenant}")
    # One DNS label (no dot, no colon so a port never leaks into the tenant), an optional
    # trailing root dot (`acme.example.com.` is the same name) and an optional port.
    regex = re.compile(
        rf"{re.escape(before)}([^.:]+){re.escape(after)}\.?(?::[0-9]*)?",
        re.IGNORECASE,
    )

    def extract(headers: Mapping[str, str], host: str | None, raw_path: str) -> str | None:
        if not host:
            return None
        match = regex.fullmatch(host)
        # Host names are case-insensitive: ACME.example.com and acme.example.com must be
        # the same tenant, or a flag flip would miss half of its traffic.
        return match.group(1).lower() if match else None

    return extract


def _path(spec: PathExtractor) -> _Extract:
    before, _, after = spec.pattern.partition("{tenant}")
    # `/t/{tenant}/` must also match `/t/acme` and `/t/acme?x=1`: drop the trailing slash
    # from the pattern and require the match to end at a segment boundary instead, so that
    # `/t/acme` never matches `/t/acmecorp`'s prefix by accident.
    after = after.rstrip("/")
    regex = re.compile(rf"{re.escape(before)}([^/?]+){re.escape(after)}(?=[/?]|\Z)")

    def extract(headers: Mapping[str, str], host: str | None, raw_path: str) -> str | None:
        match = regex.match(raw_path)
        return match.group(1) if match else None

    return extract


def _build(spec: HeaderExtractor | JwtExtractor | HostExtractor | PathExtractor) -> _Extract:
    if isinstance(spec, HeaderExtractor):
        return _header(spec)
    if isinstance(spec, JwtExtractor):
        return _jwt(spec)
    if isinstance(spec, HostExtractor):
        return _host(spec)
    return _path(spec)


# Tenant ids seen valid, so the pattern runs once per id rather than once per request;
# cleared when full, so ids a client makes up cannot grow it without bound.
_KNOWN_VALID_MAX: Final = 65536


class TenantIdentifier:
    __slots__ = ("_extractors", "_known_valid", "_max_length")

    def __init__(self, settings: TenantSettings) -> None:
        # The source label is the settings' own discriminator ("header", "jwt", ...).
        self._extractors: tuple[tuple[str, _Extract], ...] = tuple(
            (spec.type, _build(spec)) for spec in settings.extractors
        )
        self._max_length = settings.max_length
        self._known_valid: set[str] = set()

    def is_valid(self, tenant: str) -> bool:
        """router.domain's tenant-id rule with the configured `tenant.max_length`: what every
        identified tenant id passes (the admin API checks ids in its paths with it too)."""
        return is_tenant_id(tenant, self._max_length)

    def identify(
        self, headers: Mapping[str, str], host: str | None, raw_path: str
    ) -> tuple[str | None, str]:
        """Return (tenant, source). source is the extractor type that matched ("header",
        "jwt", "host", "path"), or "none" when no tenant was found (tenant is then None)."""
        known = self._known_valid
        for source, extract in self._extractors:
            tenant = extract(headers, host, raw_path)
            if tenant is None:
                continue
            if tenant in known:
                return tenant, source
            if self.is_valid(tenant):
                if len(known) >= _KNOWN_VALID_MAX:
                    known.clear()
                known.add(tenant)
                return tenant, source
        return None, "none"
