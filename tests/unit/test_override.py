"""Signed test routing (router/control/override.py, `router sign`): what is accepted, what is
refused and why, and the message format pinned by vectors computed independently of it."""

from __future__ import annotations

import hashlib
import hmac
import random
import time
from typing import Any

import pytest

from router.control.override import (
    REJECTION_REASONS,
    SIGNATURE_HEADER,
    TARGET_HEADER,
    OverrideVerifier,
    sign,
    signed_headers,
)
from tests.support.signing import NOW, SECRET, WINDOW, Clock, verifier


def reference_mac(secret: str, target: str, tenant: str, timestamp: int) -> str:
    """The documented contract, written out with the standard library only."""
    message = f"{target}\n{tenant}\n{timestamp}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def refused(
    v: OverrideVerifier, target: str | None, signature: str | None, tenant: str | None
) -> str:
    """The rejection reason, after checking that verify() refused the values."""
    assert v.verify(target, signature, tenant) is None
    reason = v.rejection_reason(target, signature, tenant)
    assert reason in REJECTION_REASONS
    return reason


# ---- the format, pinned ---------------------------------------------------------------


def test_known_answer_vector() -> None:
    # Computed once with `printf 'new\nacme\n1700000000' | openssl dgst -sha256 -hmac
    # test-secret`: a change to the message format breaks this, whatever sign() does.
    expected = "t=1700000000,v1=2553b60eb19ff6d1829047e58462bec4881475d7d77ee40581e8775c01c32dad"
    assert f"t={NOW},v1={reference_mac(SECRET, 'new', 'acme', NOW)}" == expected
    assert sign(SECRET, "new", "acme", NOW) == expected
    assert verifier().verify("new", expected, "acme") == "new"


@pytest.mark.parametrize(
    ("secret", "target", "tenant", "timestamp"),
    [
        (SECRET, "legacy", "acme", NOW),
        (SECRET, "new", "", NOW),  # a request without a tenant
        ("k" * 64, "new", "acme", NOW),  # exactly one block: no pre-hash
        ("k" * 65, "new", "acme", NOW),  # longer than a block: hashed first (RFC 2104)
        ("k" * 500, "legacy", "globex", NOW),
        ("sécret-ü-✓", "new", "a.b_c:d@e-f", NOW),  # UTF-8 secret
        (SECRET, "new", "acme", 0),
        (SECRET, "new", "acme", 999_999_999_999),  # the largest timestamp the format allows
    ],
)
def test_sign_matches_reference(secret: str, target: str, tenant: str, timestamp: int) -> None:
    mac = reference_mac(secret, target, tenant, timestamp)
    assert sign(secret, target, tenant, timestamp) == f"t={timestamp},v1={mac}"
    # verify() computes the HMAC its own way (precomputed pads): it must agree.
    v = OverrideVerifier(secret, WINDOW, clock=Clock(timestamp))
    assert v.verify(target, f"t={timestamp},v1={mac}", tenant or None) == target


# ---- accepted -------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["legacy", "new"])
def test_round_trip(target: str) -> None:
    headers = signed_headers(SECRET, target, "acme", now=NOW)
    assert headers[TARGET_HEADER] == target
    assert verifier().verify(headers[TARGET_HEADER], headers[SIGNATURE_HEADER], "acme") == target


def test_no_tenant_signs_as_empty() -> None:
    signature = sign(SECRET, "new", "", NOW)
    v = verifier()
    assert v.verify("new", signature, None) == "new"
    assert v.verify("new", signature, "") == "new"
    assert refused(v, "new", signature, "acme") == "bad_mac"


def test_signed_headers_default_now_is_the_clock() -> None:
    headers = signed_headers(SECRET, "new", "acme")
    stamp = int(headers[SIGNATURE_HEADER].split(",")[0].removeprefix("t="))
    assert abs(stamp - time.time()) < 5
    assert OverrideVerifier(SECRET, WINDOW).verify("new", headers[SIGNATURE_HEADER], "acme")


@pytest.mark.parametrize("skew", [-WINDOW, WINDOW, 0, 1, -1])
def test_window_is_inclusive_both_ways(skew: float) -> None:
    assert verifier(now=NOW + skew).verify("new", sign(SECRET, "new", "acme", NOW), "acme")


# ---- refused, and why -----------------------------------------------------------------


def test_wrong_secret() -> None:
    signature = sign("another-secret", "new", "acme", NOW)
    assert refused(verifier(), "new", signature, "acme") == "bad_mac"


def test_signature_for_another_tenant_cannot_move_this_one() -> None:
    signature = sign(SECRET, "new", "test-tenant", NOW)
    assert refused(verifier(), "new", signature, "real-customer") == "bad_mac"
    assert refused(verifier(), "new", signature, None) == "bad_mac"


def test_signature_for_another_target() -> None:
    signature = sign(SECRET, "new", "acme", NOW)
    assert refused(verifier(), "legacy", signature, "acme") == "bad_mac"


