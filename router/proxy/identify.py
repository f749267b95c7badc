"""Phase 1, identify: which tenant is this request for? (docs/design.md, "Identity")

Every extractor runs (the common case is one or two, each a dict lookup or a regex), and
every one that yields a *valid* tenant id must agree: two sources naming different tenants
are a client trying to choose its tenant (a valid token for acme plus `X-Tenant-Id:
globex`), so the request is refused (TenantMismatch, 400) and never forwarded. When they
agree, the most trusted source names the request's source; if even that one is below
`tenant.min_trust` (a header any client can write, while production wants a credential),
the request counts as carrying no tenant: default side, pinned paths.
Everything is compiled in `TenantIdentifier.__init__`; `identify` runs on every request,
so it does no regex compilation and builds no tables.

A value that fails router.domain's tenant-id rule (1 to `tenant.max_length` characters of
`A-Za-z0-9._:@-`) counts as "not found here" and the next extractor is tried: a hostile id
never reaches the flag evaluator, the decision cache or the logs.

JWTs: without `verify` a token is decoded for routing only (the backend verifies it): a
forged token can pick a backend only if no other source contradicts it, and never gets
past the backend. A token with alg `none` is refused (InvalidToken, 401) in both modes.
With `verify`, the signature (keys from a JWKS URL, control/jwks.py), alg allow-list,
exp/nbf (with leeway), iss and aud are checked with PyJWT; a bad token is refused (401).
Either way a token is read once: its result is cached by the token string until it
expires (bounded, oldest first), so the hot path pays for a signature once per token.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable, Mapping
from typing import Final
from urllib.parse import unquote

import jwt

from router.control.jwks import JwksKeys
from router.domain import is_tenant_id
from router.errors import InvalidToken, NotReady, TenantMismatch
from router.settings import (
    TRUST_RANK,
    HeaderExtractor,
    HostExtractor,
    JwtExtractor,
    JwtVerifySettings,
    PathExtractor,
    TenantSettings,
)

__all__ = ["TenantIdentifier", "TokenReader", "UnknownKey"]


class UnknownKey(Exception):
    """A verified token names a `kid` its key set lacks: the handler refetches the keys
    (rate-limited, control/jwks.py) and identifies once more; still unknown: 401."""

    def __init__(self, keys: JwksKeys, kid: str) -> None:
        super().__init__(kid)
        self.keys = keys
        self.kid = kid


# (headers, host, raw_path) -> raw tenant candidate, or None. Validation happens once, in
# `identify`, so each extractor only has to find a candidate.
_Extract = Callable[[Mapping[str, str], str | None, str], str | None]

# Larger than any real Connect/OIDC token; caps the work a client can make us do.
_MAX_TOKEN = 8 * 1024

# header.payload.signature, base64url (RFC 7515 compact form: no padding, but some
# encoders add it, so up to two `=` are tolerated and the capture leaves them out).
# Checking the alphabet here matters: base64's decoder silently skips characters outside
# it. The signature may be empty (alg "none"): such a token is then refused by its alg.
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


def _b64json(segment: str) -> object:
    try:
        return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, RecursionError):
        # ValueError covers binascii.Error, UnicodeDecodeError and JSONDecodeError;
        # RecursionError a payload of thousands of nested brackets.
        return None


def _is_alg_none(header: object) -> bool:
    """alg `none` (any case), or no usable alg at all: an unsigned token, never routed."""
    if not isinstance(header, dict):
        return True
    alg = header.get("alg")
    return not isinstance(alg, str) or alg.lower() == "none"


class _Cached:
    """A token already read: its claim, when it stops being valid, the key it was checked
    with (None: decode-only) so that a key removed from the JWKS ends its tokens too."""

    __slots__ = ("expires", "jwk", "kid", "value")

    def __init__(self, value: str | None, expires: float, kid: str, jwk: jwt.PyJWK | None) -> None:
        self.value = value
        self.expires = expires
        self.kid = kid
        self.jwk = jwk


_FOREVER: Final = float("inf")


class TokenReader:
    """A jwt extractor's tokens -> their claim: decoded, or verified when `verify` is set."""

    __slots__ = (
        "_algorithms", "_audience", "_cache", "_cache_size", "_claim", "_issuer", "_keys",
        "_leeway",
    )  # fmt: skip

    def __init__(
        self,
        claim: str,
        verify: JwtVerifySettings | None,
        keys: JwksKeys | None,
        cache_size: int,
    ) -> None:
        self._claim = claim
        self._keys = keys if verify is not None else None
        self._algorithms: frozenset[str] = frozenset(verify.algorithms if verify else ())
        self._issuer = verify.issuer if verify else None
        self._audience = verify.audience if verify else None
        self._leeway = verify.leeway if verify else 0.0
        self._cache: dict[str, _Cached] = {}
        self._cache_size = cache_size

    def claim(self, token: str) -> str | None:
        """The token's claim (None: not a JWT, or no such string claim). InvalidToken for
        alg none or a failed verification; UnknownKey / NotReady while keys are missing."""
        cached = self._cache.get(token)
        if cached is not None:
            keys = self._keys
            if time.time() < cached.expires and (
                keys is None or keys.keys.get(cached.kid) is cached.jwk
            ):
                return cached.value
            del self._cache[token]
        if len(token) > _MAX_TOKEN:
            return None
        shape = _JWT_SHAPE.fullmatch(token)
        if shape is None:
            return None  # opaque bearer token, or garbage
        header = _b64json(token[: token.index(".")])
        if _is_alg_none(header):
            raise InvalidToken("unsigned token (alg none)")
        if self._keys is None:
            payload = _b64json(shape.group(1))
            value = payload.get(self._claim) if isinstance(payload, dict) else None
            found = value if isinstance(value, str) else None
            self._remember(token, _Cached(found, _FOREVER, "", None))
            return found
        assert isinstance(header, dict)  # _is_alg_none said so
        return self._verify(token, header, self._keys)

    def _verify(self, token: str, header: dict[str, object], keys: JwksKeys) -> str | None:
        alg = header.get("alg")
        if alg not in self._algorithms:
            raise InvalidToken(f"alg {alg!r} not allowed")
        assert isinstance(alg, str)
        if not keys.loaded:
            raise NotReady("no JWKS keys yet")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise InvalidToken("token without a kid")
        jwk = keys.keys.get(kid)
        if jwk is None:
            raise UnknownKey(keys, kid)
        # The key decides the algorithm, not the token: an RSA public key is never an
        # HMAC secret, whatever the token's header says (alg confusion).
        if jwk.algorithm_name != alg:
            raise InvalidToken(f"alg {alg} does not match key {kid}")
        try:
            claims = jwt.decode(
                token,
                jwk.key,
                algorithms=[alg],
                issuer=self._issuer,
                audience=self._audience,
                leeway=self._leeway,
                options={"require": ["exp"], "verify_aud": self._audience is not None},
            )
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"token rejected: {exc}") from None
        value = claims.get(self._claim)
        found = value if isinstance(value, str) else None
        exp = claims["exp"]
        self._remember(token, _Cached(found, float(exp) + self._leeway, kid, jwk))
        return found

    def _remember(self, token: str, entry: _Cached) -> None:
        cache = self._cache
        if self._cache_size <= 0:
            return
        if len(cache) >= self._cache_size:
            del cache[next(iter(cache))]  # oldest first (dicts keep insertion order)
        cache[token] = entry


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


