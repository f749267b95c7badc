"""JWT verification in the router (a jwt extractor with `verify`), against a local HTTPS
JWKS server (aiohttp, trustme certificates) and two recording upstreams: a refused token
reaches no backend (no connection at all), a valid one routes by its claim.

Covered: RS256/ES256/EdDSA tokens route; expired, nbf in the future, wrong iss, wrong aud,
alg none, alg confusion (HS256 signed with the public key as HMAC secret), a token whose
alg is not its key's -> 401 invalid_token; an unknown kid refetches the JWKS (once per
min_refetch_interval) then 401; key rotation (new kid accepted after the refetch, old kid
refused once removed, even though it was cached); not ready before the first fetch.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from tests.conftest import (
    RawHandler,
    RawUpstream,
    RunningRouter,
    StartRouter,
    raw_request,
    recording_upstream,
    router_settings,
    sample,
)
from tests.integration.test_identity import Sides, request

pytestmark = pytest.mark.usefixtures("no_error_logs")

UpstreamFactory = Callable[[RawHandler], Awaitable[RawUpstream]]
ISSUER = "https://idp.test"
AUDIENCE = "tenant-router"


@dataclass
class Pki:
    ca_file: Path
    server_context: ssl.SSLContext


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = trustme.CA()
    ca_file = tmp_path_factory.mktemp("jwks-pki") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    return Pki(ca_file, context)


@dataclass
class Key:
    kid: str
    alg: str
    private: Any

    def jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        if self.alg.startswith("RS"):
            data = RSAAlgorithm.to_jwk(public, as_dict=True)
        elif self.alg.startswith("ES"):
            data = ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            data = OKPAlgorithm.to_jwk(public, as_dict=True)
        return {**data, "kid": self.kid, "use": "sig"}

    def sign(self, claims: dict[str, Any], **header: Any) -> str:
        return jwt.encode(
            claims, self.private, algorithm=self.alg, headers={"kid": self.kid, **header}
        )

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@pytest.fixture(scope="module")
def keys() -> dict[str, Key]:
    return {
        "rsa1": Key(
            "rsa1", "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ),
        "rsa2": Key(
            "rsa2", "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ),
        "ec1": Key("ec1", "ES256", ec.generate_private_key(ec.SECP256R1())),
        "ed1": Key("ed1", "EdDSA", ed25519.Ed25519PrivateKey.generate()),
    }


@dataclass
class Jwks:
    server: TestServer
    served: list[Key]
    fetches: int = 0
    failing: bool = False
    kids_asked: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://localhost:{self.server.port}/jwks.json"


@pytest.fixture
async def jwks(aiohttp_server: Any, pki: Pki, keys: dict[str, Key]) -> Jwks:
    state: Jwks | None = None

    async def document(_: web.Request) -> web.Response:
        assert state is not None
        state.fetches += 1
        if state.failing:
            return web.Response(status=503)
        return web.json_response({"keys": [key.jwk() for key in state.served]})

    app = web.Application()
    app.router.add_get("/jwks.json", document)
    server = await aiohttp_server(app, ssl=pki.server_context)
    state = Jwks(server, [keys["rsa1"], keys["ec1"], keys["ed1"]])
    return state


@pytest.fixture
async def sides(raw_upstream: UpstreamFactory) -> Sides:
    return Sides(await recording_upstream(raw_upstream), await recording_upstream(raw_upstream))


async def start(
    start_router: StartRouter,
    flag_file: Path,
    sides: Sides,
    jwks: Jwks,
    pki: Pki,
    wait_keys: bool = True,
    **verify: Any,
) -> RunningRouter:
    settings = router_settings(
        sides.legacy.url,
        sides.new.url,
        flag_file,
        tenant__extractors=[
            {"type": "header", "name": "X-Tenant-Id"},
            {
                "type": "jwt",
                "claim": "tenant",
                "verify": {
                    "jwks_url": jwks.url,
                    "ca_file": str(pki.ca_file),
                    "issuer": ISSUER,
                    "audience": AUDIENCE,
                    "leeway": 5,
                    "min_refetch_interval": 0.3,
                    **verify,
                },
            },
        ],
        tenant__min_trust="credential",
    )
    router = await start_router(settings)
    router.app.start_jwks()
    if wait_keys:
        assert await router.app.jwks[jwks.url].wait_loaded(5.0)
    return router


def claims(tenant: str = "globex", **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"tenant": tenant, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 600, **extra}


def bearer(token: str) -> bytes:
    return request(Authorization=f"Bearer {token}")


async def assert_refused(router: RunningRouter, raw: bytes, status: int = 401,
                         code: str = "invalid_token") -> None:  # fmt: skip
    response = await raw_request(router.port, raw)
    assert response.status == status, response
    assert response.json()["error"] == code, response


async def test_valid_tokens_of_each_algorithm_route_by_their_claim(
    start_router: StartRouter, flag_file: Path, sides: Sides, jwks: Jwks, pki: Pki,
    keys: dict[str, Key],
) -> None:  # fmt: skip
    router = await start(start_router, flag_file, sides, jwks, pki)
    for kid in ("rsa1", "ec1", "ed1"):
        response = await raw_request(router.port, bearer(keys[kid].sign(claims("globex"))))
        assert response.status == 200, (kid, response)
    # globex -> new by its flag; the token decided it (min_trust credential).
    assert len(sides.new.requests) == 3 and not sides.legacy.requests
    # Also in the query (Connect iframes), and with an agreeing header.
    token = keys["rsa1"].sign(claims("acme"))
    assert (await raw_request(router.port, request(path=f"/x?jwt={token}"))).status == 200
    raw = request(Authorization=f"Bearer {token}", X_Tenant_Id="acme")
    assert (await raw_request(router.port, raw)).status == 200
    assert len(sides.legacy.requests) == 2


async def test_tokens_failing_a_check_are_refused_and_never_forwarded(
    start_router: StartRouter, flag_file: Path, sides: Sides, jwks: Jwks, pki: Pki,
    keys: dict[str, Key],
) -> None:  # fmt: skip
    router = await start(start_router, flag_file, sides, jwks, pki)
    rsa1 = keys["rsa1"]
    now = int(time.time())
    bad = {
        "expired": rsa1.sign(claims(exp=now - 60)),
        "nbf_in_the_future": rsa1.sign(claims(nbf=now + 600)),
        "no_exp": rsa1.sign({k: v for k, v in claims().items() if k != "exp"}),
        "wrong_iss": rsa1.sign(claims(iss="https://evil.test")),
        "wrong_aud": rsa1.sign(claims(aud="someone-else")),
        "bad_signature": rsa1.sign(claims())[:-4] + "AAAA",
        "signed_by_another_key": Key("rsa1", "RS256", keys["rsa2"].private).sign(claims()),
        # ES256 token claiming the RSA key: the key decides the algorithm.
        "alg_not_the_keys": Key("rsa1", "ES256", keys["ec1"].private).sign(claims()),
        "alg_none": jwt.encode(claims(), None, algorithm="none", headers={"kid": "rsa1"}),
        "alg_confusion": hs256_with(rsa1.public_pem(), claims(), kid="rsa1"),
        "no_kid": jwt.encode(claims(), rsa1.private, algorithm="RS256"),
    }
    for name, token in bad.items():
        response = await raw_request(router.port, bearer(token))
        assert response.status == 401, (name, response)
        assert response.json()["error"] == "invalid_token", name
    assert sides.untouched()
    assert sample(router, "router_invalid_tokens_total") == len(bad)


def hs256_with(secret: bytes, payload: dict[str, Any], kid: str) -> str:
    """An HS256 token whose HMAC key is the RSA public key's PEM (the classic alg
    confusion: a verifier that lets the token pick the algorithm accepts it)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = (
        b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
        + "."
        + b64(json.dumps(payload).encode())
    )
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(mac)


