"""Signed test routing: `X-Router-Target: legacy|new` honoured only with a valid signature.

A test suite can run against the old or the new infrastructure on demand by sending

    X-Router-Target: new
    X-Router-Signature: t=1700000000,v1=<64 lowercase hex digits>

Without a valid signature X-Router-Target is ignored (the request is routed as usual and
the caller counts the refusal by reason), and both headers are always stripped before a
request is forwarded (relay.py).

Threat model
------------
- The header is ignored without a valid MAC, so a customer cannot pick a side by sending
  `X-Router-Target` themselves: only holders of the shared secret
  (`ROUTER_OVERRIDE_SECRET`) can. Without a configured secret every override is ignored.
- The tenant is part of the MAC, so a signature made for a test tenant cannot move a real
  tenant's requests (nor can a signature made for "no tenant" be reused for one).
- Overrides are a test tool: with `routing.override_tenants` set, only the tenants it lists
  can be overridden. A valid signature for any other tenant (or for a request without a
  tenant) is refused like a bad one (`tenant_not_allowed`): whoever holds the secret still
  cannot move a customer's requests. The request is routed as if no override was sent.
- An override never skips hold (decide.py): a held tenant's request waits like any other,
  and the override is checked again once the hold ends.
- Two secrets can be valid at once, so the secret can be rotated without a window in which
  valid signatures are refused: `ROUTER_OVERRIDE_SECRET` (current: `router sign` signs
  with it) and `ROUTER_OVERRIDE_SECRET_PREVIOUS` (accepted until removed). The current key
  is tried first; the previous one costs a second MAC only for a signature the current
  one refused (docs/operations.md, "Rotating the override secret").
- The side is part of the MAC, so a signature for `legacy` cannot be turned into `new`.
- The timestamp is part of the MAC and must be within `routing.override_window` seconds
  (default 300) of the router's clock, in either direction (clock skew between the test
  runner and the router): a captured header can be replayed only for that long, and only
  for the same tenant and side.
- The MAC is compared in constant time (`hmac.compare_digest`), so response timing tells
  an attacker nothing about how much of a guessed MAC was right.
- Everything is parsed strictly and bounded before any work: a malformed or oversized
  value is refused, never an exception on the hot path.

The signature (a contract for test suites in any language)
----------------------------------------------------------
    message   = f"{side}\\n{tenant}\\n{timestamp}"          (UTF-8)
    mac       = lowercase hex of HMAC-SHA256(key=secret (UTF-8), message)
    header    = f"t={timestamp},v1={mac}"

- `side` is exactly `legacy` or `new`;
- `tenant` is the tenant id the router identifies for the request (header, JWT claim, host
  or path), or the empty string for a request without a tenant;
- `timestamp` is Unix time in whole seconds, decimal, no sign, no leading zeros, and the
  same digits go into the message and into `t=`;
- the header has exactly those two fields, in that order, no spaces; the hex is lowercase.

From Python (tests in this repo, or any suite that can import the package):

    from router.control.override import signed_headers
    headers = signed_headers(os.environ["ROUTER_OVERRIDE_SECRET"], "new", "acme")

From a shell (`router sign acme new` prints the same), or as a model for any language:

    t=$(date +%s)
    mac=$(printf 'new\\nacme\\n%s' "$t" \\
          | openssl dgst -sha256 -hmac "$ROUTER_OVERRIDE_SECRET" -r | cut -d' ' -f1)
    curl -H 'X-Tenant-Id: acme' -H 'X-Router-Target: new' \\
         -H "X-Router-Signature: t=$t,v1=$mac" http://localhost:8080/hello

(`printf`, not `echo`: the message has no trailing newline.)
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Callable, Collection
from typing import Final

from router.domain import SIDES, TENANT_ID_MAX_LENGTH_LIMIT

__all__ = [
    "REJECTION_REASONS",
    "SIGNATURE_HEADER",
    "TARGET_HEADER",
    "OverrideVerifier",
    "sign",
    "signed_headers",
]

SIGNATURE_HEADER: Final = "X-Router-Signature"
TARGET_HEADER: Final = "X-Router-Target"

# Why a signature was refused: the complete, fixed label set of
# router_override_rejections_total{reason} (a label set that cannot grow with the input).
#   disabled    no secret configured: every override is ignored
#   bad_target  X-Router-Target is not exactly `legacy` or `new`
#   missing     no X-Router-Signature, or an empty one
#   malformed   not `t=<digits>,v1=<64 lowercase hex>`, or oversized (signature or tenant)
#   expired     the timestamp is more than the window away from now, past or future
#   bad_mac     well-formed and in time, but the MAC does not match (wrong secret, or made
#               for another tenant, side or timestamp): checked with the current secret,
#               then the previous one (rotation)
#   tenant_not_allowed
#               a valid signature, for a tenant routing.override_tenants does not list (or
#               for a request without a tenant, when the list is set): the secret is
#               being used on a real tenant
REJECTION_REASONS: Final = (
    "disabled",
    "bad_target",
    "missing",
    "malformed",
    "expired",
    "bad_mac",
    "tenant_not_allowed",
)

# Strict and ASCII-only ([0-9], not \d, which matches other scripts' digits): one
# canonical spelling per signature, so an implementation in any language agrees on it.
_SIGNATURE = re.compile(r"t=(0|[1-9][0-9]{0,11}),v1=([0-9a-f]{64})")
# The longest value the pattern accepts: checked first, so a 10 KB header costs a len().
_MAX_SIGNATURE = len("t=") + 12 + len(",v1=") + 64

_BLOCK = 64  # SHA-256 block size, for the HMAC pads


def _message(side: str, tenant: str, timestamp: str) -> bytes:
    return f"{side}\n{tenant}\n{timestamp}".encode()


def sign(secret: str, side: str, tenant: str, timestamp: int) -> str:
    """The `X-Router-Signature` value for `side` and `tenant` at `timestamp` (Unix
    seconds): `t=<timestamp>,v1=<hex HMAC-SHA256>`. `tenant` is "" for a request without
    one. Raises ValueError for values the router would never accept."""
    if not secret:
        raise ValueError("the override secret is empty")
    if side not in SIDES:
        raise ValueError(f"side must be 'legacy' or 'new', got {side!r}")
    if len(tenant) > TENANT_ID_MAX_LENGTH_LIMIT:
        raise ValueError(f"tenant id longer than {TENANT_ID_MAX_LENGTH_LIMIT} characters")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int) or timestamp < 0:
        raise ValueError(f"timestamp must be a non-negative int, got {timestamp!r}")
    stamp = str(timestamp)
    mac = hmac.new(secret.encode(), _message(side, tenant, stamp), hashlib.sha256)
    return f"t={stamp},v1={mac.hexdigest()}"


def signed_headers(secret: str, side: str, tenant: str, now: float | None = None) -> dict[str, str]:
    """Both headers forcing `tenant`'s requests to `side`, signed at `now` (default:
    the current time). Valid for the router's `override_window` around `now`."""
    timestamp = int(time.time() if now is None else now)
    return {
        TARGET_HEADER: side,
        SIGNATURE_HEADER: sign(secret, side, tenant, timestamp),
    }


