"""The load test's verdict: pure functions over the recordings, unit-tested on their own.

Inputs (all times are `time.time()` epoch seconds of this machine: the load generator,
the backends and the cutover tools run on the same clock, so they compare directly; on a
deployed router, run the harness on a host whose clock is NTP-synced with the backends'):

* client records: the locustfile's client log (one per request: t, seq, tenant, side,
  status, ms, ok, fault, error), and its `{"event": "start"}` line;
* backend records: each recording backend's lines (ts, side, tenant, seq, status, fault);
* cutovers: per moved tenant, when its cutover began (hold written) and finished (new
  written), from `router cutover --json` steps or `router migrate`'s journal;
* initial: tenants that were on `new` before the run (every other tenant starts on legacy);
* the target: requests the shape asked for over the run.

`judge()` returns {"ok", "failures": [messages naming the tenant or the figure], "figures"}.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RATE_TOLERANCE = 0.05
MAX_EXAMPLES = 10


@dataclass
class Cutover:
    tenant: str
    via: str  # "cutover" (one at a time) or "migrate:<wave>"
    ok: bool
    outcome: str
    began: float | None  # hold written
    finished: float | None  # new written

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ---- reading ------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if not Path(path).exists():
        return out
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by a killed writer
    return out


def cutover_from_json(doc: Mapping[str, Any], via: str = "cutover") -> Cutover:
    """From `router cutover TENANT --json`: began = the hold step's end (hold written),
    finished = the new step's end (new written)."""
    steps = {s["name"]: s for s in doc.get("steps", [])}
    result = doc.get("result", {})
    hold, new = steps.get("hold"), steps.get("new")
    return Cutover(
        tenant=str(doc.get("tenant")),
        via=via,
        ok=bool(result.get("ok")) and result.get("outcome") == "moved",
        outcome=str(result.get("outcome")),
        began=float(hold["ended_at"]) if hold and hold.get("ok") else None,
        finished=float(new["ended_at"]) if new and new.get("ok") else None,
    )


def cutovers_from_journal(records: Iterable[Mapping[str, Any]], via: str) -> list[Cutover]:
    """From a `router migrate` journal: began = ts of the `flag hold` event, finished = ts
    of the `flag new` event (both written right after the flag write succeeded)."""
    found: dict[str, Cutover] = {}
    for record in records:
        tenant = record.get("tenant")
        if not tenant:
            continue
        cut = found.setdefault(tenant, Cutover(str(tenant), via, False, "unfinished", None, None))
        event = record.get("event")
        if event == "flag" and record.get("value") == "hold":
            cut.began = float(record["ts"])
        elif event == "flag" and record.get("value") == "new":
            cut.finished = float(record["ts"])
        elif event == "done":
            cut.outcome = str(record.get("outcome"))
            cut.ok = cut.outcome == "moved"
        elif event == "failed":
            cut.outcome = str(record.get("outcome"))
            cut.ok = False
    return list(found.values())


# ---- figures ------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0-100) of unsorted values; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _fmt_t(ts: float, t0: float | None) -> str:
    return f"t+{ts - t0:.3f}s" if t0 is not None else f"{ts:.6f}"


# ---- the verdict ----------------------------------------------------------------------------