async def test_an_unknown_kid_refetches_then_is_refused(
    start_router: StartRouter, flag_file: Path, sides: Sides, jwks: Jwks, pki: Pki,
    keys: dict[str, Key],
) -> None:  # fmt: skip
    router = await start(start_router, flag_file, sides, jwks, pki)
    await asyncio.sleep(0.35)  # past min_refetch_interval since the start-up fetch
    fetched = jwks.fetches
    stranger = Key("nobody", "RS256", keys["rsa2"].private)
    await assert_refused(router, bearer(stranger.sign(claims())))
    assert jwks.fetches == fetched + 1  # it did look again before refusing
    # Made-up kids in a burst cost no more fetches (min_refetch_interval).
    for _ in range(5):
        await assert_refused(router, bearer(stranger.sign(claims())))
    assert jwks.fetches == fetched + 1
    assert sides.untouched()


async def test_key_rotation(
    start_router: StartRouter, flag_file: Path, sides: Sides, jwks: Jwks, pki: Pki,
    keys: dict[str, Key],
) -> None:  # fmt: skip
    router = await start(start_router, flag_file, sides, jwks, pki)
    old_token = keys["rsa1"].sign(claims("globex"))
    assert (await raw_request(router.port, bearer(old_token))).status == 200  # now cached
    # The identity provider rotates: rsa2 replaces rsa1.
    jwks.served = [keys["rsa2"]]
    await asyncio.sleep(0.35)  # past min_refetch_interval since the start-up fetch
    new_token = keys["rsa2"].sign(claims("globex"))
    assert (await raw_request(router.port, bearer(new_token))).status == 200
    assert len(sides.new.requests) == 2
    # rsa1 is gone from the key set: its tokens stop, cached or not.
    await assert_refused(router, bearer(old_token))
    await assert_refused(router, bearer(keys["rsa1"].sign(claims("globex"))))
    assert len(sides.new.requests) == 2 and not sides.legacy.requests


async def test_not_ready_until_the_first_jwks_fetch(
    start_router: StartRouter, flag_file: Path, sides: Sides, jwks: Jwks, pki: Pki,
    keys: dict[str, Key],
) -> None:  # fmt: skip
    jwks.failing = True
    router = await start(start_router, flag_file, sides, jwks, pki, wait_keys=False)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{router.admin_url}/readyz") as response:
            body = await response.json()
            assert response.status == 503, body
            assert body["checks"]["jwks_loaded"] is False
        # Fail closed: a token we cannot check yet routes nowhere.
        await assert_refused(router, bearer(keys["rsa1"].sign(claims())), 503, "not_ready")
        assert sides.untouched()
        jwks.failing = False
        assert await router.app.jwks[jwks.url].wait_loaded(5.0)
        async with session.get(f"{router.admin_url}/readyz") as response:
            assert response.status == 200
    response = await raw_request(router.port, bearer(keys["rsa1"].sign(claims())))
    assert response.status == 200


async def test_the_attack_with_a_verified_token(
    start_router: StartRouter, flag_file: Path, sides: Sides, jwks: Jwks, pki: Pki,
    keys: dict[str, Key],
) -> None:  # fmt: skip
    """acme's genuine token plus X-Tenant-Id: globex: refused, not routed as either."""
    router = await start(start_router, flag_file, sides, jwks, pki)
    raw = request(Authorization=f"Bearer {keys['rsa1'].sign(claims('acme'))}", X_Tenant_Id="globex")
    await assert_refused(router, raw, 400, "tenant_mismatch")
    assert sides.untouched()
    assert router.app.tenant_inflight == {}
