"""The load test's verdict (loadtests/verdict.py) and day shape (loadtests/shape.py).

The verdict must be able to fail: recordings with a request served by the wrong side, a
request recorded on both sides, or a rate shortfall each fail it with a message naming the
tenant or the figure; clean recordings pass.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest

from tests.support.paths import REPO

LOADTESTS = REPO / "loadtests"
sys.path.insert(0, str(LOADTESTS))

import shape  # noqa: E402
import verdict  # noqa: E402
from verdict import Cutover  # noqa: E402

T0 = 1_800_000_000.0
DURATION = 10.0


def _client(n: int, t0: float = T0, duration: float = DURATION) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"event": "start", "t": t0, "duration": duration}]
    out.extend(
        {
            "t": t0 + duration * i / n,
            "seq": f"r-{i}",
            "tenant": f"tenant-{i % 4:04d}",
            "kind": "get",
            "side": "legacy",
            "status": 200,
            "ms": 1.0 + i % 10,
            "ok": True,
            "fault": False,
            "error": "",
        }
        for i in range(n)
    )
    return out


def _scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[Cutover]]:
    """100 requests over 10 s for 4 tenants; tenant-0001 moves between t+4 and t+5 s.
    Backend records say where each went: tenant-0001 on new from t+5 s."""
    client = _client(100)
    backend: list[dict[str, Any]] = []
    for rec in client[1:]:
        side = "new" if rec["tenant"] == "tenant-0001" and rec["t"] > T0 + 5.0 else "legacy"
        rec["side"] = side
        backend.append(
            {"ts": rec["t"] + 0.001, "side": side, "tenant": rec["tenant"], "seq": rec["seq"]}
        )
    cut = Cutover("tenant-0001", "cutover", True, "moved", T0 + 4.0, T0 + 5.0)
    return client, backend, [cut]


def _judge(client: Any, backend: Any, cutovers: Any, expected: float = 100) -> dict[str, Any]:
    return verdict.judge(client, backend, cutovers, expected_requests=expected, duration=DURATION)


def test_clean_recordings_pass() -> None:
    result = _judge(*_scenario())
    assert result["ok"], result["failures"]
    figures = result["figures"]
    assert figures["requests_sent"] == 100 and figures["rate_ratio"] == 1.0
    assert figures["latency"]["legacy"]["p50_ms"] is not None
    assert figures["latency"]["new"]["p99_ms"] is not None


def test_legacy_after_the_cutover_finished_fails_naming_the_tenant() -> None:
    client, backend, cutovers = _scenario()
    # A second router whose flag file lags: it still sends tenant-0001 to legacy at t+7 s.
    backend.append({"ts": T0 + 7.0, "side": "legacy", "tenant": "tenant-0001", "seq": "lag-1"})
    result = _judge(client, backend, cutovers)
    assert not result["ok"]
    [message] = [f for f in result["failures"] if "wrong side" in f]
    assert "tenant-0001" in message and "legacy" in message and "after" in message


def test_new_before_the_cutover_began_fails_naming_the_tenant() -> None:
    client, backend, cutovers = _scenario()
    backend.append({"ts": T0 + 1.0, "side": "new", "tenant": "tenant-0001", "seq": "early-1"})
    result = _judge(client, backend, cutovers)
    assert not result["ok"]
    assert any("tenant-0001" in f and "before" in f for f in result["failures"])


def test_a_tenant_never_moved_served_by_new_fails() -> None:
    client, backend, cutovers = _scenario()
    backend.append({"ts": T0 + 2.0, "side": "new", "tenant": "tenant-0003", "seq": "x-1"})
    result = _judge(client, backend, cutovers)
    assert any("tenant-0003" in f and "never moved" in f for f in result["failures"])


def test_a_request_recorded_on_both_sides_fails_naming_the_tenant() -> None:
    client, backend, cutovers = _scenario()
    # The request r-2 (tenant-0002, legacy) also landed on new: same sequence number.
    twin = next(r for r in backend if r["seq"] == "r-2")
    backend.append({**twin, "side": "new", "ts": twin["ts"] + 0.002})
    result = _judge(client, backend, cutovers)
    assert not result["ok"]
    [message] = [f for f in result["failures"] if "both sides" in f]
    assert "tenant-0002" in message and "r-2" in message
    assert result["figures"]["requests_on_both_sides"] == 1


def test_shadow_copies_are_judged_apart_and_only_safe_ones_pass() -> None:
    client, backend, cutovers = _scenario()
    # Copies of tenant-0002's (legacy) GETs on new, with the clients' sequence numbers,
    # and a noise-filter replay on legacy: not wrong-side, not "both sides".
    twin = next(r for r in backend if r["seq"] == "r-2")
    backend.append({**twin, "side": "new", "shadow": "new", "method": "GET"})
    backend.append({**twin, "side": "legacy", "shadow": "legacy-replay", "method": "GET"})
    result = _judge(client, backend, cutovers)
    assert result["ok"], result["failures"]
    assert result["figures"]["shadow_copies"] == 2
    # A copy of a write fails the verdict, as does a copy on the wrong side.
    backend.append({**twin, "side": "new", "shadow": "new", "method": "POST", "path": "/x"})
    backend.append({**twin, "side": "legacy", "shadow": "new", "method": "GET"})
    result = _judge(client, backend, cutovers)
    assert any("shadow copies of unsafe requests" in f and "POST /x" in f
               for f in result["failures"]), result["failures"]  # fmt: skip
    assert any("shadow copies on the wrong side" in f for f in result["failures"])
    assert result["figures"]["shadow_copies_unsafe"] == 1


def test_a_rate_shortfall_fails_naming_the_figures() -> None:
    client, backend, cutovers = _scenario()
    result = _judge(client, backend, cutovers, expected=120)  # sent 100 of 120: 83 %
    assert not result["ok"]
    [message] = [f for f in result["failures"] if f.startswith("rate")]
    assert "83.3 %" in message and "10.0 requests/s" in message and "12.0" in message


def test_a_rate_within_five_percent_passes() -> None:
    result = _judge(*_scenario(), expected=104)
    assert result["ok"], result["failures"]


def test_failed_requests_fail_but_injected_faults_do_not() -> None:
    client, backend, cutovers = _scenario()
    client[10].update(ok=False, fault=True, status=500, error="injected fault (status 500)")
    assert _judge(client, backend, cutovers)["ok"]
    client[20].update(ok=False, status=502, error="status 502")
    result = _judge(client, backend, cutovers)
    assert not result["ok"] and "1 failed requests" in result["failures"][0]
    assert client[20]["tenant"] in result["failures"][0]


def test_a_failed_cutover_fails_naming_the_tenant() -> None:
    client, backend, cutovers = _scenario()
    cutovers.append(Cutover("tenant-0003", "migrate:wave-1", False, "rolled-back", None, None))
    result = _judge(client, backend, cutovers)
    assert any("tenant-0003" in f and "rolled-back" in f for f in result["failures"])


def test_cutover_timeline_from_the_cli_json_and_the_journal() -> None:
    doc = {
        "tenant": "acme",
        "steps": [
            {"name": "preflight", "ok": True, "started_at": 1.0, "ended_at": 1.1},
            {"name": "hold", "ok": True, "started_at": 1.1, "ended_at": 1.2},
            {"name": "drain", "ok": True, "started_at": 1.2, "ended_at": 1.5},
            {"name": "new", "ok": True, "started_at": 1.5, "ended_at": 1.6},
            {"name": "verify", "ok": True, "started_at": 1.6, "ended_at": 1.8},
        ],
        "result": {"ok": True, "outcome": "moved"},
    }
    cut = verdict.cutover_from_json(doc)
    assert (cut.tenant, cut.ok, cut.began, cut.finished) == ("acme", True, 1.2, 1.6)
    journal = [
        {"ts": 0.5, "event": "run", "tenants": 2},
        {"ts": 1.0, "event": "started", "tenant": "a"},
        {"ts": 1.1, "event": "flag", "tenant": "a", "value": "hold"},
        {"ts": 1.4, "event": "flag", "tenant": "a", "value": "new"},
        {"ts": 1.5, "event": "done", "tenant": "a", "outcome": "moved"},
        {"ts": 1.0, "event": "started", "tenant": "b"},
        {"ts": 1.2, "event": "flag", "tenant": "b", "value": "hold"},
        {"ts": 1.3, "event": "failed", "tenant": "b", "outcome": "rolled-back"},
    ]
    cuts = {c.tenant: c for c in verdict.cutovers_from_journal(journal, "wave-1")}
    assert (cuts["a"].ok, cuts["a"].began, cuts["a"].finished) == (True, 1.1, 1.4)
    assert not cuts["b"].ok and cuts["b"].outcome == "rolled-back"


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_the_day_shape_meets_the_figures(scale: float) -> None:
    day = 600.0
    mean = shape.expected_requests(day, scale) / day
    assert mean == pytest.approx(19_000_000 / 86_400 * scale, rel=0.005)
    peak = max(shape.target_rate(t / 10, day, scale) for t in range(int(day * 10)))
    assert peak >= 3 * mean
    assert shape.peak_rate(scale) == pytest.approx(peak, rel=0.01)
    # Compressing the day differently keeps the mean.
    assert shape.expected_requests(60, scale) / 60 == pytest.approx(mean, rel=0.005)
