"""RCU grace periods, waited for in a background thread.

A grace period (``Barrier.wait``) costs about 8 ms here. The writer needs one after each
publish before it may reuse or delete the sets it switched away from, but nobody should wait
for it on the update path: a background thread runs the barrier whenever one is requested, and
the writer later collects what has become safe, or blocks only when it must reuse a set early.

Retirements are numbered. ``request(n)`` asks for a grace period that starts after retirement
``n`` was made; ``completed`` is the highest number known to be safe.
"""

from __future__ import annotations

import threading

from kmesh_plugin.datapath.syscall import Barrier


class GracePeriods:
    def __init__(self, barrier: Barrier) -> None:
        self._barrier = barrier
        self._cond = threading.Condition()
        self._requested = 0
        self._completed = 0
        self._error: BaseException | None = None
        self._closing = False
        self._thread: threading.Thread | None = None
        self.waits = 0  # barriers run, for stats

    @property
    def completed(self) -> int:
        with self._cond:
            return self._completed

    def request(self, seq: int) -> None:
        with self._cond:
            if seq <= self._requested:
                return
            self._requested = seq
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="kmesh-grace", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def wait_for(self, seq: int, timeout: float | None = 10.0) -> None:
        """Block until retirement ``seq`` is safe (its grace period has passed)."""
        self.request(seq)
        with self._cond:
            if not self._cond.wait_for(
                lambda: self._completed >= seq or self._error is not None, timeout
            ):
                raise TimeoutError(f"no RCU grace period within {timeout} s")
            if self._error is not None:
                raise self._error

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closing or self._requested > self._completed)
                if self._closing:
                    return
                # Every retirement numbered up to here was made before this barrier starts.
                target = self._requested
            try:
                self._barrier.wait()
            except BaseException as e:  # surfaced to the next wait_for()
                with self._cond:
                    self._error = e
                    self._cond.notify_all()
                return
            with self._cond:
                self._completed = target
                self.waits += 1
                self._cond.notify_all()
