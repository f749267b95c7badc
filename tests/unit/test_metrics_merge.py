"""Metrics arithmetic without a router (router/proxy/metrics.py): histogram buckets are
Prometheus `le` bounds, and merging workers' figures sums counters and histograms and takes
the lowest readiness.
"""

from __future__ import annotations

from router.proxy.metrics import LATENCY_BUCKETS, Histogram, merge


def test_histogram_buckets_are_le_bounds() -> None:
    histogram = Histogram(LATENCY_BUCKETS)
    for value in (0.0005, 0.0004, 0.0006, 100.0):
        histogram.observe(value)
    # 0.0005 and 0.0004 are <= the first bound; 0.0006 in the second; 100 s in +Inf.
    assert histogram.counts[0] == 2
    assert histogram.counts[1] == 1
    assert histogram.counts[-1] == 1
    assert histogram.sum == 0.0005 + 0.0004 + 0.0006 + 100.0


def test_merge_sums_counters_and_histograms_and_takes_min_readiness() -> None:
    a = {
        "counters": {"router_requests_total": [[["legacy", "GET", "200"], 3]]},
        "gauges": {
            "router_flag_source_ready": [[[], 1]],
            "router_inflight_requests": [[["new"], 2]],
        },
        "histograms": {"router_request_duration_seconds": [[["legacy"], [1, 2, 0], 0.5]]},
    }
    b = {
        "counters": {
            "router_requests_total": [[["legacy", "GET", "200"], 4], [["new", "GET", "500"], 1]]
        },
        "gauges": {
            "router_flag_source_ready": [[[], 0]],
            "router_inflight_requests": [[["new"], 5]],
        },
        "histograms": {"router_request_duration_seconds": [[["legacy"], [0, 1, 1], 2.0]]},
    }
    merged = merge([a, b])
    counters = {tuple(k): v for k, v in merged["counters"]["router_requests_total"]}
    assert counters == {("legacy", "GET", "200"): 7, ("new", "GET", "500"): 1}
    assert merged["gauges"]["router_flag_source_ready"] == [[[], 0]]
    assert merged["gauges"]["router_inflight_requests"] == [[["new"], 7]]
    assert merged["histograms"]["router_request_duration_seconds"] == [[["legacy"], [1, 3, 1], 2.5]]
