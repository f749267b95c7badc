"""identify.TokenReader's cache: a token's signature is checked once, until it expires;
the cache is bounded; a key removed from the JWKS ends its cached tokens; failures are
never cached as successes."""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from router.control.jwks import JwksKeys, parse_jwks
from router.errors import InvalidToken
from router.proxy.identify import TokenReader, UnknownKey
from router.settings import JwtVerifySettings

PRIVATE = ec.generate_private_key(ec.SECP256R1())
JWK = {**ECAlgorithm.to_jwk(PRIVATE.public_key(), as_dict=True), "kid": "k1"}
VERIFY = JwtVerifySettings(jwks_url="https://idp.test/jwks.json", leeway=0)


def loaded_keys() -> JwksKeys:
    keys = JwksKeys(VERIFY)
    keys.keys = parse_jwks(json.dumps({"keys": [JWK]}).encode())
    keys.loaded = True
    return keys


def token(tenant: str, exp: float, kid: str = "k1") -> str:
    return jwt.encode({"tenant": tenant, "exp": int(exp)}, PRIVATE, "ES256", headers={"kid": kid})


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = jwt.decode

    def counting(token: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(token)
        return real(token, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    return calls


def test_a_token_is_verified_once_until_it_expires(
    decodes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    reader = TokenReader("tenant", VERIFY, loaded_keys(), cache_size=100)
    now = time.time()
    tok = token("acme", now + 60)
    for _ in range(5):
        assert reader.claim(tok) == "acme"
    assert len(decodes) == 1
    # Past its exp the cached entry is no longer used: the token is checked again (and
    # PyJWT, on its own clock, decides; here the real clock still says valid).
    monkeypatch.setattr(time, "time", lambda: now + 61)
    reader.claim(tok)
    assert len(decodes) == 2


def test_the_cache_is_bounded_oldest_first(decodes: list[str]) -> None:
    reader = TokenReader("tenant", VERIFY, loaded_keys(), cache_size=2)
    exp = time.time() + 60
    a, b, c = (token(t, exp) for t in ("a", "b", "c"))
    for tok in (a, b, c):
        reader.claim(tok)
    assert len(decodes) == 3
    reader.claim(c)
    reader.claim(b)
    assert len(decodes) == 3  # still cached
    reader.claim(a)
    assert len(decodes) == 4  # evicted: verified again


def test_a_removed_key_ends_its_cached_tokens(decodes: list[str]) -> None:
    keys = loaded_keys()
    reader = TokenReader("tenant", VERIFY, keys, cache_size=100)
    tok = token("acme", time.time() + 60)
    assert reader.claim(tok) == "acme"
    keys.keys = {}  # the next JWKS fetch no longer lists k1
    with pytest.raises(UnknownKey):
        reader.claim(tok)


def test_refused_tokens_are_not_cached(decodes: list[str]) -> None:
    reader = TokenReader("tenant", VERIFY, loaded_keys(), cache_size=100)
    expired = token("acme", time.time() - 60)
    for _ in range(3):
        with pytest.raises(InvalidToken):
            reader.claim(expired)
    assert len(decodes) == 3


def test_decode_only_tokens_are_cached_too() -> None:
    reader = TokenReader("iss", None, None, cache_size=100)
    tok = jwt.encode({"iss": "acme"}, "a-backend-secret-the-router-never-sees!", "HS256")
    assert reader.claim(tok) == "acme"
    assert reader.claim(tok) == "acme"