class _Key:
    """One secret, prepared once: HMAC's inner and outer padded keys (RFC 2104) hashed, so
    each verification copies the two SHA-256 states and hashes only the message."""

    __slots__ = ("inner", "outer")

    def __init__(self, secret: str) -> None:
        key = secret.encode()
        if len(key) > _BLOCK:
            key = hashlib.sha256(key).digest()
        key = key.ljust(_BLOCK, b"\0")
        self.inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self.outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def matches(self, message: bytes, mac_hex: str) -> bool:
        digest = self.inner.copy()
        digest.update(message)
        outer = self.outer.copy()
        outer.update(digest.digest())
        return hmac.compare_digest(outer.hexdigest(), mac_hex)


class OverrideVerifier:
    """Checks `X-Router-Target` / `X-Router-Signature` for one request: `verify` returns the
    forced side or None, and never raises.

    Each key is prepared once (_Key): about half the cost of `hmac.new` per call. `sign`
    uses the standard library's `hmac`, and the tests check both against each other and
    against independent vectors.

    `secret` is the current secret, `previous` the one being rotated out (accepted too;
    ignored without a current one). `tenants`: the tenants an override may name (None:
    any; an empty collection: none).
    """

    __slots__ = (
        "_clock",
        "_keys",
        "_last_reason",
        "_last_side",
        "_last_signature",
        "_last_tenant",
        "_tenants",
        "_window",
    )

    def __init__(
        self,
        secret: str | None,
        window: float,
        clock: Callable[[], float] = time.time,
        *,
        previous: str | None = None,
        tenants: Collection[str] | None = None,
    ) -> None:
        self._window = float(window)
        self._clock = clock
        # Current first: a signature made with it (the usual case) costs one MAC.
        self._keys: tuple[_Key, ...] = ()
        if secret:
            self._keys = (_Key(secret),) if not previous else (_Key(secret), _Key(previous))
        self._tenants = frozenset(tenants) if tenants is not None else None
        # The last refusal, so `rejection_reason` right after `verify` neither computes
        # the MAC again nor disagrees with it (the clock moves between the two calls).
        self._last_side: str | None = None
        self._last_signature: str | None = None
        self._last_tenant: str | None = None
        self._last_reason = "disabled"

    @property
    def enabled(self) -> bool:
        """False without a secret: every override is ignored."""
        return bool(self._keys)

    def verify(self, side: str | None, signature: str | None, tenant: str | None) -> str | None:
        """`"legacy"` or `"new"` when `signature` is valid for `side` and `tenant` now,
        and the tenant may be overridden; else None. `tenant` None means a request without
        a tenant (signed as "")."""
        result = self._check(side, signature, tenant)
        if result in SIDES:
            return result
        self._last_side = side
        self._last_signature = signature
        self._last_tenant = tenant
        self._last_reason = result
        return None

    def rejection_reason(self, side: str | None, signature: str | None, tenant: str | None) -> str:
        """Why `verify` refused these values: one of REJECTION_REASONS. Meant to be called
        right after `verify` returned None (that refusal's reason is returned, without
        computing the MAC again). For other values they are checked now; values that
        verify have nothing to refuse and give "valid", outside the label set."""
        if (
            signature is self._last_signature
            and side is self._last_side
            and tenant is self._last_tenant
        ):
            return self._last_reason
        result = self._check(side, signature, tenant)
        return "valid" if result in SIDES else result

    def _check(self, side: str | None, signature: str | None, tenant: str | None) -> str:
        """The side ("legacy" / "new") or a rejection reason (never one of those two):
        one pass, shared by `verify` and `rejection_reason`."""
        keys = self._keys
        if not keys:
            return "disabled"
        if side not in SIDES:
            return "bad_target"
        if not signature:
            return "missing"
        if tenant is None:
            tenant = ""
        if len(signature) > _MAX_SIGNATURE or len(tenant) > TENANT_ID_MAX_LENGTH_LIMIT:
            return "malformed"
        parsed = _SIGNATURE.fullmatch(signature)
        if parsed is None:
            return "malformed"
        stamp = parsed[1]
        if abs(self._clock() - int(stamp)) > self._window:
            return "expired"
        try:
            message = _message(side, tenant, stamp)
        except UnicodeEncodeError:  # a lone surrogate: no signer could have produced it
            return "malformed"
        mac = parsed[2]
        if not any(key.matches(message, mac) for key in keys):
            return "bad_mac"
        # After the MAC, not before: `tenant_not_allowed` then means "someone holding the
        # secret signed for a real tenant", a signal worth a warning, never muddied by
        # customers sending X-Router-Target on their own.
        allowed = self._tenants
        if allowed is not None and (not tenant or tenant not in allowed):
            return "tenant_not_allowed"
        return side
