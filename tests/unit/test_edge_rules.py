"""Issue 16's edge rules without sockets: what is a Host (relay.valid_host), the bound on
its cache, and the forwarded-field trust settings. The same rules on real sockets, with a
recording upstream: tests/integration/test_edge.py."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from router.proxy import relay
from router.proxy.relay import HeaderRules, valid_host
from router.settings import ServerSettings

VALID = [
    "", "acme.example", "acme.example:8080", "ACME.Example.", "127.0.0.1", "127.0.0.1:80",
    "[::1]", "[::1]:8443", "[2001:db8::7]", "[::ffff:127.0.0.1]", "xn--caf-dma.test",
    "a_b~c-d.test", "a%41b.test", "host:",
]  # fmt: skip
INVALID = [
    "a b", "x/y", "user@x", "user:pw@x", "x\\y", "x?y", "x#y", "x:80a", "x:1:2", "[::1",
    "::1", "[zz::1]", "[1:2:3:4:5:6:7:8:9]", "caf\udce9.test", "x\ty", "x:123456", "a%4",
    "x\r\ny", "[::1]x", " x", "x ",
]  # fmt: skip


@pytest.mark.parametrize("host", VALID)
def test_valid_hosts(host: str) -> None:
    assert valid_host(host)
    assert valid_host(host)  # the cached answer agrees


@pytest.mark.parametrize("host", INVALID)
def test_invalid_hosts(host: str) -> None:
    assert not valid_host(host)
    assert not valid_host(host)


def test_the_validity_cache_is_bounded() -> None:
    for i in range(relay._HOST_CACHE_SIZE + 100):
        valid_host(f"h{i}.example")
    assert len(relay._HOST_VALIDITY) <= relay._HOST_CACHE_SIZE
    assert valid_host("beyond-the-bound.example")
    assert not valid_host("beyond the bound")


@pytest.mark.parametrize(
    ("settings", "proto", "host"),
    [
        ({}, False, False),
        ({"trust_forwarded_proto": True}, True, False),
        ({"trust_forwarded_proto": True, "trust_forwarded_host": True}, True, True),
    ],
)
def test_trust_is_per_field_and_off_by_default(
    settings: dict[str, Any], proto: bool, host: bool
) -> None:
    server = ServerSettings.model_validate(settings)
    rules = HeaderRules(
        (),
        server.trusted_hops,
        trust_forwarded_proto=server.trust_forwarded_proto,
        trust_forwarded_host=server.trust_forwarded_host,
    )
    assert (rules.trust_proto, rules.trust_host) == (proto, host)


@pytest.mark.parametrize("field", ["trust_forwarded_proto", "trust_forwarded_host"])
def test_trust_without_a_trusted_hop_is_refused(field: str) -> None:
    with pytest.raises(ValidationError, match="trusted_hops"):
        ServerSettings.model_validate({"trusted_hops": 0, field: True})
    # And HeaderRules never trusts without a hop, whatever it is given.
    rules = HeaderRules((), 0, trust_forwarded_proto=True, trust_forwarded_host=True)
    assert (rules.trust_proto, rules.trust_host) == (False, False)
