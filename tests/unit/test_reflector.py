"""The reflector's retry policy, without a server: backoff bounds, Retry-After, reset, and one
log line per run of errors. (Its behaviour against a real HTTP API server is in
integration/tests/test_kubernetes_source.py.)"""

from __future__ import annotations

import logging
import random
import threading
from typing import Any

import pytest

from kmesh_plugin.sources.kubeapi import ApiError
from kmesh_plugin.sources.reflector import Backoff, Reflector, Update
from kmesh_plugin.sources.resources import WATCHED


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_backoff_doubles_from_0_8_to_30_seconds_with_bounded_jitter() -> None:
    for seed in range(50):
        backoff = Backoff(rng=random.Random(seed), clock=Clock())
        delays = [backoff.next() for _ in range(12)]
        bases = [min(30.0, 0.8 * 2**i) for i in range(12)]
        for delay, base in zip(delays, bases, strict=True):
            assert base <= delay <= min(30.0, base * 1.25), (seed, delays)
        assert delays[0] < 1.0 and delays[-1] == pytest.approx(30.0, abs=1e-9)


def test_backoff_starts_over_after_a_healthy_stretch() -> None:
    clock = Clock()
    backoff = Backoff(rng=random.Random(1), clock=clock)
    for _ in range(6):
        clock.now += 1
        backoff.next()
    clock.now += 1
    assert backoff.next() > 25  # still escalated: failures kept coming
    clock.now += backoff.reset_after + 1
    assert backoff.next() < 1.0  # no failure for a while: from the start again


def test_backoff_honours_retry_after_within_reason() -> None:
    backoff = Backoff(rng=random.Random(2), clock=Clock())
    assert backoff.next(retry_after=7.0) >= 7.0
    assert backoff.next(retry_after=3600.0) <= 2 * backoff.cap


class FailingTransport:
    """Answers every list with the errors given, in turn, then stops the reflector."""

    def __init__(self, errors: list[ApiError], stop: threading.Event) -> None:
        self.errors = list(errors)
        self.stop = stop
        self.calls = 0

    def get(self, path: str, query: dict[str, str], **_: Any) -> Any:
        self.calls += 1
        if not self.errors:
            self.stop.set()
            raise ApiError("list", 0, "stopped")
        raise self.errors.pop(0)

    def stream(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("no watch before a successful list")


def test_a_run_of_errors_is_logged_once_per_reason_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stop = threading.Event()
    refused = ApiError("list nodes", 0, "connection refused", "[Errno 111]")
    busy = ApiError("list nodes", 429, "TooManyRequests", "slow down", retry_after=0.0)
    transport = FailingTransport([refused] * 5 + [busy] * 3 + [refused], stop)
    waits: list[float] = []

    class NoWaitStop(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            waits.append(timeout or 0.0)
            return stop.is_set()

        def is_set(self) -> bool:
            return stop.is_set()

    updates: list[Update] = []
    reflector = Reflector(WATCHED[0], transport, updates.append, stop=NoWaitStop(),
                          backoff=Backoff(rng=random.Random(3), clock=Clock()))
    with caplog.at_level(logging.DEBUG, logger="kmesh_plugin.sources.reflector"):
        reflector.run()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # One line per change of reason, not one per failed request.
    assert len(warnings) == 3, warnings
    assert "connection refused" in warnings[0] and "TooManyRequests" in warnings[1]
    assert reflector.stats.errors == {"connection refused": 6, "TooManyRequests": 3}
    assert reflector.stats.failing_since is not None
    assert updates == []  # nothing reached the agent: its maps keep their last good state
    assert len(waits) == 9 and all(0.8 <= w <= 30 for w in waits), waits
    assert waits == sorted(waits)  # exponential within one streak (fixed clock: no reset)