def test_expired_past_the_window() -> None:
    signature = sign(SECRET, "new", "acme", NOW)
    assert refused(verifier(now=NOW + WINDOW + 1), "new", signature, "acme") == "expired"
    assert refused(verifier(now=NOW + 86_400), "new", signature, "acme") == "expired"


def test_future_beyond_the_window() -> None:
    signature = sign(SECRET, "new", "acme", NOW)
    assert refused(verifier(now=NOW - WINDOW - 1), "new", signature, "acme") == "expired"


def test_replay_within_the_window_is_the_accepted_risk() -> None:
    # Documented: the window bounds replay, it does not prevent it.
    v, signature = verifier(), sign(SECRET, "new", "acme", NOW)
    assert v.verify("new", signature, "acme") == v.verify("new", signature, "acme") == "new"


MAC = reference_mac(SECRET, "new", "acme", NOW)
ARABIC_INDIC_DIGITS = "\u0661\u0667" + "\u0660" * 8  # 1700000000, in another script


@pytest.mark.parametrize(
    "signature",
    [
        "garbage",
        "t=",
        f"t={NOW}",  # missing v1
        f"t={NOW},v1=",
        f"v1={MAC}",  # missing t
        f"v1={MAC},t={NOW}",  # fields swapped
        f"t={NOW},v1={MAC.upper()}",  # uppercase hex
        f"t={NOW},v1={MAC[:-1]}",  # 63 hex digits
        f"t={NOW},v1={MAC}0",  # 65
        f"t={NOW},v1={MAC},v2={MAC}",  # extra field after
        f"x=1,t={NOW},v1={MAC}",  # extra field before
        f"t={NOW},v1={MAC},",
        f"t={NOW}, v1={MAC}",  # a space
        f" t={NOW},v1={MAC}",
        f"t={NOW},v1={MAC}\n",
        f"t={NOW}.0,v1={MAC}",  # non-integer t
        f"t=1.7e9,v1={MAC}",
        f"t=-{NOW},v1={MAC}",
        f"t=+{NOW},v1={MAC}",
        f"t=0{NOW},v1={MAC}",  # leading zero: not the canonical spelling
        f"t={'9' * 13},v1={MAC}",  # more digits than any Unix time we will see
        f"t={'9' * 5000},v1={MAC}",  # beyond int()'s digit limit: no ValueError
        f"t={ARABIC_INDIC_DIGITS},v1={MAC}",  # a regex \d would take them
        f"t={NOW},v1={'g' * 64}",  # not hex
        f"t={NOW},v1={'é' * 64}",  # non-ASCII: compare_digest would raise on it
        f"t={NOW},v1={MAC[:-1]}\x00",
        "t=" + "1" * 10_240,  # a 10 KB header
        "x" * 10_240,
        f"t={NOW},v1={MAC}" + " " * 10_240,
    ],
)
def test_malformed(signature: str) -> None:
    assert refused(verifier(), "new", signature, "acme") == "malformed"


def test_far_future_is_well_formed_but_expired() -> None:
    assert refused(verifier(), "new", f"t=1{NOW},v1={MAC}", "acme") == "expired"


@pytest.mark.parametrize("signature", [None, ""])
def test_missing_signature(signature: str | None) -> None:
    assert refused(verifier(), "new", signature, "acme") == "missing"


@pytest.mark.parametrize("target", [None, "", "hold", "NEW", "New", " new", "new ", "x" * 10_240])
def test_bad_target(target: str | None) -> None:
    # Checked before the signature: a valid MAC cannot make up for the target.
    signature = sign(SECRET, "new", "acme", NOW)
    assert refused(verifier(), target, signature, "acme") == "bad_target"


def test_huge_or_unencodable_tenant() -> None:
    signature = sign(SECRET, "new", "acme", NOW)
    assert refused(verifier(), "new", signature, "a" * 10_240) == "malformed"
    assert refused(verifier(), "new", signature, "acme\udc80") == "malformed"


@pytest.mark.parametrize("secret", [None, ""])
def test_disabled_without_a_secret(secret: str | None) -> None:
    v = verifier(secret)
    assert not v.enabled
    signature = sign(SECRET, "new", "acme", NOW)  # correct for some secret: irrelevant
    assert refused(v, "new", signature, "acme") == "disabled"
    assert verifier().enabled


def test_never_raises_on_random_input() -> None:
    rng = random.Random(1234)
    alphabet = "t=v1,0123456789abcdefABCDEF -\n\x00é\udc80"
    v = verifier()
    for _ in range(3000):
        signature = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 100)))
        target = rng.choice(["new", "legacy", "hold", None, signature])
        tenant = rng.choice(["acme", None, "", signature])
        assert v.verify(target, signature, tenant) is None
        assert v.rejection_reason(target, signature, tenant) in REJECTION_REASONS


