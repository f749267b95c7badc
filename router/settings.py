"""Settings: `config/router.yaml` plus environment overrides, validated once at start-up.

Everything the router needs is resolved here, before the first request: a bad value never
surfaces as a failed request at 3 a.m., it stops the process at start with exit status 2
and a message that names the key (`ConfigError`).

Precedence: built-in defaults < YAML file < environment variables (the contract in
docs/contracts.md; the ECS task definition sets the variables). Relative paths in the YAML file
are resolved against the file's own directory, so a config works from any working
directory; paths from the environment are resolved against the working directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from router.domain import (
    DEFAULT_TENANT_ID_MAX_LENGTH,
    TENANT_ID_MAX_LENGTH_LIMIT,
    Side,
    tenant_id_problem,
)

PositiveSeconds = Annotated[float, Field(gt=0)]


def _absolute(pattern: str) -> str:
    if not pattern.startswith("/"):
        raise ValueError(f"must start with '/', got {pattern!r}")
    return pattern


# A path pattern (compile_path_patterns' syntax: `*`, `**`): pinned paths, body limits,
# shadow exclusions.
PathPattern = Annotated[str, AfterValidator(_absolute)]


# redact_query_params' default: parameter names (substrings, lower case) whose values
# are credentials in the usual APIs: jwt, token (access_token, id_token, refresh_token),
# OAuth's code and assertion, sig (signature, X-Amz-Signature), key (api_key, apikey),
# secret (client_secret), password / passwd / pwd, auth, session, credential, otp.
DEFAULT_REDACT_QUERY_PARAMS: Final = (
    "jwt", "token", "code", "assertion", "sig", "key", "secret", "password", "passwd", "pwd",
    "auth", "session", "credential", "otp",
)  # fmt: skip

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def is_token(value: str) -> bool:
    """RFC 9110 token (a valid header field name)."""
    return bool(_TOKEN.match(value))


class ConfigError(Exception):
    """Invalid configuration; `str()` names every offending key and its problem."""


class _Frozen(BaseModel):
    # extra="forbid": a misspelt key is an error, not a silently ignored default.
    model_config = ConfigDict(frozen=True, extra="forbid")


def _split_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port, got {value!r}")
    return (host.strip("[]") or "0.0.0.0"), int(port)


# How far an identity source is trusted (docs/design.md, "Identity"): `client` is a value
# any client can write (a header, the path, the Host); `edge` a field a trusted hop (the
# ALB, an edge proxy) sets and overwrites whatever the client sent; `credential` a JWT
# claim that the backend verifies too (and the router as well when `verify` is set).
Trust = Literal["client", "edge", "credential"]
TRUST_RANK: Final[dict[str, int]] = {"client": 0, "edge": 1, "credential": 2}


class HeaderExtractor(_Frozen):
    type: Literal["header"]
    name: str = "X-Tenant-Id"
    # `edge` only if a hop in front of the router always sets (overwrites) this header.
    trust: Literal["client", "edge"] = "client"

    @field_validator("name")
    @classmethod
    def _header_name(cls, v: str) -> str:
        if not is_token(v):
            raise ValueError(f"not a valid header name: {v!r}")
        return v


JwtAlgorithm = Literal["RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"]


def _default_algorithms() -> list[JwtAlgorithm]:
    return ["RS256", "ES256", "EdDSA"]


class JwtVerifySettings(_Frozen):
    """Signature and claim checks for a jwt extractor (control/jwks.py fetches the keys).

    Only asymmetric algorithms: an HMAC secret shared with the router is a secret the
    router would leak in a compromise, and `none` is never accepted (not even decode-only).
    """

    # The JWKS document (https only: the keys decide who is which tenant).
    jwks_url: str
    # CA bundle for the JWKS server's certificate (None: the system's trust store).
    ca_file: str | None = None
    algorithms: list[JwtAlgorithm] = Field(default_factory=_default_algorithms, min_length=1)
    issuer: str | None = None  # required `iss` (None: not checked)
    audience: str | None = None  # required in `aud` (None: not checked)
    leeway: float = Field(default=30.0, ge=0, le=600)  # seconds of clock skew for exp/nbf
    # Periodic refetch of the key set (rotation that adds a key before using it).
    refresh_interval: PositiveSeconds = 300.0
    # An unknown `kid` refetches at once, but no more often than this (a client sending
    # made-up kids must not turn the router into a JWKS flooder).
    min_refetch_interval: PositiveSeconds = 10.0
    fetch_timeout: PositiveSeconds = 5.0

    @field_validator("jwks_url")
    @classmethod
    def _https(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"jwks_url must be an https:// URL, got {v!r}")
        return v


class JwtExtractor(_Frozen):
    """Tenant from a JWT claim. Without `verify` the token is decoded for routing only (the
    backend verifies it; the mismatch rule stops a forged claim from outvoting another
    source); with `verify` the router checks it too and refuses a bad one (401)."""

    type: Literal["jwt"]
    claim: str = "iss"
    query_param: str = "jwt"
    trust: Literal["credential", "client"] = "credential"
    verify: JwtVerifySettings | None = None


class HostExtractor(_Frozen):
    type: Literal["host"]
    pattern: str  # e.g. "{tenant}.example.com"
    trust: Literal["client", "edge"] = "client"

    @field_validator("pattern")
    @classmethod
    def _one_placeholder(cls, v: str) -> str:
        if v.count("{tenant}") != 1:
            raise ValueError("pattern must contain '{tenant}' exactly once")
        return v


class PathExtractor(_Frozen):
    type: Literal["path"]
    pattern: str  # e.g. "/t/{tenant}/"
    trust: Literal["client", "edge"] = "client"

    @field_validator("pattern")
    @classmethod
    def _one_placeholder(cls, v: str) -> str:
        if v.count("{tenant}") != 1:
            raise ValueError("pattern must contain '{tenant}' exactly once")
        if not v.startswith("/"):
            raise ValueError("pattern must start with '/'")
        return v


Extractor = Annotated[
    HeaderExtractor | JwtExtractor | HostExtractor | PathExtractor, Field(discriminator="type")
]


def _default_extractors() -> list[Extractor]:
    return [HeaderExtractor(type="header"), JwtExtractor(type="jwt")]


class TenantSettings(_Frozen):
    # Every extractor runs; all that find a tenant must agree, else 400 tenant_mismatch.
    extractors: list[Extractor] = Field(default_factory=_default_extractors)
    # The least trust a source needs to decide the side: a tenant found only by sources
    # below it counts as no tenant (default side, pinned paths). Production sets
    # `credential` (or `edge`): a client-written value never picks a backend.
    min_trust: Trust = "client"
    # Verified (or decoded) tokens remembered until they expire, so the hot path pays for
    # a signature check once per token; bounded, oldest evicted first.
    token_cache_size: int = Field(default=10_000, ge=0, le=1_000_000)
    # Where a request with no recognisable tenant goes (reason `no-tenant`). Its old name
    # `default_target` is still read (deprecated: "target" is the HTTP request target).
    default_side: Side = Field(
        default="legacy", validation_alias=AliasChoices("default_side", "default_target")
    )
    # A tenant id longer than this, or with characters outside router.domain's alphabet,
    # is treated as "no tenant" rather than being fed to the flag evaluator and the
    # decision cache. The CLI checks the ids it is given against the same bound.
    max_length: int = Field(
        default=DEFAULT_TENANT_ID_MAX_LENGTH, ge=1, le=TENANT_ID_MAX_LENGTH_LIMIT
    )

    @model_validator(mode="before")
    @classmethod
    def _one_name_for_default_side(cls, data: Any) -> Any:
        if isinstance(data, dict) and "default_side" in data and "default_target" in data:
            raise ValueError(
                "default_side and default_target (its deprecated old name) are both set; "
                "keep default_side"
            )
        return data

    @model_validator(mode="after")
    def _some_source_can_decide(self) -> TenantSettings:
        # A min_trust no extractor reaches would route every request to default_side: a
        # misconfiguration, never an intent.
        need = TRUST_RANK[self.min_trust]
        if self.extractors and not any(TRUST_RANK[e.trust] >= need for e in self.extractors):
            raise ValueError(
                f"min_trust is {self.min_trust!r} but no extractor is trusted that far"
            )
        return self


class FlagSettings(_Frozen):
    source: Literal["file", "launchdarkly"] = "file"
    file: Path | None = None
    flag_key: str = "tenant-routing"
    # The file source polls the file's mtime (the SDK's watchdog mode misses atomic
    # renames, which is how `router flags set` writes): this bounds how late a flip lands.
    poll_interval: PositiveSeconds = 0.5
    sdk_key: str | None = None
    base_uri: str | None = None  # Relay Proxy, if used
    stream_uri: str | None = None
    events_uri: str | None = None
    send_events: bool = True  # analytics events to LaunchDarkly (launchdarkly source only)
    # Decisions are cached per tenant and invalidated on flag change; the bound keeps
    # a client inventing tenant ids from growing memory without limit.
    decision_cache_size: int = Field(default=200_000, ge=100)
    # Seconds `router serve` waits for flag data before starting to serve anyway (not
    # ready: /readyz stays 503 until data arrives).
    start_wait: float = Field(default=5.0, ge=0)


class UpstreamSettings(_Frozen):
    url: str
    # `preserve`: the client's Host (same-domain backends); `upstream`: the upstream's own
    # host name (what a load balancer in another account expects).
    host_header: Literal["preserve", "upstream"] = "preserve"
    verify_tls: bool = True
    ca_file: Path | None = None
    max_connections: int = Field(default=1024, ge=1)
    # Must stay below the upstream's own keep-alive timeout: if the upstream closes an idle
    # connection at the moment we reuse it, the request races the FIN (the stale-connection
    # race). Node.js closes idle connections after 5 s, gunicorn after 2 s, nginx 75 s,
    # an ALB 60 s; 4 s is safe against all but gunicorn's default.
    idle_timeout: PositiveSeconds = 4.0
    connect_timeout: PositiveSeconds = 3.0
    # From the end of the request to the response's status line and headers.
    response_header_timeout: PositiveSeconds = 30.0
    # Longest silence between two reads of the response body.
    read_timeout: PositiveSeconds = 60.0

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http:// or https:// URL with a host, got {v!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("must not carry a path, query or fragment (requests keep theirs)")
        try:
            _ = parts.port
        except ValueError as exc:
            raise ValueError(f"bad port: {exc}") from None
        return v.rstrip("/")

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def authority(self) -> str:
        """The upstream's own `Host` value (default ports omitted, as clients do)."""
        default = 443 if self.scheme == "https" else 80
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return host if self.port == default else f"{host}:{self.port}"


