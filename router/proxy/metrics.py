"""Prometheus metrics: counted in plain Python on the hot path, rendered at scrape time.

Why not prometheus-client's Counter/Histogram objects on the hot path: every `inc()` and
`observe()` takes a lock and walks label children, about 0.5-1 us each, and a request
touches eight of them; the event loop thread is the only writer here, so a dict update
does the same job for a tenth of that. prometheus-client still does what it is good at:
the families and the text exposition, from `RouterCollector.collect()` at scrape time.

Labels never grow with tenants or paths: target (the side: legacy/new/hold/none; named
`target` before the vocabulary settled, kept for dashboards and alerts), method (the
standard methods, anything else is OTHER), status code, reason and error code (both
fixed vocabularies).

Several workers (`router serve --workers N`): each worker counts its own requests; the
worker that answers a scrape asks its siblings for their `snapshot()` over their private
admin sockets (admin.py) and renders the sum (`merge`). So one scrape of the shared admin
port is the whole task's figures, exact and current, with no shared files or locks on the
hot path. Gauges are summed too, except `router_flag_source_ready`, which is the minimum
(the task is ready only when every worker has flag data).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

# A proxy's latency lives in milliseconds: buckets from 0.5 ms, dense below 100 ms.
# The explicit types are for mypyc: with a bare `Final`, its compiled module never sets
# these (NameError at import).
LATENCY_BUCKETS: Final[tuple[float, ...]] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
CONNECT_BUCKETS: Final[tuple[float, ...]] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 3.0,
)  # fmt: skip
METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"}
)
# Every side a request can be counted against ("none": answered before a side was chosen).
METRIC_SIDES: Final = ("legacy", "new", "hold", "none")

# name -> (type, help, label names). The one list of what the router exports.
FAMILIES: Final[dict[str, tuple[str, str, tuple[str, ...]]]] = {
    "router_requests_total": (
        "counter", "Requests answered, by side, method and status.", ("target", "method", "code")),
    "router_request_duration_seconds": (
        "histogram", "Time from request head to last response byte.", ("target",)),
    "router_upstream_connect_duration_seconds": (
        "histogram", "Time to open a new upstream connection.", ("target",)),
    "router_inflight_requests": ("gauge", "Requests being proxied now, by side.", ("target",)),
    "router_upstream_errors_total": (
        "counter", "Upstream failures, by side and error code.", ("target", "code")),
    "router_route_decisions_total": (
        "counter", "Routing decisions, by side and reason.", ("target", "reason")),
    "router_flag_source_ready": ("gauge", "1 once flag data has loaded (all workers).", ()),
    "router_flag_updates_total": ("counter", "Change events received for the routing flag.", ()),
    "router_pool_connections": (
        "gauge", "Upstream connections, by side and state (idle/active).", ("target", "state")),
    "router_request_bytes_total": (
        "counter", "Request body bytes sent upstream.", ("target",)),
    "router_response_bytes_total": (
        "counter", "Response body bytes relayed to clients.", ("target",)),
    "router_held_requests": (
        "gauge", "Requests held now, waiting for a tenant's cutover to move on.", ()),
    "router_hold_timeouts_total": (
        "counter", "Held requests answered 503 hold_timeout.", ()),
    "router_ratchet_refusals_total": (
        "counter", "Legacy decisions refused for tenants already served by new.", ()),
    "router_override_rejections_total": (
        "counter", "X-Router-Target headers ignored, by reason (no valid signature).",
        ("reason",)),
    "router_tenant_mismatch_total": (
        "counter", "Requests refused 400 tenant_mismatch: identity sources named different "
        "tenants, by the pair of sources (e.g. header+jwt).", ("sources",)),
    "router_invalid_tokens_total": (
        "counter", "Requests refused 401 invalid_token (a JWT failed verification, or alg "
        "none).", ()),
    "router_shed_requests_total": (
        "counter", "Requests and connections refused by overload protection, by reason "
        "(connections, inflight, loop_lag).", ("reason",)),
    "router_event_loop_lag_seconds": (
        "gauge", "How late a 100 ms timer last fired on the event loop (max over workers).",
        ()),
    "router_workers": (
        "gauge", "Worker processes this scrape's figures include (answered) or lack (missing).",
        ("state",)),
    "router_shadow_requests_total": (
        "counter", "Copies of legacy requests sent to new (shadow traffic).", ()),
    "router_shadow_comparisons_total": (
        "counter", "Shadow copies by outcome (matched, mismatched; noisy or incomplete: no "
        "verdict).", ("result",)),
    "router_shadow_mismatches_total": (
        "counter", "Shadow mismatches by what differed (status, header, body, error); one "
        "comparison may count several kinds.", ("kind",)),
    "router_shadow_dropped_total": (
        "counter", "Shadow copies not sent, by reason (queue_full, stale, closing).",
        ("reason",)),
    "router_shadow_duration_seconds": (
        "histogram", "Shadowed requests: each side's time to a complete answer.", ("side",)),
    "router_shadow_pending": (
        "gauge", "Shadow copies being sent (active) or waiting for a slot (queued).",
        ("state",)),
}  # fmt: skip
_MIN_GAUGES: Final = frozenset({"router_flag_source_ready"})
_MAX_GAUGES: Final = frozenset({"router_event_loop_lag_seconds"})
_BUCKETS: Final = {
    "router_request_duration_seconds": LATENCY_BUCKETS,
    "router_upstream_connect_duration_seconds": CONNECT_BUCKETS,
    "router_shadow_duration_seconds": LATENCY_BUCKETS,
}

# snapshot(): {"counters"|"gauges": {name: [[labels, value], ...]},
#              "histograms": {name: [[labels, [per-bucket counts..., +Inf], sum], ...]}}
Snapshot = dict[str, dict[str, list[Any]]]


class Histogram:
    """Per-bucket (not cumulative) counts; the last slot is +Inf."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le).
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class Metrics:
    """The router's figures for one worker. Only the event loop thread writes them."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        self.decisions: dict[tuple[str, str], int] = {}
        self.upstream_errors: dict[tuple[str, str], int] = {}
        self.inflight = dict.fromkeys(METRIC_SIDES, 0)
        self.request_bytes = dict.fromkeys(METRIC_SIDES, 0)
        self.response_bytes = dict.fromkeys(METRIC_SIDES, 0)
        self.duration = {t: Histogram(LATENCY_BUCKETS) for t in METRIC_SIDES}
        self.connect_duration = {t: Histogram(CONNECT_BUCKETS) for t in METRIC_SIDES}
        self.flag_updates = 0
        self.hold_timeouts = 0
        self.ratchet_refusals = 0
        self.override_rejections: dict[str, int] = {}
        self.shed: dict[str, int] = {}
        self.tenant_mismatches: dict[str, int] = {}
        self.invalid_tokens = 0
        self.loop_lag = 0.0
        self.held: Callable[[], int] = lambda: 0
        # Read at scrape time (set by RouterApp): flag readiness and pool sizes.
        self.flag_ready: Callable[[], bool] = lambda: False
        self.pool_sizes: Callable[[], Iterable[tuple[str, int, int]]] = lambda: ()
        # Shadow traffic (shadow.py); pending is read at scrape time: (active, queued).
        self.shadow_requests = 0
        self.shadow_results: dict[str, int] = {}
        self.shadow_mismatches: dict[str, int] = {}
        self.shadow_drops: dict[str, int] = {}
        self.shadow_durations = {side: Histogram(LATENCY_BUCKETS) for side in ("legacy", "new")}
        self.shadow_pending: Callable[[], tuple[int, int]] = lambda: (0, 0)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(RouterCollector(self.snapshot))

    # ---- hot path ----------------------------------------------------------------------

    def request_started(self, side: str, reason: str) -> None:
        decisions = self.decisions
        key = (side, reason)
        decisions[key] = decisions.get(key, 0) + 1
        self.inflight[side] += 1

    def decided(self, side: str, reason: str) -> None:
        """A decision that does not (yet) send the request anywhere: `hold`."""
        decisions = self.decisions
        key = (side, reason)
        decisions[key] = decisions.get(key, 0) + 1

    def shed_one(self, reason: str) -> None:
        self.shed[reason] = self.shed.get(reason, 0) + 1

    def tenant_mismatch(self, sources: str) -> None:
        self.tenant_mismatches[sources] = self.tenant_mismatches.get(sources, 0) + 1

    def override_rejected(self, reason: str) -> None:
        rejections = self.override_rejections
        rejections[reason] = rejections.get(reason, 0) + 1

    def request_finished(
        self,
        side: str,
        method: str,
        status: int,
        seconds: float,
        bytes_in: int,
        bytes_out: int,
        upstream_error: str | None,
    ) -> None:
        self.inflight[side] -= 1
        if method not in METHODS:
            method = "OTHER"
        requests = self.requests
        key = (side, method, status)
        requests[key] = requests.get(key, 0) + 1
        self.duration[side].observe(seconds)
        if bytes_in:
            self.request_bytes[side] += bytes_in
        if bytes_out:
            self.response_bytes[side] += bytes_out
        if upstream_error is not None:
            errors = self.upstream_errors
            ekey = (side, upstream_error)
            errors[ekey] = errors.get(ekey, 0) + 1

    def local_reply(self, method: str, status: int, side: str = "none") -> None:
        """A request answered by the router itself: before any side was chosen (side
        none), or held and then refused (side hold). The label is `target` (dashboards)."""
        if method not in METHODS:
            method = "OTHER"
        if side not in ("none", "hold"):
            side = "none"  # chosen, but refused before reaching it (ledger unavailable)
        requests = self.requests
        key = (side, method, status)
        requests[key] = requests.get(key, 0) + 1

    def connected(self, side: str, seconds: float) -> None:
        self.connect_duration[side].observe(seconds)

    def flag_updated(self) -> None:
        self.flag_updates += 1

    # ---- shadow traffic (sampled copies, off the client's path) ------------------------

    def shadow_compared(self, result: str) -> None:
        self.shadow_results[result] = self.shadow_results.get(result, 0) + 1

    def shadow_mismatch(self, kind: str) -> None:
        self.shadow_mismatches[kind] = self.shadow_mismatches.get(kind, 0) + 1

    def shadow_dropped(self, reason: str) -> None:
        self.shadow_drops[reason] = self.shadow_drops.get(reason, 0) + 1

    def shadow_duration(self, side: str, seconds: float) -> None:
        self.shadow_durations[side].observe(seconds)

    # ---- scrape ------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """This worker's figures as JSON-able data (what siblings send each other)."""
        counters: dict[str, list[Any]] = {
            "router_requests_total": [
                [[t, m, str(c)], v] for (t, m, c), v in self.requests.items()
            ],
            "router_route_decisions_total": [[list(k), v] for k, v in self.decisions.items()],
            "router_upstream_errors_total": [[list(k), v] for k, v in self.upstream_errors.items()],
            "router_request_bytes_total": [[[t], v] for t, v in self.request_bytes.items() if v],
            "router_response_bytes_total": [[[t], v] for t, v in self.response_bytes.items() if v],
            "router_flag_updates_total": [[[], self.flag_updates]],
            "router_hold_timeouts_total": [[[], self.hold_timeouts]],
            "router_ratchet_refusals_total": [[[], self.ratchet_refusals]],
            "router_override_rejections_total": [
                [[r], v] for r, v in self.override_rejections.items()
            ],
            "router_shed_requests_total": [[[r], v] for r, v in self.shed.items()],
            "router_tenant_mismatch_total": [[[k], v] for k, v in self.tenant_mismatches.items()],
            "router_invalid_tokens_total": [[[], self.invalid_tokens]],
            "router_shadow_requests_total": [[[], self.shadow_requests]],
            "router_shadow_comparisons_total": [[[r], v] for r, v in self.shadow_results.items()],
            "router_shadow_mismatches_total": [[[k], v] for k, v in self.shadow_mismatches.items()],
            "router_shadow_dropped_total": [[[r], v] for r, v in self.shadow_drops.items()],
        }
        shadow_active, shadow_queued = self.shadow_pending()
        pools: list[Any] = []
        for side, idle, active in self.pool_sizes():
            pools.append([[side, "idle"], idle])
            pools.append([[side, "active"], active])
        gauges: dict[str, list[Any]] = {
            "router_inflight_requests": [[[t], v] for t, v in self.inflight.items() if t != "none"],
            "router_flag_source_ready": [[[], 1 if self.flag_ready() else 0]],
            "router_pool_connections": pools,
            "router_held_requests": [[[], self.held()]],
            "router_workers": [[["answered"], 1]],
            "router_event_loop_lag_seconds": [[[], self.loop_lag]],
            "router_shadow_pending": [[["active"], shadow_active], [["queued"], shadow_queued]],
        }
        histograms: dict[str, list[Any]] = {
            "router_request_duration_seconds": [
                [[t], list(h.counts), h.sum] for t, h in self.duration.items() if any(h.counts)
            ],
            "router_upstream_connect_duration_seconds": [
                [[t], list(h.counts), h.sum]
                for t, h in self.connect_duration.items()
                if any(h.counts)
            ],
            "router_shadow_duration_seconds": [
                [[side], list(h.counts), h.sum]
                for side, h in self.shadow_durations.items()
                if any(h.counts)
            ],
        }
        return {"counters": counters, "gauges": gauges, "histograms": histograms}


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """The sum of several workers' snapshots (gauges in _MIN_GAUGES: the minimum)."""
    totals: dict[str, dict[str, dict[tuple[str, ...], Any]]] = {
        "counters": {}, "gauges": {}, "histograms": {}
    }  # fmt: skip
    for snap in snapshots:
        for kind in ("counters", "gauges"):
            for name, series in snap.get(kind, {}).items():
                merged = totals[kind].setdefault(name, {})
                for labels, value in series:
                    key = tuple(labels)
                    if key not in merged:
                        merged[key] = value
                    elif name in _MIN_GAUGES:
                        merged[key] = min(merged[key], value)
                    elif name in _MAX_GAUGES:
                        merged[key] = max(merged[key], value)
                    else:
                        merged[key] += value
        for name, series in snap.get("histograms", {}).items():
            merged = totals["histograms"].setdefault(name, {})
            for labels, counts, total in series:
                key = tuple(labels)
                if key in merged:
                    old_counts, old_total = merged[key]
                    merged[key] = ([a + b for a, b in zip(old_counts, counts, strict=True)],
                                   old_total + total)  # fmt: skip
                else:
                    merged[key] = (list(counts), total)
    result: Snapshot = {}
    for kind, families in totals.items():
        result[kind] = {}
        for name, merged_series in families.items():
            if kind == "histograms":
                result[kind][name] = [[list(k), c, s] for k, (c, s) in merged_series.items()]
            else:
                result[kind][name] = [[list(k), v] for k, v in merged_series.items()]
    return result


