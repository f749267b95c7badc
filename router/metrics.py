"""Prometheus collectors, declared once, and the record_* helpers the hot path calls.

Labels never grow with tenants or paths: target (legacy/new/hold/none), method (the
standard methods, anything else is OTHER), status code, reason and error code (both
fixed vocabularies). Label children are resolved once and cached in plain dicts, because
`Counter.labels()` costs more than the increment itself.

Names follow what an operator asks (Envoy's habit): how many requests went where, how
long they took, how many are in flight, how the upstream connections fare.
"""

from __future__ import annotations

from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# A proxy's latency lives in milliseconds: buckets from 0.5 ms, dense below 100 ms.
LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
CONNECT_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 3.0)
METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"}
)


class Metrics:
    """All router collectors on one registry (one per app, so tests can build several)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "router_requests_total", "Requests answered, by side, method and status.",
            ["target", "method", "code"], registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "router_request_duration_seconds", "Time from request head to last response byte.",
            ["target"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.connect_duration = Histogram(
            "router_upstream_connect_duration_seconds", "Time to open a new upstream connection.",
            ["target"], buckets=CONNECT_BUCKETS, registry=r,
        )  # fmt: skip
        self.inflight = Gauge(
            "router_inflight_requests", "Requests being proxied now, by side.", ["target"],
            registry=r,
        )  # fmt: skip
        self.upstream_errors = Counter(
            "router_upstream_errors_total", "Upstream failures, by side and error code.",
            ["target", "code"], registry=r,
        )  # fmt: skip
        self.decisions = Counter(
            "router_route_decisions_total", "Routing decisions, by side and reason.",
            ["target", "reason"], registry=r,
        )  # fmt: skip
        self.flag_ready = Gauge(
            "router_flag_source_ready", "1 once flag data has loaded.", registry=r
        )
        self.flag_updates = Counter(
            "router_flag_updates_total", "Change events received for the routing flag.",
            registry=r,
        )  # fmt: skip
        self.pool_connections = Gauge(
            "router_pool_connections", "Upstream connections, by side and state (idle/active).",
            ["target", "state"], registry=r,
        )  # fmt: skip
        self.request_bytes = Counter(
            "router_request_bytes_total", "Request body bytes sent upstream.", ["target"],
            registry=r,
        )  # fmt: skip
        self.response_bytes = Counter(
            "router_response_bytes_total", "Response body bytes relayed to clients.", ["target"],
            registry=r,
        )  # fmt: skip
        self._children: dict[Any, Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # ---- hot path ----------------------------------------------------------------------

    def request_started(self, target: str, reason: str) -> None:
        self._child(self.decisions, target, reason).inc()
        self._child(self.inflight, target).inc()

    def request_finished(
        self,
        target: str,
        method: str,
        status: int,
        seconds: float,
        bytes_in: int,
        bytes_out: int,
        upstream_error: str | None,
    ) -> None:
        self._child(self.inflight, target).dec()
        if method not in METHODS:
            method = "OTHER"
        self._child(self.requests, target, method, str(status)).inc()
        self._child(self.duration, target).observe(seconds)
        if bytes_in:
            self._child(self.request_bytes, target).inc(bytes_in)
        if bytes_out:
            self._child(self.response_bytes, target).inc(bytes_out)
        if upstream_error is not None:
            self._child(self.upstream_errors, target, upstream_error).inc()

    def local_reply(self, method: str, status: int) -> None:
        """A request answered by the router itself before any side was chosen."""
        if method not in METHODS:
            method = "OTHER"
        self._child(self.requests, "none", method, str(status)).inc()

    def connected(self, target: str, seconds: float) -> None:
        self._child(self.connect_duration, target).observe(seconds)
