"""The load test's chart (PNG, matplotlib Agg): read at a glance.

Top: requests/s per side (legacy, new) and the shape's target, in bins over the run; the
sum of the two sides should follow the target line. Middle: p99 latency per side per bin
(ms, log scale; slow streams, 1-3 s by design, left out). Bottom: failed requests per bin
(should be a flat zero; injected faults drawn separately). Cutovers: a thin grey line per
one-at-a-time cutover (at its finish) and a shaded band per `router migrate` wave (first
began to last finished), on every panel.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from verdict import Cutover, percentile


def draw(
    path: Path,
    client: Sequence[Mapping[str, Any]],
    cutovers: Sequence[Cutover],
    *,
    t0: float,
    duration: float,
    target: Callable[[float], float],
    title: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(1.0, duration / 120)  # ~120 bins whatever the duration
    bins = math.ceil(duration / width) + 1
    counts: dict[str, list[int]] = {"legacy": [0] * bins, "new": [0] * bins}
    lat: dict[str, list[list[float]]] = {s: [[] for _ in range(bins)] for s in counts}
    failed = [0] * bins
    faults = [0] * bins
    for r in client:
        if "seq" not in r:
            continue
        i = int((float(r["t"]) - t0) // width)
        if not 0 <= i < bins:
            continue
        side = r.get("side")
        if r.get("fault"):
            faults[i] += 1
        elif not r.get("ok"):
            failed[i] += 1
        elif side in counts:
            counts[side][i] += 1
            if r.get("kind") != "stream":  # 1-3 s by design: not the p99 we watch
                lat[side][i].append(float(r["ms"]))
    xs = [(i + 0.5) * width for i in range(bins)]
    fig, (ax1, ax2, ax3) = plt.subplots(
        3, 1, figsize=(13, 9), sharex=True, gridspec_kw={"height_ratios": [3, 2, 1]}
    )
    colours = {"legacy": "tab:blue", "new": "tab:orange"}
    for side, values in counts.items():
        ax1.plot(xs, [v / width for v in values], label=f"{side} requests/s", color=colours[side])
    total = [(a + b) / width for a, b in zip(counts["legacy"], counts["new"], strict=True)]
    ax1.plot(xs, total, label="both sides", color="tab:green", linewidth=0.8)
    fine = [duration * i / 400 for i in range(401)]
    ax1.plot(fine, [target(t) for t in fine], "k--", linewidth=1, label="target (shape)")
    ax1.set_ylabel("requests/s")
    ax1.legend(loc="upper left", fontsize=8)
    for side, per_bin in lat.items():
        p99 = [percentile(v, 99) if len(v) >= 5 else None for v in per_bin]
        ax2.plot(
            [x for x, p in zip(xs, p99, strict=True) if p is not None],
            [p for p in p99 if p is not None],
            label=f"{side} p99",
            color=colours[side],
        )
    ax2.set_yscale("log")
    ax2.set_ylabel("p99 ms (log)")
    ax2.legend(loc="upper left", fontsize=8)
    ax3.bar(xs, failed, width=width, color="tab:red", label="failed")
    ax3.bar(xs, faults, width=width, bottom=failed, color="tab:gray", label="injected faults")
    ax3.set_ylabel("failures / bin")
    ax3.set_xlabel(f"seconds into the run (bins of {width:.0f} s; the day compressed)")
    ax3.legend(loc="upper left", fontsize=8)
    waves: dict[str, list[float]] = defaultdict(list)
    for cut in cutovers:
        if cut.via == "cutover":
            if cut.finished is not None:
                for ax in (ax1, ax2, ax3):
                    ax.axvline(cut.finished - t0, color="grey", linewidth=0.6, alpha=0.7)
        else:
            waves[cut.via] += [x for x in (cut.began, cut.finished) if x is not None]
    for name, times in waves.items():
        if times:
            for ax in (ax1, ax2, ax3):
                ax.axvspan(min(times) - t0, max(times) - t0, color="violet", alpha=0.18)
            ax1.annotate(
                name, (min(times) - t0, ax1.get_ylim()[1] * 0.95), fontsize=7, color="purple"
            )
    ax1.set_title(title, fontsize=10)
    ax1.set_xlim(0, duration)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