def test_reason_is_the_refusals_even_if_the_clock_moved() -> None:
    """rejection_reason right after verify names verify's reason: a future timestamp that
    enters the window in between still counts as expired, not as something else."""
    clock = Clock(NOW - WINDOW - 1)
    v = OverrideVerifier(SECRET, WINDOW, clock=clock)
    target, signature, tenant = "new", sign(SECRET, "new", "acme", NOW), "acme"
    assert v.verify(target, signature, tenant) is None
    clock.now = NOW
    assert v.rejection_reason(target, signature, tenant) == "expired"
    # Values verify() did not refuse are checked now; those that pass give "valid".
    assert v.verify(target, signature, tenant) == "new"
    assert v.rejection_reason("new", sign(SECRET, "new", "acme", NOW), "acme") == "valid"


def test_rejection_reasons_are_a_fixed_set() -> None:
    assert set(REJECTION_REASONS) == {
        "missing",
        "malformed",
        "expired",
        "bad_mac",
        "disabled",
        "bad_target",
        "tenant_not_allowed",
    }


# ---- rotation: two secrets at once -------------------------------------------------------

PREVIOUS = "the-previous-secret"


def test_during_rotation_the_current_and_the_previous_secret_verify() -> None:
    v = OverrideVerifier(SECRET, WINDOW, clock=Clock(), previous=PREVIOUS)
    assert v.verify("new", sign(SECRET, "new", "acme", NOW), "acme") == "new"
    assert v.verify("legacy", sign(PREVIOUS, "legacy", "acme", NOW), "acme") == "legacy"
    assert refused(v, "new", sign("a-third-secret", "new", "acme", NOW), "acme") == "bad_mac"
    # The previous secret's signatures are bound like the current one's.
    assert refused(v, "new", sign(PREVIOUS, "new", "globex", NOW), "acme") == "bad_mac"


def test_the_previous_secret_alone_enables_nothing() -> None:
    v = OverrideVerifier(None, WINDOW, clock=Clock(), previous=PREVIOUS)
    assert not v.enabled
    assert refused(v, "new", sign(PREVIOUS, "new", "acme", NOW), "acme") == "disabled"


def test_the_current_secret_is_tried_first() -> None:
    """A signature made with the current secret costs one MAC, not two; the previous
    secret is tried only for a signature the current one refused."""
    v = OverrideVerifier(SECRET, WINDOW, clock=Clock(), previous=PREVIOUS)
    calls: list[str] = []

    class Counting:
        def __init__(self, key: Any, name: str) -> None:
            self.key, self.name = key, name

        def matches(self, message: bytes, mac: str) -> bool:
            calls.append(self.name)
            return bool(self.key.matches(message, mac))

    current, previous = v._keys
    v._keys = (Counting(current, "current"), Counting(previous, "previous"))  # type: ignore[assignment]
    assert v.verify("new", sign(SECRET, "new", "acme", NOW), "acme") == "new"
    assert calls == ["current"]
    calls.clear()
    assert v.verify("new", sign(PREVIOUS, "new", "acme", NOW), "acme") == "new"
    assert calls == ["current", "previous"]


# ---- the allow-list ----------------------------------------------------------------------


def test_with_an_allow_list_only_its_tenants_can_be_overridden() -> None:
    v = OverrideVerifier(SECRET, WINDOW, clock=Clock(), tenants=["qa-1", "qa-2"])
    assert v.verify("new", sign(SECRET, "new", "qa-1", NOW), "qa-1") == "new"
    assert refused(v, "new", sign(SECRET, "new", "acme", NOW), "acme") == "tenant_not_allowed"
    assert refused(v, "new", sign(SECRET, "new", "", NOW), None) == "tenant_not_allowed"
    # Checked after the MAC: a bad signature for an unlisted tenant is a bad signature.
    assert refused(v, "new", sign("wrong", "new", "acme", NOW), "acme") == "bad_mac"


def test_an_empty_allow_list_allows_no_tenant_and_none_allows_any() -> None:
    none = OverrideVerifier(SECRET, WINDOW, clock=Clock(), tenants=[])
    assert refused(none, "new", sign(SECRET, "new", "qa-1", NOW), "qa-1") == "tenant_not_allowed"
    anyone = OverrideVerifier(SECRET, WINDOW, clock=Clock(), tenants=None)
    assert anyone.verify("new", sign(SECRET, "new", "acme", NOW), "acme") == "new"


@pytest.mark.parametrize(
    ("secret", "target", "tenant", "timestamp"),
    [
        ("", "new", "acme", NOW),
        (SECRET, "hold", "acme", NOW),
        (SECRET, "new", "acme", -1),
        (SECRET, "new", "a" * 1025, NOW),
    ],
)
def test_sign_refuses_what_verify_never_accepts(
    secret: str, target: str, tenant: str, timestamp: int
) -> None:
    with pytest.raises(ValueError):
        sign(secret, target, tenant, timestamp)