class UpstreamsSettings(_Frozen):
    legacy: UpstreamSettings
    new: UpstreamSettings


class ServerSettings(_Frozen):
    listen: str = "0.0.0.0:8080"
    admin_listen: str = "0.0.0.0:8081"
    workers: int = Field(default=1, ge=1, le=64)
    # Above the ALB's 60 s idle timeout: the ALB must be the side that closes an idle
    # connection, or it may send a request on a connection we are closing (ALB 502s).
    keepalive_timeout: PositiveSeconds = 75.0
    # SIGTERM: keep serving (readyz 503) this long so the ALB deregisters us, then stop
    # accepting and wait up to shutdown_timeout for in-flight requests.
    drain_delay: float = Field(default=10.0, ge=0)
    shutdown_timeout: float = Field(default=20.0, ge=0)
    # Seconds from the first byte of a request head to its end (slowloris): past it, 408
    # client_timeout and close. nginx client_header_timeout 60 s; HAProxy's
    # `timeout http-request` is commonly 10 s; Envoy's request_headers_timeout is unset.
    header_timeout: PositiveSeconds = 10.0
    # Longest wait for the next piece of a request body (nginx client_body_timeout 60 s):
    # past it, 408 client_timeout (the upstream connection, holding half a request, is
    # dropped) rather than an upstream connection held for good by a stalled client.
    client_body_timeout: PositiveSeconds = 60.0
    # Request-head limits (proxy/connection.py): the request target's length (414 beyond), one
    # field's name and value (431 beyond), the number of fields (431 beyond).
    max_request_line: int = Field(default=8190, ge=256)
    max_header_size: int = Field(default=8190, ge=256)
    max_headers: int = Field(default=100, ge=8)
    # Adds `X-Routed-To` (side; reason) to responses; useful in staging, off in prod.
    debug_headers: bool = False
    # Proxies in front of the router whose X-Forwarded-For entries are believed: 1 = the
    # ALB (it appends the address it saw). The client address logged, and the leftmost
    # X-Forwarded-For entry sent upstream, is the one the outermost trusted hop saw, never
    # an entry the client wrote. 0: nothing in front (the peer is the client, and the
    # client's X-Forwarded-* are dropped); 2: e.g. CloudFront -> ALB -> router.
    trusted_hops: int = Field(default=1, ge=0, le=16)
    # Whether the hop in front sets X-Forwarded-Proto / X-Forwarded-Host (replacing any a
    # client sent): only then is the request's value kept; otherwise the router sets
    # X-Forwarded-Proto from its own listener's scheme and X-Forwarded-Host from the Host
    # it received, whatever the client wrote. An AWS ALB sets X-Forwarded-Proto (and -For)
    # but never X-Forwarded-Host: behind one, trust proto, not host. Both need
    # trusted_hops >= 1 (something in front to trust).
    trust_forwarded_proto: bool = False
    trust_forwarded_host: bool = False
    # Pipelining: requests read and queued on one connection behind the one being served,
    # and the bytes they hold (heads and bodies). At either bound the router stops reading
    # the connection until its queue drains (TCP backpressure then reaches the client), so
    # one connection cannot make the router parse and hold an unbounded pile of requests.
    max_pipelined: int = Field(default=32, ge=1, le=1024)
    max_pipelined_bytes: int = Field(default=256 * 1024, ge=4096)

    @model_validator(mode="after")
    def _trust_needs_a_hop(self) -> ServerSettings:
        if (self.trust_forwarded_proto or self.trust_forwarded_host) and self.trusted_hops == 0:
            raise ValueError(
                "trust_forwarded_proto / trust_forwarded_host need trusted_hops >= 1: with "
                "nothing trusted in front, every X-Forwarded-* field came from the client"
            )
        return self

    @field_validator("listen", "admin_listen")
    @classmethod
    def _host_port(cls, v: str) -> str:
        _split_host_port(v)
        return v

    @property
    def listen_addr(self) -> tuple[str, int]:
        return _split_host_port(self.listen)

    @property
    def admin_addr(self) -> tuple[str, int]:
        return _split_host_port(self.admin_listen)