def judge(
    client: Sequence[Mapping[str, Any]],
    backend: Sequence[Mapping[str, Any]],
    cutovers: Sequence[Cutover],
    *,
    expected_requests: float,
    duration: float,
    initial_new: Iterable[str] = (),
    rate_tolerance: float = RATE_TOLERANCE,
) -> dict[str, Any]:
    failures: list[str] = []
    starts = [r for r in client if r.get("event") == "start"]
    t0 = float(starts[0]["t"]) if starts else None
    requests = [r for r in client if "seq" in r]

    # 1. Failed requests (injected faults excepted).
    failed = [r for r in requests if not r.get("ok") and not r.get("fault")]
    faults = [r for r in requests if r.get("fault")]
    if failed:
        examples = "; ".join(
            f"{r.get('tenant')} seq {r.get('seq')}: {r.get('error')}" for r in failed[:5]
        )
        failures.append(f"{len(failed)} failed requests (not injected), e.g. {examples}")

    # 2. Every cutover must have moved its tenant.
    failures.extend(
        f"cutover of tenant {cut.tenant} ({cut.via}) ended {cut.outcome}"
        for cut in cutovers
        if not cut.ok
    )

    # Shadow copies (router/proxy/shadow.py) are the router's own requests, not clients': they
    # are judged apart. Only safe methods may ever be copied, and only to new (or replayed
    # to legacy by the noise filter).
    copies = [r for r in backend if r.get("shadow")]
    backend = [r for r in backend if not r.get("shadow")]
    unsafe = [r for r in copies if r.get("method") not in ("GET", "HEAD")]
    if unsafe:
        r = unsafe[0]
        failures.append(
            f"{len(unsafe)} shadow copies of unsafe requests, e.g. {r.get('method')} "
            f"{r.get('path')} for tenant {r.get('tenant')} on {r.get('side')}"
        )
    misplaced = [
        r
        for r in copies
        if (r.get("shadow"), r.get("side")) not in (("new", "new"), ("legacy-replay", "legacy"))
    ]
    if misplaced:
        r = misplaced[0]
        failures.append(
            f"{len(misplaced)} shadow copies on the wrong side, e.g. {r.get('shadow')!r} "
            f"recorded by {r.get('side')}"
        )

    # 3. Each backend request on the side its tenant was on at that moment.
    moved = {c.tenant: c for c in cutovers if c.ok}
    start_new = set(initial_new)
    wrong: dict[str, list[str]] = defaultdict(list)
    for rec in backend:
        tenant = str(rec.get("tenant", ""))
        side = rec.get("side")
        ts = float(rec["ts"])
        cut = moved.get(tenant)
        if cut is not None:
            if side == "legacy" and cut.finished is not None and ts > cut.finished:
                wrong[tenant].append(
                    f"served by legacy at {_fmt_t(ts, t0)} (seq {rec.get('seq')}), after its "
                    f"cutover finished at {_fmt_t(cut.finished, t0)}"
                )
            elif side == "new" and (cut.began is None or ts < cut.began):
                began = _fmt_t(cut.began, t0) if cut.began is not None else "never"
                wrong[tenant].append(
                    f"served by new at {_fmt_t(ts, t0)} (seq {rec.get('seq')}), before its "
                    f"cutover began at {began}"
                )
        elif tenant:
            expected = "new" if tenant in start_new else "legacy"
            if side != expected:
                wrong[tenant].append(
                    f"served by {side} at {_fmt_t(ts, t0)} (seq {rec.get('seq')}) but it "
                    f"was never moved and lives on {expected}"
                )
    for tenant, problems in list(wrong.items())[:MAX_EXAMPLES]:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        failures.append(f"wrong side: tenant {tenant} {problems[0]}{more}")
    if len(wrong) > MAX_EXAMPLES:
        failures.append(f"wrong side: {len(wrong) - MAX_EXAMPLES} more tenants")

    # 4. No request recorded on both sides (or twice on one).
    seen: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for rec in backend:
        if rec.get("seq"):
            seen[str(rec["seq"])].append(rec)
    both = [(seq, recs) for seq, recs in seen.items() if len({r["side"] for r in recs}) > 1]
    twice = [(seq, recs) for seq, recs in seen.items() if len(recs) > 1]
    for seq, recs in both[:MAX_EXAMPLES]:
        failures.append(
            f"request on both sides: tenant {recs[0].get('tenant')} seq {seq} recorded by "
            + " and ".join(f"{r['side']} at {_fmt_t(float(r['ts']), t0)}" for r in recs)
        )
    if len(both) > MAX_EXAMPLES:
        failures.append(f"{len(both) - MAX_EXAMPLES} more requests on both sides")
    dup_one_side = [x for x in twice if len({r["side"] for r in x[1]}) == 1]
    if dup_one_side:
        seq, recs = dup_one_side[0]
        failures.append(
            f"{len(dup_one_side)} requests recorded twice by one side, e.g. tenant "
            f"{recs[0].get('tenant')} seq {seq} on {recs[0]['side']}"
        )

    # 5. Every answered request was recorded by a backend.
    lost = [r for r in requests if r.get("ok") and str(r["seq"]) not in seen]
    if lost:
        failures.append(
            f"{len(lost)} requests answered OK but recorded by no backend, e.g. tenant "
            f"{lost[0].get('tenant')} seq {lost[0]['seq']}"
        )

    # 6. The rate.
    achieved_rps = len(requests) / duration if duration > 0 else 0.0
    target_rps = expected_requests / duration if duration > 0 else 0.0
    ratio = len(requests) / expected_requests if expected_requests > 0 else 0.0
    if abs(ratio - 1.0) > rate_tolerance:
        failures.append(
            f"rate: achieved {achieved_rps:.1f} requests/s ({len(requests)} requests) is "
            f"{ratio * 100:.1f} % of the target {target_rps:.1f} requests/s "
            f"({expected_requests:.0f} requests); allowed {100 - rate_tolerance * 100:.0f}-"
            f"{100 + rate_tolerance * 100:.0f} %"
        )

    # Figures.
    # Latency per side over the OK requests, slow streams excepted (they last 1-3 s by
    # design and would be the p99 on their own).
    by_side: dict[str, list[float]] = defaultdict(list)
    for r in requests:
        if r.get("ok") and r.get("side") and r.get("kind") != "stream":
            by_side[str(r["side"])].append(float(r["ms"]))
    latency = {
        side: {
            "requests": len(values),
            "p50_ms": _round(percentile(values, 50)),
            "p99_ms": _round(percentile(values, 99)),
            "max_ms": _round(max(values) if values else None),
        }
        for side, values in sorted(by_side.items())
    }
    backend_sides: dict[str, int] = defaultdict(int)
    for rec in backend:
        backend_sides[str(rec.get("side"))] += 1
    moved_tenants = sorted(moved)
    busy = [t for t in moved_tenants if t in {"tenant-0000", "tenant-0001", "tenant-0002"}]
    figures = {
        "duration_s": duration,
        "requests_sent": len(requests),
        "requests_target": round(expected_requests),
        "achieved_rps": round(achieved_rps, 1),
        "target_rps": round(target_rps, 1),
        "rate_ratio": round(ratio, 4),
        "failed_requests": len(failed),
        "injected_faults": len(faults),
        "backend_requests": dict(backend_sides),
        "latency": latency,
        "cutovers": len(cutovers),
        "cutovers_ok": len(moved),
        "cutovers_one_at_a_time": sum(1 for c in cutovers if c.via == "cutover"),
        "cutovers_in_waves": sum(1 for c in cutovers if c.via != "cutover"),
        "busiest_tenants_moved": busy,
        "wrong_side_tenants": len(wrong),
        "requests_on_both_sides": len(both),
        "answered_but_unrecorded": len(lost),
        "shadow_copies": len(copies),
        "shadow_copies_unsafe": len(unsafe),
    }
    return {"ok": not failures, "failures": failures, "figures": figures}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
