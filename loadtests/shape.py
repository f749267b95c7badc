"""The day's shape: a diurnal request rate, compressed into a chosen duration.

Pure functions, no locust import (importing locust monkey-patches the process with gevent,
which a pytest run or the harness must not suffer); `locustfile.py` wraps them in a
`LoadTestShape` when the harness asks for the day (env LOADTEST_DAY_SECONDS).

    target_rate(t, duration, scale)   requests/s the generator must send at run time t
    expected_requests(duration, scale)  the integral over the whole run

The real day: 19,000,000 requests / 86,400 s = 219.9 requests/s on average, with a
business-hours peak. HOURLY below is the relative load at each hour (UTC of the compressed
day; linear between hours), normalised so that its mean is exactly 1: the rate is
MEAN_RATE * scale * profile(hour). The peak (14:00) is 3.2x the mean.
"""

from __future__ import annotations

import math

DAY_REQUESTS = 19_000_000
DAY_SECONDS = 86_400
MEAN_RATE = DAY_REQUESTS / DAY_SECONDS  # 219.9 requests/s

# Relative load at hours 0..24 (24 == 0): a quiet night, a morning ramp, a business-hours
# plateau with a lunch dip and an afternoon peak, an evening tail.
_RAW = (
    0.12, 0.09, 0.07, 0.07, 0.08, 0.12, 0.22, 0.45, 0.95, 1.70, 2.30, 2.50, 2.20,
    2.40, 3.30, 2.70, 1.90, 1.20, 0.70, 0.45, 0.32, 0.24, 0.18, 0.14, 0.12,
)  # fmt: skip


def _raw(hour: float) -> float:
    hour %= 24.0
    i = int(hour)
    frac = hour - i
    return _RAW[i] + (_RAW[i + 1] - _RAW[i]) * frac


# Mean of the piecewise-linear profile over the day (trapezoids, exact).
_RAW_MEAN = sum((_RAW[i] + _RAW[i + 1]) / 2 for i in range(24)) / 24


def profile(hour: float) -> float:
    """Relative load at `hour` (0-24) of the day; its mean over the day is 1."""
    return _raw(hour) / _RAW_MEAN


PEAK_FACTOR = max(profile(h / 10) for h in range(240))


def target_rate(t: float, duration: float, scale: float = 1.0) -> float:
    """Requests/s to send at `t` seconds into a run that replays the day in `duration` s."""
    if duration <= 0:
        raise ValueError("duration must be positive")
    hour = 24.0 * min(max(t, 0.0), duration) / duration
    return MEAN_RATE * scale * profile(hour)


def expected_requests(duration: float, scale: float = 1.0, until: float | None = None) -> float:
    """Requests the shape asks for from 0 to `until` (default: the whole run)."""
    end = duration if until is None else min(max(until, 0.0), duration)
    steps = max(1, math.ceil(end * 10))
    dt = end / steps
    return sum(target_rate((i + 0.5) * dt, duration, scale) for i in range(steps)) * dt


def mean_rate(scale: float = 1.0) -> float:
    return MEAN_RATE * scale


def peak_rate(scale: float = 1.0) -> float:
    return MEAN_RATE * scale * PEAK_FACTOR


def users_for(rate: float) -> int:
    """Locust users to keep: the pacer hands out send slots at the target rate, so users
    only need to cover the requests in flight (rate x latency, with slow streams of a few
    seconds among them) with a wide margin."""
    return 30 + math.ceil(rate * 0.15)