def _jwt(spec: JwtExtractor, reader: TokenReader) -> _Extract:
    param = spec.query_param
    # Cheap substring test before splitting the query: most requests carry no jwt param.
    needle = param + "="

    def extract(headers: Mapping[str, str], host: str | None, raw_path: str) -> str | None:
        auth = headers.get("Authorization")
        if auth is not None:
            scheme, _, token = auth.strip().partition(" ")
            if scheme.lower() in _JWT_SCHEMES:
                found = reader.claim(token.strip())
                if found is not None:
                    return found
        # Connect iframe and redirect requests carry the token in the query instead; also
        # the fallback when the Authorization header holds an opaque token.
        if needle in raw_path:
            token_q = _query_value(raw_path, param)
            if token_q is not None:
                return reader.claim(token_q)
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


def _build(
    spec: HeaderExtractor | JwtExtractor | HostExtractor | PathExtractor,
    keys: Mapping[str, JwksKeys],
    cache_size: int,
) -> _Extract:
    if isinstance(spec, HeaderExtractor):
        return _header(spec)
    if isinstance(spec, JwtExtractor):
        verify = spec.verify
        reader = TokenReader(
            spec.claim, verify, keys[verify.jwks_url] if verify else None, cache_size
        )
        return _jwt(spec, reader)
    if isinstance(spec, HostExtractor):
        return _host(spec)
    return _path(spec)