class PinnedPath(_Frozen):
    """Requests whose path matches `pattern` always go to `side` (reason `pinned-path`):
    for example lifecycle callbacks that one side must receive whatever the tenant's flag.

    The pattern is matched against the path without its query: `*` matches within one
    segment, `**` across segments, anything else literally; it must match the whole path
    (`/lifecycle/**` for everything under /lifecycle/).
    """

    pattern: PathPattern
    # `target` is its deprecated old name, still read.
    side: Side = Field(validation_alias=AliasChoices("side", "target"))

    @model_validator(mode="before")
    @classmethod
    def _one_name_for_side(cls, data: Any) -> Any:
        if isinstance(data, dict) and "side" in data and "target" in data:
            raise ValueError("side and target (its deprecated old name) are both set; keep side")
        return data


class RoutingSettings(_Frozen):
    # How long a request for a tenant in `hold` waits for the flag to move on before a 503
    # hold_timeout. Below the ALB's 60 s idle timeout, so the client gets our answer rather
    # than the ALB's 504; a single-tenant cutover takes seconds, not minutes.
    hold_timeout: PositiveSeconds = 20.0
    # Held requests are bounded, per tenant and in total: beyond, 503 hold_timeout at once
    # rather than memory that grows with a client's retries.
    max_held_per_tenant: int = Field(default=1000, ge=1)
    max_held_total: int = Field(default=10_000, ge=1)
    pinned_paths: list[PinnedPath] = Field(default_factory=list)
    # A signed X-Router-Target is honoured for this long after its timestamp (and as long
    # before it, for clock skew between the test runner and the router).
    override_window: PositiveSeconds = 300.0
    # The tenants a signed override may name (test tenants). null: any tenant (the secret
    # alone decides); a list: an override for any other tenant, or for a request without
    # a tenant, is ignored and counted (reason tenant_not_allowed), and the request goes
    # where the flag says. Production sets it: a leaked secret then cannot move customers.
    override_tenants: list[str] | None = None

    @field_validator("override_tenants")
    @classmethod
    def _override_tenant_ids(cls, v: list[str] | None) -> list[str] | None:
        # A misspelt id would silently allow nothing for it: refuse it at start-up.
        for tenant in v or ():
            problem = tenant_id_problem(tenant, TENANT_ID_MAX_LENGTH_LIMIT)
            if problem is not None:
                raise ValueError(problem)
        return v


