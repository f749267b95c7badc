"""Errors the router answers with, and the one place their wire form is built.

Every local reply has a stable `code` (Envoy's `response_code_details` idea): the same
string is the JSON body's `error`, the access log's `error` field and a metric label, so
an SRE can grep, graph and alert on it. Codes are a contract (docs/contracts.md): add, never rename.

    RouterError(code, status, source, retryable)
    ├── ClientError                 source=downstream: the request itself is at fault
    │   ├── bad_request             400  malformed request, or one we refuse to forward (a
    │   │                                tenant field named in the request's Connection header)
    │   ├── tenant_mismatch         400  two identity sources name different tenants
    │   ├── invalid_token           401  a JWT the router verifies (or an alg-none JWT) failed
    │   ├── method_not_allowed      405  CONNECT: this is not a forward proxy
    │   ├── client_timeout          408  the request head, or the next piece of its body,
    │   │                                did not arrive in time (server.header_timeout,
    │   │                                server.client_body_timeout); the connection is closed
    │   ├── body_too_large          413  request body over limits.max_body_bytes (or a
    │   │                                body_limits entry); the connection is closed
    │   ├── uri_too_long            414  request line over the limit
    │   └── headers_too_large       431  a header field over the limit, or too many fields
    ├── UpstreamError               source=upstream: the chosen backend failed us
    │   ├── upstream_connect_failed 502  refused, unreachable, TLS handshake failed
    │   ├── upstream_reset          502  connection closed/reset before a complete response head
    │   ├── upstream_bad_response   502  broken framing, invalid Content-Length, bad status line,
    │   │                                a transfer coding other than chunked, head over the limits
    │   └── upstream_timeout        504  connect (TLS handshake included), response head, body
    │                                    read, or the upstream no longer reading the request body
    ├── CutoverError                source=internal: a tenant is being moved (nothing was sent)
    │   ├── hold_timeout            503  held for hold_timeout and the flag did not move on
    │   ├── hold_overflow           503  too many requests held already (per tenant or in total)
    │   └── ledger_unavailable      503  the ratchet ledger could not record the tenant's first
    │                                    request to new, so new may not serve it yet
    └── InternalError               source=internal
        ├── not_ready               503  no flag data yet (the LB should not have sent this)
        ├── overloaded              503  a limit of settings.limits was hit: connections,
        │                                requests in flight, or event-loop lag
        ├── unauthorized            401  admin route without the right bearer token
        ├── admin_disabled          403  admin route, but no ROUTER_ADMIN_TOKEN configured
        └── internal_error          500  a bug: logged with its traceback

`retryable` says whether the *client* may safely retry (the request did not reach the
backend, or the router itself refused it); the router never retries on its own except in
one case (`relay.Exchange.send`): a reused keep-alive connection that died before any byte
of the response, for an idempotent request without a body.
"""

from __future__ import annotations

from typing import Final, Literal

Source = Literal["downstream", "upstream", "internal"]


class RouterError(Exception):
    code: str = "internal_error"
    status: int = 500
    source: Source = "internal"
    retryable: bool = False

    def __init__(self, detail: str = "", *, retryable: bool | None = None) -> None:
        super().__init__(detail or self.code)
        self.detail = detail or self.code
        if retryable is not None:
            self.retryable = retryable


class ClientError(RouterError):
    source: Source = "downstream"


class BadRequest(ClientError):
    code = "bad_request"
    status = 400


class TenantMismatch(ClientError):
    """Two identity sources (header, JWT, host, path) name different tenants: the request
    is refused rather than routed by either (identify.py), and never forwarded."""

    code = "tenant_mismatch"
    status = 400

    def __init__(self, sources: str) -> None:
        super().__init__(f"identity sources disagree on the tenant ({sources})")
        self.sources = sources  # the metric label: the two sources, e.g. "header+jwt"


class InvalidToken(ClientError):
    """A JWT that a verifying jwt extractor rejected (signature, key, alg, exp/nbf, iss,
    aud), or one with alg `none` whatever the mode: never forwarded."""

    code = "invalid_token"
    status = 401


class MethodNotAllowed(ClientError):
    code = "method_not_allowed"
    status = 405


class ClientTimeout(ClientError):
    code = "client_timeout"
    status = 408


class BodyTooLarge(ClientError):
    code = "body_too_large"
    status = 413


class UriTooLong(ClientError):
    code = "uri_too_long"
    status = 414


class HeadersTooLarge(ClientError):
    code = "headers_too_large"
    status = 431


class UpstreamError(RouterError):
    source: Source = "upstream"
    status = 502


class UpstreamConnectFailed(UpstreamError):
    code = "upstream_connect_failed"
    retryable = True  # nothing reached the backend


class UpstreamReset(UpstreamError):
    code = "upstream_reset"


class UpstreamBadResponse(UpstreamError):
    code = "upstream_bad_response"


class UpstreamTimeout(UpstreamError):
    code = "upstream_timeout"
    status = 504


class InternalError(RouterError):
    source: Source = "internal"


class NotReady(InternalError):
    code = "not_ready"
    status = 503
    retryable = True


class CutoverError(RouterError):
    source: Source = "internal"
    status = 503
    retryable = True  # nothing reached a backend


class HoldTimeout(CutoverError):
    code = "hold_timeout"


class HoldOverflow(CutoverError):
    code = "hold_overflow"


class LedgerUnavailable(CutoverError):
    code = "ledger_unavailable"


class Overloaded(InternalError):
    code = "overloaded"
    status = 503
    retryable = True  # nothing reached a backend


class Unauthorized(InternalError):
    code = "unauthorized"
    status = 401


class AdminDisabled(InternalError):
    code = "admin_disabled"
    status = 403


# Retry-After (seconds) sent with 503s the router itself decides.
RETRY_AFTER_SECONDS: Final = "1"