def key_sets(settings: TenantSettings) -> dict[str, JwksKeys]:
    """One JwksKeys per distinct jwks_url of the verifying jwt extractors (the composition
    root starts and closes them; readiness waits for them)."""
    found: dict[str, JwksKeys] = {}
    for spec in settings.extractors:
        if isinstance(spec, JwtExtractor) and spec.verify is not None:
            found.setdefault(spec.verify.jwks_url, JwksKeys(spec.verify))
    return found


class _Source:
    """One extractor, compiled: what it is called (the metric label), how far it is
    trusted (TRUST_RANK), and how it finds a candidate."""

    __slots__ = ("extract", "label", "rank")

    def __init__(self, label: str, rank: int, extract: _Extract) -> None:
        self.label = label
        self.rank = rank
        self.extract = extract


# Tenant ids seen valid, so the pattern runs once per id rather than once per request;
# cleared when full, so ids a client makes up cannot grow it without bound.
_KNOWN_VALID_MAX: Final = 65536


class TenantIdentifier:
    __slots__ = ("_known_valid", "_max_length", "_min_rank", "_sources", "routing_fields")

    def __init__(
        self, settings: TenantSettings, keys: Mapping[str, JwksKeys] | None = None
    ) -> None:
        keys = keys if keys is not None else key_sets(settings)
        cache_size = settings.token_cache_size
        # The source label is the settings' own discriminator ("header", "jwt", ...).
        self._sources: tuple[_Source, ...] = tuple(
            _Source(spec.type, TRUST_RANK[spec.trust], _build(spec, keys, cache_size))
            for spec in settings.extractors
        )
        self._min_rank = TRUST_RANK[settings.min_trust]
        self._max_length = settings.max_length
        self._known_valid: set[str] = set()
        # Field names (lower-case bytes) that carry identity: one named in the request's
        # Connection header is hop-by-hop, so the request is refused (handler.py).
        names = {
            spec.name.lower().encode("ascii")
            for spec in settings.extractors
            if isinstance(spec, HeaderExtractor)
        }
        if any(isinstance(spec, JwtExtractor) for spec in settings.extractors):
            names.add(b"authorization")
        self.routing_fields: frozenset[bytes] = frozenset(names)

    def is_valid(self, tenant: str) -> bool:
        """router.domain's tenant-id rule with the configured `tenant.max_length`: what every
        identified tenant id passes (the admin API checks ids in its paths with it too)."""
        return is_tenant_id(tenant, self._max_length)

    def identify(
        self, headers: Mapping[str, str], host: str | None, raw_path: str
    ) -> tuple[str | None, str]:
        """Return (tenant, source). source is the most trusted extractor type that found
        the tenant ("header", "jwt", "host", "path"), or "none" when no tenant was found or
        only sources below tenant.min_trust found one (tenant is then None).

        TenantMismatch when two sources found different valid tenants; InvalidToken,
        UnknownKey or NotReady from a jwt source (TokenReader.claim)."""
        known = self._known_valid
        tenant: str | None = None
        source = "none"
        rank = -1
        for candidate in self._sources:
            value = candidate.extract(headers, host, raw_path)
            if value is None:
                continue
            if value not in known:
                if not self.is_valid(value):
                    continue  # a hostile id counts as "not found here"
                if len(known) >= _KNOWN_VALID_MAX:
                    known.clear()
                known.add(value)
            if tenant is None:
                tenant, source, rank = value, candidate.label, candidate.rank
            elif value != tenant:
                first, second = sorted((source, candidate.label))
                raise TenantMismatch(first + "+" + second)
            elif candidate.rank > rank:
                source, rank = candidate.label, candidate.rank
        if rank < self._min_rank:
            return None, "none"
        return tenant, source