def families(snapshot: Snapshot) -> Iterator[Metric]:
    """Prometheus metric families for a snapshot, every family of FAMILIES present."""
    values: dict[str, list[Any]] = {}
    for kind in ("counters", "gauges", "histograms"):
        values.update(snapshot.get(kind, {}))
    for name, (kind, help_text, labels) in FAMILIES.items():
        series = values.get(name, [])
        family: Any
        if kind == "counter":
            family = CounterMetricFamily(name, help_text, labels=labels)
            for label_values, value in series:
                family.add_metric(label_values, value)
        elif kind == "gauge":
            family = GaugeMetricFamily(name, help_text, labels=labels)
            for label_values, value in series:
                family.add_metric(label_values, value)
        else:
            bounds = _BUCKETS[name]
            family = HistogramMetricFamily(name, help_text, labels=labels)
            for label_values, counts, total in series:
                cumulative = 0
                buckets: list[tuple[str, float]] = []
                for bound, count in zip((*map(_float_label, bounds), "+Inf"), counts, strict=True):
                    cumulative += count
                    buckets.append((bound, cumulative))
                family.add_metric(label_values, buckets, total)
        yield family


def _float_label(value: float) -> str:
    # The `le` spelling prometheus-client uses for its own histograms ("0.005", "1.0").
    return repr(float(value))


class RouterCollector(Collector):
    """Renders a snapshot source (this worker's, or the merged figures of all workers)."""

    def __init__(self, source: Callable[[], Snapshot]) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        return families(self._source())


def render(snapshot: Snapshot) -> bytes:
    """Prometheus text exposition of a snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RouterCollector(lambda: snapshot))
    return generate_latest(registry)
