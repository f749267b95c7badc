"""The domain's words, defined once: every other module imports them from here.

- A **side** is one of the two backends a request can be sent to: `legacy` or `new`.
- A tenant's **flag value** (the routing flag's variation) is a side or `hold`: the tenant
  is being cut over and its requests wait (docs/design.md, "Routing semantics").
- A **tenant id** is 1 to `max_length` characters of `A-Z a-z 0-9 . _ : @ -`. The router
  routes exactly the ids this rule accepts, and the CLI accepts exactly those: one rule,
  with one configurable bound (`tenant.max_length`, default 128, at most 1024).

"Target" is kept for the HTTP request target (RFC 9112's request-target) only.
"""

from __future__ import annotations

import re
from typing import Final, Literal

Side = Literal["legacy", "new"]
FlagValue = Literal["legacy", "hold", "new"]

SIDES: Final[tuple[Side, ...]] = ("legacy", "new")
FLAG_VALUES: Final[tuple[FlagValue, ...]] = ("legacy", "hold", "new")
# What the router does when the flag gives no usable answer (missing, off, or a value that
# is not a flag value): the tenant has not moved.
DEFAULT_FLAG_VALUE: Final[FlagValue] = "legacy"

TENANT_ID_ALPHABET: Final = "A-Z a-z 0-9 . _ : @ -"
DEFAULT_TENANT_ID_MAX_LENGTH: Final = 128
TENANT_ID_MAX_LENGTH_LIMIT: Final = 1024  # the largest `tenant.max_length` allowed

_TENANT_ID_CHARS: Final = re.compile(r"[A-Za-z0-9._:@-]+")


def is_tenant_id(value: object, max_length: int = DEFAULT_TENANT_ID_MAX_LENGTH) -> bool:
    """The tenant-id rule: a str of 1 to `max_length` characters from TENANT_ID_ALPHABET."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= max_length
        and _TENANT_ID_CHARS.fullmatch(value) is not None
    )


def tenant_id_rule(max_length: int = DEFAULT_TENANT_ID_MAX_LENGTH) -> str:
    """The rule in words, for messages: `1 to 128 characters of A-Z a-z 0-9 . _ : @ -`."""
    return f"1 to {max_length} characters of {TENANT_ID_ALPHABET}"


def tenant_id_problem(value: object, max_length: int = DEFAULT_TENANT_ID_MAX_LENGTH) -> str | None:
    """None for a valid tenant id, else the sentence that tells an operator why not."""
    if is_tenant_id(value, max_length):
        return None
    return f"invalid tenant id {value!r}: {tenant_id_rule(max_length)}"
