"""The metric names the router exports on its admin port's /metrics: the one list that the
deployment files (config/grafana/router-dashboard.json, config/prometheus/alerts.yml) and
the router's own /metrics test are checked against.

Names are as PromQL sees them: counters with their `_total`, histograms by their base name
(the exposition has `<name>_bucket`, `<name>_sum` and `<name>_count`). `base_name()` maps
an exposed sample name back to its entry here. Renaming a metric means changing it here,
in router/proxy/metrics.py, and in every dashboard and alert that the tests then flag.
"""

from __future__ import annotations

from typing import Final, Literal

Kind = Literal["counter", "gauge", "histogram"]

# name -> kind, with the labels in a comment (labels never grow with tenants or paths).
METRIC_KINDS: Final[dict[str, Kind]] = {
    "router_requests_total": "counter",  # target, method, code
    "router_request_duration_seconds": "histogram",  # target
    "router_upstream_connect_duration_seconds": "histogram",  # target
    "router_inflight_requests": "gauge",  # target
    "router_upstream_errors_total": "counter",  # target, code (an error code, not a status)
    "router_route_decisions_total": "counter",  # target, reason
    "router_flag_source_ready": "gauge",
    "router_flag_updates_total": "counter",
    "router_pool_connections": "gauge",  # target, state (idle/active)
    "router_request_bytes_total": "counter",  # target
    "router_response_bytes_total": "counter",  # target
    "router_held_requests": "gauge",
    "router_hold_timeouts_total": "counter",
    "router_ratchet_refusals_total": "counter",
    "router_override_rejections_total": "counter",  # reason (fixed set, override.py)
    "router_tenant_mismatch_total": "counter",  # sources (a pair of extractor types)
    "router_invalid_tokens_total": "counter",
    "router_shed_requests_total": "counter",  # reason (connections, inflight, loop_lag)
    "router_event_loop_lag_seconds": "gauge",
    "router_workers": "gauge",  # state (answered/missing): workers a scrape's figures cover
    "router_shadow_requests_total": "counter",
    "router_shadow_comparisons_total": "counter",  # result (matched/mismatched/noisy/incomplete)
    "router_shadow_mismatches_total": "counter",  # kind (status/header/body/error)
    "router_shadow_dropped_total": "counter",  # reason (queue_full/stale/closing)
    "router_shadow_duration_seconds": "histogram",  # side (legacy/new)
    "router_shadow_pending": "gauge",  # state (active/queued)
}

EXPORTED_METRICS: Final[frozenset[str]] = frozenset(METRIC_KINDS)
HISTOGRAMS: Final[frozenset[str]] = frozenset(
    name for name, kind in METRIC_KINDS.items() if kind == "histogram"
)
COUNTERS: Final[frozenset[str]] = frozenset(
    name for name, kind in METRIC_KINDS.items() if kind == "counter"
)
GAUGES: Final[frozenset[str]] = frozenset(
    name for name, kind in METRIC_KINDS.items() if kind == "gauge"
)

HISTOGRAM_SUFFIXES: Final = ("_bucket", "_sum", "_count")


def base_name(sample: str) -> str:
    """The EXPORTED_METRICS entry an exposed sample (or PromQL series) name belongs to.

    `router_request_duration_seconds_bucket` -> `router_request_duration_seconds`;
    prometheus_client's `<counter>_created` -> `<counter>_total`, `<histogram>_created`
    -> `<histogram>`. Anything else is returned unchanged (and is either in the set or
    not exported).
    """
    for suffix in (*HISTOGRAM_SUFFIXES, "_created"):
        if sample.endswith(suffix):
            stem = sample[: -len(suffix)]
            if stem in HISTOGRAMS:
                return stem
            if suffix == "_created" and f"{stem}_total" in COUNTERS:
                return f"{stem}_total"
    return sample