class BodyLimit(_Frozen):
    """A request-body limit for paths matching `pattern` (routing.pinned_paths syntax)."""

    pattern: PathPattern
    max_bytes: int = Field(ge=0)


class LimitSettings(_Frozen):
    """Overload protection, per worker process. When a bound is hit the router sheds load
    with 503 `overloaded` and Retry-After (counted in router_shed_requests_total) instead of
    queueing without bound: a client retries elsewhere, and the requests already accepted
    keep their latency. For comparison: HAProxy's `maxconn` (per process) is derived from
    the file-descriptor limit when unset, and it queues beyond; Envoy has no connection
    limit unless its overload manager is configured, and then sheds by memory."""

    # Open client connections. Beyond it, a new connection gets a 503 and is closed at
    # once; the open ones keep working. 10,000 idle connections cost about 85 MiB.
    max_connections: int = Field(default=20_000, ge=1)
    # Requests being proxied (held ones excluded: they are bounded by routing.max_held_*).
    max_inflight: int = Field(default=10_000, ge=1)
    # Event-loop lag (how late a 100 ms timer fires) above which new requests are shed
    # until it recovers: past this the loop cannot keep up with what it has accepted.
    max_loop_lag: PositiveSeconds = 0.5
    # Request bodies larger than this get 413 body_too_large (null: no limit). The router
    # streams bodies, so size costs it no memory; the limit protects the backends. nginx's
    # client_max_body_size defaults to 1 MiB; HAProxy and Envoy (streaming) set none.
    max_body_bytes: int | None = Field(default=None, ge=0)
    # Per-path limits, first match wins, before max_body_bytes: e.g. uploads may be larger.
    body_limits: list[BodyLimit] = Field(default_factory=list)


