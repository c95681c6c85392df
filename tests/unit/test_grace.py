"""GracePeriods against fake barriers: errors are retried with a bounded backoff and never
stick, and a slow grace period is a delay the caller is told about, never an exception.

The real barrier under the real writer is tested in tests/kernel/test_writer_faults.py.
"""

from __future__ import annotations

import errno
import logging
import threading
import time

import pytest

from kmesh_plugin.datapath.grace import GracePeriods
from kmesh_plugin.errors import BpfError

DEADLINE = 10.0


class FlakyBarrier:
    """Fails the calls whose numbers (1-based) are in ``failing``; counts every call."""

    def __init__(self, failing: set[int] | None = None, fail_always: bool = False) -> None:
        self.failing = failing or set()
        self.fail_always = fail_always
        self.calls = 0
        self.called = threading.Condition()

    def wait(self) -> float:
        with self.called:
            self.calls += 1
            n = self.calls
            self.called.notify_all()
        if self.fail_always or n in self.failing:
            raise BpfError(errno.EIO, "MAP_UPDATE_ELEM", f"kmesh_barrier (call {n})")
        return 0.0

    def wait_calls(self, n: int) -> None:
        with self.called:
            assert self.called.wait_for(lambda: self.calls >= n, DEADLINE), self.calls


class GatedBarrier:
    """Blocks every wait until the gate opens: a grace period that takes as long as we like."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.calls = 0

    def wait(self) -> float:
        self.calls += 1
        assert self.gate.wait(DEADLINE), "the test never opened the gate"
        return 0.0


def test_a_barrier_error_is_retried_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    barrier = FlakyBarrier(failing={1, 2, 3})
    grace = GracePeriods(barrier)  # type: ignore[arg-type]
    try:
        with caplog.at_level(logging.DEBUG, logger="kmesh_plugin.datapath.grace"):
            assert grace.wait_for(1, timeout=DEADLINE) is True
        assert grace.completed >= 1
        assert barrier.calls == 4  # three failures, then the one that worked
        failures = [r for r in caplog.records
                    if r.levelno >= logging.WARNING and "barrier" in r.getMessage()]
        assert len(failures) == 1, [r.getMessage() for r in failures]
        assert "EIO" in failures[0].getMessage()
    finally:
        grace.close()


def test_one_error_never_sticks_to_later_grace_periods() -> None:
    barrier = FlakyBarrier(failing={2})
    grace = GracePeriods(barrier)  # type: ignore[arg-type]
    try:
        grace.wait_for(1, timeout=DEADLINE)
        grace.wait_for(2, timeout=DEADLINE)  # its first barrier fails, the retry works
        grace.wait_for(3, timeout=DEADLINE)  # was: the error of barrier 2, forever
        assert grace.completed == 3
        assert grace.errors == 1
        assert grace.failing is None  # the streak is over
    finally:
        grace.close()


def test_a_failing_barrier_is_retried_with_a_bounded_backoff() -> None:
    barrier = FlakyBarrier(fail_always=True)
    grace = GracePeriods(barrier, retry_min=0.001, retry_max=0.01)  # type: ignore[arg-type]
    try:
        grace.request(1)
        # Doubling from 1 ms and capped at 10 ms: 30 tries take well under a second. Without
        # the cap they would take 2**30 ms; without retries there would be one.
        barrier.wait_calls(30)
        assert grace.completed == 0
        assert grace.wait_for(1, timeout=0.01) is False
        assert grace.failing is not None and "EIO" in grace.failing
        barrier.fail_always = False
        assert grace.wait_for(1, timeout=DEADLINE) is True
        assert grace.failing is None
    finally:
        grace.close()


def test_close_interrupts_the_backoff() -> None:
    barrier = FlakyBarrier(fail_always=True)
    grace = GracePeriods(barrier, retry_min=30.0, retry_max=30.0)  # type: ignore[arg-type]
    grace.request(1)
    barrier.wait_calls(1)
    started = time.monotonic()
    grace.close()
    assert time.monotonic() - started < 5.0


def test_a_slow_grace_period_is_a_delay_not_an_exception() -> None:
    barrier = GatedBarrier()
    grace = GracePeriods(barrier)  # type: ignore[arg-type]
    try:
        # Was: TimeoutError after 10 s, which nothing caught and the agent died of.
        assert grace.wait_for(1, timeout=0.05) is False
        assert grace.completed == 0
        barrier.gate.set()
        assert grace.wait_for(1, timeout=DEADLINE) is True
    finally:
        barrier.gate.set()
        grace.close()


def test_close_does_not_hang_on_a_barrier_that_never_returns() -> None:
    barrier = GatedBarrier()
    grace = GracePeriods(barrier)  # type: ignore[arg-type]
    grace.request(1)
    started = time.monotonic()
    grace.close(timeout=0.1)
    assert time.monotonic() - started < 5.0
    barrier.gate.set()  # let the daemon thread finish
