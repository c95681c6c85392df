"""RCU grace periods, waited for in a background thread.

A grace period (``Barrier.wait``) costs about 8 ms here. The writer needs one after each
publish before it may reuse or delete the sets it switched away from, but nobody should wait
for it on the update path: a background thread runs the barrier whenever one is requested, and
the writer later collects what has become safe, or blocks only when it must reuse a set early.

Retirements are numbered. ``request(n)`` asks for a grace period that starts after retirement
``n`` was made; ``completed`` is the highest number known to be safe.

Nothing here fails for good. A barrier that raises is retried with a bounded exponential
backoff (the first error of a streak is logged, and the end of the streak); a later grace
period never inherits an earlier error. A grace period that takes long is only a delay:
``wait_for`` returns False when its timeout passes, and the caller reclaims later (the
retired sets stay in the maps, unused, until then).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

log = logging.getLogger(__name__)

RETRY_MIN = 0.01  # seconds before the first retry of a failed barrier
RETRY_MAX = 2.0  # the backoff doubles up to this


class BarrierLike(Protocol):
    def wait(self) -> float: ...


class GracePeriods:
    def __init__(self, barrier: BarrierLike, *, retry_min: float = RETRY_MIN,
                 retry_max: float = RETRY_MAX) -> None:
        self._barrier = barrier
        self._cond = threading.Condition()
        self._requested = 0
        self._completed = 0
        self._closing = False
        self._thread: threading.Thread | None = None
        self._retry_min = retry_min
        self._retry_max = retry_max
        self.waits = 0  # barriers run, for stats
        self.errors = 0  # barriers that failed (each was retried)
        self.failing: str | None = None  # the error of the current streak of failures
        self.failing_since: float | None = None
        self._streak = 0

    @property
    def completed(self) -> int:
        with self._cond:
            return self._completed

    @property
    def requested(self) -> int:
        with self._cond:
            return self._requested

    def request(self, seq: int) -> None:
        with self._cond:
            if self._closing:
                return
            if seq > self._requested:
                self._requested = seq
            if self._requested <= self._completed:
                return
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="kmesh-grace", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def wait_for(self, seq: int, timeout: float | None = 10.0) -> bool:
        """Block until retirement ``seq`` is safe (its grace period has passed), for at most
        ``timeout`` seconds. True when it is; False when the time ran out (or we are closing):
        a slow grace period is a delay, never an error."""
        self.request(seq)
        with self._cond:
            return self._cond.wait_for(
                lambda: self._completed >= seq or self._closing, timeout
            ) and self._completed >= seq

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop the thread. A barrier stuck in the kernel is not waited for past ``timeout``
        (the thread is a daemon and exits once the barrier returns)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("a grace period barrier is still running after %s s; not waiting "
                            "for it", timeout)
            self._thread = None

    def status(self) -> dict[str, object]:
        with self._cond:
            return {"requested": self._requested, "completed": self._completed,
                    "waits": self.waits, "errors": self.errors, "failing": self.failing,
                    "failing_since": self.failing_since}

    def _run(self) -> None:
        delay = self._retry_min
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closing or self._requested > self._completed)
                if self._closing:
                    return
                # Every retirement numbered up to here was made before this barrier starts.
                target = self._requested
            try:
                self._barrier.wait()
            except Exception as e:  # retried: nothing may end this thread
                with self._cond:
                    self.errors += 1
                    self._streak += 1
                    first = self.failing is None
                    self.failing = f"{type(e).__name__}: {e}"
                    if first:
                        self.failing_since = time.time()
                if first:
                    log.warning("RCU grace period barrier failed, retrying with backoff (up to "
                                "%.1f s apart); retired sets are reclaimed once it works: %s",
                                self._retry_max, e)
                else:
                    log.debug("RCU grace period barrier failed again: %s", e)
                with self._cond:
                    self._cond.wait_for(lambda: self._closing, delay)
                delay = min(delay * 2, self._retry_max)
                continue
            delay = self._retry_min
            with self._cond:
                if self.failing is not None:
                    log.info("RCU grace period barrier works again after %d failures",
                             self._streak)
                self._streak = 0
                self.failing = None
                self.failing_since = None
                self._completed = max(self._completed, target)
                self.waits += 1
                self._cond.notify_all()
