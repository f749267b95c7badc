"""A verifier of signed test routing (router/control/override.py) on a clock the test
sets, with the secret and window the override tests sign with."""

from __future__ import annotations

from router.control.override import OverrideVerifier

SECRET = "test-secret"
NOW = 1_700_000_000
WINDOW = 300.0


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def verifier(secret: str | None = SECRET, now: float = NOW) -> OverrideVerifier:
    return OverrideVerifier(secret, WINDOW, clock=Clock(now))