class AccessLogSettings(_Frozen):
    enabled: bool = True
    # Fraction of successful requests logged; errors (status >= 500 or an error code)
    # are always logged.
    sample_rate: float = Field(default=1.0, ge=0, le=1)


class ShadowSettings(_Frozen):
    """Shadow traffic (shadow.py): copies of a sample of a tenant's safe requests that legacy
    serves are sent to new in the background, and the two answers compared.

    Only GET and HEAD without a body are ever copied, and only for requests the tenant's
    flag sends to legacy (not test overrides, pinned paths or ratchet decisions). The
    client's answer always comes from legacy; the copy never delays it, and is dropped
    (counted) rather than queued when max_concurrency and max_queue are full.
    """

    # Tenants shadowed: a list (each at sample_rate) or a mapping tenant -> its own rate
    # (a list is read as a mapping to null: sample_rate).
    tenants: dict[str, Annotated[float, Field(ge=0, le=1)] | None] = Field(default_factory=dict)
    # Fraction of a shadowed tenant's eligible requests that are copied.
    sample_rate: float = Field(default=0.01, ge=0, le=1)
    # A LaunchDarkly flag evaluated per tenant (same flag source as the routing flag):
    # true -> sample_rate, a number -> that rate, false/0/absent -> not shadowed. Checked
    # after `tenants`, which wins. null: only `tenants` decides.
    flag_key: str | None = None
    # Copies being sent at once, per worker, and copies waiting for a free slot; beyond
    # both, a copy is dropped (router_shadow_dropped_total{reason="queue_full"}).
    max_concurrency: int = Field(default=16, ge=1, le=1024)
    max_queue: int = Field(default=64, ge=0, le=100_000)
    # Seconds a copy may take (connect, response head, each body read), and the longest a
    # queued copy may wait before it is dropped as stale (its legacy answer is that old).
    timeout: PositiveSeconds = 10.0
    # Paths never copied (routing.pinned_paths syntax): GET endpoints with side effects.
    exclude_paths: list[PathPattern] = Field(default_factory=list)
    # Response fields compared (case-insensitive). Date, Server, ids... differ by nature.
    compare_headers: list[str] = Field(
        default_factory=lambda: ["content-type", "content-encoding", "location", "cache-control"]
    )
    # JSON bodies: object keys ignored at any depth ("updated_at"), or paths from the
    # root ("$.meta.generated_at", "$.items[*].etag"). Other bodies compare byte for byte.
    ignore_json_keys: list[str] = Field(default_factory=list)
    # Bodies up to this size are kept for the comparison (and the JSON diff); larger ones
    # are compared by a streaming hash only, never held whole in memory.
    max_compare_bytes: int = Field(default=64 * 1024, ge=0, le=16 * 1024 * 1024)
    # Diffy's noise filter: send each copy to legacy a second time too; fields that differ
    # between two legacy answers are noise for that tenant and ignored from then on.
    # It doubles the copies' load on legacy.
    noise_filter: bool = False
    # Recent mismatches kept per tenant (GET /admin/shadow), and tenants tracked per worker.
    recent_mismatches: int = Field(default=20, ge=1, le=1000)
    max_tenants: int = Field(default=1000, ge=1, le=100_000)

    @field_validator("tenants", mode="before")
    @classmethod
    def _list_as_mapping(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not all(isinstance(t, str) and t for t in v):
                raise ValueError("expected tenant ids (strings), or a mapping tenant: rate")
            return dict.fromkeys(v)
        return v

    @field_validator("compare_headers")
    @classmethod
    def _header_names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not is_token(name):
                raise ValueError(f"not a valid header name: {name!r}")
        return [name.lower() for name in v]

    @field_validator("ignore_json_keys")
    @classmethod
    def _paths(cls, v: list[str]) -> list[str]:
        for key in v:
            if not key:
                raise ValueError("an empty key")
            if key.startswith("$") and not _JSON_PATH.fullmatch(key):
                raise ValueError(f"not a path like $.a.b[*].c: {key!r}")
        return v

    @property
    def enabled(self) -> bool:
        return bool(self.tenants) or self.flag_key is not None

    def rate_for_listed(self, tenant: str) -> float | None:
        """The configured rate for a tenant in `tenants` (None: not listed)."""
        if tenant not in self.tenants:
            return None
        rate = self.tenants[tenant]
        return self.sample_rate if rate is None else rate


_JSON_PATH: Final = re.compile(r"\$(\.[^.\[\]]+|\[(\*|\d+)\])*")


class Settings(_Frozen):
    server: ServerSettings = Field(default_factory=ServerSettings)
    tenant: TenantSettings = Field(default_factory=TenantSettings)
    flags: FlagSettings = Field(default_factory=FlagSettings)
    upstreams: UpstreamsSettings
    access_log: AccessLogSettings = Field(default_factory=AccessLogSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    shadow: ShadowSettings = Field(default_factory=ShadowSettings)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # The ratchet ledger (ledger.py): sqlite:///path (one router) or redis://host:port/db
    # (a fleet: every instance must see the same ledger).
    ledger: str = "sqlite:///router-ledger.db"
    admin_token: str | None = None
    # Signed overrides: the current secret (`router sign` signs with it) and, while it is
    # being rotated, the previous one, still accepted (docs/operations.md).
    override_secret: str | None = None
    override_secret_previous: str | None = None
    # Query parameters whose values never reach a log line or an admin view (the access
    # log, shadow mismatches): a name matches when, lower-cased and percent-decoded, it
    # contains one of these (so `token` covers access_token, id_token, ...). "*": every
    # value. Values without a name are always redacted (docs/contracts.md).
    redact_query_params: list[str] = Field(
        default_factory=lambda: list(DEFAULT_REDACT_QUERY_PARAMS), min_length=1
    )

    @field_validator("ledger")
    @classmethod
    def _ledger_url(cls, v: str) -> str:
        # docs/contracts.md says `sqlite:///path` or `redis://host:port/db`. Unchecked, a
        # typo (ROUTER_LEDGER=sqlite://x.db, postgres://...) started fine and would only
        # fail once the ratchet first writes: the 3 a.m. failure this module exists to stop.
        parts = urlsplit(v)
        if parts.scheme == "sqlite":
            if parts.netloc or not parts.path.strip("/"):
                raise ValueError(f"expected sqlite:///path (three slashes), got {v!r}")
        elif parts.scheme in ("redis", "rediss"):
            if not parts.hostname:
                raise ValueError(f"expected redis://host:port/db, got {v!r}")
        else:
            raise ValueError(f"expected sqlite:///path or redis://host:port/db, got {v!r}")
        return v

    @field_validator("redact_query_params")
    @classmethod
    def _redact_words(cls, v: list[str]) -> list[str]:
        words = [w.strip().lower() for w in v]
        if any(not w for w in words):
            raise ValueError(
                'names must not be empty (an empty one would match everything: say "*" for that)'
            )
        return words

    @model_validator(mode="after")
    def _previous_secret_needs_a_current_one(self) -> Settings:
        # Only the previous secret set is a half-done rotation: fail at start-up rather
        # than accept signatures made with the secret being retired and none other.
        if self.override_secret_previous and not self.override_secret:
            raise ValueError(
                "override_secret_previous (ROUTER_OVERRIDE_SECRET_PREVIOUS) is set without "
                "override_secret (ROUTER_OVERRIDE_SECRET): set the current secret"
            )
        if self.override_secret_previous and self.override_secret_previous == self.override_secret:
            raise ValueError("override_secret_previous is the same as override_secret")
        return self

    @model_validator(mode="after")
    def _flag_source_complete(self) -> Settings:
        if self.flags.source == "file" and self.flags.file is None:
            raise ValueError(
                "flags.file (or ROUTER_FLAGS_FILE) is required when flags.source is 'file'"
            )
        if self.flags.source == "launchdarkly" and not self.flags.sdk_key:
            raise ValueError(
                "flags.sdk_key (or LAUNCHDARKLY_SDK_KEY) is required when flags.source is "
                "'launchdarkly'"
            )
        return self


# Environment variable -> (path in the settings tree, converter): docs/contracts.md's table.
_ENV: dict[str, tuple[tuple[str, ...], Any]] = {
    "ROUTER_LISTEN": (("server", "listen"), str),
    "ROUTER_ADMIN_LISTEN": (("server", "admin_listen"), str),
    "ROUTER_WORKERS": (("server", "workers"), str),
    "ROUTER_LEGACY_URL": (("upstreams", "legacy", "url"), str),
    "ROUTER_NEW_URL": (("upstreams", "new", "url"), str),
    "ROUTER_FLAGS_SOURCE": (("flags", "source"), str),
    "ROUTER_FLAGS_FILE": (("flags", "file"), lambda v: str(Path(v).absolute())),
    "LAUNCHDARKLY_SDK_KEY": (("flags", "sdk_key"), str),
    "ROUTER_LOG_LEVEL": (("log_level",), lambda v: v.lower()),
    "ROUTER_LEDGER": (("ledger",), str),
    "ROUTER_ADMIN_TOKEN": (("admin_token",), str),
    "ROUTER_OVERRIDE_SECRET": (("override_secret",), str),
    "ROUTER_OVERRIDE_SECRET_PREVIOUS": (("override_secret_previous",), str),
}


def _set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = tree
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[path[-1]] = value


def _apply_tenant_header(tree: dict[str, Any], header: str) -> None:
    """ROUTER_TENANT_HEADER renames the header extractor, adding one first if there is none."""
    tenant = tree.setdefault("tenant", {})
    if not isinstance(tenant, dict):
        return  # the validator reports the bad type
    extractors = tenant.get("extractors")
    if extractors is None:
        extractors = [{"type": "header"}, {"type": "jwt"}]
    if not isinstance(extractors, list):
        return
    extractors = [dict(e) if isinstance(e, dict) else e for e in extractors]
    headers = [e for e in extractors if isinstance(e, dict) and e.get("type") == "header"]
    if headers:
        for extractor in headers:
            extractor["name"] = header
    else:
        extractors.insert(0, {"type": "header", "name": header})
    tenant["extractors"] = extractors


def _resolve_relative_paths(tree: dict[str, Any], base: Path) -> None:
    flags = tree.get("flags")
    if isinstance(flags, dict) and isinstance(flags.get("file"), str):
        flags["file"] = str((base / flags["file"]).resolve())
    upstreams = tree.get("upstreams")
    if isinstance(upstreams, dict):
        for upstream in upstreams.values():
            if isinstance(upstream, dict) and isinstance(upstream.get("ca_file"), str):
                upstream["ca_file"] = str((base / upstream["ca_file"]).resolve())
    tenant = tree.get("tenant")
    extractors = tenant.get("extractors") if isinstance(tenant, dict) else None
    for extractor in extractors if isinstance(extractors, list) else ():
        verify = extractor.get("verify") if isinstance(extractor, dict) else None
        if isinstance(verify, dict) and isinstance(verify.get("ca_file"), str):
            verify["ca_file"] = str((base / verify["ca_file"]).resolve())


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error.

    PyYAML keeps the last one silently: a second `upstreams:` section further down a
    long file replaced the first one whole, with no message (the YAML twin of a misspelt
    key, which `extra="forbid"` rejects).
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults`: keys given next to it may override merged ones
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # an unhashable key: super() reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        # Drop the discriminator tags pydantic adds for tagged unions ("header", "jwt").
        loc = ".".join(str(p) for p in err["loc"] if p not in ("header", "jwt", "host", "path"))
        message = err["msg"].removeprefix("Value error, ")
        lines.append(f"{loc or 'config'}: {message}")
    return "\n".join(lines)


def deprecated_keys(tree: Mapping[str, Any]) -> list[str]:
    """The old key names a config file (its YAML, unvalidated) still uses, each with its
    new name: they are read, but "target" now means only the HTTP request target."""
    found = []
    tenant = tree.get("tenant")
    if isinstance(tenant, Mapping) and "default_target" in tenant:
        found.append("tenant.default_target (now tenant.default_side)")
    routing = tree.get("routing")
    pinned = routing.get("pinned_paths") if isinstance(routing, Mapping) else None
    for index, path in enumerate(pinned if isinstance(pinned, list) else []):
        if isinstance(path, Mapping) and "target" in path:
            found.append(
                f"routing.pinned_paths[{index}].target (now routing.pinned_paths[{index}].side)"
            )
    return found


def load_settings(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Read the YAML file (optional), apply environment overrides, validate.

    Raises ConfigError naming every bad key. `env` defaults to `os.environ`.
    """
    env = os.environ if env is None else env
    tree: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
            loaded = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
        except OSError as exc:
            raise ConfigError(f"{file}: cannot read: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file}: the top level must be a mapping of settings")
        tree = loaded
        _resolve_relative_paths(tree, file.resolve().parent)

    for name, (key_path, convert) in _ENV.items():
        value = env.get(name)
        if value:
            _set_path(tree, key_path, convert(value))
    tenant_header = env.get("ROUTER_TENANT_HEADER")
    if tenant_header:
        _apply_tenant_header(tree, tenant_header)

    try:
        return Settings.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None
